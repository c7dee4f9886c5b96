"""``python -m score_ray.probe`` on its own Ray, as users run it (the eval CLI runs on a trained run's folder in
test_trainer_run.py)."""

import json
import os

import pytest

from conftest import run_module

pytestmark = pytest.mark.slow


def test_probe_reports_greedy_and_sampled_rates_on_training_problems(tmp_path):
    output = tmp_path / "probe.json"
    result = run_module("score_ray.probe", "--config", "configs/smoke.yaml", "--n", "6", "--samples", "2",
                        "--output", str(output), f"rollout.cpus_per_generator={os.cpu_count()}", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    probe = json.loads(output.read_text())
    assert probe["problems"] == 6 and probe["source"] == "arithmetic[train]"
    assert 0.0 <= probe["greedy/delta_c2i"] <= 1.0 and 0.0 <= probe["sampled/truncated_t1"] <= 1.0
    assert probe["sampled/length_t1"] > 0


def test_vllm_serves_the_model_organism_as_built_and_its_two_turns_behave_as_pretrained(tmp_path):
    """The organism through the real stack: vLLM serves the folder `python -m score_ray.assets organism` built
    (its tokenizer, chat template and EOS), the math grader grades its two-sum answers, and what it learned in
    pretraining shows on training-split problems (drawn afresh, not its corpus's examples): it solves well above
    chance (1 pair in 10), and its sampled second attempt changes answers and breaks right ones, as the
    corpus's blind retries taught it."""
    output = tmp_path / "probe.json"
    result = run_module("score_ray.probe", "--config", "organism", "--n", "300", "--samples", "2",
                        "--output", str(output), f"rollout.cpus_per_generator={os.cpu_count()}", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    probe = json.loads(output.read_text())
    assert probe["source"] == "two_sum[train]"
    assert probe["greedy/acc_t1"] > 0.4, probe
    assert probe["sampled/truncated_t1"] < 0.05 and probe["sampled/length_t1"] < 5.5  # four digits and the EOS
    assert probe["sampled/answer_changed"] > 0.2 and probe["sampled/broken_given_right_t1"] > 0.2, probe
