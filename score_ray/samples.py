"""Episodes -> learner samples: which positions of x2 + y2 are trained, with what advantage,
KL coefficient and log-probs (pure functions over lists; positions from ``Episode.turn_span``).

The supervised baselines (algo.objective, docs/methods.md) choose what to learn from here too:
``star_episodes`` keeps the episodes whose second attempt is right; ``pair_sft_episodes`` pairs a
wrong first attempt with a right attempt at the same problem as its second turn. Both are then
trained with advantage 1 and no KL (``supervised_credit``): a token-level cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

from score_ray.episode import TURNS, Episode
from score_ray.outcomes import is_right
from score_ray.records import Credit

# The per-position fields of a LearnerSample, in the order the learner collates them.
POSITION_FIELDS = ("loss_mask", "advantage", "kl_coef", "old_logp", "ref_logp", "temperature")


@dataclass
class LearnerSample:
    """One sequence for the learner. Every per-position list has len(input_ids) - 1 entries:
    position t scores token t + 1. Untrained positions hold 0."""

    input_ids: list[int]  # x2 + y2
    loss_mask: list[float]  # 1.0 at the trained tokens of y1 and y2
    advantage: list[float]  # the turn's advantage, broadcast over its tokens
    kl_coef: list[float]  # the turn's KL coefficient (0 when the KL is in the reward)
    old_logp: list[float]  # the sampler's log-probs (PPO's ratio, the off-policy weight)
    ref_logp: list[float]  # the frozen reference's log-probs (the KL)
    temperature: list[float]  # the temperature each position is scored at: its turn's sampling temperature


# one scoring temperature for every position, or per sequence each position's own (``position_temperatures``)
PositionTemperatures = Union[float, Sequence[Sequence[float]]]


def position_temperatures(episode: Episode) -> list[float]:
    """The temperature each log-prob position of an episode is scored at: its turn's sampling temperature at
    the tokens of y1 and y2, 1.0 at the prompts' (never scored). A greedy response has no distribution to
    score, so an episode with one is refused."""
    temperatures = [1.0] * (len(episode.sequence) - 1)
    for turn in TURNS:
        temperature = episode.temperature(turn)
        if temperature <= 0.0:
            raise ValueError(f"episode of {episode.problem.id}: turn {turn} was decoded greedily (temperature "
                             f"{temperature}); only sampled episodes are trained")
        start, end = episode.turn_span(turn)
        temperatures[start:end] = [temperature] * (end - start)
    return temperatures


def trained_positions(episode: Episode) -> list[float]:
    """1.0 at the log-prob positions of the sampled y1 and y2 tokens of an episode, else 0.0."""
    flags = [0.0] * (len(episode.sequence) - 1)
    for turn in TURNS:
        start, end = episode.turn_span(turn)
        flags[start:end] = [1.0] * (end - start)
    return flags


def build_samples(
    episodes: Sequence[Episode], ref_logps: Sequence[list[float]], credit: Credit,
    turns: Sequence[int] = TURNS, temperature: Optional[float] = None,
) -> list[LearnerSample]:
    """One sample per episode: the full sequence x2 + y2 with the tokens of the turns in ``turns`` trained
    ([1] is single-turn RL), with each turn's advantage and KL coefficient from ``credit``.
    Of the episodes that share a y1 (rollout.turn2_samples), only branch 0 trains turn 1. Each position is
    scored at the temperature its token was sampled at, or with ``temperature`` all at that one (the
    supervised baselines: their targets are imitated, not compared with the sampler's probabilities)."""
    samples = []
    for index, (episode, ref) in enumerate(zip(episodes, ref_logps)):
        width = len(episode.sequence) - 1
        mask, advantage, coef, old = ([0.0] * width for _ in range(4))
        for turn in turns:
            if turn == 1 and not episode.trains_turn1:
                continue
            start, end = episode.turn_span(turn)
            mask[start:end] = [1.0] * (end - start)
            advantage[start:end] = [credit.advantage(turn)[index]] * (end - start)
            coef[start:end] = [credit.kl_coef(turn)[index]] * (end - start)
            logp = episode.response_logp(turn)
            if len(logp) != end - start:
                raise ValueError(f"episode of {episode.problem.id}: turn {turn} has {end - start} tokens but "
                                 f"{len(logp)} sampler log-probs")
            old[start:end] = logp
        temperatures = position_temperatures(episode) if temperature is None else [temperature] * width
        samples.append(LearnerSample(episode.sequence, mask, advantage, coef, old, ref, temperatures))
    return samples


def first_attempt_groups(episodes: Sequence[Episode]) -> list[tuple[str, tuple[int, ...]]]:
    """Each episode's first attempt, as a key: the episodes that share one are the second attempts at it
    (rollout.turn2_samples). Keyed on y1 itself, not on the sample index: a batch that crosses an epoch holds
    a problem twice, with other first attempts under the same indices."""
    return [(episode.problem.id, tuple(episode.y1)) for episode in episodes]


def turn_kl_sums(episode: Episode, ref: list[float]) -> tuple[float, float]:
    """Summed log(pi/ref) of the sampled tokens of each turn (for the KL in the reward)."""
    sums = []
    for turn in TURNS:
        start, end = episode.turn_span(turn)
        sums.append(sum(p - r for p, r in zip(episode.response_logp(turn), ref[start:end])))
    return sums[0], sums[1]


def star_episodes(episodes: Sequence[Episode], r2: Sequence[float]) -> list[Episode]:
    """STaR: the episodes whose second attempt is right (both turns are then trained)."""
    return [episode for episode, reward in zip(episodes, r2) if is_right(reward)]


def pair_sft_episodes(episodes: Sequence[Episode], r1: Sequence[float], r2: Sequence[float]) -> list[Episode]:
    """Pair-SFT: each wrong first attempt, with a right attempt at the same problem as its second turn (the
    first right y1 or y2 of the problem's samples, in batch order); problems with no right attempt give none."""
    right: dict[str, tuple[list[int], list[float], str, float]] = {}
    for episode, a, b in zip(episodes, r1, r2):
        for turn, reward in ((1, a), (2, b)):
            if is_right(reward) and episode.problem.id not in right:
                right[episode.problem.id] = (episode.response(turn), episode.response_logp(turn),
                                             episode.response_text(turn), episode.temperature(turn))
    paired = []
    for episode, a in zip(episodes, r1):
        if not is_right(a) and episode.problem.id in right:
            tokens, logp, text, temperature = right[episode.problem.id]
            paired.append(replace(episode, y2=list(tokens), y2_logp=list(logp), y2_text=text, y2_truncated=False,
                                  y2_temperature=temperature))
    return paired


def supervised_credit(count: int) -> Credit:
    """The supervised baselines' credit: advantage 1 on every chosen episode, no KL (a cross-entropy)."""
    ones, zeros = [1.0] * count, [0.0] * count
    return Credit(ones, ones, ones, ones, zeros, zeros)


# The turns each supervised objective trains.
SUPERVISED_TURNS = {"star": (1, 2), "pair_sft": (2,)}
