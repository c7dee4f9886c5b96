"""Which problems each iteration trains on, and the sampling seed of each.

The order is a pure function of (seed, epoch): a resumed run continues exactly where the
checkpointed one stopped, and a new epoch reshuffles without skipping or repeating a problem.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from score_ray.data import Problem


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def next_batch(epoch: int, position: int, count: int, size: int, seed: int) -> tuple[list[int], int, int]:
    """(the next ``size`` problem indices, the epoch and position after them). A new epoch starts with a
    new shuffle (nothing skipped or repeated)."""
    picked: list[int] = []
    while len(picked) < size:
        order = epoch_order(count, seed, epoch)
        take = order[position : position + size - len(picked)]
        picked += take
        position += len(take)
        if position >= count:
            epoch, position = epoch + 1, 0
    return picked, epoch, position


def sampling_seeds(seed: int, iteration: int, problems: Sequence[Problem]) -> list[int]:
    """One sampling seed per problem of an iteration, independent of which generator gets it: a rollout
    redone after a crash (or a resume) samples exactly what the lost one would have, given the weights."""
    seeds = []
    for index, problem in enumerate(problems):
        digest = hashlib.sha256(f"{seed}:{iteration}:{index}:{problem.id}".encode()).digest()
        seeds.append(int.from_bytes(digest[:4], "little") & 0x3FFFFFFF)
    return seeds
