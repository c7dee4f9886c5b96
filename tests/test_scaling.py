"""Majority voting at an equal sample budget (score_ray.scaling), by hand."""

import pytest

from score_ray.scaling import ProblemSamples, scaling_curve, vote


def test_the_vote_takes_the_most_frequent_answer_and_the_first_drawn_on_a_tie():
    assert vote(["12", "34", "34", None, None, None]) == "34"  # no answer never wins, however often
    assert vote(["56", "12", "12", "56"]) == "56"
    assert vote([None, None]) is None and vote([]) is None


def test_each_budget_votes_over_k_first_attempts_or_the_corrections_of_k_over_2():
    # first attempts mostly wrong, corrections mostly right: the sequential vote wins at every budget
    problems = [
        ProblemSamples(first=["9", "1", "9", "9"], second=["1", "1", "9", "9"], right=frozenset({"1"})),
        ProblemSamples(first=["2", "8", "8", "2"], second=["2", "8", "8", "8"], right=frozenset({"2"})),
    ]
    curve = scaling_curve(problems, [2, 4])
    # K=2: first votes "9" (wrong) and "2" (right, drawn first); one correction each: "1" right, "2" right
    assert curve["parallel"][2] == pytest.approx(0.5) and curve["sequential"][2] == pytest.approx(1.0)
    # K=4: first votes "9" wrong, "2" (tie 2-2, drawn first) right; two corrections each: "1" right, "2" right
    assert curve["parallel"][4] == pytest.approx(0.5) and curve["sequential"][4] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="even number"):
        scaling_curve(problems, [3])
