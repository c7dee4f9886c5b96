"""What learner.trainable costs, side by side: all weights, the top blocks (shared trunk), a LoRA adapter.

Runs `python -m score_ray.launch` on one recipe (the demo's, SmolLM2-135M, by default) once per mode, the modes
alternating within each repeat, and samples every process of the run's tree (resident memory by role, as
bench/soak.py does) while it runs:

    python bench/trainable_modes.py                          # configs/cpu_demo.yaml, 5 iterations, 1 repeat
    python bench/trainable_modes.py --iterations 8 --repeats 2

Reports medians over the iterations after the first: megabytes and seconds per weight sync, the learner's step
seconds, iteration seconds and episodes per minute; and the peak resident memory of the learner ranks, of the
reference actor (none where the ranks serve it) and of the whole run. Writes bench/results/trainable_modes.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from iteration import median  # noqa: E402 - the same row reading
from soak import sample  # noqa: E402 - one way to read a run's memory by role

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "trainable_modes.json"
MODES = {
    "all": ["learner.trainable=all"],
    "top_layers": ["learner.trainable=top_layers", "learner.share_trunk=true"],
    "lora": ["learner.trainable=lora"],
}
ROW_KEYS = {"sync_mb": "perf/sync_mb", "sync_seconds": "perf/sync_seconds", "learner_seconds": "perf/learner_seconds",
            "rollout_seconds": "perf/rollout_seconds", "reference_seconds": "perf/reference_seconds",
            "iteration_seconds": "perf/iteration_seconds"}


def run_sampled(config: str, iterations: int, overrides: list[str]) -> tuple[list[dict], dict[str, float]]:
    """One training run: its per-iteration rows and the peak resident MB of each role and of the whole tree."""
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as out:
        args = [sys.executable, "-m", "score_ray.launch", "--config", config, f"run.output_dir={out}",
                "algo.schedule.stage1_iterations=1", f"algo.schedule.stage2_iterations={iterations - 1}",
                "eval.every=0", "eval.at_start=false", "eval.max_problems=1", "checkpoint.every=0", *overrides]
        process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        driver = psutil.Process(process.pid)
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                roles = sample(driver)
                for role, values in roles.items():
                    peaks[role] = max(peaks.get(role, 0.0), values["rss_mb"])
                peaks["whole run"] = max(peaks.get("whole run", 0.0), sum(v["rss_mb"] for v in roles.values()))
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, errors = process.communicate()
        done.set()
        watcher.join()
        if process.returncode != 0:
            raise SystemExit(f"run failed ({' '.join(overrides)}):\n{errors[-3000:]}")
        (metrics,) = Path(out).glob("*/metrics.jsonl")
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r for r in rows if "train/stage" in r], peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cpu_demo.yaml")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="for every mode's run")
    args = parser.parse_args()

    from score_ray.config import load_config

    config = load_config(args.config, args.overrides)
    episodes = config.rollout.prompts_per_iteration * config.rollout.samples_per_prompt
    measured: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, extra in MODES.items():
            start = time.monotonic()
            rows, peaks = run_sampled(args.config, args.iterations, [*args.overrides, *extra])
            steady = rows[1:]  # the first iteration includes compilation and cache warm-up
            measured[mode].append({**{name: median(steady, key) for name, key in ROW_KEYS.items()},
                                   "peak_mb": peaks})
            print(f"  {mode}: {time.monotonic() - start:.0f}s", flush=True)
    summary = {}
    for mode, runs in measured.items():
        entry = {name: statistics.median(r.get(name, 0.0) for r in runs) for name in ROW_KEYS}
        entry["episodes_per_minute"] = episodes / entry["iteration_seconds"] * 60
        for role in ("LearnerWorker", "ReferenceActor", "whole run"):
            entry[f"peak_mb {role}"] = statistics.median(r["peak_mb"].get(role, 0.0) for r in runs)
        summary[mode] = entry
    rows = [("sync MB", "sync_mb", ".2f"), ("sync seconds", "sync_seconds", ".3f"),
            ("learner step seconds", "learner_seconds", ".2f"), ("rollout seconds", "rollout_seconds", ".2f"),
            ("reference seconds", "reference_seconds", ".2f"), ("iteration seconds", "iteration_seconds", ".2f"),
            ("episodes / minute", "episodes_per_minute", ".1f"),
            ("peak MB, learner ranks", "peak_mb LearnerWorker", ".0f"),
            ("peak MB, reference actor", "peak_mb ReferenceActor", ".0f"), ("peak MB, whole run", "peak_mb whole run", ".0f")]
    print(f"\n{args.config} {' '.join(args.overrides)}: {episodes} episodes an iteration, medians over iterations "
          f"2..{args.iterations}, {args.repeats} run(s) each")
    print(f"{'':<26}" + "".join(f"{mode:>14}" for mode in MODES))
    for label, key, spec in rows:
        print(f"{label:<26}" + "".join(f"{summary[mode][key]:>14{spec}}" for mode in MODES))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "iterations": args.iterations,
                                   "repeats": args.repeats, "episodes_per_iteration": episodes, "modes": summary,
                                   "runs": measured}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
