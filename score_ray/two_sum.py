"""Two-sum: a task whose answer is much cheaper to check than to find.

A problem is a list of distinct two-digit numbers and a target that exactly one pair of them sums to:
``37 12 85 64 20=76`` -> ``1264``. Finding the pair searches the pairs of the list (ten for five
numbers); checking a proposed pair is one addition and a comparison. That gap is what a second attempt
can use and what a + b lacks (checking ``a + b = c`` is the same computation as answering it).

The answer is the pair in increasing order, its two numbers written together: ``1264`` is 12 and 64 (every
number has two digits, so the reading is unique). It is one plain number, graded by the project's math
grader as it grades every numeric answer (score_ray.reward.math: the last number of the response, equal
as a number, as for GSM-style data): ``6412`` (the wrong order), ``76`` (the target) and a cut-off ``12``
are wrong; text before the last number (the sum a second attempt restates, ``97 1264``) does not count.

Pure functions of a ``random.Random``: the data source (score_ray.data) and the organism's pretraining
corpus (score_ray.organism) draw problems the same way. No torch here.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from itertools import combinations
from typing import Optional

_ANSWER = re.compile(r"^(\d\d)(\d\d)$")


@dataclass(frozen=True)
class TwoSum:
    """One instance: ``numbers`` in the order shown, the ``target``, and the one pair that reaches it."""

    numbers: tuple[int, ...]
    target: int

    @property
    def text(self) -> str:
        return " ".join(str(n) for n in self.numbers) + f"={self.target}"

    @property
    def pair(self) -> tuple[int, int]:
        (solution,) = [p for p in self.pairs() if sum(p) == self.target]
        return solution

    def pairs(self) -> list[tuple[int, int]]:
        """Every pair of the list, each in increasing order, in a fixed order."""
        return [tuple(sorted(p)) for p in combinations(self.numbers, 2)]  # type: ignore[misc]


def format_pair(pair: tuple[int, int]) -> str:
    return f"{pair[0]}{pair[1]}"


def parse_pair(text: str) -> Optional[tuple[int, int]]:
    """``1264`` -> (12, 64); anything else -> None."""
    match = _ANSWER.match(text.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def draw(rng: random.Random, size: int = 5, low: int = 10, high: int = 99) -> TwoSum:
    """A list of ``size`` distinct numbers in [low, high] and a target reached by exactly one pair."""
    if size < 2 or high - low + 1 < size:
        raise ValueError(f"two-sum needs 2 <= size <= the number of values in [{low}, {high}], got size {size}")
    while True:
        numbers = tuple(rng.sample(range(low, high + 1), size))
        sums = [a + b for a, b in combinations(numbers, 2)]
        unique = [s for s in sums if sums.count(s) == 1]
        if unique:
            return TwoSum(numbers, rng.choice(unique))


def distractor(problem: TwoSum, rng: random.Random, avoid: tuple[tuple[int, int], ...] = ()) -> tuple[int, int]:
    """A wrong pair of the list, drawn with weight 1 / (1 + |its sum - target|): near misses are likelier,
    as an answer that was not checked tends to be one."""
    wrong = [p for p in problem.pairs() if sum(p) != problem.target and p not in avoid]
    weights = [1.0 / (1.0 + abs(sum(p) - problem.target)) for p in wrong]
    return rng.choices(wrong, weights=weights)[0]
