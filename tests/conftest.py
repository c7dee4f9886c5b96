import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from score_ray.assets import ensure_smollm2

    return str(ensure_smollm2())


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def child_env(extra: dict | None = None) -> dict:
    """The environment for a program a test starts, as a user's shell would give it: without the W&B
    service address that wandb exports into this process once a test here has used it (a child would
    share that service instead of starting its own)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    return {**clean, **(extra or {})}


def run_module(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` from the project root, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
    )


def kill_tree(process) -> None:
    """SIGKILL a process and everything it started (the driver and its local Ray: a lost head node)."""
    import psutil

    try:
        parent = psutil.Process(process.pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:  # already gone (and reaped): nothing to kill, and no error to hide another
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session's tests (4 logical CPUs, so fractional actors fit)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
