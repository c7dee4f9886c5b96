"""A pool of Ray reward actors grading batches concurrently.

Each RewardActor holds a Grader (its own sandbox runs and math judge processes)
and takes a fractional CPU share. The pool hands out small chunks and keeps every
actor busy (a slow chunk does not hold up the others), and returns results in the
order of the input. Actors restart when they die and their chunk is retried.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import ray

from score_ray.reward import Grader
from score_ray.reward.sandbox import SandboxLimits


@ray.remote(max_restarts=3, max_task_retries=3)
class RewardActor:
    def __init__(self, limits: SandboxLimits, math_timeout_s: float, threads: int):
        self.grader = Grader(limits, math_timeout_s, threads)

    def grade(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.grader.grade(records)

    def ping(self) -> bool:
        return True


class RewardPool:
    def __init__(
        self,
        workers: int = 2,
        cpus_per_worker: float = 0.5,
        threads_per_worker: int = 2,
        limits: SandboxLimits = SandboxLimits(),
        math_timeout_s: float = 5.0,
        chunk_size: int = 8,
    ):
        self.chunk_size = chunk_size
        self.actors = [
            RewardActor.options(num_cpus=cpus_per_worker, name=None).remote(limits, math_timeout_s, threads_per_worker)
            for _ in range(workers)
        ]

    @classmethod
    def from_config(cls, reward_config) -> "RewardPool":
        return cls(
            workers=reward_config.workers,
            cpus_per_worker=reward_config.cpus_per_worker,
            threads_per_worker=reward_config.threads_per_worker,
            limits=SandboxLimits.from_config(reward_config.sandbox),
            math_timeout_s=reward_config.math_timeout_s,
        )

    def grade(
        self, records: list[dict[str, Any]], on_progress: Optional[Callable[[int], None]] = None
    ) -> list[dict[str, Any]]:
        """Grade all records; ``on_progress(n)`` is called as each chunk of n finishes."""
        chunks = [(start, records[start : start + self.chunk_size]) for start in range(0, len(records), self.chunk_size)]
        results: list[Optional[dict[str, Any]]] = [None] * len(records)
        pending: dict[Any, tuple[int, int, Any]] = {}
        idle = list(self.actors)
        queue = list(reversed(chunks))
        while queue or pending:
            while queue and idle:
                start, chunk = queue.pop()
                actor = idle.pop()
                pending[actor.grade.remote(chunk)] = (start, len(chunk), actor)
            done, _ = ray.wait(list(pending), num_returns=1)
            start, size, actor = pending.pop(done[0])
            results[start : start + size] = ray.get(done[0])
            idle.append(actor)
            if on_progress:
                on_progress(size)
        return results  # type: ignore[return-value]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
