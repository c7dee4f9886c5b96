"""score_ray.faults: the grading alarm and the accounting of skipped (non-finite) optimiser steps."""

from score_ray.checkpoints import TrainerState
from score_ray.faults import account_step, grading_alarm
from score_ray.reward.types import GradeResult


def graded(statuses):
    return [GradeResult(1.0 if s == "correct" else 0.0, s, 0.0, detail=f"{s} detail") for s in statuses]


def test_grading_alarm_fires_past_the_threshold_and_names_the_first_failure():
    assert grading_alarm([], 0.25) is None
    assert grading_alarm(graded(["correct", "wrong", "timeout", "wrong"]), 0.25) is None  # exactly 25%: quiet
    message = grading_alarm(graded(["correct", "timeout", "error", "wrong"]), 0.25)
    assert message.startswith("50% of 4 grades failed (timeout 1, error 1")
    assert "reward.alarm_fraction=0.25" in message and "error detail" in message


def test_skipped_steps_are_counted_and_the_limit_in_a_row_stops():
    state = TrainerState()
    assert account_step(state, applied=False, limit=2) is None
    assert account_step(state, applied=True, limit=2) is None  # an applied step resets the run of skips
    assert (state.skipped_steps, state.skipped_in_row) == (1, 0)
    assert account_step(state, applied=False, limit=2) is None
    message = account_step(state, applied=False, limit=2)
    assert (state.skipped_steps, state.skipped_in_row) == (3, 2)
    assert "2 optimiser steps in a row" in message and "learner.max_skipped_steps_in_row=2" in message
