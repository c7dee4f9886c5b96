"""A pool of Ray reward actors grading batches concurrently.

Each RewardActor holds a Grader (its own sandbox runs and math judge processes)
and takes a fractional CPU share. The pool hands out small chunks and keeps every
actor busy (a slow chunk does not hold up the others), and returns results in the
order of the input. Actors restart when they die (Ray re-runs the lost chunk on the
restarted actor); an actor past its restarts leaves the pool and its chunk goes to
another. Each chunk's results are written once, at its input positions, so nothing
is lost or counted twice.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import ray

from score_ray.config import RewardConfig
from score_ray.placement import kill_actors, this_node
from score_ray.reward import Grader
from score_ray.reward.types import GradeRequest, GradeResult


@ray.remote
class RewardActor:
    def __init__(self, config: RewardConfig):
        self.grader = Grader(config)

    def grade_with_seconds(self, requests: list[GradeRequest]) -> tuple[list[GradeResult], float]:
        return self.grader.grade_with_seconds(requests)

    def node(self) -> dict[str, Any]:
        return this_node()


class RewardPool:
    """``config.workers`` reward actors; ``chunk_size`` requests go to an actor at a time."""

    def __init__(self, config: RewardConfig = RewardConfig(), chunk_size: int = 8, restart_wait_s: float = 300.0,
                 runtime_env: Optional[dict[str, Any]] = None):
        self.chunk_size = chunk_size
        self.restart_wait_s = restart_wait_s
        self.lost_actors = 0
        self.actors = [
            RewardActor.options(num_cpus=config.cpus_per_worker, max_restarts=config.max_restarts,
                                max_task_retries=config.max_restarts, runtime_env=runtime_env).remote(config)
            for _ in range(config.workers)
        ]

    def grade(self, requests: Sequence[GradeRequest],
              on_progress: Optional[Callable[[int], None]] = None) -> list[GradeResult]:
        """Grade all requests; ``on_progress(n)`` is called as each chunk of n finishes."""
        return self.grade_with_seconds(requests, on_progress)[0]

    def grade_with_seconds(
        self, requests: Sequence[GradeRequest], on_progress: Optional[Callable[[int], None]] = None
    ) -> tuple[list[GradeResult], float]:
        """(the results in the requests' order, the seconds the busiest actor spent grading: the compute)."""
        records = list(requests)
        chunks = [(start, records[start : start + self.chunk_size]) for start in range(0, len(records), self.chunk_size)]
        results: list[Optional[GradeResult]] = [None] * len(records)
        busy: dict[Any, float] = {}  # seconds each actor spent grading (its own clock)
        pending: dict[Any, tuple[int, int, Any]] = {}
        idle = list(self.actors)
        queue = list(reversed(chunks))
        while queue or pending:
            while queue and idle:
                start, chunk = queue.pop()
                actor = idle.pop()
                pending[actor.grade_with_seconds.remote(chunk)] = (start, len(chunk), actor)
            done, _ = ray.wait(list(pending), num_returns=1)
            start, size, actor = pending.pop(done[0])
            try:
                graded, seconds = ray.get(done[0])
            except ray.exceptions.RayActorError:
                queue.append((start, records[start : start + size]))  # the chunk is redone, on it or another
                if self._back_after_restart(actor):  # e.g. its node was lost and Ray placed it elsewhere
                    idle.append(actor)
                    continue
                # past its restarts: drop it
                self.actors = [a for a in self.actors if a != actor]
                self.lost_actors += 1
                if not self.actors:
                    raise RuntimeError("every reward actor died (reward.max_restarts exhausted); see the actors' logs")
                continue
            results[start : start + size] = graded
            busy[actor] = busy.get(actor, 0.0) + seconds
            idle.append(actor)
            if on_progress:
                on_progress(size)
        return results, max(busy.values(), default=0.0)  # type: ignore[return-value]

    def _back_after_restart(self, actor) -> bool:
        """Wait while Ray restarts ``actor`` (a lost node: it is placed on another one); False once it is dead
        for good or did not come back within ``restart_wait_s``. Task retries alone run out while a node's
        loss is still being noticed ("temporarily unavailable"), so the pool waits for the actor itself."""
        deadline = time.monotonic() + self.restart_wait_s
        while time.monotonic() < deadline:
            try:
                ray.get(actor.node.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return True
            except ray.exceptions.ActorUnavailableError:
                time.sleep(1.0)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return False
        return False

    def nodes(self, timeout_s: float = 60.0) -> list[Optional[dict[str, Any]]]:
        """Where each reward actor runs (None for one that does not answer in time)."""
        found = []
        for actor in self.actors:
            try:
                found.append(ray.get(actor.node.remote(), timeout=timeout_s))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                found.append(None)
        return found

    def shutdown(self) -> None:
        kill_actors(self.actors)
