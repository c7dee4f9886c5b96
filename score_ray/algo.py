"""The SCoRe objective as small pure functions (no Ray, no torch.distributed).

Stage I   maximise  r(y2) - beta2 * KL_turn1 - beta1 * KL_turn2
          (turn 1 earns no reward: it is only held near the base model)
Stage II  maximise  sum_i [ r_hat(y_i) - beta1 * KL_turn_i ]
          with r_hat(y1) = r(y1), r_hat(y2) = r(y2) + alpha * (r(y2) - r(y1))

Each turn is weighted by its own (shaped) reward, no discounting between turns.
Advantages are per turn: REINFORCE (the reward itself) or with a leave-one-out
baseline over the k samples of the same prompt (RLOO, the default). PPO-clip uses
the RLOO advantage with a clipped ratio to the sampling policy.

Reward shaping and advantages are plain Python over floats; the token-level loss
is a torch function of log-prob tensors, so it can be checked by hand.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Optional, Sequence

STAGE_I = 1
STAGE_II = 2


def stage_plan(stage1_iterations: int, stage2_iterations: int, rounds: int = 1) -> list[int]:
    """The stage of every iteration: I x n1, II x n2, repeated ``rounds`` times (I, II, I, II, ...)."""
    return ([STAGE_I] * stage1_iterations + [STAGE_II] * stage2_iterations) * rounds


def turn_rewards(stage: int, r1: float, r2: float, alpha: float) -> tuple[float, float]:
    """(reward credited to turn 1, reward credited to turn 2) for one episode."""
    if stage == STAGE_I:
        return 0.0, r2
    if stage == STAGE_II:
        return r1, r2 + alpha * (r2 - r1)
    raise ValueError(f"unknown stage {stage!r}")


def turn_kl_coefs(stage: int, beta1: float, beta2: float) -> tuple[float, float]:
    """(KL coefficient on turn 1, on turn 2): Stage I holds turn 1 with the strong beta2."""
    if stage == STAGE_I:
        return beta2, beta1
    if stage == STAGE_II:
        return beta1, beta1
    raise ValueError(f"unknown stage {stage!r}")


def advantages(rewards: Sequence[float], groups: Sequence[Hashable], estimator: str) -> list[float]:
    """Per-sample advantages. ``groups`` says which samples share a prompt.

    rloo / ppo: r_i minus the mean reward of the other samples of its prompt (a group
    of one keeps its reward: there is nothing to compare with). reinforce: r_i.
    """
    if len(rewards) != len(groups):
        raise ValueError("rewards and groups differ in length")
    if estimator == "reinforce":
        return [float(r) for r in rewards]
    if estimator not in ("rloo", "ppo"):
        raise ValueError(f"unknown estimator {estimator!r}")
    members: dict[Hashable, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    result = [0.0] * len(rewards)
    for indices in members.values():
        total = sum(rewards[i] for i in indices)
        k = len(indices)
        for i in indices:
            result[i] = float(rewards[i]) if k == 1 else float(rewards[i]) - (total - rewards[i]) / (k - 1)
    return result


def normalize(values: Sequence[float], eps: float = 1e-6) -> list[float]:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return [(v - mean) / (std + eps) for v in values]


def kl_estimate(logp, ref_logp, estimator: str):
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1, k2, k3)."""
    import torch

    log_ratio = logp - ref_logp  # log pi/ref at the sampled token
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # exp(-x) - 1 + x >= 0, unbiased; clamp the exponent so one outlier token cannot overflow.
        negative = torch.clamp(-log_ratio, max=20.0)
        return torch.exp(negative) - 1.0 - negative
    raise ValueError(f"unknown KL estimator {estimator!r}")


def token_loss(
    logp,
    old_logp,
    ref_logp,
    advantage,
    kl_coef,
    mask,
    estimator: str = "rloo",
    kl_estimator: str = "k3",
    kl_in_loss: bool = True,
    clip_eps: float = 0.2,
    importance_cap: Optional[float] = None,
):
    """Sum over masked tokens of policy-gradient loss + KL penalty (divide by the token count outside).

    All arguments are tensors of the same shape (advantage and kl_coef already broadcast per token).
    ``importance_cap`` (REINFORCE/RLOO on samples from an older policy, i.e. rollout.overlap): each
    token's gradient is weighted by the truncated ratio min(pi / pi_old, cap), held constant.
    Returns (loss_sum, stats) where stats are sums for logging: pg, kl, clipped-token count.
    """
    import torch

    mask = mask.to(logp.dtype)
    if estimator == "ppo":
        ratio = torch.exp(logp - old_logp)
        clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
        pg = -torch.minimum(ratio * advantage, clipped * advantage)
        clip_count = ((ratio - clipped).abs() > 0).to(logp.dtype)
    elif importance_cap is not None:
        ratio = torch.exp(logp - old_logp).detach()
        weight = torch.clamp(ratio, max=importance_cap)
        pg = -weight * advantage * logp
        clip_count = (ratio > importance_cap).to(logp.dtype)
    else:
        pg = -advantage * logp
        clip_count = torch.zeros_like(logp)
    kl = kl_estimate(logp, ref_logp, kl_estimator)
    per_token = pg + (kl_coef * kl if kl_in_loss else 0.0)
    loss = (per_token * mask).sum()
    stats = {
        "pg": float((pg * mask).sum().detach()),
        "kl": float((kl * mask).sum().detach()),
        "clipped": float((clip_count * mask).sum()),
    }
    return loss, stats


def score_turns(
    stage: int,
    r1: Sequence[float],
    r2: Sequence[float],
    groups: Sequence[Hashable],
    alpha: float,
    beta1: float,
    beta2: float,
    estimator: str = "rloo",
    normalize_advantages: bool = False,
    kl_in_reward: bool = False,
    kl1: Sequence[float] = (),
    kl2: Sequence[float] = (),
) -> dict[str, list[float]]:
    """Per-episode turn rewards, advantages and KL coefficients for one batch.

    ``kl1`` / ``kl2`` are each episode's summed per-token log-ratio log(pi/ref) on
    the turn, needed only when the KL penalty goes into the reward instead of the loss.
    Returns lists: reward1, reward2 (shaped, before KL), adv1, adv2, kl_coef1, kl_coef2.
    When the KL is in the reward, the loss's KL coefficients are 0.
    """
    coef1, coef2 = turn_kl_coefs(stage, beta1, beta2)
    shaped = [turn_rewards(stage, a, b, alpha) for a, b in zip(r1, r2)]
    reward1 = [pair[0] for pair in shaped]
    reward2 = [pair[1] for pair in shaped]
    scored1, scored2 = list(reward1), list(reward2)
    if kl_in_reward:
        if len(kl1) != len(r1) or len(kl2) != len(r2):
            raise ValueError("kl_in_reward needs the per-episode KL sums of both turns")
        scored1 = [r - coef1 * k for r, k in zip(scored1, kl1)]
        scored2 = [r - coef2 * k for r, k in zip(scored2, kl2)]
    adv1 = advantages(scored1, groups, estimator)
    adv2 = advantages(scored2, groups, estimator)
    if normalize_advantages and len(adv1) > 1:
        adv1, adv2 = normalize(adv1), normalize(adv2)
    loss_coef1, loss_coef2 = (0.0, 0.0) if kl_in_reward else (coef1, coef2)
    n = len(r1)
    return {
        "reward1": reward1,
        "reward2": reward2,
        "adv1": adv1,
        "adv2": adv2,
        "kl_coef1": [loss_coef1] * n,
        "kl_coef2": [loss_coef2] * n,
    }
