"""Where an iteration's time goes: phase breakdown, orchestration overhead, scaling, and overlap mode.

Runs `python -m score_ray.launch` (the real system: Ray, vLLM, DeepSpeed, sandboxed graders, W&B
offline) several times and reads each run's metrics.jsonl:

  phases       wall seconds of each phase as the driver sees it, and the compute inside the actors
               (generator, reward actors, reference, learner ranks, weight build + load), medians over
               the iterations after the first (warm-up);
  overhead     wall time of an iteration not spent in any phase's compute (Ray calls, object transfers,
               driver bookkeeping), as a share of the iteration;
  logging      time between consecutive metric rows not inside the iteration (writing metrics.jsonl and
               W&B, checkpoints when due);
  scaling      iteration time with 1x, 2x, 4x the prompts per iteration;
  overlap      rollout.overlap=true (generate k+1 while the learner trains on k) against the same config
               run synchronously, in the same invocation.

    python bench/iteration.py                      # smoke config: ~6 minutes on 2 cores
    python bench/iteration.py --iterations 8 --scales 1,2,4 --overlap-tokens 48

Prints tables and writes bench/results/iteration.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = [  # (label, wall key, compute key)
    ("rollout", "perf/rollout_seconds", "perf/rollout_compute_seconds"),
    ("grading", "perf/grading_seconds", "perf/grading_compute_seconds"),
    ("reference", "perf/reference_seconds", "perf/reference_compute_seconds"),
    ("credit (driver)", "perf/credit_seconds", "perf/credit_seconds"),
    ("learner", "perf/learner_seconds", "perf/learner_compute_seconds"),
    ("weight sync", "perf/sync_seconds", "perf/sync_compute_seconds"),
]


def run(config: str, iterations: int, overrides: list[str]) -> list[dict]:
    """One training run; its per-iteration metric rows (the first, warm-up, included)."""
    with tempfile.TemporaryDirectory() as out:
        args = [sys.executable, "-m", "score_ray.launch", "--config", config, f"run.output_dir={out}",
                "algo.schedule.stage1_iterations=1", f"algo.schedule.stage2_iterations={iterations - 1}",
                "eval.every=0", "eval.at_start=false", "checkpoint.every=0", *overrides]
        start = time.monotonic()
        result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"run failed ({' '.join(overrides)}):\n{result.stderr[-3000:]}")
        (metrics,) = Path(out).glob("*/metrics.jsonl")
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        print(f"  ran {' '.join(overrides) or 'baseline'}: {time.monotonic() - start:.0f}s", flush=True)
        return [r for r in rows if "train/stage" in r]


def median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else 0.0


def breakdown(rows: list[dict]) -> dict:
    steady = rows[1:]  # the first iteration includes compilation and cache warm-up
    table = {label: {"wall": median(steady, wall), "compute": median(steady, compute)} for label, wall, compute in PHASES}
    gaps = [b["perf/wall_time"] - a["perf/wall_time"] - b["perf/iteration_seconds"] for a, b in zip(rows[1:], rows[2:])]
    return {
        "phases": table,
        "iteration_seconds": median(steady, "perf/iteration_seconds"),
        "orchestration_seconds": median(steady, "perf/orchestration_seconds"),
        "orchestration_fraction": median(steady, "perf/orchestration_fraction"),
        "logging_seconds": statistics.median(gaps) if gaps else 0.0,
        "generated_tokens": median(steady, "perf/generated_tokens"),
        "iterations_measured": len(steady),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--iterations", type=int, default=6, help="per run; the first is dropped as warm-up")
    parser.add_argument("--scales", default="1,2,4", help="multiples of rollout.prompts_per_iteration")
    parser.add_argument("--overlap-tokens", type=int, default=48,
                        help="tokens per turn for the overlap comparison (longer rollouts: rollout ~ learning)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "iteration.json")
    args = parser.parse_args()

    from score_ray.config import load_config

    base = load_config(args.config)
    prompts = base.rollout.prompts_per_iteration
    report: dict = {"config": args.config, "iterations": args.iterations}

    print(f"phase breakdown ({args.config}, {args.iterations} iterations, medians after the first):", flush=True)
    rows = run(args.config, args.iterations, [])
    report["breakdown"] = found = breakdown(rows)
    print(f"\n{'phase':<18}{'wall s':>10}{'compute s':>12}{'overhead s':>12}")
    for label, cells in found["phases"].items():
        print(f"{label:<18}{cells['wall']:>10.3f}{cells['compute']:>12.3f}{cells['wall'] - cells['compute']:>12.3f}")
    print(f"{'iteration':<18}{found['iteration_seconds']:>10.3f}")
    print(f"orchestration overhead: {found['orchestration_seconds']:.3f}s = "
          f"{100 * found['orchestration_fraction']:.1f}% of the iteration (target <= 5%)")
    print(f"logging + bookkeeping between iterations: {found['logging_seconds']:.3f}s")

    print("\nscaling (prompts per iteration):", flush=True)
    report["scaling"] = []
    for scale in [int(s) for s in args.scales.split(",")]:
        scaled = breakdown(run(args.config, args.iterations, [f"rollout.prompts_per_iteration={prompts * scale}"]))
        report["scaling"].append({"scale": scale, "prompts": prompts * scale, **scaled})
    first = report["scaling"][0]["iteration_seconds"]
    print(f"\n{'prompts':>8}{'iteration s':>13}{'vs 1x':>8}{'gen tokens/s':>14}{'overhead %':>12}")
    for entry in report["scaling"]:
        rate = entry["generated_tokens"] / max(1e-9, entry["phases"]["rollout"]["wall"])
        print(f"{entry['prompts']:>8}{entry['iteration_seconds']:>13.3f}{entry['iteration_seconds'] / first:>8.2f}"
              f"{rate:>14.0f}{100 * entry['orchestration_fraction']:>12.1f}")

    print("\noverlap (same config, same invocation):", flush=True)
    tokens = [f"rollout.max_tokens_turn1={args.overlap_tokens}", f"rollout.max_tokens_turn2={args.overlap_tokens}"]
    synchronous = breakdown(run(args.config, args.iterations, tokens))
    overlapped = breakdown(run(args.config, args.iterations, tokens + ["rollout.overlap=true"]))
    ratio = overlapped["iteration_seconds"] / synchronous["iteration_seconds"]
    report["overlap"] = {"synchronous": synchronous, "overlap": overlapped, "ratio": ratio}
    learning = sum(synchronous["phases"][p]["wall"] for p in ("grading", "reference", "scoring (driver)", "learner"))
    print(f"synchronous: rollout {synchronous['phases']['rollout']['wall']:.3f}s, grading+reference+learner "
          f"{learning:.3f}s, iteration {synchronous['iteration_seconds']:.3f}s")
    print(f"overlap:     iteration {overlapped['iteration_seconds']:.3f}s (waiting for the rollout "
          f"{overlapped['phases']['rollout']['wall']:.3f}s)")
    print(f"overlap / synchronous = {ratio:.2f} (target <= 0.75 when rollout ~ learning)")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
