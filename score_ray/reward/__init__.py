"""Rewards: sandboxed graders (math answer equivalence, code unit tests) and the Ray actors that run them.

Nothing here imports torch: reward actors stay small and start fast.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from score_ray.reward.code import grade_code
from score_ray.reward.math import MathJudge, grade_math
from score_ray.config import SandboxConfig
from score_ray.reward.types import STATUSES, GradeResult


def _required(record: dict[str, Any], *names: str) -> Optional[str]:
    for name in names:
        value = record.get(name)
        if value is None or (isinstance(value, (str, list)) and not value):
            return f"record field {name!r} is missing or empty"
    return None


# A response the generator cut at its token cap is not all there: the grader never read its end, so it fails
# closed. Without this, a loop cut mid-number ("...The final answer is 1") is graded on the fragment.
TRUNCATED_DETAIL = "response cut at the token cap: its end was never written, so it is not graded"


class Grader:
    """Grades records ``{"kind": "math"|"code", "response", "answer" | "tests", "entry_point"?, "truncated"?}``.

    Several records run at once (sandboxed programs are separate processes); each
    thread has its own math judge process. Never raises for a bad record: it comes
    back with status ``error`` and the reason. A record with ``truncated: true`` (the
    response hit the generation token cap) is ``wrong`` unless ``credit_truncated``
    (kept only to re-grade runs made before truncated responses failed closed).
    """

    def __init__(
        self, limits: SandboxConfig = SandboxConfig(), math_timeout_s: float = 5.0, threads: int = 2,
        credit_truncated: bool = False,
    ):
        self.limits = limits
        self.math_timeout_s = math_timeout_s
        self.threads = threads
        self.credit_truncated = credit_truncated
        self._local = threading.local()
        self._judges: list[MathJudge] = []
        self._lock = threading.Lock()

    def _judge(self) -> MathJudge:
        judge = getattr(self._local, "judge", None)
        if judge is None:
            judge = self._local.judge = MathJudge(timeout_s=self.math_timeout_s)
            with self._lock:
                self._judges.append(judge)
        return judge

    def grade_one(self, record: dict[str, Any]) -> GradeResult:
        kind = record.get("kind")
        try:
            if kind in ("math", "code") and record.get("truncated") and not self.credit_truncated:
                return GradeResult(0.0, "wrong", 0.0, detail=TRUNCATED_DETAIL)
            if kind == "math":
                problem = _required(record, "answer")
                if problem:
                    return GradeResult(0.0, "error", 0.0, detail=problem)
                return grade_math(str(record.get("response") or ""), str(record["answer"]), self._judge())
            if kind == "code":
                problem = _required(record, "tests")
                if problem:
                    return GradeResult(0.0, "error", 0.0, detail=problem)
                return grade_code(str(record.get("response") or ""), record["tests"], record.get("entry_point"), self.limits)
            return GradeResult(0.0, "error", 0.0, detail=f"record field 'kind' must be 'math' or 'code', got {kind!r}")
        except Exception as err:  # noqa: BLE001 - a grader failure is a status, never a stalled iteration
            return GradeResult(0.0, "error", 0.0, detail=f"grader failed: {type(err).__name__}: {err}"[:300])

    def grade(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            results = list(pool.map(self.grade_one, records))
        return [result.to_dict() for result in results]

    def close(self) -> None:
        for judge in self._judges:
            judge.close()


__all__ = ["Grader", "GradeResult", "STATUSES", "TRUNCATED_DETAIL", "grade_code", "grade_math"]
