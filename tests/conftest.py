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


def make_episode(x1=(1,), y1=(2,), instruction=(3,), y2=(4,), problem=None, y1_logp=None, y2_logp=None,
                 **fields):
    """An ``Episode`` built by hand, as a generator lays one out: x2 = x1 + y1 + ``instruction`` (the close of
    the turn and the self-correction prompt); the sampler's log-probs 0.0 per token unless given; any other
    field by name."""
    from score_ray.data import Problem
    from score_ray.episode import Episode

    problem = problem if problem is not None else Problem(id="p0", kind="math", prompt="1 + 1", answer="2")
    fields.setdefault("y1_truncated", False)
    return Episode(problem=problem, sample=fields.pop("sample", 0), x1=list(x1), y1=list(y1),
                   y1_logp=list(y1_logp) if y1_logp is not None else [0.0] * len(y1),
                   x2=list(x1) + list(y1) + list(instruction), y2=list(y2),
                   y2_logp=list(y2_logp) if y2_logp is not None else [0.0] * len(y2), **fields)


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


def y2_sample(episode, ref, advantage):
    """A learner sample training y2 alone, with one advantage everywhere."""
    from score_ray.samples import LearnerSample, position_temperatures

    start, end = episode.turn_span(2)
    width = len(episode.sequence) - 1
    mask = [0.0] * start + [1.0] * (end - start)
    return LearnerSample(input_ids=episode.sequence, loss_mask=mask, advantage=[advantage] * width,
                         kl_coef=[0.0] * width, old_logp=[0.0] * width, ref_logp=ref,
                         temperature=position_temperatures(episode))


def launch_killed_after_checkpoint(args: list[str], output_dir: Path, iteration: int, timeout: float = 600) -> Path:
    """Start ``python -m score_ray.launch ARGS run.output_dir=OUTPUT_DIR``, SIGKILL the driver and its Ray the moment
    checkpoint ``iteration`` is complete (a lost head node mid-run), and return the run folder it left."""
    import time

    process = subprocess.Popen([sys.executable, "-m", "score_ray.launch", *args, f"run.output_dir={output_dir}"],
                               cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline, marker = time.monotonic() + timeout, None
    while time.monotonic() < deadline and process.poll() is None:
        found = list(output_dir.glob(f"*/checkpoints/iter-{iteration:06d}/COMPLETE"))
        if found:
            marker = found[0]
            break
        time.sleep(0.02)
    kill_tree(process)
    assert marker is not None, f"the run never wrote checkpoint {iteration}"
    run_dir = marker.parents[2]
    assert not (run_dir / "summary.json").exists()  # it really died before finishing
    return run_dir


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


# A run that lost and redid iterations (a crash and resume, a lost node) must log what an uninterrupted run
# with the same seed logs: these per-iteration keys, and the final eval.
PER_TURN_KEYS = [f"train/{name}_t{turn}" for name in ("reward", "kl", "entropy", "length", "truncated") for turn in (1, 2)]
EVAL_KEYS = ["eval/acc_t1", "eval/acc_t2", "eval/delta", "eval/delta_i2c", "eval/delta_c2i"]
REDONE_KEYS = PER_TURN_KEYS + ["train/loss", "train/pg_loss", "train/kl_loss", "train/grad_norm", "train/i2c", "train/c2i"]


def assert_same_as_uninterrupted(rows: list[dict], expected_rows: list[dict], iterations: list[int]) -> None:
    """Every iteration logged exactly once, though some were started twice, with the uninterrupted numbers."""
    train = {r["iteration"]: r for r in rows if "train/stage" in r}
    expected = {r["iteration"]: r for r in expected_rows if "train/stage" in r}
    assert [r["iteration"] for r in rows if "train/stage" in r] == iterations
    for iteration in iterations:
        for key in REDONE_KEYS:
            assert train[iteration][key] == pytest.approx(expected[iteration][key], rel=1e-4, abs=1e-6), (iteration, key)
    final = [r for r in rows if "eval/acc_t1" in r][-1]
    final_expected = [r for r in expected_rows if "eval/acc_t1" in r][-1]
    assert {k: final[k] for k in EVAL_KEYS} == {k: final_expected[k] for k in EVAL_KEYS}
