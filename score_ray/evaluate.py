"""Held-out two-turn evaluation (greedy) and the paper's five metrics.

Acc@t1, Acc@t2, Delta = Acc@t2 - Acc@t1, Delta_i->c (fraction of ALL problems wrong
at turn 1 and right at turn 2), Delta_c->i (right at turn 1, wrong at turn 2). Each
comes with a standard error from the eval size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:
    from score_ray.data import Problem
    from score_ray.episode import Episode

from score_ray.outcomes import LABELS, METRIC_KEYS, PER_PROBLEM


def self_correction_metrics(r1: Sequence[float], r2: Sequence[float]) -> dict[str, float]:
    """The five metrics (fractions) and their standard errors (``<key>_se``)."""
    n = len(r1)
    if n == 0 or n != len(r2):
        raise ValueError("need the same, non-zero number of turn-1 and turn-2 rewards")
    per_problem = {key: [value(a, b) for a, b in zip(r1, r2)] for key, value in PER_PROBLEM.items()}
    metrics: dict[str, float] = {"n": float(n)}
    for key, values in per_problem.items():
        mean = sum(values) / n
        variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
        metrics[key] = mean
        metrics[f"{key}_se"] = math.sqrt(variance / n)  # paired: Delta's SE accounts for the correlation
    return metrics


def format_table(rows: dict[str, dict[str, float]], problems: str = "held-out") -> str:
    """A paper-style table: one row per model, percentages with +- standard errors (``problems``: which split)."""
    header = f"{'model':<14}" + "".join(f"{LABELS[k]:>18}" for k in METRIC_KEYS)
    lines = [header, "-" * len(header)]
    for name, metrics in rows.items():
        cells = "".join(f"{100 * metrics[k]:>10.1f} +-{100 * metrics[k + '_se']:4.1f}" for k in METRIC_KEYS)
        lines.append(f"{name:<14}{cells}")
    n = next(iter(rows.values()))["n"] if rows else 0
    lines.append(f"(percent of {int(n)} {problems} problems, greedy; +- one standard error)")
    return "\n".join(lines)


def answer_of(episode: "Episode", turn: int) -> Optional[str]:
    """The final answer the grader reads from a math episode's turn (None for code: its answer is the program)."""
    from score_ray.reward.math import graded_answer

    problem = episode.problem
    return graded_answer(episode.response_text(turn), problem.answer) if problem.kind == "math" else None


def answer_changed(episode: "Episode") -> bool:
    """Whether the second attempt's final answer differs from the first's (a program: its text, stripped)."""
    if episode.problem.kind == "math":
        return answer_of(episode, 1) != answer_of(episode, 2)
    return episode.response_text(1).strip() != episode.response_text(2).strip()


def write_eval_records(path, episodes: Sequence["Episode"]) -> None:
    """One JSON line per held-out problem (id, r1, r2, both answers, their token lengths, whether they hit
    the token cap and whether the final answer changed): what a study pairs per problem."""
    import json
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for episode in episodes:
            handle.write(json.dumps({"id": episode.problem.id, "r1": episode.r1, "r2": episode.r2,
                                     "y1": episode.y1_text, "y2": episode.y2_text, "length1": len(episode.y1),
                                     "length2": len(episode.y2), "truncated1": episode.y1_truncated,
                                     "truncated2": episode.y2_truncated, "changed": answer_changed(episode)}) + "\n")
    os.replace(tmp, path)


def two_turn_eval(
    generate: Callable[[Sequence["Problem"]], list["Episode"]], pool, problems: Sequence["Problem"], label: str = "eval",
    chunk: int = 200,  # config: eval.batch_problems
) -> tuple[dict[str, float], list["Episode"]]:
    """Greedy two-turn episodes on the held-out problems, graded; returns metrics and the episodes.

    ``generate(problems)`` returns one greedy episode per problem (the trainer's fault-tolerant rollout,
    or one engine). Problems go out in chunks so a progress bar with an ETA can follow.
    """
    import sys

    from tqdm import tqdm

    from score_ray.reward import grade_episodes

    episodes: list["Episode"] = []
    with tqdm(total=len(problems), desc=label, unit="problem", disable=not sys.stderr.isatty(), leave=False) as bar:
        for start in range(0, len(problems), chunk):
            batch = problems[start : start + chunk]
            episodes += generate(batch)
            bar.update(len(batch))
    grades = grade_episodes(pool, episodes)
    for episode, a, b in zip(episodes, grades.r1, grades.r2):
        episode.r1, episode.r2 = a, b
    return self_correction_metrics(grades.r1, grades.r2), episodes
