"""Fault handling that needs no actors: sampling seeds, the grading alarm, skipped-step accounting,
checkpoints cut short or torn, metric rows rolled back on resume, and bad input refused by the launch."""

import json
import shutil
import time
from pathlib import Path

import pytest

from conftest import run_module
from score_ray.trainer import (
    TrainerState,
    account_step,
    checkpoint_folders,
    grading_alarm,
    load_state,
    resumable_checkpoints,
    roll_back_metrics,
    sampling_seeds,
    save_checkpoint,
    verify_checkpoint,
)


def test_sampling_seeds_depend_on_seed_iteration_and_problem_only():
    problems = [{"id": f"p{i}"} for i in range(6)]
    seeds = sampling_seeds(0, 3, problems)
    assert seeds == sampling_seeds(0, 3, problems)  # a redone rollout samples the same
    assert len(set(seeds)) == 6 and all(0 <= s < 2**30 for s in seeds)
    assert seeds != sampling_seeds(0, 4, problems) and seeds != sampling_seeds(1, 3, problems)
    # how problems are dealt to generators does not matter: each problem keeps its seed
    assert seeds[1::2] == sampling_seeds(0, 3, problems)[1::2]


def graded(statuses):
    return [{"status": s, "reward": 1.0 if s == "correct" else 0.0, "detail": f"{s} detail"} for s in statuses]


def test_grading_alarm_fires_past_the_threshold_and_names_the_first_failure():
    assert grading_alarm([], 0.25) is None
    assert grading_alarm(graded(["correct", "wrong", "timeout", "wrong"]), 0.25) is None  # exactly 25%: quiet
    message = grading_alarm(graded(["correct", "timeout", "error", "wrong"]), 0.25)
    assert message.startswith("50% of 4 grades failed (timeout 1, error 1")
    assert "reward.alarm_fraction=0.25" in message and "error detail" in message


def test_skipped_steps_are_counted_and_the_limit_in_a_row_stops():
    state = TrainerState()
    assert account_step(state, applied=False, limit=2) is None
    assert account_step(state, applied=True, limit=2) is None  # an applied step resets the run of skips
    assert (state.skipped_steps, state.skipped_in_row) == (1, 0)
    assert account_step(state, applied=False, limit=2) is None
    message = account_step(state, applied=False, limit=2)
    assert (state.skipped_steps, state.skipped_in_row) == (3, 2)
    assert "2 optimiser steps in a row" in message and "learner.max_skipped_steps_in_row=2" in message


class FileWritingLearner:
    """Writes checkpoint files the way a DeepSpeed engine does (a folder of binary shards), optionally
    dying half-way: the subject here is the trainer's checkpoint protocol, not DeepSpeed."""

    def __init__(self, crash_after: int = -1):
        self.crash_after = crash_after

    def save_checkpoint(self, folder: str, tag: str) -> None:
        target = Path(folder) / tag
        target.mkdir(parents=True)
        for index in range(3):
            if index == self.crash_after:
                raise KeyboardInterrupt("killed mid-write")
            (target / f"shard_{index}.pt").write_bytes(bytes(range(256)) * (index + 1))


def test_a_checkpoint_cut_short_mid_write_is_skipped_for_the_previous_one(tmp_path):
    save_checkpoint(tmp_path, FileWritingLearner(), TrainerState(iteration=1, position=8), keep=3)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, FileWritingLearner(crash_after=1), TrainerState(iteration=2), keep=3)
    whole, damaged = resumable_checkpoints(tmp_path)
    assert [p.name for p in whole] == ["iter-000001"]
    assert [(p.name, reason) for p, reason in damaged] == [(".iter-000002.partial", "left half-written by a crash")]
    assert load_state(whole[0]).position == 8
    # the next save of that iteration replaces the partial folder
    save_checkpoint(tmp_path, FileWritingLearner(), TrainerState(iteration=2), keep=3)
    assert [p.name for p in resumable_checkpoints(tmp_path)[0]] == ["iter-000002", "iter-000001"]
    assert resumable_checkpoints(tmp_path)[1] == []


def test_a_torn_or_unmarked_checkpoint_is_detected(tmp_path):
    for iteration in (1, 2, 3):
        save_checkpoint(tmp_path, FileWritingLearner(), TrainerState(iteration=iteration), keep=3)
    root = tmp_path / "checkpoints"
    shard = root / "iter-000003" / "deepspeed" / "state" / "shard_2.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # a copy torn by a full disk or a crashed sync
    (root / "iter-000002" / "COMPLETE").unlink()  # a marker that never got written
    assert verify_checkpoint(root / "iter-000003") == "deepspeed/state/shard_2.pt has 100 bytes, 768 were written"
    assert verify_checkpoint(root / "iter-000002") == "no COMPLETE marker (the write was cut short)"
    whole, damaged = resumable_checkpoints(tmp_path)
    assert [p.name for p in whole] == ["iter-000001"]
    assert [p.name for p, _ in damaged] == ["iter-000003", "iter-000002"]
    shutil.rmtree(root / "iter-000001" / "deepspeed" / "state")
    assert verify_checkpoint(root / "iter-000001").endswith("is missing")


def test_keep_prunes_old_checkpoints_only_after_the_new_one_is_whole(tmp_path):
    for iteration in (1, 2, 3):
        save_checkpoint(tmp_path, FileWritingLearner(), TrainerState(iteration=iteration), keep=2)
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["iter-000002", "iter-000003"]
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, FileWritingLearner(crash_after=0), TrainerState(iteration=4), keep=2)
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["iter-000002", "iter-000003"]


def test_metric_rows_after_the_resumed_checkpoint_are_moved_aside_not_lost(tmp_path):
    rows = [{"iteration": 0, "eval/acc_t1": 0.1}, {"iteration": 1, "train/loss": 1.0},
            {"iteration": 2, "train/loss": 0.9}, {"iteration": 3, "train/loss": 0.8}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 4, "train/lo'  # torn by the crash
    (tmp_path / "metrics.jsonl").write_text(text)
    assert roll_back_metrics(tmp_path, 2) == 2
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:3]
    aside = (tmp_path / "metrics.rolled_back.jsonl").read_text().splitlines()
    assert json.loads(aside[0]) == rows[3] and aside[1].startswith('{"iteration": 4')
    assert roll_back_metrics(tmp_path, 2) == 0


# ----------------------------------------------------------------------------- bad input, refused in seconds


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
