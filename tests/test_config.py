"""Config: YAML + dotted overrides, validated with errors that name the key."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from score_ray.config import Config, ConfigError, apply_overrides, load_config

from conftest import ROOT, run_module


def error_of(*overrides: str, path: str = "smoke") -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, list(overrides))
    return str(caught.value)


@pytest.mark.parametrize("config_file", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(config_file):
    config = load_config(config_file)
    assert isinstance(config, Config)


def test_no_arguments_means_the_cpu_demo():
    assert load_config(None).run.name == "cpu_demo"


def test_unknown_key_names_the_key_and_the_closest_valid_one():
    message = error_of("algo.alhpa=3")
    assert "unknown key 'algo.alhpa'" in message
    assert "did you mean 'algo.alpha'" in message


def test_unknown_key_inside_a_data_source_is_named_without_the_union_tag():
    message = error_of("data.train.termz=3")
    assert "unknown key 'data.train.termz'" in message
    assert "did you mean 'data.train.terms'" in message


def test_unknown_section_lists_the_valid_sections():
    message = error_of("learnr.lr=1")
    assert "unknown key 'learnr'" in message and "did you mean 'learner'" in message


def test_wrong_type_and_out_of_range_name_the_key_and_value():
    message = error_of("rollout.temperature=hot", "learner.zero_stage=1", "rollout.samples_per_prompt=0")
    assert "'rollout.temperature'" in message and "'hot'" in message
    assert "'learner.zero_stage'" in message and "(got 1)" in message
    assert "'rollout.samples_per_prompt'" in message


def test_every_bad_key_is_reported_at_once():
    message = error_of("algo.alhpa=1", "rollout.temperature=hot", "reward.workers=-1")
    assert message.count("\n  - ") == 3


def test_cross_field_rules_name_both_keys():
    message = error_of("algo.estimator=rloo", "rollout.samples_per_prompt=1")
    assert "algo.estimator=rloo" in message and "rollout.samples_per_prompt" in message
    message = error_of("rollout.max_tokens_turn1=300", "rollout.max_tokens_turn2=300")
    assert "rollout.max_model_len" in message


def test_same_generated_split_for_train_and_eval_is_refused():
    message = error_of("data.eval.split=train")
    assert "data.eval.split=test" in message


def test_overrides_parse_values_as_yaml():
    config = load_config("smoke", ["algo.alpha=2.5", "learner.lr=3e-6", "logging.tags=[a, b]", "run.resume=true"])
    assert config.algo.alpha == 2.5
    assert config.learner.lr == pytest.approx(3e-6)
    assert config.logging.tags == ["a", "b"]
    assert config.run.resume is True


def test_override_that_switches_a_source_type():
    config = load_config("smoke", ["data.eval={type: humaneval, limit: 3}"])
    assert config.data.eval.type == "humaneval" and config.data.eval.limit == 3


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["no_equals_sign"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"run": {"seed": 1}}, ["run.seed.x=2"])


def test_base_inheritance_merges_and_reports_loops(tmp_path: Path):
    (tmp_path / "parent.yaml").write_text("algo: {alpha: 3.0}\nrollout: {samples_per_prompt: 6}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nalgo: {beta2: 0.5}\n")
    config = load_config(str(tmp_path / "child.yaml"))
    assert (config.algo.alpha, config.algo.beta2, config.rollout.samples_per_prompt) == (3.0, 0.5, 6)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(tmp_path / "loop.yaml"))


def test_missing_config_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_launch_rejects_a_bad_key_within_seconds_without_starting_ray():
    # The check runs in a fresh interpreter, as a user's command would, and inspects what got imported.
    probe = (
        "import sys; from score_ray.launch import main; rc = main(['algo.alhpa=3']); "
        "heavy = [m for m in ('ray', 'torch', 'vllm', 'deepspeed') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    assert "did you mean 'algo.alpha'" in result.stderr
    assert "HEAVY []" in result.stdout
    assert elapsed < 10, f"config rejection took {elapsed:.1f}s"


def test_launch_cli_exit_code_for_bad_value():
    result = run_module("score_ray.launch", "--config", "configs/smoke.yaml", "learner.zero_stage=4", timeout=60)
    assert result.returncode == 2
    assert "'learner.zero_stage'" in result.stderr
