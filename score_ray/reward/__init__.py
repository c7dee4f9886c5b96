"""Rewards: sandboxed graders (math answer equivalence, code unit tests) and the Ray actors that run them.

Nothing here imports torch: reward actors stay small and start fast.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional, Sequence

from score_ray.config import RewardConfig
from score_ray.records import Grades
from score_ray.reward.code import grade_code
from score_ray.reward.math import MathJudge, grade_math
from score_ray.reward.types import STATUSES, GradeRequest, GradeResult

if TYPE_CHECKING:
    from score_ray.episode import Episode


def _required(request: GradeRequest, name: str) -> Optional[str]:
    value = getattr(request, name)
    if value is None or (isinstance(value, (str, list)) and not value):
        return f"record field {name!r} is missing or empty"
    return None


# A response the generator cut at its token cap is not all there: the grader never read its end, so it fails
# closed. Without this, a loop cut mid-number ("...The final answer is 1") is graded on the fragment.
TRUNCATED_DETAIL = "response cut at the token cap: its end was never written, so it is not graded"


class Grader:
    """Grades ``GradeRequest``s by the reward config (its sandbox limits, math timeout, threads).

    Several requests run at once (sandboxed programs are separate processes); each
    thread has its own math judge process. Never raises for a bad request: it comes
    back with status ``error`` and the reason. A truncated response (it hit the generation
    token cap) is ``wrong`` unless reward.credit_truncated (kept only to re-grade runs made
    before truncated responses failed closed).
    """

    def __init__(self, config: RewardConfig = RewardConfig()):
        self.config = config
        self._local = threading.local()
        self._judges: list[MathJudge] = []
        self._lock = threading.Lock()

    def _judge(self) -> MathJudge:
        judge = getattr(self._local, "judge", None)
        if judge is None:
            judge = self._local.judge = MathJudge(timeout_s=self.config.math_timeout_s)
            with self._lock:
                self._judges.append(judge)
        return judge

    def grade_one(self, request: GradeRequest) -> GradeResult:
        kind = request.kind
        try:
            if kind in ("math", "code") and request.truncated and not self.config.credit_truncated:
                return GradeResult(0.0, "wrong", 0.0, detail=TRUNCATED_DETAIL)
            if kind == "math":
                problem = _required(request, "answer")
                if problem:
                    return GradeResult(0.0, "error", 0.0, detail=problem)
                return grade_math(request.response, str(request.answer), self._judge())
            if kind == "code":
                problem = _required(request, "tests")
                if problem:
                    return GradeResult(0.0, "error", 0.0, detail=problem)
                return grade_code(request.response, request.tests, request.entry_point, self.config.sandbox)
            return GradeResult(0.0, "error", 0.0, detail=f"record field 'kind' must be 'math' or 'code', got {kind!r}")
        except Exception as err:  # noqa: BLE001 - a grader failure is a status, never a stalled iteration
            return GradeResult(0.0, "error", 0.0, detail=f"grader failed: {type(err).__name__}: {err}"[:300])

    def grade(self, requests: Sequence[GradeRequest]) -> list[GradeResult]:
        return self.grade_with_seconds(requests)[0]

    def grade_with_seconds(self, requests: Sequence[GradeRequest]) -> tuple[list[GradeResult], float]:
        """(the results in the requests' order, the seconds they took)."""
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=self.config.threads_per_worker) as pool:
            results = list(pool.map(self.grade_one, requests))
        return results, time.monotonic() - start

    def close(self) -> None:
        for judge in self._judges:
            judge.close()


def episode_requests(episodes: Sequence["Episode"]) -> list[GradeRequest]:
    """Both turns of every episode, in order: episode i's turns at 2i and 2i + 1."""
    requests = []
    for episode in episodes:
        problem = episode.problem
        for turn in (1, 2):
            requests.append(GradeRequest(kind=problem.kind, response=episode.response_text(turn),
                                         truncated=episode.truncated(turn),
                                         answer=problem.answer if problem.kind == "math" else None,
                                         tests=problem.tests if problem.kind == "code" else None,
                                         entry_point=problem.entry_point if problem.kind == "code" else None))
    return requests


def grade_episodes(grader, episodes: Sequence["Episode"]) -> Grades:
    """Both turns of every episode, graded by ``grader`` (a ``Grader`` here, or the actors' ``RewardPool``)."""
    results, seconds = grader.grade_with_seconds(episode_requests(episodes))
    return Grades(r1=[result.reward for result in results[0::2]], r2=[result.reward for result in results[1::2]],
                  results=results, compute_seconds=seconds)


__all__ = ["Grader", "GradeRequest", "GradeResult", "STATUSES", "TRUNCATED_DETAIL", "episode_requests",
           "grade_code", "grade_episodes", "grade_math"]
