"""The faults a run notices and what it says about them: lost learner nodes, failed grades,
non-finite optimiser steps. Pure accounting; the trainer decides what to do (see docs/reliability.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, Sequence

if TYPE_CHECKING:
    from score_ray.reward.types import GradeResult

def is_out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError, or an allocator / KV-cache failure reported as another error type."""
    text = f"{type(err).__name__}: {err}".lower()
    return "outofmemory" in text.replace(" ", "") or "out of memory" in text or "cannot allocate memory" in text


MAX_RECOVERIES_IN_ROW = 3  # learner losses while the previous one is still being recovered


class LearnerLost(RuntimeError):
    """A learner rank or the reference died (e.g. its node was lost): the group must be replaced."""


class PlacementTimeout(RuntimeError):
    """The cluster did not place a role again within cluster.resource_timeout_s."""


class TrainingHalted(RuntimeError):
    """The run stopped itself (e.g. non-finite steps in a row) after checkpointing its last good state."""


def grading_alarm(graded: Sequence["GradeResult"], threshold: float) -> Optional[str]:
    """A warning when more than ``threshold`` of the grades timed out or failed (their rewards are 0)."""
    if not graded:
        return None
    timeouts = [g for g in graded if g.status == "timeout"]
    errors = [g for g in graded if g.status == "error"]
    share = (len(timeouts) + len(errors)) / len(graded)
    if share <= threshold:
        return None
    first = (errors or timeouts)[0].detail
    return (f"{share:.0%} of {len(graded)} grades failed (timeout {len(timeouts)}, error {len(errors)}; "
            f"reward.alarm_fraction={threshold:g}); they count as reward 0. First: {str(first)[:200]}")


class SkipCounts(Protocol):
    """What the accounting of skipped steps keeps (score_ray.checkpoints.TrainerState checkpoints it)."""

    skipped_steps: int
    skipped_in_row: int


def account_step(state: SkipCounts, applied: bool, limit: int) -> Optional[str]:
    """Count a skipped (non-finite) optimiser step; the reason to stop once ``limit`` came in a row."""
    if applied:
        state.skipped_in_row = 0
        return None
    state.skipped_steps += 1
    state.skipped_in_row += 1
    if state.skipped_in_row < limit:
        return None
    return (f"{state.skipped_in_row} optimiser steps in a row had a non-finite loss or gradient and were skipped "
            f"(learner.max_skipped_steps_in_row={limit}); the weights are those of the last finite step. "
            "Lower learner.lr, check the rewards and advantages, or raise the limit")
