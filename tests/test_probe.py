"""score_ray.probe: the sampled-episode rates a recipe is chosen by, by hand."""

import pytest

from conftest import make_episode
from score_ray.data import Problem
from score_ray.probe import sampled_stats


def episode(y1_text: str, y2_text: str, truncated1: bool = False):
    problem = Problem(id="p", kind="math", prompt="1 + 1", answer="2")
    return make_episode(problem=problem, x1=[1], y1=[2, 3], instruction=[], y2=[4], y1_truncated=truncated1,
                        y1_text=y1_text, y2_text=y2_text)


def test_sampled_rates_by_hand():
    episodes = [episode("The final answer is 3.", "The final answer is 2."),  # fixed
                episode("The final answer is 2.", "The final answer is 2."),  # kept
                episode("The final answer is 2.", "The final answer is 5.", truncated1=True),  # broken
                episode("The final answer is 4.", "The final answer is 4.")]  # wrong twice
    stats = sampled_stats(episodes, r1=[0.0, 1.0, 1.0, 0.0], r2=[1.0, 1.0, 0.0, 0.0])
    assert stats["sampled/reward_t1"] == 0.5 and stats["sampled/reward_t2"] == 0.5
    assert stats["sampled/fixed_given_wrong_t1"] == 0.5 and stats["sampled/broken_given_right_t1"] == 0.5
    assert stats["sampled/answer_changed"] == 0.5
    assert stats["sampled/length_t1"] == 2 and stats["sampled/truncated_t1"] == 0.25
    assert sampled_stats(episodes[:1], [0.0], [1.0])["sampled/broken_given_right_t1"] is None
    assert stats["sampled/length_t2"] == pytest.approx(1.0)
