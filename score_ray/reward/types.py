"""What a grader is asked, and what it returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

STATUSES = ("correct", "wrong", "timeout", "error")


@dataclass
class GradeRequest:
    """One response to grade: math against ``answer``; code by running ``tests`` (Python source run after the
    program, followed by ``check(<entry_point>)`` when given, or a list of assert strings). ``truncated``:
    the response hit the generator's token cap (it fails closed)."""

    kind: Optional[str]  # math | code; anything else is graded as an error that names it
    response: str
    truncated: bool = False
    answer: Optional[str] = None
    tests: Union[str, list[str], None] = None
    entry_point: Optional[str] = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "GradeRequest":
        """From a JSON record (score_ray.grade's input); keys it does not know are ignored."""
        return cls(kind=record.get("kind"), response=str(record.get("response") or ""),
                   truncated=bool(record.get("truncated")), answer=record.get("answer"), tests=record.get("tests"),
                   entry_point=record.get("entry_point"))


@dataclass
class GradeResult:
    reward: float  # 1.0 or 0.0
    status: str  # correct | wrong | timeout | error
    seconds: float
    detail: str = ""  # why: the extracted answer, the failing assert, the error

    def to_dict(self) -> dict:
        return asdict(self)
