"""`ray job submit` against a real local Ray head, as users run it on a cluster.

The head runs with token authentication in a fresh HOME (no ~/.ray of this machine's), as on a new
machine: the fixture makes the token the way a user does (`ray get-auth-token --generate`).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, child_env, kill_tree
from score_ray.placement import free_ports

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head node of its own (its own ports, stopped by killing only its processes: other tests' Ray lives on)."""
    from score_ray.assets import cache_dir

    home = tmp_path_factory.mktemp("fresh-home")
    # A fresh HOME has no ~/.ray/auth_token; with RAY_AUTH_MODE=token `ray start --head` dies without one.
    # The project cache is named explicitly: the job must not rebuild models in the empty HOME.
    env = child_env({"RAY_AUTH_MODE": "token", "HOME": str(home), "SCORE_RAY_CACHE": str(cache_dir())})
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    made = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and (home / ".ray" / "auth_token").is_file(), made.stderr[-2000:]
    # Every port its own: another local Ray (the session's test cluster) holds the default agent ports.
    gcs, dashboard, agent, agent_grpc, metrics, runtime_env, client = free_ports(7)
    log = open(tmp_path_factory.mktemp("head") / "ray-start.log", "w")
    process = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}", "--num-cpus=4", "--num-gpus=0",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        # Ready when a trivial job runs: the dashboard answers before the node's job agent has registered.
        deadline = time.monotonic() + 240
        while True:
            probe = subprocess.run([RAY, "job", "submit", "--address", address, "--", sys.executable, "-c",
                                    "print('job ran')"], env=env, capture_output=True, text=True, timeout=240)
            if probe.returncode == 0 and "job ran" in probe.stdout:
                break
            log.flush()
            assert process.poll() is None, f"the head died:\n{open(log.name).read()[-3000:]}"
            assert time.monotonic() < deadline, f"no job ran within 240s:\n{probe.stderr[-2000:]}"
            time.sleep(2)
        yield address, env
    finally:
        kill_tree(process)  # tolerates a head that already died, so its own message is the one reported
        log.close()


def submit(address, env, *args, timeout=900):
    return subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         sys.executable, "-m", "score_ray.launch", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_ray_job_submit_runs_the_smoke_config_on_the_cluster(head, tmp_path):
    address, env = head
    result = submit(address, env, "--config", "configs/smoke.yaml", f"run.output_dir={tmp_path}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output
    (run_dir,) = list(tmp_path.glob("smoke-*"))  # an absolute output dir: not inside the job's working-dir copy
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "train/stage" in r] == [1, 2]
    assert json.loads((run_dir / "summary.json").read_text())["iterations"] == 2
    assert (run_dir / "final_model" / "model.safetensors").is_file()


def test_a_job_asking_for_gpus_the_cluster_lacks_fails_fast_with_the_keys(head, tmp_path):
    address, env = head
    start = time.monotonic()
    result = submit(address, env, "--config", "configs/smoke.yaml", f"run.output_dir={tmp_path}",
                    "learner.gpus_per_rank=1", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "failed" in output
    assert "needs 3 GPUs" in output and "learner.gpus_per_rank" in output
    assert time.monotonic() - start < 120
