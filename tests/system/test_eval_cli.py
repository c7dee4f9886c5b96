"""``python -m score_ray.eval`` and ``python -m score_ray.probe`` on their own Ray, as users run them."""

import json
import os

import pytest

from conftest import run_module

pytestmark = pytest.mark.slow


def test_eval_runs_when_the_engine_asks_for_every_core_of_the_machine(tmp_path):
    # cpu_demo's engine takes both cores of a 2-core machine: the graders must still be placed
    records = tmp_path / "records.jsonl"
    result = run_module("score_ray.eval", "tiny-random", f"rollout.cpus_per_generator={os.cpu_count()}",
                        "data.eval.count=4", "--config", "configs/smoke.yaml", "--records", str(records), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Acc@t1" in result.stdout and len(records.read_text().splitlines()) == 4


def test_probe_reports_greedy_and_sampled_rates_on_training_problems(tmp_path):
    output = tmp_path / "probe.json"
    result = run_module("score_ray.probe", "--config", "configs/smoke.yaml", "--n", "6", "--samples", "2",
                        "--output", str(output), f"rollout.cpus_per_generator={os.cpu_count()}", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    probe = json.loads(output.read_text())
    assert probe["problems"] == 6 and probe["source"] == "arithmetic[train]"
    assert 0.0 <= probe["greedy/delta_c2i"] <= 1.0 and 0.0 <= probe["sampled/truncated_t1"] <= 1.0
    assert probe["sampled/length_t1"] > 0
