"""The typed records the phases of an iteration hand each other; each that runs on actors carries the
compute seconds it took there (the driver's wall time around it is the phase timer's).

    rollout    generators      -> Rollout            (score_ray.actor_group)
    grade      reward pool     -> Grades             (score_ray.reward.pool)
    reference  reference       -> ReferenceLogprobs  (score_ray.actor_group, score_ray.learner)
    credit     pure functions  -> Credit             (score_ray.algo)
    learn      learner group   -> StepStats          (score_ray.learner)
    sync       weight sync     -> SyncStats          (score_ray.weight_sync)
    the whole iteration        -> IterationResult    (its metrics: score_ray.metrics.iteration_metrics)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from score_ray.episode import Episode
    from score_ray.reward.types import GradeResult


@dataclass
class Rollout:
    episodes: list["Episode"]
    compute_seconds: float  # the busiest generator's
    retries: int = 0  # generator shares redone after their generator died
    policy_version: int = 0  # the weights that sampled it: the learner's after this many syncs


@dataclass
class Grades:
    """Both turns' rewards of every episode, and each grade (episode i's turns at 2i and 2i + 1)."""

    r1: list[float]
    r2: list[float]
    results: list["GradeResult"]
    compute_seconds: float  # the busiest reward actor's

    def share(self, status: str) -> float:
        return sum(result.status == status for result in self.results) / max(1, len(self.results))


@dataclass
class ReferenceLogprobs:
    logps: list[list[float]]  # per sequence, per log-prob position (0 where not selected)
    compute_seconds: float  # the slowest reference's (or learner rank's, with learner.share_trunk)
    # learner.share_trunk: each sequence's row in the learner ranks' reference pass, whose trunk they kept for
    # the step (LearnerGroup.train_step's trunk_rows); None when a reference actor of its own scored them
    trunk_rows: Optional[list[int]] = None


@dataclass
class Credit:
    """Per episode: each turn's (shaped) reward, advantage and KL coefficient (score_ray.algo.assign_credit)."""

    reward1: list[float]
    reward2: list[float]
    adv1: list[float]
    adv2: list[float]
    kl_coef1: list[float]
    kl_coef2: list[float]

    def advantage(self, turn: int) -> list[float]:
        return self.adv1 if turn == 1 else self.adv2

    def kl_coef(self, turn: int) -> list[float]:
        return self.kl_coef1 if turn == 1 else self.kl_coef2


@dataclass
class StepStats:
    """One optimiser step. The first eight fields are sums over micro-batches and ranks (divide by ``tokens``
    for per-token values); trunk_batches / filled_batches: micro-batches that ran the top blocks alone on a
    kept trunk (learner.share_trunk), of those with samples."""

    loss: float = 0.0
    pg: float = 0.0
    kl: float = 0.0
    clipped: float = 0.0
    entropy: float = 0.0
    tokens: float = 0.0
    trunk_batches: float = 0.0
    filled_batches: float = 0.0
    compute_seconds: float = 0.0  # the slowest rank's
    grad_norm: float = 0.0  # global, before clipping
    applied: bool = True  # False when DeepSpeed dropped the step (a non-finite gradient)
    micro_batches: int = 0  # per rank

    @classmethod
    def of_ranks(cls, ranks: Sequence["StepStats"], micro_batches: int) -> "StepStats":
        """The group's step from its ranks' (every rank computed the same global gradient norm)."""
        summed = {name: sum(getattr(rank, name) for rank in ranks) for name in SUMMED_STEP_FIELDS}
        return cls(**summed, compute_seconds=max(rank.compute_seconds for rank in ranks),
                   grad_norm=ranks[0].grad_norm, applied=all(rank.applied for rank in ranks),
                   micro_batches=micro_batches)

    def after(self, earlier: "StepStats") -> "StepStats":
        """This pass over a batch, following ``earlier`` passes over it (ppo_epochs): this pass's loss and
        statistics, the compute of every pass, and applied only if every pass was."""
        return replace(self, compute_seconds=earlier.compute_seconds + self.compute_seconds,
                       applied=earlier.applied and self.applied)


SUMMED_STEP_FIELDS = tuple(f.name for f in fields(StepStats))[:8]


@dataclass
class SyncStats:
    seconds: float  # the driver's wall time of the whole sync
    compute_seconds: float  # building and loading the weights
    load_seconds: Optional[float] = None  # the slowest generator's load (object store sync)
    megabytes: Optional[float] = None  # sent to each generator (object store sync)


@dataclass
class Evaluation:
    """Greedy two-turn eval on the held-out problems (score_ray.evaluate.self_correction_metrics)."""

    metrics: dict[str, float]
    episodes: list["Episode"]
    seconds: float = 0.0


@dataclass
class IterationResult:
    iteration: int
    stage: int
    rollout: Rollout
    grades: Grades
    reference: ReferenceLogprobs  # of the sampled episodes
    credit: Optional[Credit]  # None for the supervised baselines: no shaping
    step: StepStats
    off_policy: bool  # older weights sampled the batch (rollout.overlap)
    alarm: bool  # failed grades passed reward.alarm_fraction
    skipped_steps: int  # so far
    phase_seconds: dict[str, float] = field(default_factory=dict)  # the driver's wall time of each phase
    sync: Optional[SyncStats] = None  # the iteration's last weight sync
    evaluation: Optional[Evaluation] = None
    seconds: float = 0.0  # wall time of the iteration
    overlapped: bool = False  # rollout.overlap: phases ran beside each other
    wall_time: float = 0.0  # Unix time when it was logged
