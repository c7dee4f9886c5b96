"""A study's statistics: the paper's five metrics per method, as a mean over seeds with a standard error
that counts both the held-out problems (paired per problem) and the seeds; and one method's gain over
another, paired per problem. Pure functions over per-problem rewards.

For a metric with per-problem values v[s][i] (seed s, problem i; e.g. Delta: right@t2 - right@t1):
    y_i = mean over seeds of v[s][i]          m_s = mean over problems of v[s][i]
    mean = mean_i y_i
    se^2 = var_i(y_i) / N  +  var_s(m_s) / S
The first term is the problems' sampling error (paired: both turns, and both methods of a gain, are
compared on the same problem), the second the seeds'; their overlap (the problem x seed interaction) is
counted twice, so the error is slightly conservative. With one seed the seed term is 0: the table says
how many seeds each mean has.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from score_ray import outcomes

# Per-problem value of each of the paper's five metrics, under their logged names (eval/<key>).
PER_PROBLEM: dict[str, Callable[[float, float], float]] = {f"eval/{key}": value
                                                           for key, value in outcomes.PER_PROBLEM.items()}

Records = dict[str, tuple[float, float]]  # problem id -> (r1, r2) of one run


def _variance(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def common_problems(runs: Sequence[Records]) -> list[str]:
    """The problem ids every run evaluated, in the first run's order (a study compares only these)."""
    if not runs:
        return []
    shared = set(runs[0]).intersection(*runs[1:])
    return [problem for problem in runs[0] if problem in shared]


def values(run: Records, problems: Sequence[str], key: str) -> list[float]:
    per_problem = PER_PROBLEM[key]
    return [per_problem(*run[problem]) for problem in problems]


def estimate(seeds: Sequence[Records], problems: Sequence[str], key: str) -> dict[str, float]:
    """{"mean", "se"} of ``key`` over ``seeds`` (runs of one method) on ``problems``."""
    table = [values(run, problems, key) for run in seeds]
    return _combine([sum(column) / len(table) for column in zip(*table)], [sum(row) / len(row) for row in table])


def gain(treated: Sequence[Records], control: Sequence[Records], problems: Sequence[str], key: str) -> dict[str, float]:
    """{"mean", "se"} of ``treated`` minus ``control`` in ``key``, paired per problem; each side's seed
    variance adds to the error."""
    a = [values(run, problems, key) for run in treated]
    b = [values(run, problems, key) for run in control]
    per_problem = [sum(x) / len(a) - sum(y) / len(b) for x, y in zip(zip(*a), zip(*b))]
    seed_term = _variance([sum(row) / len(row) for row in a]) / len(a) + _variance([sum(row) / len(row) for row in b]) / len(b)
    mean = sum(per_problem) / len(per_problem)
    return {"mean": mean, "se": math.sqrt(_variance(per_problem) / len(per_problem) + seed_term)}


def change_estimates(rewards: Sequence[Records], changes: Sequence[dict[str, bool]],
                     problems: Sequence[str]) -> dict[str, dict[str, float]]:
    """How often the second attempt changed the final answer (``eval/changed``, a share of the problems) and
    its precision (``eval/change_precision``: of the changed answers, the share the first attempt had
    wrong), over the seeds of one method. The precision is a ratio of two means, a/b: its problem term is
    the delta method's var_i(a_i - R b_i) / (N b^2), its seed term the variance of the seeds' own ratios."""
    changed = [[float(run[problem]) for problem in problems] for run in changes]
    wrong_changed = [[float(run[problem]) * (1.0 - outcomes.right(seed_rewards[problem][0])) for problem in problems]
                     for run, seed_rewards in zip(changes, rewards)]
    a = [sum(column) / len(changed) for column in zip(*wrong_changed)]
    b = [sum(column) / len(changed) for column in zip(*changed)]
    out = {"eval/changed": _combine(b, [sum(row) / len(row) for row in changed])}
    mean_b = sum(b) / len(b)
    if mean_b > 0:
        ratio = sum(a) / sum(b)
        seed_ratios = [sum(x) / sum(y) for x, y in zip(wrong_changed, changed) if sum(y) > 0]
        problem_term = _variance([x - ratio * y for x, y in zip(a, b)]) / (len(a) * mean_b ** 2)
        seed_term = _variance(seed_ratios) / len(seed_ratios) if seed_ratios else 0.0
        out["eval/change_precision"] = {"mean": ratio, "se": math.sqrt(problem_term + seed_term)}
    return out


def _combine(per_problem: list[float], per_seed: list[float]) -> dict[str, float]:
    mean = sum(per_problem) / len(per_problem)
    se = math.sqrt(_variance(per_problem) / len(per_problem) + _variance(per_seed) / len(per_seed))
    return {"mean": mean, "se": se}
