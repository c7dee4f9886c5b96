"""Training episodes per minute of a study's recipe, with and without the shared trunk, side by side.

Runs `python -m score_ray.launch` on the study's config and overrides (the real system) for a few
iterations, once with `learner.share_trunk=false` (a reference actor scores the whole model) and once
with `true` (the learner ranks score the reference from one pass through the frozen trunk and train the
top blocks on it), alternating for each repeat, and reports medians over the iterations after the first:

    python bench/episodes_per_minute.py                                   # configs/studies/cpu_study.yaml
    python bench/episodes_per_minute.py --study configs/studies/cpu_study_r1.yaml --iterations 6 --repeats 2

Episodes per minute = episodes per iteration / median iteration seconds * 60. Writes
bench/results/episodes_per_minute.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from iteration import PHASES, breakdown, run  # noqa: E402 - the same runner and phase table

ROOT = Path(__file__).resolve().parent.parent


def bench_settings(iterations: int) -> list[str]:
    """A run of ``iterations`` with no evals but the final one, cut to one problem, and no checkpoints."""
    return ["algo.schedule.stage1_iterations=1", f"algo.schedule.stage2_iterations={iterations - 1}",
            "algo.schedule.rounds=1", "eval.every=0", "eval.at_start=false", "eval.max_problems=1",
            "checkpoint.every=0"]


VARIANTS = {"whole model + reference actor": ["learner.share_trunk=false"], "shared trunk": ["learner.share_trunk=true"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="configs/studies/cpu_study.yaml")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from score_ray.config import load_config
    from score_ray.study import load_study

    spec = load_study(ROOT / args.study)
    config = load_config(spec.config, spec.overrides)
    episodes = config.rollout.prompts_per_iteration * config.rollout.samples_per_prompt
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name, extra in VARIANTS.items():
            # The bench's schedule and settings last: they win over the study's (later overrides win).
            rows = run(spec.config, args.iterations, [*spec.overrides, *bench_settings(args.iterations), *extra])
            results[name].append({"breakdown": breakdown(rows), "trunk_reused": [r.get("perf/learner_trunk_reused")
                                                                                for r in rows]})
    summary = {}
    for name, runs in results.items():
        seconds = statistics.median(r["breakdown"]["iteration_seconds"] for r in runs)
        phases = {label: statistics.median(r["breakdown"]["phases"][label]["wall"] for r in runs)
                  for label, _, _ in PHASES}
        summary[name] = {"iteration_seconds": seconds, "episodes_per_minute": episodes / seconds * 60,
                         "phases": phases, "runs": runs}
    names = list(VARIANTS)
    print(f"\n{args.study}: {episodes} episodes per iteration, medians over iterations 2..{args.iterations}, "
          f"{args.repeats} run(s) each")
    print(f"{'phase (wall s)':<22}" + "".join(f"{n:>32}" for n in names))
    for label, _, _ in PHASES:
        print(f"{label:<22}" + "".join(f"{summary[n]['phases'][label]:>32.2f}" for n in names))
    print(f"{'iteration':<22}" + "".join(f"{summary[n]['iteration_seconds']:>32.2f}" for n in names))
    print(f"{'episodes / minute':<22}" + "".join(f"{summary[n]['episodes_per_minute']:>32.1f}" for n in names))
    ratio = summary[names[1]]["episodes_per_minute"] / summary[names[0]]["episodes_per_minute"]
    print(f"ratio (shared trunk / whole model): {ratio:.2f}x")
    out = ROOT / "bench" / "results" / "episodes_per_minute.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"study": args.study, "episodes_per_iteration": episodes, "ratio": ratio,
                               "variants": summary}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
