"""End to end: `python -m score_ray.launch` on the smoke config, Stage I into Stage II, resume, eval CLI."""

import json
import re

import pytest

from conftest import run_module

pytestmark = pytest.mark.slow

TRAIN_KEYS = [f"train/{name}_t{turn}" for name in ("reward", "kl", "entropy", "length", "truncated") for turn in (1, 2)]
EVAL_KEYS = ["eval/acc_t1", "eval/acc_t2", "eval/delta", "eval/delta_i2c", "eval/delta_c2i"]
PERF_KEYS = ["perf/rollout_seconds", "perf/grading_seconds", "perf/reference_seconds", "perf/learner_seconds",
             "perf/sync_seconds", "perf/iteration_seconds"]


def test_smoke_run_writes_every_metric_and_resumes_at_the_right_iteration(tmp_path):
    common = ["--config", "configs/smoke.yaml", f"run.output_dir={tmp_path}", "eval.at_start=true", "eval.every=1",
              "data.eval.count=8", "checkpoint.every=1", "checkpoint.keep=2"]
    first = run_module("score_ray.launch", *common, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    (run_dir,) = list(tmp_path.glob("smoke-*"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/stage" in r]
    assert [r["iteration"] for r in train_rows] == [1, 2]
    assert [r["train/stage"] for r in train_rows] == [1, 2]  # Stage I, then Stage II
    for row in train_rows:
        assert all(key in row for key in TRAIN_KEYS + PERF_KEYS), sorted(set(TRAIN_KEYS + PERF_KEYS) - set(row))
    eval_rows = [r for r in rows if "eval/acc_t1" in r]
    assert len(eval_rows) >= 2  # base (iteration 0) and final
    for row in eval_rows:
        assert all(0.0 <= row[key] + (1.0 if key.startswith("eval/delta") else 0.0) <= 2.0 for key in EVAL_KEYS)
        assert row["eval/delta"] == pytest.approx(row["eval/acc_t2"] - row["eval/acc_t1"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 2 and all(key in summary["final_eval"] for key in EVAL_KEYS)
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    assert (run_dir / "eval_accuracy.png").is_file() and (run_dir / "train_rewards.png").is_file()
    assert "Acc@t1" in first.stdout and "Delta_c->i" in first.stdout
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["iter-000001", "iter-000002"]

    from score_ray.tracking import read_wandb_history

    history = read_wandb_history(run_dir)
    assert [h["iteration"] for h in history if "train/reward_t1" in h] == [1, 2]
    assert any("eval/acc_t2" in h for h in history)

    # Resume: one more Stage II iteration continues from the last checkpoint at iteration 3.
    second = run_module("score_ray.launch", *common, "run.resume=true", "algo.schedule.stage2_iterations=2", timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from iter-000002: iteration 2" in second.stdout
    assert list(tmp_path.glob("smoke-*")) == [run_dir]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "train/stage" in r] == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["iterations"] == 3

    # The eval CLI on the run folder prints the five metrics.
    evaluated = run_module("score_ray.eval", str(run_dir), "--n", "4", "--output", str(tmp_path / "eval.json"), timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    assert re.search(r"Acc@t1\s+Acc@t2\s+Delta\(t1,t2\)\s+Delta_i->c\s+Delta_c->i", evaluated.stdout)
    assert json.loads((tmp_path / "eval.json").read_text())["eval/n"] == 4


def test_a_cluster_without_the_requested_gpus_fails_in_seconds(tmp_path):
    import time

    start = time.monotonic()
    result = run_module("score_ray.launch", "--config", "configs/smoke.yaml", f"run.output_dir={tmp_path}",
                        "learner.gpus_per_rank=1", timeout=300)
    assert result.returncode == 4
    assert "needs 3 GPUs" in result.stderr and "learner.gpus_per_rank" in result.stderr
    assert time.monotonic() - start < 120
