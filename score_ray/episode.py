"""The two-turn episode: what a generator produces and every later role reads.

Token ids, not text, are the record: x2 is x1 + y1 (the sampled ids, untouched) + the chat
template's close of the turn + the self-correction instruction, so the learner scores exactly
the tokens that were sampled. The full sequence is x2 + y2.

Log-prob positions: position t scores token t + 1 of the full sequence, so a turn whose tokens
sit at sequence indices [a, b) has its log-probs at positions [a - 1, b - 1). ``turn_span`` is
that arithmetic, written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from score_ray.data import Problem

TURNS = (1, 2)


@dataclass
class Episode:
    problem: Problem
    sample: int  # which of the problem's samples this is (0 .. samples_per_prompt - 1)

    # turn 1: prompt x1, sampled response y1 (token ids), the sampler's log-prob of each y1 token
    # (after temperature: the distribution the learner scores), and whether y1 hit max_tokens_turn1
    x1: list[int]
    y1: list[int]
    y1_logp: list[float]
    y1_truncated: bool
    # turn 2: x2 = x1 + y1 + the close of the turn + the self-correction instruction
    x2: list[int]
    y2: list[int] = field(default_factory=list)
    y2_logp: list[float] = field(default_factory=list)
    y2_truncated: bool = False

    y1_text: str = ""  # the decoded responses, as the graders read them
    y2_text: str = ""
    # which of the second attempts at this y1 this is (0 .. rollout.turn2_samples - 1): the episodes of one y1
    # share x1, y1 and x2, and only branch 0 trains turn 1
    branch: int = 0
    # the temperature each response was sampled at (0: greedy); the learner scores each turn at its own
    y1_temperature: float = 1.0
    y2_temperature: float = 1.0
    # rewards of y1 and y2, set on held-out eval episodes (training keeps them beside the batch)
    r1: Optional[float] = None
    r2: Optional[float] = None

    @property
    def trains_turn1(self) -> bool:
        """Whether this episode carries its y1 (to the learner, and into counts of sampled tokens): of the
        episodes that share one first attempt, branch 0 alone."""
        return self.branch == 0

    @property
    def sequence(self) -> list[int]:
        """The full token sequence the learner and the reference score: x2 + y2."""
        return self.x2 + self.y2

    def response(self, turn: int) -> list[int]:
        return self._pick(turn, self.y1, self.y2)

    def response_logp(self, turn: int) -> list[float]:
        return self._pick(turn, self.y1_logp, self.y2_logp)

    def response_text(self, turn: int) -> str:
        return self._pick(turn, self.y1_text, self.y2_text)

    def temperature(self, turn: int) -> float:
        return self._pick(turn, self.y1_temperature, self.y2_temperature)

    def truncated(self, turn: int) -> bool:
        return self._pick(turn, self.y1_truncated, self.y2_truncated)

    def turn_span(self, turn: int) -> tuple[int, int]:
        """[start, end) of the log-prob positions that score ``turn``'s sampled tokens in ``sequence``."""
        start = len(self._pick(turn, self.x1, self.x2)) - 1
        return start, start + len(self.response(turn))

    @staticmethod
    def _pick(turn: int, first, second):
        if turn == 1:
            return first
        if turn == 2:
            return second
        raise ValueError(f"turn must be 1 or 2, got {turn!r}")
