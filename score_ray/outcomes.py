"""What a two-turn episode's rewards mean: right or wrong at each turn, and the paper's five metrics.

A reward is right from 0.5 up (graders give 1.0 or 0.0). Per problem, each metric is a value of (r1, r2):

    acc_t1     right at turn 1                 delta_i2c  wrong at turn 1, right at turn 2
    acc_t2     right at turn 2                 delta_c2i  right at turn 1, wrong at turn 2
    delta      right@t2 - right@t1

A table's metric is their mean over problems (score_ray.evaluate, score_ray.study.stats). Pure; no imports.
"""

from __future__ import annotations

from typing import Callable

RIGHT_FROM = 0.5


def is_right(reward: float) -> bool:
    return reward >= RIGHT_FROM


def right(reward: float) -> float:
    """1.0 for a right answer, 0.0 for a wrong one."""
    return 1.0 if is_right(reward) else 0.0


def corrected(r1: float, r2: float) -> bool:
    """Wrong at turn 1, right at turn 2 (i->c)."""
    return not is_right(r1) and is_right(r2)


def broken(r1: float, r2: float) -> bool:
    """Right at turn 1, wrong at turn 2 (c->i)."""
    return is_right(r1) and not is_right(r2)


PER_PROBLEM: dict[str, Callable[[float, float], float]] = {
    "acc_t1": lambda r1, r2: right(r1),
    "acc_t2": lambda r1, r2: right(r2),
    "delta": lambda r1, r2: right(r2) - right(r1),
    "delta_i2c": lambda r1, r2: float(corrected(r1, r2)),
    "delta_c2i": lambda r1, r2: float(broken(r1, r2)),
}
METRIC_KEYS = tuple(PER_PROBLEM)
LABELS = {"acc_t1": "Acc@t1", "acc_t2": "Acc@t2", "delta": "Delta(t1,t2)", "delta_i2c": "Delta_i->c",
          "delta_c2i": "Delta_c->i"}
