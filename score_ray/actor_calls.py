"""Calling a group of Ray actors together (the learner ranks, the reference) and noticing when one died.

``call_ranks(workers, "train_step", ...)`` runs one method on every actor and returns their answers in order;
``gather`` is the waiting behind it, which raises ``LearnerLost`` as soon as one actor died instead of
waiting on survivors that may be blocked in a collective with it.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import ray

from score_ray.faults import LearnerLost


def call_ranks(workers: Sequence, method: str, *args: Any, per_rank: Optional[Sequence[tuple]] = None,
               role: str = "learner rank") -> list:
    """``method`` on every worker, each with ``args`` (or, with ``per_rank``, each with its own argument tuple
    followed by ``args``); their answers in the workers' order."""
    if per_rank is not None and len(per_rank) != len(workers):
        raise ValueError(f"{len(per_rank)} argument tuples for {len(workers)} workers")
    own = per_rank if per_rank is not None else [()] * len(workers)
    return gather([getattr(worker, method).remote(*mine, *args) for worker, mine in zip(workers, own)], role)


def gather(refs: list, role: str = "learner rank", grace_s: float = 60.0) -> list:
    """``ray.get`` of every ref, raising ``LearnerLost`` as soon as ONE actor died: the others may be
    blocked in a collective with the dead one and would never answer.

    A survivor's collective often fails (connection reset by the dead peer) before Ray reports the death
    itself; after such an error the other refs get ``grace_s`` to show whether a peer died, which makes the
    failure a ``LearnerLost``, before the error is raised as it is.
    """
    pending = {ref: index for index, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    first_error: Optional[BaseException] = None
    deadline = None
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
        if not done:  # grace over: no peer reported dead
            break
        index = pending.pop(done[0])
        try:
            results[index] = ray.get(done[0])
        except ray.exceptions.RayActorError as err:
            raise LearnerLost(f"{role} {index} died ({str(err).splitlines()[0][:240]})") from err
        except Exception as err:  # noqa: BLE001 - re-raised below unless a peer turns out dead
            if first_error is None:
                first_error, deadline = err, time.monotonic() + grace_s
    if first_error is not None:
        raise first_error
    return results
