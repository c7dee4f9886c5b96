"""score_ray.samples and score_ray.episode: a turn's log-prob positions and the learner samples built on them."""

import pytest

from conftest import make_episode
from score_ray.data import Problem
from score_ray.episode import Episode
from score_ray.records import Credit
from score_ray.samples import (
    build_samples,
    first_attempt_groups,
    pair_sft_episodes,
    position_temperatures,
    trained_positions,
    turn_kl_sums,
)

def credit(adv1, adv2, kl_coef1, kl_coef2) -> Credit:
    """Credit for the samples' fields (the rewards are not read by ``build_samples``)."""
    return Credit(reward1=[0.0] * len(adv1), reward2=[0.0] * len(adv1), adv1=adv1, adv2=adv2, kl_coef1=kl_coef1,
                  kl_coef2=kl_coef2)


def test_samples_train_exactly_the_sampled_tokens_of_each_turn():
    # x1 = [1, 2, 3], y1 = [4, 5], x2 = x1 + y1 + [6, 7], y2 = [8]
    episode = make_episode(x1=[1, 2, 3], y1=[4, 5], instruction=[6, 7], y2=[8], y1_logp=[-0.4, -0.5], y2_logp=[-0.8])
    ref = [-1.0 * i for i in range(1, 8)]  # 8 tokens -> 7 positions
    scored = credit([2.0], [-3.0], [0.1], [0.01])
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


def test_each_turn_is_scored_at_the_temperature_it_was_sampled_at():
    from score_ray.samples import SUPERVISED_TURNS, supervised_credit

    episode = make_episode(x1=[1, 2, 3], y1=[4, 5], instruction=[6, 7], y2=[8], y1_logp=[-0.4, -0.5], y2_logp=[-0.8],
                           y1_temperature=1.2, y2_temperature=0.7)
    assert position_temperatures(episode) == [1.0, 1.0, 1.2, 1.2, 1.0, 1.0, 0.7]  # prompts: 1, never scored
    (sample,) = build_samples([episode], [[0.0] * 7], credit([1.0], [1.0], [0.0], [0.0]))
    assert sample.temperature == position_temperatures(episode)
    # Pair-SFT's second turn is a first attempt: it keeps the temperature it was sampled at.
    wrong = make_episode(sample=1, x1=[1, 2, 3], y1=[9], instruction=[6, 7], y2=[9], y1_logp=[-2.0], y2_logp=[-1.0],
                         y1_temperature=1.2, y2_temperature=0.7)
    (paired,) = pair_sft_episodes([episode, wrong], r1=[1.0, 0.0], r2=[1.0, 0.0])
    assert paired.y2 == [4, 5] and paired.y2_temperature == 1.2
    # ... but a supervised target is imitated at one temperature, whichever turn sampled it
    (imitated,) = build_samples([paired], [[0.0] * 7], supervised_credit(1), SUPERVISED_TURNS["pair_sft"],
                                temperature=0.7)
    assert imitated.temperature == [0.7] * 7
    with pytest.raises(ValueError, match="p0: turn 2 was decoded greedily"):
        position_temperatures(make_episode(y1_logp=[-1.0], y2_logp=[-1.0], y2_temperature=0.0))


def test_second_attempts_at_one_first_attempt_train_its_turn_one_once():
    from dataclasses import replace

    first = make_episode(x1=[1, 2, 3], y1=[4, 5], instruction=[6, 7], y2=[8], y1_logp=[-0.4, -0.5], y2_logp=[-0.8])
    second = replace(first, y2=[9, 10], y2_logp=[-0.9, -1.0], branch=1)
    refs = [[-1.0] * 7, [-1.0] * 8]
    scored = credit([2.0, 0.0], [-3.0, 3.0], [0.1, 0.1], [0.01, 0.01])
    # The key of a first attempt is the attempt: the same problem and sample index in the next epoch's share of a
    # batch is another first attempt, and its second attempts are compared among themselves.
    next_epoch = replace(first, y1=[4, 6], x2=[1, 2, 3, 4, 6, 6, 7])
    keys = first_attempt_groups([first, second, next_epoch])
    assert keys[0] == keys[1] != keys[2]
    kept, branch = build_samples([first, second], refs, scored)
    assert kept.loss_mask == [0, 0, 1, 1, 0, 0, 1]
    assert branch.loss_mask == [0, 0, 0, 0, 0, 0, 1, 1]  # its y1 is trained in branch 0's sample only
    assert branch.advantage == [0, 0, 0, 0, 0, 0, 3.0, 3.0] and branch.kl_coef[2:4] == [0, 0]


def test_a_sampler_log_prob_list_that_does_not_match_its_tokens_is_refused_naming_the_problem():
    episode = make_episode(x1=[1, 2], y1=[3, 4], instruction=[5], y2=[6], y1_logp=[-0.1], y2_logp=[-0.2])
    scored = credit([1.0], [1.0], [0.0], [0.0])
    with pytest.raises(ValueError, match="p0: turn 1 has 2 tokens but 1 sampler log-probs"):
        build_samples([episode], [[0.0] * 5], scored)
    with pytest.raises(ValueError, match="turn must be 1 or 2"):
        episode.turn_span(3)


def two_turn(problem_id: str, y1: list[int], y2: list[int]) -> Episode:
    problem = Problem(id=problem_id, kind="math", prompt="1 + 1", answer="2")
    x1 = [1, 2]
    return make_episode(problem=problem, x1=x1, y1=y1, instruction=[9], y2=y2, y1_logp=[-0.1] * len(y1),
                        y2_logp=[-0.2] * len(y2), y1_text=str(y1), y2_text=str(y2))


def test_star_keeps_the_episodes_whose_second_attempt_is_right_and_trains_both_turns():
    from score_ray.samples import SUPERVISED_TURNS, star_episodes, supervised_credit

    episodes = [two_turn("a", [3], [4]), two_turn("a", [5], [6]), two_turn("b", [7], [8, 8])]
    chosen = star_episodes(episodes, r2=[1.0, 0.0, 1.0])
    assert chosen == [episodes[0], episodes[2]]
    (first, second) = build_samples(chosen, [[0.0] * 4, [0.0] * 5], supervised_credit(2), SUPERVISED_TURNS["star"])
    assert first.loss_mask == [0, 1, 0, 1] and first.advantage == [0, 1, 0, 1] and first.kl_coef == [0] * 4
    assert second.loss_mask == [0, 1, 0, 1, 1]


def test_pair_sft_gives_each_wrong_first_attempt_a_right_attempt_at_the_same_problem_as_its_second_turn():
    from score_ray.samples import SUPERVISED_TURNS, pair_sft_episodes, supervised_credit

    episodes = [two_turn("a", [3], [4]), two_turn("a", [5], [6, 6]), two_turn("b", [7], [8])]
    # a: sample 0 wrong then wrong, sample 1 right at turn 1; b: wrong twice, nothing right to pair with
    pairs = pair_sft_episodes(episodes, r1=[0.0, 1.0, 0.0], r2=[0.0, 0.0, 0.0])
    assert len(pairs) == 1
    (pair,) = pairs
    assert pair.x2 == episodes[0].x2 and pair.y1 == [3] and pair.y2 == [5] and pair.y2_text == "[5]"
    assert episodes[0].y2 == [4]  # the sampled episode is not changed
    (sample,) = build_samples(pairs, [[0.0] * 4], supervised_credit(1), SUPERVISED_TURNS["pair_sft"])
    assert sample.input_ids == [1, 2, 3, 9, 5] and sample.loss_mask == [0, 0, 0, 1]  # only the correction
    # a wrong first attempt whose own second attempt is right is paired with that one
    (own,) = pair_sft_episodes([episodes[2]], r1=[0.0], r2=[1.0])
    assert own.y2 == [8]
