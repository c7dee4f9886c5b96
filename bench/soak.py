"""A soak: one long training run, every process's memory and open files recorded as it goes.

Runs `python -m score_ray.launch` (the real system) for many iterations and, every few seconds, reads the
resident memory (RSS) and open file descriptors of the driver and of every Ray process under it: each actor by
its role (ray::GeneratorActor, ray::LearnerWorker, ray::RewardActor, ray::ReferenceActor), and Ray's own
daemons. Each sample is tagged with the iterations finished so far (metrics.jsonl). A leak shows as a slope:
the script fits one per role over the second half of the run (after warm-up) and prints it per 100 iterations.

    python bench/soak.py                                   # smoke model, 200 iterations: ~4 minutes here
    python bench/soak.py --iterations 1000                 # ~17 minutes
    python bench/soak.py --iterations 400 --config smoke learner.zero_stage=3

Writes bench/results/soak.json (every sample and the slopes) and docs/images/soak.png (RSS and open files
per role against iterations).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("GeneratorActor", "LearnerWorker", "RewardActor", "ReferenceActor")


def role_of(process: psutil.Process, driver: int) -> str:
    """The role a process plays: an actor's class (Ray names its worker processes ray::<Class>[.<method>]),
    the driver, Ray's daemons by name, or "other" (sandboxed graders, compilers)."""
    if process.pid == driver:
        return "driver"
    try:
        title = " ".join(process.cmdline())[:200]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "gone"
    for role in ROLES:
        if f"ray::{role}" in title:
            return role
    if title.startswith("ray::"):
        return "ray worker (idle)"
    for daemon in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env"):
        if daemon in title:
            return "ray daemons"
    return "other"


def sample(driver: psutil.Process) -> dict[str, dict[str, float]]:
    """Per role: summed RSS (MB), open file descriptors and process count, over the driver's whole tree."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"rss_mb": 0.0, "fds": 0.0, "processes": 0.0})
    for process in [driver, *driver.children(recursive=True)]:
        try:
            rss, fds = process.memory_info().rss / 2**20, process.num_fds()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        role = role_of(process, driver.pid)
        totals[role]["rss_mb"] += rss
        totals[role]["fds"] += fds
        totals[role]["processes"] += 1
    return dict(totals)


def finished_iterations(run_root: Path) -> int:
    metrics = list(run_root.glob("*/metrics.jsonl"))
    if not metrics:
        return 0
    return sum('"train/stage"' in line for line in metrics[0].read_text().splitlines())


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = sorted({role for s in samples for role in s["roles"]} - {"gone", "other", "ray worker (idle)"})
    fig, (rss_ax, fd_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for role in roles:
        xs = [s["iteration"] for s in samples if role in s["roles"]]
        rss_ax.plot(xs, [s["roles"][role]["rss_mb"] for s in samples if role in s["roles"]], label=role)
        fd_ax.plot(xs, [s["roles"][role]["fds"] for s in samples if role in s["roles"]], label=role)
    rss_ax.set(title="resident memory per role (MB, summed over its processes)", xlabel="iterations finished")
    fd_ax.set(title="open file descriptors per role", xlabel="iterations finished")
    rss_ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--config", default="smoke")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between samples")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "images" / "soak.png")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    stage1 = args.iterations // 3
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "score_ray.launch", "--config", args.config, f"run.output_dir={out}",
                   f"algo.schedule.stage1_iterations={stage1}",
                   f"algo.schedule.stage2_iterations={args.iterations - stage1}",
                   "eval.every=0", "eval.at_start=false", "checkpoint.every=50", "checkpoint.keep=1",
                   "logging.wandb=offline", *args.overrides]
        print(" ".join(command[1:]), flush=True)
        log = open(Path(out) / "launch.log", "w")
        launch = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        driver = psutil.Process(launch.pid)
        samples, start = [], time.monotonic()
        while launch.poll() is None:
            iteration = finished_iterations(Path(out))
            if 1 <= iteration < args.iterations:  # the actors are up, and not yet the final eval and shutdown
                samples.append({"seconds": time.monotonic() - start, "iteration": iteration, "roles": sample(driver)})
                if len(samples) % 20 == 0:
                    roles = samples[-1]["roles"]
                    print(f"  {iteration}/{args.iterations} iterations, "
                          + ", ".join(f"{r} {v['rss_mb']:.0f} MB / {v['fds']:.0f} fds" for r, v in sorted(roles.items())
                                      if r in ROLES or r == "driver"), flush=True)
            time.sleep(args.every)
        log.close()
        if launch.returncode != 0:
            print((Path(out) / "launch.log").read_text()[-3000:], file=sys.stderr)
            raise SystemExit(f"the run failed (exit {launch.returncode})")
    half = [s for s in samples if s["iteration"] >= args.iterations // 2]
    roles = sorted({role for s in samples for role in s["roles"]})
    slopes = {}
    for role in roles:
        for key in ("rss_mb", "fds"):
            points = [(s["iteration"], s["roles"][role][key]) for s in half if role in s["roles"]]
            slopes.setdefault(role, {})[f"{key}_per_100_iterations"] = 100 * slope(points)
        first = next((s["roles"][role] for s in samples if role in s["roles"]), None)
        last = next((s["roles"][role] for s in reversed(samples) if role in s["roles"]), None)
        slopes[role].update(first=first, last=last)
    print(f"\n{'role':<20}{'RSS MB first -> last':>24}{'per 100 it':>12}{'fds first -> last':>22}{'per 100 it':>12}")
    for role, fit in slopes.items():
        if fit["first"] is None:
            continue
        print(f"{role:<20}{fit['first']['rss_mb']:>11.0f} -> {fit['last']['rss_mb']:<10.0f}"
              f"{fit['rss_mb_per_100_iterations']:>+12.1f}{fit['first']['fds']:>10.0f} -> {fit['last']['fds']:<8.0f}"
              f"{fit['fds_per_100_iterations']:>+12.1f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"command": command[1:], "iterations": args.iterations,
                                       "slopes_second_half": slopes, "samples": samples}, indent=1))
    plot(samples, args.plot)
    print(f"wrote {args.output} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
