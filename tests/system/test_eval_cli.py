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
