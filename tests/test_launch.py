"""``python -m score_ray.launch``'s preflight, which refuses bad input (a config error, a missing model, a context or
KV cache too small, no chat template, malformed data) in seconds, before any actor starts."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import run_module


def test_launch_check_runs_the_preflight(tmp_path: Path):
    result = run_module("score_ray.launch", "--config", "configs/smoke.yaml", "--check", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "config and preflight OK" in result.stdout
    assert re.search(r"longest first-turn prompt \d+ tokens", result.stdout)


def test_launch_preflight_rejects_prompts_that_do_not_fit_the_budget():
    result = run_module(
        "score_ray.launch", "--config", "configs/smoke.yaml", "--check",
        "rollout.max_model_len=100", "rollout.max_tokens_turn1=40", "rollout.max_tokens_turn2=40", timeout=300,
    )
    assert result.returncode == 3
    assert "raise rollout.max_model_len" in result.stderr


def test_launch_rejects_a_missing_model_folder_before_starting_anything():
    result = run_module("score_ray.launch", "--config", "configs/smoke.yaml", "model.path=./no_such_model", timeout=300)
    assert result.returncode == 3
    assert "model.path './no_such_model' does not exist" in result.stderr


def test_kv_cache_size_per_token_by_hand():
    from types import SimpleNamespace

    from score_ray.launch import kv_bytes_per_token

    smollm2 = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert kv_bytes_per_token(smollm2, "float32") == 2 * 30 * 3 * 64 * 4 == 46080
    assert kv_bytes_per_token(smollm2, "bfloat16") == 23040


@pytest.mark.parametrize(
    "overrides, exit_code, message",
    [
        (["rollout.max_model_len=5000"], 3, "rollout.max_model_len=5000 exceeds the model's 4096 positions"),
        (["learner.zero_stage=4"], 2, "learner.zero_stage"),
        (["model.path=/nonexistent/model"], 3, "/nonexistent/model' does not exist"),
    ],
    ids=["context-beyond-the-model", "config-error", "missing-model"],
)
def test_the_launch_refuses_bad_input_within_seconds(overrides, exit_code, message):
    start = time.monotonic()
    result = run_module("score_ray.launch", "--check", "--config", "configs/smoke.yaml", *overrides, timeout=120)
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert message in result.stderr
    assert time.monotonic() - start < 60


def test_a_kv_cache_too_small_for_one_full_sequence_is_refused_before_any_engine(tmp_path):
    from score_ray.assets import ensure_tiny_model

    model = tmp_path / "deep"  # the check reads the config only: 1000 layers need 500 KiB of KV cache per token
    shutil.copytree(ensure_tiny_model(), model)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 1000
    (model / "config.json").write_text(json.dumps(config))
    result = run_module("score_ray.launch", "--check", "--config", "configs/smoke.yaml", f"model.path={model}",
                        "rollout.max_model_len=4096", timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "needs 1.95 GiB of KV cache but rollout.kv_cache_gib=1" in result.stderr


def test_a_tokenizer_without_a_chat_template_is_refused_before_any_actor(tmp_path):
    from score_ray.assets import ensure_tiny_model

    model = tmp_path / "no-template"
    shutil.copytree(ensure_tiny_model(), model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    result = run_module("score_ray.launch", "--check", "--config", "configs/smoke.yaml", f"model.path={model}", timeout=120)
    assert result.returncode == 3
    assert "has no chat template" in result.stderr


def test_a_data_file_of_malformed_rows_is_refused_naming_the_file(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "1+1"}\n{not json\n')
    result = run_module("score_ray.launch", "--check", "--config", "configs/smoke.yaml",
                        f"data.train={{type: file, path: {data}, preset: gsm8k}}", timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert str(data) in result.stderr and "answer" in result.stderr


def test_overrides_may_come_before_and_after_the_options():
    from score_ray.launch import parse_args

    args = parse_args(["a.b=1", "--config", "configs/smoke.yaml", "c.d=2"])
    assert args.config == "configs/smoke.yaml" and args.overrides == ["a.b=1", "c.d=2"]
