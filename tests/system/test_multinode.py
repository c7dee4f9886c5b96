"""score_ray on a three-host Ray cluster built on this machine (tests/system/netns_cluster.py), as users run it.

The head has no CPUs for our actors (like cluster/aws.yaml, gcp.yaml and KubeRay): the job's driver runs
there and nothing else. Host ``gpu-a`` offers ``learner_host`` (learner ranks and the reference ask for
it), host ``gpu-b`` offers ``generator_host`` (the vLLM engine): weight sync and the learner's rendezvous
cross hosts. Every host has its own /tmp, so each one builds the test model in its own cache; the run
folder is on a folder all hosts see (the stand-in for /mnt/shared).

A lost learner host is survived inside the job when a replacement joins (the autoscaler's new node), and
stops the job resumably when none comes back in time (one job sees both); the run ends with the
uninterrupted run's metrics.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, assert_same_as_uninterrupted, child_env
from netns_cluster import RAY, Cluster, available

UNAVAILABLE = available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=f"multi-node tests need network namespaces: {UNAVAILABLE}"),
]

LEARNER_HOST = {"learner_host": 3}  # two ranks + the reference
GENERATOR_HOST = {"generator_host": 1}
# Three iterations with a checkpoint after each; k1 KL and a large step make the weights move, so a wrong
# sync or checkpoint would show in the later iterations' numbers (as in test_trainer_run.py).
COMMON = ["--config", "configs/smoke.yaml", "algo.schedule.stage2_iterations=2", "algo.kl_estimator=k1",
          "learner.lr=1e-3", "checkpoint.every=1", "checkpoint.keep=2", "data.eval.count=8",
          "learner.resources={learner_host: 1}", "rollout.resources={generator_host: 1}"]
JOB_TIMEOUT = 900


@pytest.fixture(scope="module")
def cluster():
    from score_ray.assets import torch_extensions_dir

    shared = Path(tempfile.mkdtemp(prefix="score_ray-shared-", dir="/var/tmp"))  # outside every host's /tmp
    env = child_env({
        "RAY_AUTH_MODE": "disabled",  # the hosts' own network; token auth is covered by test_ray_job.py
        "SCORE_RAY_CACHE": "/tmp/score_ray_cache",  # per host: each node builds its own model folder
        # DeepSpeed's comm op, built once by the set-up, as a cluster image would carry it
        "TORCH_EXTENSIONS_DIR": str(torch_extensions_dir()),
        # Notice a lost node within seconds, not Ray's default half minute
        "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    })
    (shared / "hosts").mkdir()
    # A checkout (and its venv) under /tmp, as CI's clone may be, stays visible on every host, like an image.
    made = Cluster.create(shared / "hosts", env, keep_visible=[ROOT, Path(sys.prefix)])
    try:
        head = made.start_head()
        made.start_worker("gpu-a", cpus=2, resources=LEARNER_HOST)
        made.start_worker("gpu-b", cpus=2, resources=GENERATOR_HOST)
        made.wait_for_nodes({head.address, made.hosts["gpu-a"].address, made.hosts["gpu-b"].address})
        made.shared = shared
        yield made
    finally:
        problems = made.teardown()
        shutil.rmtree(shared, ignore_errors=True)
        assert not problems, problems


def run_args(cluster, name: str, *extra: str) -> list[str]:
    return [*COMMON, f"run.output_dir={cluster.shared / 'runs'}", f"run.name={name}", *extra]


def run_folder(cluster, name: str) -> Path:
    (folder,) = list((cluster.shared / "runs").glob(f"{name}-*"))
    return folder


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(run_dir: Path, expected_dir: Path) -> None:
    rows, expected_rows = rows_of(run_dir), rows_of(expected_dir)
    assert_same_as_uninterrupted(rows, expected_rows, [1, 2, 3])


def wait_for_checkpoint(cluster, name: str, iteration: int, job, timeout: float = 600) -> Path:
    deadline = time.monotonic() + timeout
    pattern = f"{name}-*/checkpoints/iter-{iteration:06d}/COMPLETE"
    while time.monotonic() < deadline:
        found = list((cluster.shared / "runs").glob(pattern))
        if found:
            return found[0].parents[2]
        assert job.poll() is None, f"the job ended before checkpoint {iteration}"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {iteration} within {timeout:.0f}s")


@pytest.fixture(scope="module")
def uninterrupted(cluster):
    start = time.monotonic()
    result = cluster.submit(run_args(cluster, "whole"), ROOT, timeout=JOB_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-5000:]
    print(f"multi-node smoke job: {time.monotonic() - start:.0f}s wall")
    return run_folder(cluster, "whole")


def test_the_smoke_job_runs_each_role_on_its_intended_host(cluster, uninterrupted):
    hosts = {role: host.address for role, host in cluster.hosts.items()}
    placement = json.loads((uninterrupted / "nodes.json").read_text())
    assert placement["driver"]["ip"] == hosts["head"] and placement["driver"]["hostname"] == "head"
    (first,) = placement["placements"]
    assert [rank["ip"] for rank in first["learner_ranks"]] == [hosts["gpu-a"]] * 2
    assert [rank["rank"] for rank in first["learner_ranks"]] == [0, 1]
    assert first["reference"]["ip"] == hosts["gpu-a"]
    assert [g["ip"] for g in first["generators"]] == [hosts["gpu-b"]]
    assert {actor["ip"] for actor in first["reward_actors"]} <= {hosts["gpu-a"], hosts["gpu-b"]}  # not the head
    # Weight sync crossed hosts and the weights moved: the KL to the reference grows iteration by iteration.
    train = [r for r in rows_of(uninterrupted) if "train/stage" in r]
    assert [r["iteration"] for r in train] == [1, 2, 3]
    assert train[0]["train/kl_t1"] < 1e-6 < 1e-3 < train[2]["train/kl_t1"]
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["learner_replacements"] == 0
    assert (uninterrupted / "final_model" / "model.safetensors").is_file()
    assert list((uninterrupted / "checkpoints").glob("iter-*/deepspeed"))  # written by the ranks on gpu-a


PROBE = """
import json, socket, ray
from score_ray.config import AlgoConfig, LearnerConfig, ModelConfig
from score_ray.learner import LearnerWorker
ray.init()
rank0 = LearnerWorker.options(num_cpus=0.1, resources={"learner_host": 0.1}).remote(
    0, 2, ModelConfig(path="tiny-random"), LearnerConfig(), AlgoConfig(), 0)
rendezvous = ray.get(rank0.rendezvous.remote())
transfer = ray.get(rank0.transfer_endpoint.remote())

@ray.remote(num_cpus=0.1, resources={"learner_host": 0.1})
def bind(ports):  # on the learner's host: every port handed out is free there
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("", port))
    return ray.util.get_node_ip_address()

print("PROBE=" + json.dumps({"driver": ray.util.get_node_ip_address(), "rendezvous": rendezvous,
                             "transfer": transfer, "bound_on": ray.get(bind.remote([rendezvous[1], transfer[1]]))}))
"""


def test_the_rendezvous_and_transfer_ports_come_from_rank_zeros_host(cluster):
    """What learner rank 0 hands out for the DeepSpeed rendezvous and the NCCL transfer group is its own
    host's address and ports free there, not the driver's (the CPU-only head, where nothing listens)."""
    command = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(ROOT), "--",
               sys.executable, "-c", PROBE]
    result = cluster.head.run(command, env=cluster.env, timeout=300, cwd=ROOT)
    line = next((x for x in result.stdout.splitlines() if x.startswith("PROBE=")), None)
    assert result.returncode == 0 and line, (result.stdout + result.stderr)[-4000:]
    found = json.loads(line[len("PROBE="):])
    learner_host = next(h for role, h in cluster.hosts.items() if role != "head" and h.alive() and role != "gpu-b")
    learner, head = learner_host.address, cluster.head.address
    assert found["driver"] == head
    assert found["rendezvous"][0] == learner and found["transfer"][0] == learner
    assert found["rendezvous"][1] != found["transfer"][1] and found["bound_on"] == learner


def test_a_lora_job_trains_the_adapter_on_one_host_and_serves_it_on_another(cluster):
    """learner.trainable=lora across hosts: the ranks on gpu-a are the reference too (no reference actor), and each
    sync's adapter reaches the engine on gpu-b, whose sampled log-probs move away from the reference's."""
    result = cluster.submit(run_args(cluster, "lora", "learner.trainable=lora"), ROOT, timeout=JOB_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-5000:]
    run_dir = run_folder(cluster, "lora")
    placed = json.loads((run_dir / "nodes.json").read_text())["placements"][0]
    learner, generator = cluster.hosts["gpu-a"].address, cluster.hosts["gpu-b"].address
    assert [rank["ip"] for rank in placed["learner_ranks"]] == [learner] * 2
    assert placed["reference"]["served_by"] == "learner ranks (the base weights, adapter off)"
    assert [g["ip"] for g in placed["generators"]] == [generator]
    train = [r for r in rows_of(run_dir) if "train/stage" in r]
    # train/kl_t1 is measured at the engine's sampled tokens: it grows only if the adapter reached the engine
    assert [r["iteration"] for r in train] == [1, 2, 3]
    assert train[0]["train/kl_t1"] < 1e-6 < 1e-4 < train[2]["train/kl_t1"]
    assert (run_dir / "final_model" / "adapter_config.json").is_file()


def test_a_lost_learner_host_is_replaced_inside_the_job_and_with_none_back_the_job_stops_resumably(
        cluster, uninterrupted):
    """All of gpu-a's processes are killed right after checkpoint 1 and a new host with the same capacity joins
    (the autoscaler's replacement): the same job places the learner and the reference there, reloads checkpoint 1
    and goes on. Right after checkpoint 2 the replacement dies too and nothing comes back within
    cluster.resource_timeout_s: the job fails with a message naming checkpoint 2; once capacity is back, a
    resumed job finishes the run with the uninterrupted run's metrics."""
    log = cluster.shared / "lost-job.log"
    timeout_s = 60  # long enough for a replacement host to join, short enough to wait out when none does
    job = cluster.start_submit(run_args(cluster, "lost", f"cluster.resource_timeout_s={timeout_s}"), ROOT, log)
    try:
        run_dir = wait_for_checkpoint(cluster, "lost", 1, job)
        cluster.hosts["gpu-a"].kill()
        time.sleep(3)
        cluster.start_worker("gpu-c", cpus=2, resources=LEARNER_HOST)  # the autoscaler's replacement
        wait_for_checkpoint(cluster, "lost", 2, job)
        start = time.monotonic()
        cluster.hosts["gpu-c"].kill()
        job.wait(timeout=JOB_TIMEOUT)
    finally:
        if job.poll() is None:
            job.kill()
    output = log.read_text()
    assert job.returncode != 0 and "failed" in output, output[-5000:]
    assert "placing the learner again" in output and "continuing from iter-000001" in output, output[-5000:]
    assert f"no capacity for it came back within cluster.resource_timeout_s={timeout_s}s" in output, output[-5000:]
    assert "the last whole checkpoint is iter-000002: resume with run.resume=true" in output
    assert time.monotonic() - start < timeout_s + 180  # it gave up after the timeout, not after minutes of hanging
    assert not (run_dir / "summary.json").exists()
    placements = json.loads((run_dir / "nodes.json").read_text())["placements"]
    assert len(placements) == 2 and placements[1]["reason"] != "start"  # what was lost, e.g. "learner rank 0 died"
    replacement = cluster.hosts["gpu-c"].address
    assert [rank["ip"] for rank in placements[1]["learner_ranks"]] == [replacement] * 2
    assert placements[1]["reference"]["ip"] == replacement
    assert placements[1]["generators"] == placements[0]["generators"]  # the engine lived on, not restarted

    cluster.start_worker("gpu-d", cpus=2, resources=LEARNER_HOST)
    cluster.wait_for_nodes({cluster.hosts["gpu-d"].address})
    resumed = cluster.submit(run_args(cluster, "lost", "run.resume=true"), ROOT, timeout=JOB_TIMEOUT)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0 and "succeeded" in output, output[-5000:]
    assert "resumed from iter-000002: iteration 2" in output
    assert_same_metrics(run_dir, uninterrupted)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 3
    placements = json.loads((run_dir / "nodes.json").read_text())["placements"]
    assert [rank["ip"] for rank in placements[-1]["learner_ranks"]] == [cluster.hosts["gpu-d"].address] * 2
