"""The SCoRe mathematics against numbers worked out by hand."""

import math

import pytest
import torch

from score_ray.algo import (
    STAGE_I,
    STAGE_II,
    advantages,
    kl_estimate,
    assign_credit,
    stage_plan,
    token_loss,
    turn_kl_coefs,
    turn_rewards,
)


def test_stage_plan_and_interleaving():
    assert stage_plan(2, 3) == [1, 1, 2, 2, 2]
    assert stage_plan(1, 1, rounds=2) == [1, 2, 1, 2]
    assert stage_plan(0, 2) == [2, 2]


def test_turn_rewards_stage_one_credits_only_the_second_attempt():
    assert turn_rewards(STAGE_I, 1.0, 0.0, alpha=10) == (0.0, 0.0)
    assert turn_rewards(STAGE_I, 0.0, 1.0, alpha=10) == (0.0, 1.0)


@pytest.mark.parametrize(
    "r1, r2, expected",
    [
        (0.0, 1.0, (0.0, 11.0)),  # wrong -> right: 1 + 10 * (1 - 0)
        (1.0, 0.0, (1.0, -10.0)),  # right -> wrong: 0 + 10 * (0 - 1)
        (1.0, 1.0, (1.0, 1.0)),
        (0.0, 0.0, (0.0, 0.0)),
    ],
)
def test_turn_rewards_stage_two_shaping(r1, r2, expected):
    assert turn_rewards(STAGE_II, r1, r2, alpha=10) == expected


def test_kl_coefficients_per_stage_and_turn():
    assert turn_kl_coefs(STAGE_I, beta1=0.01, beta2=0.1) == (0.1, 0.01)
    assert turn_kl_coefs(STAGE_II, beta1=0.01, beta2=0.1) == (0.01, 0.01)


def test_rloo_leave_one_out_baseline():
    # group a: rewards 1, 0, 0, 1 -> baselines 1/3, 2/3, 2/3, 1/3
    rewards = [1.0, 0.0, 0.0, 1.0, 5.0]
    groups = ["a", "a", "a", "a", "b"]
    got = advantages(rewards, groups, "rloo")
    assert got == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 5.0])
    assert advantages(rewards, groups, "reinforce") == rewards
    assert sum(got[:4]) == pytest.approx(0.0)


def test_assign_credit_stage_two_by_hand():
    # Two samples of one prompt: (r1, r2) = (0, 1) and (1, 1); alpha = 10.
    # shaped turn-2 rewards: 11 and 1 -> RLOO: 11 - 1 = 10, 1 - 11 = -10; turn 1: 0 - 1 = -1, 1 - 0 = 1.
    out = assign_credit(STAGE_II, [0.0, 1.0], [1.0, 1.0], ["p", "p"], alpha=10, beta1=0.01, beta2=0.1)
    assert out.reward2 == [11.0, 1.0]
    assert out.adv2 == pytest.approx([10.0, -10.0])
    assert out.adv1 == pytest.approx([-1.0, 1.0])
    assert out.kl_coef1 == [0.01, 0.01] and out.kl_coef2 == [0.01, 0.01]


def test_assign_credit_stage_one_by_hand():
    out = assign_credit(STAGE_I, [1.0, 0.0, 0.0], [1.0, 0.0, 1.0], ["p"] * 3, alpha=10, beta1=0.01, beta2=0.25)
    assert out.adv1 == [0.0, 0.0, 0.0]
    assert out.adv2 == pytest.approx([0.5, -1.0, 0.5])
    assert out.kl_coef1 == [0.25] * 3 and out.kl_coef2 == [0.01] * 3


def test_assign_credit_with_several_second_attempts_per_first_attempt():
    # One prompt, two first attempts (a wrong, b right), each with two second attempts; alpha = 10.
    # Turn 2 is compared within each first attempt: under a, the fix (shaped 11) against the copy (0): +-11;
    # under b, the kept answer (1) against the broken one (-10): +-11. Shaping scales by 1 + alpha, since r1
    # is shared inside a group. Turn 1 counts each first attempt once (rows 0 and 2): 0 - 1 and 1 - 0.
    r1, r2 = [0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]
    out = assign_credit(STAGE_II, r1, r2, ["p"] * 4, alpha=10, beta1=0.01, beta2=0.1,
                      turn2_groups=[("p", 0), ("p", 0), ("p", 1), ("p", 1)], trains_turn1=[True, False, True, False])
    assert out.reward2 == [11.0, 0.0, 1.0, -10.0]
    assert out.adv2 == pytest.approx([11.0, -11.0, 11.0, -11.0])
    assert out.adv1 == pytest.approx([-1.0, 0.0, 1.0, 0.0])
    # Grouped by prompt instead, turn 2 would credit b's copy for a's being wrong: its advantage is not 11.
    plain = assign_credit(STAGE_II, r1, r2, ["p"] * 4, alpha=10, beta1=0.01, beta2=0.1)
    assert plain.adv2[2] == pytest.approx(1.0 - (11.0 + 0.0 - 10.0) / 3)
    # Normalised, turn 1 is standardised over the first attempts alone and stays 0 on the others.
    normed = assign_credit(STAGE_II, r1, r2, ["p"] * 4, alpha=10, beta1=0.01, beta2=0.1, normalize_advantages=True,
                         turn2_groups=[("p", 0), ("p", 0), ("p", 1), ("p", 1)], trains_turn1=[True, False, True, False])
    assert normed.adv1 == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-5)
    assert normed.adv2 == pytest.approx([1.0, -1.0, 1.0, -1.0], abs=1e-5)


def test_assign_credit_with_kl_in_the_reward():
    # Stage II, beta1 = 0.1, kl sums (2, 0) on turn 1 and (0, 4) on turn 2, reinforce.
    out = assign_credit(STAGE_II, [1.0, 0.0], [1.0, 1.0], ["a", "b"], alpha=2, beta1=0.1, beta2=0.5,
                      advantage="reinforce", kl_in_reward=True, kl1=[2.0, 0.0], kl2=[0.0, 4.0])
    assert out.adv1 == pytest.approx([1.0 - 0.2, 0.0])
    assert out.adv2 == pytest.approx([1.0, 3.0 - 0.4])  # turn 2 of episode b: 1 + 2 * (1 - 0) = 3
    assert out.kl_coef1 == [0.0, 0.0]


def test_kl_estimators_by_hand():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.2)])
    # log ratio = ln 2 and 0
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([math.log(2), 0.0])
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx([0.5 * math.log(2) ** 2, 0.0])
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([0.5 - 1 + math.log(2), 0.0])


def test_token_loss_reinforce_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -0.5])
    adv = torch.tensor([2.0, 2.0, -1.0])
    coef = torch.tensor([0.1, 0.1, 0.5])
    mask = torch.tensor([1.0, 1.0, 0.0])
    loss, stats = token_loss(logp, logp.detach(), ref, adv, coef, mask, "pg", "k1")
    # pg: -(2 * -1) - (2 * -2) = 6; kl (k1): 0 + 0.1 * (-1) = -0.1; third token masked
    assert float(loss) == pytest.approx(6.0 - 0.1)
    assert stats["pg"] == pytest.approx(6.0)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-2.0 + 0.1, -2.0 + 0.1, 0.0])


def test_token_loss_ppo_clips_by_hand():
    old = torch.tensor([0.0, 0.0])
    logp = torch.log(torch.tensor([1.5, 0.9])).requires_grad_(True)  # ratios 1.5 and 0.9
    adv = torch.tensor([1.0, -1.0])
    zero = torch.zeros(2)
    loss, stats = token_loss(logp, old, logp.detach(), adv, zero, torch.ones(2), "ppo_clip", "k1", clip_eps=0.2)
    # token 1: -min(1.5 * 1, 1.2 * 1) = -1.2 (clipped); token 2: -min(0.9 * -1, 0.9 * -1) = 0.9 (inside the range)
    assert float(loss) == pytest.approx(-0.3)
    assert stats["clipped"] == 1.0
    loss.backward()
    # d/dlogp of -ratio * A is -A * ratio: 0 for the clipped token, 0.9 for the other
    assert logp.grad.tolist() == pytest.approx([0.0, 0.9])


def test_token_loss_off_policy_importance_weights_are_truncated_by_hand():
    old = torch.tensor([0.0, 0.0, 0.0])
    logp = torch.log(torch.tensor([0.5, 3.0, 1.0])).requires_grad_(True)  # ratios pi/pi_old 0.5, 3 and 1
    adv = torch.tensor([1.0, 1.0, -2.0])
    zero = torch.zeros(3)
    loss, stats = token_loss(logp, old, logp.detach(), adv, zero, torch.ones(3), "pg", "k1", importance_cap=2.0)
    # weights min(ratio, 2) = 0.5, 2, 1 (held constant): loss = -(0.5 ln .5 + 2 ln 3 + 1 * -2 * ln 1)
    assert float(loss) == pytest.approx(-(0.5 * math.log(0.5) + 2.0 * math.log(3.0)))
    assert stats["clipped"] == 1.0  # one token's ratio was truncated
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-0.5, -2.0, 2.0])


def test_unknown_names_are_errors():
    with pytest.raises(ValueError):
        turn_rewards(3, 0, 0, 1)
    with pytest.raises(ValueError):
        advantages([1.0], ["a"], "grpo")
    with pytest.raises(ValueError):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")
