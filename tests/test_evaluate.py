"""score_ray.evaluate: the paper's five self-correction metrics and their table."""

import pytest

from score_ray.evaluate import format_table, self_correction_metrics


def test_five_metrics_by_hand():
    # 5 problems: (t1, t2) = (1,1) (0,1) (0,1) (1,0) (0,0)
    metrics = self_correction_metrics([1, 0, 0, 1, 0], [1, 1, 1, 0, 0])
    assert metrics["acc_t1"] == pytest.approx(0.4)
    assert metrics["acc_t2"] == pytest.approx(0.6)
    assert metrics["delta"] == pytest.approx(0.2)
    assert metrics["delta_i2c"] == pytest.approx(0.4)
    assert metrics["delta_c2i"] == pytest.approx(0.2)
    assert metrics["delta"] == pytest.approx(metrics["delta_i2c"] - metrics["delta_c2i"])
    # SE of acc_t1: sample sd of (1,0,0,1,0) = sqrt(0.3); / sqrt(5)
    assert metrics["acc_t1_se"] == pytest.approx((0.3 / 5) ** 0.5)
    table = format_table({"base": metrics})
    assert "Acc@t1" in table and "Delta_c->i" in table and "40.0" in table and "of 5 held-out" in table


# The loop the no_shaping runs fell into: a whole answer repeated until the 64-token cap cut it mid-number.
LOOP = "The final answer is 13.\nThe final answer is 13.\nThe final answer is 1"


def _episode(y1_text, y1_truncated, y2_text, y2_truncated, answer):
    from score_ray.data import Problem
    from conftest import make_episode

    problem = Problem(id="p", kind="math", prompt="12 + 1", answer=answer)
    return make_episode(problem=problem, y1_truncated=y1_truncated, y2_truncated=y2_truncated, y1_text=y1_text,
                        y2_text=y2_text)


@pytest.mark.parametrize("credit_truncated, expected", [(False, ([0.0, 1.0], [0.0, 0.0])), (True, ([0.0, 1.0], [1.0, 0.0]))])
def test_responses_cut_at_the_token_cap_fail_closed(credit_truncated, expected):
    from score_ray.config import RewardConfig
    from score_ray.reward import TRUNCATED_DETAIL, Grader, grade_episodes

    grader = Grader(RewardConfig(credit_truncated=credit_truncated))
    episodes = [
        # the no_shaping "fix": the cap cut y1 inside "13" (read: 1, wrong) and y2 just before a number (read: the
        # last whole line, 13, right), so crediting cut text counted an incorrect -> correct that never happened
        _episode(LOOP, True, "The final answer is 13.\nThe final answer is", True, answer="13"),
        # the same words finished by the model itself are whole answers, right and wrong
        _episode("The final answer is 13.", False, "The final answer is 1.", False, answer="13"),
    ]
    grades = grade_episodes(grader, episodes)
    r1, r2, results = grades.r1, grades.r2, grades.results
    grader.close()
    assert (r1, r2) == expected
    if credit_truncated:
        assert [result.status for result in results[:2]] == ["wrong", "correct"]
    else:
        assert all(result.status == "wrong" and result.detail == TRUNCATED_DETAIL for result in results[:2])
    assert [result.status for result in results[2:]] == ["correct", "wrong"]
