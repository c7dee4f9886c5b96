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
    message = error_of("algo.advantage=rloo", "rollout.samples_per_prompt=1")
    assert "algo.advantage=rloo" in message and "rollout.samples_per_prompt" in message
    message = error_of("rollout.max_tokens_turn1=300", "rollout.max_tokens_turn2=300")
    assert "rollout.max_model_len" in message
    for other in ("algo.objective=star", "algo.train_turns=[1]"):
        message = error_of("rollout.turn2_samples=4", other)
        assert "rollout.turn2_samples=4" in message and other.split("=")[0] in message
    message = error_of("algo.objective=pair_sft", "algo.policy_loss=ppo_clip")
    assert "algo.objective=pair_sft" in message and "algo.policy_loss=pg" in message


@pytest.mark.parametrize("share", [0.25, 0.5, 1.5])
def test_a_gpu_share_that_two_ranks_could_split_or_that_idles_gpus_is_refused(share):
    # <= 0.5: Ray may put two ranks on one GPU (NCCL refuses duplicate GPUs); > 1: every rank drives one GPU
    message = error_of(f"learner.gpus_per_rank={share}")
    assert "'learner.gpus_per_rank'" in message
    assert ("two learner ranks on one GPU" if share <= 0.5 else "less than or equal to 1") in message


@pytest.mark.parametrize("share", [0.0, 0.6, 0.8, 1.0])
def test_gpu_shares_of_one_rank_per_gpu_are_accepted(share):
    assert load_config("smoke", [f"learner.gpus_per_rank={share}"]).learner.gpus_per_rank == share


def test_custom_resources_are_checked_by_name_and_amount():
    config = load_config("smoke", ["learner.resources={trainer_node: 1}", "rollout.resources={engine_node: 0.5}"])
    assert config.learner.resources == {"trainer_node": 1.0} and config.rollout.resources == {"engine_node": 0.5}
    assert "set by its own key" in error_of("learner.resources={GPU: 1}")
    assert "'rollout.resources'" in error_of("rollout.resources={engine_node: 0}")


def test_networking_keys_are_checked_by_name_and_port():
    config = load_config("smoke", ["cluster.env_vars={NCCL_SOCKET_IFNAME: eth0, NCCL_IB_DISABLE: 1}",
                                   "learner.rendezvous_port=29500", "learner.transfer_port=29501"])
    assert config.cluster.env_vars == {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_DISABLE": "1"}  # text, as the env holds
    assert "'NCCL-IFNAME' is not an environment variable name" in error_of("cluster.env_vars={NCCL-IFNAME: eth0}")
    assert "'learner.rendezvous_port'" in error_of("learner.rendezvous_port=70000")
    both = error_of("learner.rendezvous_port=29500", "learner.transfer_port=29500")
    assert "learner.rendezvous_port and learner.transfer_port are both 29500" in both


def test_lora_settles_the_reference_and_the_sync_and_refuses_keys_that_contradict_it():
    from score_ray.placement import reference_actors
    from score_ray.weight_sync import uses_nccl

    config = load_config("smoke", ["learner.trainable=lora", "learner.lora={rank: 8, target_modules: [q_proj, v_proj]}"])
    assert (config.learner.lora.rank, config.learner.lora.alpha) == (8, 32.0)
    assert config.learner.serves_reference and reference_actors(config) == 0  # no reference actor
    gpu = load_config("smoke", ["learner.trainable=lora", "learner.gpus_per_rank=1", "rollout.gpus_per_generator=1"])
    assert not uses_nccl(gpu)  # the adapter (a few MB) goes through the object store, on GPU too
    assert "learner.reference_gpus is set but learner.trainable=lora" in error_of(
        "learner.trainable=lora", "learner.reference_gpus=0.2")
    assert "use learner.weight_sync=auto" in error_of("learner.trainable=lora", "learner.weight_sync=nccl")
    assert "'learner.lora.rank'" in error_of("learner.trainable=lora", "learner.lora.rank=1024")
    assert "'learner.lora.rnak'" in error_of("learner.lora.rnak=8")


def test_a_retired_hub_dataset_is_refused_with_where_its_data_lives_now():
    message = error_of("data.train={type: hf, name: hendrycks/competition_math, preset: math}")
    assert "'data.train.name'" in message and "DigitalLearningGmbH/MATH-lighteval" in message


def test_the_gpu_math_recipe_trains_on_maintained_math_and_evaluates_on_math500():
    config = load_config("gpu_math_qwen2.5_1.5b.yaml")
    assert (config.data.train.name, config.data.train.split, config.data.train.preset) == (
        "DigitalLearningGmbH/MATH-lighteval", "train", "math")
    assert (config.data.eval.name, config.data.eval.preset) == ("HuggingFaceH4/MATH-500", "math500")


def test_the_gpu_math_recipe_is_pags_score_setting():
    """PAG's SCoRe run on Qwen2.5-1.5B-Instruct (arXiv 2506.10406): lr 1e-6, 512 prompts x 4 samples, 2,048
    tokens a turn, Stage I 20 and Stage II 40 epochs of MATH's 7,500 problems, alpha 1; ZeRO-2 (fits whole)."""
    config = load_config("gpu_math_qwen2.5_1.5b.yaml")
    rollout, schedule = config.rollout, config.algo.schedule
    assert (config.learner.lr, rollout.prompts_per_iteration, rollout.samples_per_prompt) == (1e-6, 512, 4)
    assert (rollout.max_tokens_turn1, rollout.max_tokens_turn2, config.algo.alpha) == (2048, 2048, 1.0)
    per_epoch = 7500 / rollout.prompts_per_iteration
    assert (schedule.stage1_iterations, schedule.stage2_iterations) == (round(20 * per_epoch), round(40 * per_epoch))
    assert config.learner.zero_stage == 2 and config.learner.micro_batch_tokens == 16384
    assert rollout.max_model_len >= 2 * 2048 + 1024  # both turns, the instruction and a long problem


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


def test_the_retired_estimator_key_still_works_with_a_warning_and_refuses_a_contradiction():
    with pytest.warns(FutureWarning, match="algo.advantage=rloo algo.policy_loss=ppo_clip"):
        config = load_config("smoke", ["algo.estimator=ppo"])
    assert (config.algo.advantage, config.algo.policy_loss) == ("rloo", "ppo_clip")
    with pytest.warns(FutureWarning):
        assert load_config("smoke", ["algo.estimator=reinforce"]).algo.advantage == "reinforce"
    with pytest.warns(FutureWarning):  # on the command line it replaces what a shipped config file sets
        config = load_config("cpu_demo", ["algo.estimator=ppo"])
    assert (config.algo.advantage, config.algo.policy_loss) == ("rloo", "ppo_clip")
    message = error_of("algo.estimator=ppo", "algo.policy_loss=pg")
    assert "algo.policy_loss=ppo_clip" in message and "drop algo.estimator" in message
    assert "never one of its values" in error_of("algo.estimator=a2c")


def test_the_algorithm_axes_allow_exactly_the_keys_of_their_tables():
    from score_ray import algo

    for key, table in (("advantage", algo.ADVANTAGE_ESTIMATORS), ("policy_loss", algo.POLICY_LOSSES),
                       ("kl_estimator", algo.KL_ESTIMATORS)):
        for name in table:
            assert getattr(load_config("smoke", [f"algo.{key}={name}"]).algo, key) == name
        message = error_of(f"algo.{key}=nope")
        assert f"algo.{key}" in message and all(repr(name) in message for name in table)
