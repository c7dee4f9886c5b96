"""bench/gpu/learner_gpu.py, the check a lent GPU runs, run by CI on the CPU (--smoke): every check, a tiny
model, bf16 on gloo. It must pass here, and it must fail when what it checks is broken."""

import json
import sys
from pathlib import Path

import pytest

from conftest import child_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu" / "learner_gpu.py"


def run_smoke(tmp_path, *extra):
    import subprocess

    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", *extra], capture_output=True, text=True,
                            timeout=600, env=child_env({"OUT": str(tmp_path)}), cwd=ROOT)
    report = tmp_path / "learner_gpu.json"
    return result, json.loads(report.read_text()) if report.exists() else None


def test_the_gpu_check_passes_every_check_on_the_cpu(tmp_path):
    result, report = run_smoke(tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (row,) = report["learner"]
    assert [check["ok"] for check in report["checks"]] == [True] * 4
    assert row["micro_batches"] >= 2 and row["step"]["applied"]  # an accumulation boundary inside the step
    losses = row["step"]["loss_per_token"]
    assert losses[-1] < losses[0]
    gather = row["gather_after_step"]
    assert gather["tensors"] == gather["parameters"] and not gather["mismatches"]
    checkpoints = row["checkpoints"]
    assert checkpoints["step_moved_logits_by"] > 0 and checkpoints["reload_exact"] and not checkpoints["export_unequal"]
    assert 0 < row["bf16_drift"]["mean_abs"] < 0.05
    assert "[not checked here]" in result.stdout


def test_the_gpu_check_fails_when_the_step_learns_nothing(tmp_path):
    # a step too small to change a bf16 weight: the loss on the fixed batch cannot fall, nor the logits move
    result, report = run_smoke(tmp_path, "--lr", "1e-12")
    assert result.returncode == 1 and "[FAILED]" in result.stdout
    failed = [check["check"] for check in report["checks"] if not check["ok"]]
    assert any("step:" in label for label in failed) and any("checkpoint:" in label for label in failed)
