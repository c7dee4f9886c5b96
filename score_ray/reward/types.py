"""What every grader returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass

STATUSES = ("correct", "wrong", "timeout", "error")


@dataclass
class GradeResult:
    reward: float  # 1.0 or 0.0
    status: str  # correct | wrong | timeout | error
    seconds: float
    detail: str = ""  # why: the extracted answer, the failing assert, the error

    def to_dict(self) -> dict:
        return asdict(self)
