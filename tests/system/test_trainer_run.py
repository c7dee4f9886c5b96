"""End to end: `python -m score_ray.launch` on the smoke config, Stage I into Stage II, resume, eval CLI."""

import json
import os
import re

import pytest

from conftest import EVAL_KEYS, PER_TURN_KEYS, REDONE_KEYS, assert_same_as_uninterrupted, child_env, kill_tree, run_module

pytestmark = pytest.mark.slow

PERF_KEYS = ["perf/rollout_seconds", "perf/grading_seconds", "perf/reference_seconds", "perf/learner_seconds",
             "perf/sync_seconds", "perf/iteration_seconds"]


# Three iterations (Stage I, then II twice) with an eval after each and a checkpoint after each. The random
# model earns no reward, so the k1 KL estimator (a non-zero gradient even at pi = ref) and a large step make
# the weights move: later iterations' KL then depends on every weight sync and checkpoint being right.
COMMON = ["--config", "configs/smoke.yaml", "eval.at_start=true", "eval.every=1", "data.eval.count=8",
          "checkpoint.every=1", "checkpoint.keep=2", "algo.schedule.stage2_iterations=2", "algo.kl_estimator=k1",
          "learner.lr=1e-3", "cluster.env_vars={GLOO_SOCKET_IFNAME: lo}"]


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    result = run_module("score_ray.launch", *COMMON, f"run.output_dir={root}", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = list(root.glob("smoke-*"))
    return run_dir, result


def test_smoke_run_writes_every_metric(uninterrupted, tmp_path):
    run_dir, first = uninterrupted
    rows = read_rows(run_dir)
    train_rows = [r for r in rows if "train/stage" in r]
    assert [r["iteration"] for r in train_rows] == [1, 2, 3]
    assert [r["train/stage"] for r in train_rows] == [1, 2, 2]  # Stage I, then Stage II
    assert train_rows[0]["train/kl_t1"] < 1e-6 < 1e-3 < train_rows[2]["train/kl_t1"]  # the weights moved
    from score_ray.metrics import METRICS

    unnamed = {key for row in rows for key in row} - set(METRICS)
    assert not unnamed, f"logged keys missing from score_ray.metrics.METRICS: {sorted(unnamed)}"
    for row in train_rows:
        assert all(key in row for key in PER_TURN_KEYS + PERF_KEYS), sorted(set(PER_TURN_KEYS + PERF_KEYS) - set(row))
        assert row["train/episodes"] == 8 and row["perf/rollout_retries"] == 0 and row["train/step_skipped"] == 0
    eval_rows = [r for r in rows if "eval/acc_t1" in r]
    assert [r["iteration"] for r in eval_rows] == [0, 1, 2, 3]  # base, after each iteration but the last, final
    for row in eval_rows:
        assert all(0.0 <= row[key] + (1.0 if key.startswith("eval/delta") else 0.0) <= 2.0 for key in EVAL_KEYS)
        assert row["eval/delta"] == pytest.approx(row["eval/acc_t2"] - row["eval/acc_t1"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 3 and all(key in summary["final_eval"] for key in EVAL_KEYS)
    assert summary["skipped_steps"] == 0 and summary["generator_restarts"] == 0
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    # cluster.env_vars reached every actor (the learner's gloo group really bound the loopback interface)
    placed = json.loads((run_dir / "nodes.json").read_text())["placements"][0]
    roles = [*placed["learner_ranks"], placed["reference"], *placed["generators"], *placed["reward_actors"]]
    assert [role["collectives_env"].get("GLOO_SOCKET_IFNAME") for role in roles] == ["lo"] * len(roles)
    assert (run_dir / "eval_accuracy.png").is_file() and (run_dir / "train_rewards.png").is_file()
    assert "Acc@t1" in first.stdout and "Delta_c->i" in first.stdout
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["iter-000002", "iter-000003"]

    from score_ray.tracking import read_wandb_history

    history = read_wandb_history(run_dir)
    assert [h["iteration"] for h in history if "train/reward_t1" in h] == [1, 2, 3]
    assert any("eval/acc_t2" in h for h in history)

    # The eval CLI on the run folder prints the five metrics and writes a record per problem, with an engine
    # that asks for every core of the machine (cpu_demo's on a 2-core one): the graders must still be placed.
    records = tmp_path / "records.jsonl"
    evaluated = run_module("score_ray.eval", str(run_dir), "--n", "4", "--output", str(tmp_path / "eval.json"),
                           "--records", str(records), f"rollout.cpus_per_generator={os.cpu_count()}", timeout=600)
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-4000:]
    assert re.search(r"Acc@t1\s+Acc@t2\s+Delta\(t1,t2\)\s+Delta_i->c\s+Delta_c->i", evaluated.stdout)
    assert json.loads((tmp_path / "eval.json").read_text())["eval/n"] == 4
    assert len(records.read_text().splitlines()) == 4


def test_a_driver_killed_mid_iteration_resumes_to_the_same_metrics(uninterrupted, tmp_path):
    """SIGKILL the driver (and its Ray) in iteration 3, right after checkpoint 2; resume; the metrics of
    every iteration equal the uninterrupted run's (same seed: sampling seeds are per problem and iteration,
    the learner's weights and Adam state come back from the checkpoint)."""
    from conftest import launch_killed_after_checkpoint

    reference_rows = read_rows(uninterrupted[0])
    run_dir = launch_killed_after_checkpoint(COMMON, tmp_path, 2)

    resumed = run_module("score_ray.launch", *COMMON, f"run.output_dir={tmp_path}", "run.resume=true", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from iter-000002: iteration 2" in resumed.stdout
    # iteration 3 once, though it had started before the kill
    assert_same_as_uninterrupted(read_rows(run_dir), reference_rows, [1, 2, 3])


def test_a_generator_killed_mid_rollout_is_restarted_resynced_and_its_share_redone(uninterrupted, tmp_path):
    """SIGKILL the vLLM generator's process while it generates iteration 2 (after checkpoint 1): Ray restarts
    it, the trainer re-syncs the current weights and redoes the share; with per-problem seeds the redone
    iteration equals the uninterrupted run's, which it would not on the restarted engine's base weights."""
    import subprocess
    import sys
    import time

    import psutil

    from conftest import ROOT

    process = subprocess.Popen([sys.executable, "-m", "score_ray.launch", *COMMON, f"run.output_dir={tmp_path}"],
                               cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    killed = None
    deadline = time.monotonic() + 600
    try:
        while killed is None and time.monotonic() < deadline and process.poll() is None:
            if list(tmp_path.glob("smoke-*/checkpoints/iter-000001/COMPLETE")):
                for child in psutil.Process(process.pid).children(recursive=True):
                    try:
                        if child.cmdline()[:1] == ["ray::GeneratorActor.generate"]:
                            child.kill()
                            killed = child.pid
                            break
                    except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                        continue
            time.sleep(0.01)
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            kill_tree(process)
    assert killed is not None, "never saw the generator generating after checkpoint 1"
    assert process.returncode == 0, stderr[-4000:]
    assert "generator 0 died" in stderr and "weights re-synced (version 1)" in stderr
    (run_dir,) = list(tmp_path.glob("smoke-*"))
    train = {r["iteration"]: r for r in read_rows(run_dir) if "train/stage" in r}
    expected = {r["iteration"]: r for r in read_rows(uninterrupted[0]) if "train/stage" in r}
    assert [train[i]["perf/rollout_retries"] for i in (1, 2, 3)] == [0, 1, 0]
    assert all(train[i]["train/episodes"] == 8 for i in (1, 2, 3))
    for iteration in (2, 3):
        for key in REDONE_KEYS:
            assert train[iteration][key] == pytest.approx(expected[iteration][key], rel=1e-4, abs=1e-6), (iteration, key)
    assert json.loads((run_dir / "summary.json").read_text())["generator_restarts"] == 1


def test_overlap_mode_generates_one_step_ahead_and_trains_off_policy(uninterrupted, tmp_path):
    """rollout.overlap=true: iteration k+1 is sampled (from the weights before step k) while the learner
    trains on k. Iteration 1 equals the synchronous run's; iteration 2's samples come from the base weights,
    so their KL to the reference is ~0 where the synchronous run's is not."""
    result = run_module("score_ray.launch", *COMMON, f"run.output_dir={tmp_path}", "rollout.overlap=true",
                        "eval.every=0", "eval.at_start=false", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = list(tmp_path.glob("smoke-*"))
    train = {r["iteration"]: r for r in read_rows(run_dir) if "train/stage" in r}
    expected = {r["iteration"]: r for r in read_rows(uninterrupted[0]) if "train/stage" in r}
    assert [train[i]["train/off_policy"] for i in (1, 2, 3)] == [0.0, 1.0, 1.0]
    for key in REDONE_KEYS:
        assert train[1][key] == pytest.approx(expected[1][key], rel=1e-4, abs=1e-6), key
    assert train[2]["train/kl_t1"] < 1e-6 < 1e-4 < expected[2]["train/kl_t1"]
    assert train[3]["train/kl_t1"] > 1e-4  # the generators did receive step 1's weights before iteration 3
    assert all(train[i]["train/step_skipped"] == 0.0 for i in (1, 2, 3))

    # Resumed for two more iterations: the first samples from the checkpoint's weights, which the learner holds
    # too (on-policy); the second was prefetched after the generators took the learner's step-4 weights.
    resumed = run_module("score_ray.launch", *COMMON, f"run.output_dir={tmp_path}", "rollout.overlap=true",
                         "eval.every=0", "eval.at_start=false", "run.resume=true", "algo.schedule.stage2_iterations=4",
                         timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from iter-000003: iteration 3" in resumed.stdout
    train = {r["iteration"]: r for r in read_rows(run_dir) if "train/stage" in r}
    assert sorted(train) == [1, 2, 3, 4, 5]
    assert [train[i]["train/off_policy"] for i in (4, 5)] == [0.0, 1.0]


def test_a_cluster_without_the_requested_gpus_fails_in_seconds(tmp_path):
    import time

    start = time.monotonic()
    result = run_module("score_ray.launch", "--config", "configs/smoke.yaml", f"run.output_dir={tmp_path}",
                        "learner.gpus_per_rank=1", timeout=300)
    assert result.returncode == 4
    assert "needs 3 GPUs" in result.stderr and "learner.gpus_per_rank" in result.stderr
    assert time.monotonic() - start < 120


def test_a_top_layers_run_serves_the_reference_from_the_learner_ranks(tmp_path):
    """trainable=top_layers (the CPU demo's setting) on two ZeRO-2 ranks: no reference actor; every micro-batch
    trains on the trunk the reference pass kept, and the first iteration's KL is that of identical models.
    With two second attempts per first attempt (rollout.turn2_samples=2), every iteration trains twice the
    episodes and grades them all."""
    result = run_module("score_ray.launch", "--config", "configs/smoke.yaml", f"run.output_dir={tmp_path}",
                        "learner.trainable=top_layers", "learner.trainable_top_layers=1", "rollout.turn2_samples=2",
                        "eval.at_start=false", "eval.every=0", "data.eval.count=4", "checkpoint.every=0", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "the reference on the learner ranks" in result.stdout
    (run_dir,) = list(tmp_path.glob("smoke-*"))
    train_rows = [r for r in read_rows(run_dir) if "train/stage" in r]
    assert [r["perf/learner_trunk_reused"] for r in train_rows] == [1.0, 1.0]
    assert [r["train/episodes"] for r in train_rows] == [16, 16]  # 4 prompts x 2 first attempts x 2 second
    assert train_rows[0]["train/kl_t1"] < 1e-6 and train_rows[0]["train/kl_t2"] < 1e-6
    placement = json.loads((run_dir / "nodes.json").read_text())["placements"][0]
    assert "learner ranks" in placement["reference"]["served_by"]
    assert placement["reference"]["ip"] == placement["learner_ranks"][0]["ip"]
