"""score_ray.samples and score_ray.episode: a turn's log-prob positions and the learner samples built on them."""

import pytest

from score_ray.data import Problem
from score_ray.episode import Episode
from score_ray.samples import build_samples, trained_positions, turn_kl_sums

PROBLEM = Problem(id="p0", kind="math", prompt="1 + 1", answer="2")


def test_samples_train_exactly_the_sampled_tokens_of_each_turn():
    # x1 = [1, 2, 3], y1 = [4, 5], x2 = x1 + y1 + [6, 7], y2 = [8]
    episode = Episode(problem=PROBLEM, sample=0, x1=[1, 2, 3], y1=[4, 5], y1_logp=[-0.4, -0.5], y1_truncated=False,
                      x2=[1, 2, 3, 4, 5, 6, 7], y2=[8], y2_logp=[-0.8])
    ref = [-1.0 * i for i in range(1, 8)]  # 8 tokens -> 7 positions
    scored = {"adv1": [2.0], "adv2": [-3.0], "kl_coef1": [0.1], "kl_coef2": [0.01]}
    (sample,) = build_samples([episode], [ref], scored)
    assert sample.input_ids == [1, 2, 3, 4, 5, 6, 7, 8]
    # position p scores token p + 1: y1 tokens (indices 3, 4) -> positions 2, 3; y2 (index 7) -> position 6
    assert (episode.turn_span(1), episode.turn_span(2)) == ((2, 4), (6, 7))
    assert sample.loss_mask == [0, 0, 1, 1, 0, 0, 1]
    assert trained_positions(episode) == sample.loss_mask  # the reference scores exactly these
    assert sample.advantage == [0, 0, 2.0, 2.0, 0, 0, -3.0]
    assert sample.kl_coef == [0, 0, 0.1, 0.1, 0, 0, 0.01]
    assert sample.old_logp == [0, 0, -0.4, -0.5, 0, 0, -0.8]
    assert sample.ref_logp == ref
    (single,) = build_samples([episode], [ref], scored, turns=(1,))  # single-turn RL: y2 is not trained
    assert single.loss_mask == [0, 0, 1, 1, 0, 0, 0] and single.advantage[6] == 0
    kl1, kl2 = turn_kl_sums(episode, ref)
    assert kl1 == pytest.approx((-0.4 + 3.0) + (-0.5 + 4.0))
    assert kl2 == pytest.approx(-0.8 + 7.0)


def test_a_sampler_log_prob_list_that_does_not_match_its_tokens_is_refused_naming_the_problem():
    episode = Episode(problem=PROBLEM, sample=0, x1=[1, 2], y1=[3, 4], y1_logp=[-0.1], y1_truncated=False,
                      x2=[1, 2, 3, 4, 5], y2=[6], y2_logp=[-0.2])
    scored = {"adv1": [1.0], "adv2": [1.0], "kl_coef1": [0.0], "kl_coef2": [0.0]}
    with pytest.raises(ValueError, match="p0: turn 1 has 2 tokens but 1 sampler log-probs"):
        build_samples([episode], [[0.0] * 5], scored)
    with pytest.raises(ValueError, match="turn must be 1 or 2"):
        episode.turn_span(3)
