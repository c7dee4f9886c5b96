"""The SCoRe objective as small pure functions (no Ray, no torch.distributed).

Stage I   maximise  r(y2) - beta2 * KL_turn1 - beta1 * KL_turn2
          (turn 1 earns no reward: it is only held near the base model)
Stage II  maximise  sum_i [ r_hat(y_i) - beta1 * KL_turn_i ]
          with r_hat(y1) = r(y1), r_hat(y2) = r(y2) + alpha * (r(y2) - r(y1))

Each turn is weighted by its own (shaped) reward, no discounting between turns.
Three separate axes, each a table whose keys are the config's allowed values:
- ``ADVANTAGE_ESTIMATORS`` (algo.advantage): REINFORCE (the reward itself) or a
  leave-one-out baseline over the k samples of the same prompt (RLOO, the default);
- ``POLICY_LOSSES`` (algo.policy_loss): the plain policy gradient, or PPO's clipped
  ratio to the sampling policy;
- ``KL_ESTIMATORS`` (algo.kl_estimator): Schulman's k1, k2, k3 of KL(pi || ref).

Reward shaping and advantages are plain Python over floats; the token-level loss
is a torch function of log-prob tensors, so it can be checked by hand.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Optional, Sequence

from score_ray.records import Credit

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


def reinforce_advantages(rewards: Sequence[float], groups: Sequence[Hashable]) -> list[float]:
    """REINFORCE: each sample's reward is its advantage."""
    return [float(r) for r in rewards]


def rloo_advantages(rewards: Sequence[float], groups: Sequence[Hashable]) -> list[float]:
    """r_i minus the mean reward of the other samples of its prompt (a group of one keeps its reward:
    there is nothing to compare with)."""
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


ADVANTAGE_ESTIMATORS = {"rloo": rloo_advantages, "reinforce": reinforce_advantages}


def advantages(rewards: Sequence[float], groups: Sequence[Hashable], estimator: str) -> list[float]:
    """Per-sample advantages by ``ADVANTAGE_ESTIMATORS[estimator]``; ``groups`` says which samples share a prompt."""
    if len(rewards) != len(groups):
        raise ValueError("rewards and groups differ in length")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; known: {', '.join(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[estimator](rewards, groups)


def normalize(values: Sequence[float], eps: float = 1e-6) -> list[float]:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return [(v - mean) / (std + eps) for v in values]


# Per-token estimates of KL(pi || ref) from samples of pi, as functions of log(pi/ref) at the sampled
# token (a torch tensor or a float64 tensor of a turn's tokens).


def kl_k1(log_ratio):
    return log_ratio


def kl_k2(log_ratio):
    return 0.5 * log_ratio**2


def kl_k3(log_ratio):
    """exp(-x) - 1 + x >= 0, unbiased; the exponent is clamped so one outlier token cannot overflow."""
    import torch

    negative = torch.clamp(-log_ratio, max=20.0)
    return torch.exp(negative) - 1.0 - negative


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp, ref_logp, estimator: str):
    """Per-token KL(pi || ref) by ``KL_ESTIMATORS[estimator]``."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp - ref_logp)


# Policy losses: (per-token loss, per-token 1.0 where the ratio was clipped or capped) from the learner's
# log-probs ``logp``, the sampler's ``old_logp`` and the per-token ``advantage``.


def pg_loss(logp, old_logp, advantage, clip_eps: float, importance_cap: Optional[float]):
    """-A * log pi. With ``importance_cap`` (samples from an older policy, i.e. rollout.overlap) each token's
    gradient is weighted by the truncated ratio min(pi / pi_old, cap), held constant."""
    import torch

    if importance_cap is None:
        return -advantage * logp, torch.zeros_like(logp)
    ratio = torch.exp(logp - old_logp).detach()
    weight = torch.clamp(ratio, max=importance_cap)
    return -weight * advantage * logp, (ratio > importance_cap).to(logp.dtype)


def ppo_clip_loss(logp, old_logp, advantage, clip_eps: float, importance_cap: Optional[float]):
    """PPO's clipped surrogate: -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A), rho = pi / pi_old. The clip
    already bounds off-policy samples, so ``importance_cap`` is not used."""
    import torch

    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return -torch.minimum(ratio * advantage, clipped * advantage), ((ratio - clipped).abs() > 0).to(logp.dtype)


POLICY_LOSSES = {"pg": pg_loss, "ppo_clip": ppo_clip_loss}


def learner_passes(policy_loss: str, ppo_epochs: int) -> int:
    """Optimiser steps per batch: PPO's ratio keeps later passes on the same samples valid, the plain
    policy gradient is on-policy for one step only."""
    return ppo_epochs if policy_loss == "ppo_clip" else 1


def token_loss(
    logp,
    old_logp,
    ref_logp,
    advantage,
    kl_coef,
    mask,
    policy_loss: str = "pg",
    kl_estimator: str = "k3",
    kl_in_loss: bool = True,
    clip_eps: float = 0.2,
    importance_cap: Optional[float] = None,
):
    """Sum over masked tokens of ``POLICY_LOSSES[policy_loss]`` + KL penalty (divide by the token count outside).

    All arguments are tensors of the same shape (advantage and kl_coef already broadcast per token).
    Returns (loss_sum, stats) where stats are sums for logging: pg, kl, clipped-token count.
    """
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {policy_loss!r}; known: {', '.join(POLICY_LOSSES)}")
    mask = mask.to(logp.dtype)
    pg, clip_count = POLICY_LOSSES[policy_loss](logp, old_logp, advantage, clip_eps, importance_cap)
    kl = kl_estimate(logp, ref_logp, kl_estimator)
    per_token = pg + (kl_coef * kl if kl_in_loss else 0.0)
    loss = (per_token * mask).sum()
    stats = {
        "pg": float((pg * mask).sum().detach()),
        "kl": float((kl * mask).sum().detach()),
        "clipped": float((clip_count * mask).sum()),
    }
    return loss, stats


def assign_credit(
    stage: int,
    r1: Sequence[float],
    r2: Sequence[float],
    groups: Sequence[Hashable],
    alpha: float,
    beta1: float,
    beta2: float,
    advantage: str = "rloo",
    normalize_advantages: bool = False,
    kl_in_reward: bool = False,
    kl1: Sequence[float] = (),
    kl2: Sequence[float] = (),
    turn2_groups: Optional[Sequence[Hashable]] = None,
    trains_turn1: Optional[Sequence[bool]] = None,
) -> Credit:
    """Per-episode turn rewards, advantages and KL coefficients for one batch.

    ``kl1`` / ``kl2`` are each episode's summed per-token log-ratio log(pi/ref) on
    the turn, needed only when the KL penalty goes into the reward instead of the loss.
    With several second attempts per first attempt (rollout.turn2_samples), ``turn2_groups`` groups turn 2's
    advantages by first attempt (default: ``groups``), so a correction is compared with the other corrections
    of the same y1, and ``trains_turn1`` marks the one episode per y1 that trains turn 1: turn 1's advantages
    are computed over those alone (each y1 counted once) and are 0 elsewhere.
    The rewards are shaped, before the KL. When the KL is in the reward, the loss's KL coefficients are 0.
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
    n = len(r1)
    rows1 = [i for i in range(n) if trains_turn1 is None or trains_turn1[i]]
    adv1_rows = advantages([scored1[i] for i in rows1], [groups[i] for i in rows1], advantage)
    adv2 = advantages(scored2, groups if turn2_groups is None else turn2_groups, advantage)
    if normalize_advantages:
        adv1_rows = normalize(adv1_rows) if len(adv1_rows) > 1 else adv1_rows
        adv2 = normalize(adv2) if n > 1 else adv2
    adv1 = [0.0] * n
    for i, value in zip(rows1, adv1_rows):
        adv1[i] = value
    loss_coef1, loss_coef2 = (0.0, 0.0) if kl_in_reward else (coef1, coef2)
    return Credit(reward1, reward2, adv1, adv2, [loss_coef1] * n, [loss_coef2] * n)
