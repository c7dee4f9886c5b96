"""Training episodes per minute of a study's recipe, with and without the shared trunk, side by side.

Runs `python -m score_ray.launch` on the study's config and overrides (the real system) for a few
iterations, once with `learner.share_trunk=false` (a reference actor scores the whole model) and once
with `true` (the learner ranks score the reference from one pass through the frozen trunk and train the
top blocks on it), alternating for each repeat, and reports medians over the iterations after the first:

    python bench/episodes_per_minute.py                                   # configs/studies/cpu_study.yaml
    python bench/episodes_per_minute.py --study configs/studies/cpu_study_r1.yaml --iterations 6 --repeats 2

Episodes per minute = episodes per iteration / median iteration seconds * 60. Each phase's matrix-multiply
FLOPs (bench/flops.py) over its median time is set against the cores' measured fp32 matmul rate, so the
table says how far each phase is from what the machine can do. Writes bench/results/episodes_per_minute.json;
`--from-results` prints the table again from that file (measuring only the matmul rate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_throughput import matmul_gflops  # noqa: E402 - one way to measure the cores
from flops import model_shape, phase_flops  # noqa: E402
from iteration import PHASES, breakdown, run  # noqa: E402 - the same runner and phase table

ROOT = Path(__file__).resolve().parent.parent


def bench_settings(iterations: int) -> list[str]:
    """A run of ``iterations`` with no evals but the final one, cut to one problem, and no checkpoints."""
    return ["algo.schedule.stage1_iterations=1", f"algo.schedule.stage2_iterations={iterations - 1}",
            "algo.schedule.rounds=1", "eval.every=0", "eval.at_start=false", "eval.max_problems=1",
            "checkpoint.every=0"]


VARIANTS = {"whole model + reference actor": ["learner.share_trunk=false"], "shared trunk": ["learner.share_trunk=true"]}
RESULTS = ROOT / "bench" / "results" / "episodes_per_minute.json"


def prompt_tokens_per_episode(config) -> float:
    """Mean tokens of x1 plus the turn-2 suffix (close of the turn + self-correction instruction) over the
    recipe's training problems: with the generated tokens, the length of the sequence x2 + y2."""
    from transformers import AutoTokenizer

    from score_ray.assets import resolve_model_path
    from score_ray.data import load_problems
    from score_ray.prompts import TwoTurnPrompter

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model.path, config.model.tiny.model_dump()))
    prompter = TwoTurnPrompter(tokenizer, config.prompts)
    problems, _ = load_problems(config.data.train)
    total = 0
    for problem in problems:
        x1 = prompter.turn1_ids(problem)
        total += len(prompter.turn2_ids(problem.kind, x1, []))
    return total / len(problems)


def utilisation(config, summary: dict, episodes: int) -> dict[str, dict[str, float]]:
    """Per variant and phase: GFLOP per iteration, GFLOP/s at the median phase time, and the fraction of the
    cores' fp32 matmul rate. Rollout counts each token of x2 + y2 once (the prefix cache serves x1 to turn 2)."""
    from score_ray.assets import resolve_model_path

    shape = model_shape(resolve_model_path(config.model.path, config.model.tiny.model_dump()))
    rate = matmul_gflops(int(config.rollout.cpus_per_generator) or 1)
    prompt = prompt_tokens_per_episode(config) * episodes
    table = {"matmul_gflops": rate}
    for name, entry in summary.items():
        generated = statistics.median(r["breakdown"]["generated_tokens"] for r in entry["runs"])
        flops = phase_flops(shape, prompt + generated, generated, config.learner.trainable_top_layers,
                            shared_trunk=name == "shared trunk")
        flops["rollout"] = phase_flops(shape, prompt + generated, generated, 0, shared_trunk=True)["reference"]
        table[name] = {phase: {"gflop": f / 1e9, "gflops": f / 1e9 / entry["phases"][phase],
                               "of_matmul": f / 1e9 / entry["phases"][phase] / rate}
                       for phase, f in flops.items()}
    return table


def print_utilisation(table: dict) -> None:
    print(f"\nmatmul FLOPs per phase against the cores' fp32 matmul rate ({table['matmul_gflops']:.0f} GFLOP/s):")
    for name, phases in table.items():
        if name == "matmul_gflops":
            continue
        print(f"  {name}: " + ", ".join(f"{phase} {cells['gflop']:.0f} GFLOP at {cells['gflops']:.0f} GFLOP/s "
                                         f"({100 * cells['of_matmul']:.0f}%)" for phase, cells in phases.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="configs/studies/cpu_study.yaml")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--from-results", action="store_true", help=f"reprint the table of {RESULTS.name}")
    args = parser.parse_args()

    from score_ray.config import load_config
    from score_ray.study import load_study

    spec = load_study(ROOT / args.study)
    config = load_config(spec.config, spec.overrides)
    episodes = config.rollout.prompts_per_iteration * config.rollout.samples_per_prompt
    if args.from_results:
        saved = json.loads(RESULTS.read_text())
        table = utilisation(config, saved["variants"], saved["episodes_per_iteration"])
        print_utilisation(table)
        RESULTS.write_text(json.dumps({**saved, "utilisation": table}, indent=1))
        return
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
    table = utilisation(config, summary, episodes)
    print_utilisation(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"study": args.study, "episodes_per_iteration": episodes, "ratio": ratio,
                                   "variants": summary, "utilisation": table}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
