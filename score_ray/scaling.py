"""``python -m score_ray.scaling MODEL_OR_RUN [MODEL_OR_RUN ...] [--config FILE] [--budgets 2 4 8 16] [--n N]``.

Inference-time scaling at an equal sample budget (SCoRe's appendix): with K samples to spend on a problem,
is it better to draw K independent first attempts and take the majority answer, or K/2 first attempts each
followed by its self-correction and take the majority of the K/2 second answers? Both spend K samples.

Each model draws ``max(budgets)`` sampled two-turn episodes per problem (rollout.temperature, the trainer's
seeds); budget K votes over the first K first attempts ("parallel") and over the second attempts of the
first K/2 episodes ("sequential"). Prints a table, writes ``scaling.json`` and ``scaling.png`` into
``--output``. Held-out problems by default; ``--on-train`` for probes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from score_ray.config import ConfigError, load_config


@dataclass(frozen=True)
class ProblemSamples:
    """One problem's sampled answers per turn, in sampling order (None: no answer, or a response cut at the
    token cap), and the answers the grader found right."""

    first: list[Optional[str]]
    second: list[Optional[str]]
    right: frozenset[str]


def vote(answers: Sequence[Optional[str]]) -> Optional[str]:
    """The most frequent answer (None never wins); a tie goes to the answer drawn first."""
    counts = Counter(answer for answer in answers if answer is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(answer for answer in answers if answer is not None and counts[answer] == best)


def scaling_curve(problems: Sequence[ProblemSamples], budgets: Sequence[int]) -> dict[str, dict[int, float]]:
    """Accuracy of the majority answer at each budget K: over K first attempts ("parallel") and over the second
    attempts of K/2 episodes ("sequential")."""
    curve: dict[str, dict[int, float]] = {"parallel": {}, "sequential": {}}
    for k in budgets:
        if k < 2 or k % 2:
            raise ValueError(f"a budget must be an even number of samples >= 2, got {k}")
        curve["parallel"][k] = sum(vote(p.first[:k]) in p.right for p in problems) / len(problems)
        curve["sequential"][k] = sum(vote(p.second[: k // 2]) in p.right for p in problems) / len(problems)
    return curve


def problem_samples(episodes, r1: Sequence[float], r2: Sequence[float]) -> list[ProblemSamples]:
    """Group graded episodes by problem, in order. An answer counts as right when a whole response giving it
    was graded right (the grader reads the same answer the same way; a cut response earns nothing)."""
    from score_ray.evaluate import answer_of
    from score_ray.outcomes import is_right

    by_problem: dict[str, list[tuple[Optional[str], Optional[str]]]] = {}
    right: dict[str, set[str]] = {}
    for episode, a, b in zip(episodes, r1, r2):
        answers = []
        for turn, reward in ((1, a), (2, b)):
            answer = None if episode.truncated(turn) else answer_of(episode, turn)
            if answer is not None and is_right(reward):
                right.setdefault(episode.problem.id, set()).add(answer)
            answers.append(answer)
        by_problem.setdefault(episode.problem.id, []).append((answers[0], answers[1]))
    return [ProblemSamples([a for a, _ in pairs], [b for _, b in pairs], frozenset(right.get(problem, set())))
            for problem, pairs in by_problem.items()]


def sample_model(config, path: str, problems, samples: int) -> list[ProblemSamples]:
    import ray

    from score_ray.batches import sampling_seeds
    from score_ray.eval import start_engine
    from score_ray.reward import grade_episodes

    generator, pool = start_engine(config, path)
    try:
        episodes = []
        size = config.rollout.prompts_per_iteration  # training-sized batches with the trainer's seeds (see probe)
        for start in range(0, len(problems), size):
            batch = problems[start : start + size]
            seeds = sampling_seeds(config.run.seed, start // size + 1, batch)
            episodes += ray.get(generator.generate.remote(batch, samples, False, seeds)).episodes
        grades = grade_episodes(pool, episodes)
    finally:
        pool.shutdown()
        ray.kill(generator)
        ray.shutdown()
    return problem_samples(episodes, grades.r1, grades.r2)


def plot(curves: dict[str, dict[str, dict[int, float]]], path: Path, problems: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for index, (model, curve) in enumerate(curves.items()):
        color = f"C{index}"
        for kind, style in (("parallel", "--"), ("sequential", "-")):
            budgets = sorted(curve[kind])
            axis.plot(budgets, [100 * curve[kind][k] for k in budgets], style, color=color, marker="o",
                      label=f"{model}: {'K first attempts' if kind == 'parallel' else 'K/2 attempts + corrections'}")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("samples per problem (K)")
    axis.set_ylabel("majority-vote accuracy (%)")
    axis.set_title(f"Inference-time scaling at equal sample budget ({problems} problems)", fontsize=10)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m score_ray.scaling", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="HF model folders, run folders, 'organism', 'smollm2' ...")
    parser.add_argument("--config", default=None, help="config for data, prompts and rollout (default: the first run's)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8, 16], help="even sample budgets K")
    parser.add_argument("--n", type=int, default=500, help="problems")
    parser.add_argument("--on-train", action="store_true", help="the config's training problems (probes)")
    parser.add_argument("--output", type=Path, default=Path("scaling"), help="folder for scaling.json and scaling.png")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)

    targets = []
    for model in args.models:
        run = Path(model)
        if (run / "config.yaml").is_file() and (run / "final_model").is_dir():
            targets.append((run.name, str(run / "final_model"), str(run / "config.yaml")))
        else:
            targets.append((Path(model).name or model, model, None))
    config_file = args.config or next((c for _, _, c in targets if c), None)
    try:
        config = load_config(config_file, args.overrides)
        if any(k < 2 or k % 2 for k in args.budgets):
            raise ConfigError(f"--budgets must be even numbers >= 2, got {args.budgets}")
    except ConfigError as err:
        print(f"score_ray.scaling: {err}", file=sys.stderr)
        return 2

    from score_ray.assets import resolve_model_path
    from score_ray.data import load_problems

    problems, report = load_problems(config.data.train if args.on_train else config.data.eval)
    problems = problems[: args.n]
    budgets = sorted(args.budgets)
    curves = {}
    for name, model, _ in targets:
        path = resolve_model_path(model, config.model.tiny.model_dump())
        print(f"{name}: {max(budgets)} sampled two-turn episodes on each of {len(problems)} problems of {report.source}",
              flush=True)
        curves[name] = scaling_curve(sample_model(config, path, problems, max(budgets)), budgets)
    print(f"{'model':<28}{'K':>4}{'K first attempts':>20}{'K/2 + corrections':>20}")
    for name, curve in curves.items():
        for k in budgets:
            print(f"{name[:27]:<28}{k:>4}{100 * curve['parallel'][k]:>19.1f}%{100 * curve['sequential'][k]:>19.1f}%")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "scaling.json").write_text(json.dumps(
        {"problems": len(problems), "source": report.source, "split": "train" if args.on_train else "held-out",
         "models": {name: model for name, model, _ in targets},
         "curves": {name: {kind: {str(k): v for k, v in c.items()} for kind, c in curve.items()}
                    for name, curve in curves.items()}}, indent=2) + "\n")
    plot(curves, args.output / "scaling.png", len(problems))
    print(f"wrote {args.output / 'scaling.json'} and {args.output / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
