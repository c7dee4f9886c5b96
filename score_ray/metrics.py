"""Every metric the trainer logs, by name, in one place, and the pure functions that compute them.

``METRICS`` names each key with what it means; the trainer logs only these keys and the W&B
dashboard (score_ray.dashboard) shows only these keys. All are stepped by ``iteration``.
``iteration_metrics`` turns one iteration's typed result (score_ray.records) into every metric it logs,
``eval_metrics`` a held-out eval's: no other module writes a metric's name. ``PhaseTimer`` times each
phase on the driver.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from score_ray.episode import TURNS, Episode
from score_ray.outcomes import METRIC_KEYS, broken, corrected
from score_ray.records import IterationResult, SyncStats

ITERATION = "iteration"
EVAL_SAMPLES = "eval/samples"  # a W&B table of eval episodes (score_ray.tracking)
PHASES = ("rollout", "grading", "reference", "credit", "learner", "sync", "eval")


def _per_turn(template: str, meaning: str) -> dict[str, str]:
    return {template.format(turn=turn): meaning.format(turn=turn) for turn in TURNS}


TRAIN = {
    "train/stage": "SCoRe stage of the iteration (1 or 2)",
    "train/episodes": "episodes sampled this iteration",
    **_per_turn("train/reward_t{turn}", "mean reward of the sampled y{turn}"),
    **_per_turn("train/kl_t{turn}", "mean per-token KL(pi || ref) of y{turn} (k3, at the sampled tokens)"),
    **_per_turn("train/entropy_t{turn}", "per-token entropy estimate of y{turn} (-log p of the sampled tokens)"),
    **_per_turn("train/length_t{turn}", "mean length of y{turn} in tokens"),
    **_per_turn("train/truncated_t{turn}", "fraction of y{turn} cut by max_tokens_turn{turn}"),
    "train/i2c": "fraction of episodes wrong at turn 1 and right at turn 2",
    "train/c2i": "fraction of episodes right at turn 1 and wrong at turn 2",
    "train/shaped_reward_t2": "mean turn-2 reward after shaping (Stage II: + alpha * (r2 - r1))",
    "train/loss": "loss per trained token",
    "train/pg_loss": "policy-gradient part of the loss per trained token",
    "train/kl_loss": "KL estimate per trained token (algo.kl_estimator)",
    "train/clip_fraction": "fraction of trained tokens whose ratio was clipped (ppo_clip) or capped (off-policy pg)",
    "train/learner_entropy": "the learner's per-token entropy over the trained tokens",
    "train/grad_norm": "global gradient norm before clipping",
    "train/step_skipped": "1 when DeepSpeed dropped the step for a non-finite loss or gradient",
    "train/skipped_steps": "steps dropped so far",
    "train/off_policy": "1 when the batch was sampled by older weights (rollout.overlap)",
    "train/grader_timeouts": "fraction of grades that timed out (reward 0)",
    "train/grader_errors": "fraction of grades that failed (reward 0)",
    "train/grader_alarm": "1 when failed grades passed reward.alarm_fraction",
}

PERF = {
    **{f"perf/{phase}_seconds": f"driver's wall time of the {phase} phase" for phase in PHASES},
    "perf/rollout_compute_seconds": "seconds the busiest generator spent generating",
    "perf/rollout_retries": "generator shares redone after a generator died",
    "perf/grading_compute_seconds": "seconds the busiest reward actor spent grading",
    "perf/reference_compute_seconds": "seconds the reference spent on log-probs",
    "perf/learner_compute_seconds": "seconds the slowest learner rank spent in its step",
    "perf/learner_micro_batches": "micro-batches per learner rank",
    "perf/learner_trunk_reused": "fraction of the step's micro-batches that ran only the top blocks, on the trunk "
                                 "the reference pass kept (learner.share_trunk); 0 without it",
    "perf/sync_compute_seconds": "seconds of the weight sync spent building and loading weights",
    "perf/sync_load_seconds": "seconds the slowest generator spent loading the weights (object store sync)",
    "perf/sync_mb": "megabytes of weights sent to each generator (object store sync)",
    "perf/generated_tokens": "tokens sampled this iteration (y1 + y2)",
    "perf/iteration_seconds": "wall time of the iteration",
    "perf/orchestration_seconds": "iteration wall time minus every phase's compute (synchronous runs)",
    "perf/orchestration_fraction": "orchestration seconds over iteration seconds",
    "perf/wall_time": "Unix time when the iteration was logged",
}

EVAL = {
    **{f"eval/{key}": f"held-out {key} (greedy, two turns)" for key in METRIC_KEYS},
    **{f"eval/{key}_se": f"standard error of eval/{key}" for key in METRIC_KEYS},
    EVAL_SAMPLES: "table of eval episodes: problem, y1, y2, r1, r2, corrected",
}

METRICS: dict[str, str] = {ITERATION: "iterations completed (the x axis of every chart)", **TRAIN, **PERF, **EVAL}

# Each phase's compute: the actors' own seconds, and the credit phase's, which runs on the driver.
COMPUTE_KEYS = ("perf/rollout_compute_seconds", "perf/grading_compute_seconds", "perf/reference_compute_seconds",
                "perf/credit_seconds", "perf/learner_compute_seconds", "perf/sync_compute_seconds",
                "perf/eval_seconds")


class PhaseTimer:
    """``with timer.phase("grading"):`` records the driver's wall time of the phase under its name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; known: {', '.join(PHASES)}")
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = time.monotonic() - start


def turn_metrics(episodes: Sequence[Episode], ref_logps: Sequence[list[float]], r1: Sequence[float],
                 r2: Sequence[float]) -> dict[str, float]:
    """Rewards, KL to the reference, entropy, length and truncation of each turn, and the sampled
    corrections (i2c) and breakages (c2i)."""
    import torch

    from score_ray.algo import kl_k3

    n = len(episodes)
    out: dict[str, float] = {"train/reward_t1": sum(r1) / n, "train/reward_t2": sum(r2) / n}
    for turn in TURNS:
        kls, entropies = [], []
        for episode, ref in zip(episodes, ref_logps):
            start, end = episode.turn_span(turn)
            logp = episode.response_logp(turn)
            log_ratio = torch.tensor(logp, dtype=torch.float64) - torch.tensor(ref[start:end], dtype=torch.float64)
            kls.append(float(kl_k3(log_ratio).mean()) if logp else 0.0)
            # -log p of on-policy samples is an unbiased per-token entropy estimate
            entropies.append(-sum(logp) / max(1, len(logp)))
        out[f"train/kl_t{turn}"] = sum(kls) / n
        out[f"train/entropy_t{turn}"] = sum(entropies) / n
        out[f"train/length_t{turn}"] = sum(len(e.response(turn)) for e in episodes) / n
        out[f"train/truncated_t{turn}"] = sum(e.truncated(turn) for e in episodes) / n
    out["train/i2c"] = sum(corrected(a, b) for a, b in zip(r1, r2)) / n
    out["train/c2i"] = sum(broken(a, b) for a, b in zip(r1, r2)) / n
    return out


def iteration_metrics(result: IterationResult) -> dict[str, float]:
    """Every metric one iteration logs, from what its phases returned."""
    episodes, grades, step = result.rollout.episodes, result.grades, result.step
    n = len(episodes)
    tokens = max(1.0, step.tokens)
    shaped2 = result.credit.reward2 if result.credit is not None else grades.r2  # the baselines shape nothing
    metrics: dict[str, float] = {
        ITERATION: result.iteration,
        "train/stage": result.stage,
        "train/episodes": n,
        **turn_metrics(episodes, result.reference.logps, grades.r1, grades.r2),
        "train/shaped_reward_t2": sum(shaped2) / n,
        "train/loss": step.loss / tokens,
        "train/pg_loss": step.pg / tokens,
        "train/kl_loss": step.kl / tokens,
        "train/clip_fraction": step.clipped / tokens,
        "train/learner_entropy": step.entropy / tokens,
        "train/grad_norm": step.grad_norm,
        "train/step_skipped": 0.0 if step.applied else 1.0,
        "train/skipped_steps": float(result.skipped_steps),
        "train/off_policy": float(result.off_policy),
        "train/grader_timeouts": grades.share("timeout"),
        "train/grader_errors": grades.share("error"),
        "train/grader_alarm": 1.0 if result.alarm else 0.0,
        "perf/learner_micro_batches": step.micro_batches,
        "perf/learner_trunk_reused": step.trunk_batches / max(1.0, step.filled_batches),
        # a first attempt is sampled once, whatever the number of second attempts at it
        "perf/generated_tokens": float(sum(len(e.y2) + (len(e.y1) if e.trains_turn1 else 0) for e in episodes)),
        **{f"perf/{phase}_seconds": seconds for phase, seconds in result.phase_seconds.items()},
        "perf/rollout_compute_seconds": result.rollout.compute_seconds,
        "perf/rollout_retries": float(result.rollout.retries),
        "perf/grading_compute_seconds": grades.compute_seconds,
        "perf/reference_compute_seconds": result.reference.compute_seconds,
        "perf/learner_compute_seconds": step.compute_seconds,
        **sync_metrics(result.sync),
    }
    if result.evaluation is not None:
        metrics.update(eval_metrics(result.evaluation.metrics))
        metrics["perf/eval_seconds"] = result.evaluation.seconds
    metrics["perf/iteration_seconds"] = result.seconds
    if not result.overlapped:
        metrics.update(orchestration(metrics))
    metrics["perf/wall_time"] = result.wall_time
    return metrics


def sync_metrics(sync: Optional[SyncStats]) -> dict[str, float]:
    """perf/sync_*: what a transport measured (none when the iteration synced nothing)."""
    if sync is None:
        return {}
    metrics = {"perf/sync_seconds": sync.seconds, "perf/sync_compute_seconds": sync.compute_seconds}
    if sync.megabytes is not None:
        metrics["perf/sync_mb"] = sync.megabytes
    if sync.load_seconds is not None:
        metrics["perf/sync_load_seconds"] = sync.load_seconds
    return metrics


def orchestration(metrics: dict[str, float]) -> dict[str, float]:
    """Phases run one after another (no overlap): what no phase computed is orchestration."""
    compute = sum(metrics.get(key, 0.0) for key in COMPUTE_KEYS)
    seconds = metrics["perf/iteration_seconds"] - compute
    return {"perf/orchestration_seconds": seconds,
            "perf/orchestration_fraction": seconds / metrics["perf/iteration_seconds"]}


def eval_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """``evaluate.self_correction_metrics`` under their logged names (eval/<key>)."""
    return {key: value for key, value in eval_summary(metrics).items() if key != "eval/n"}


def eval_summary(metrics: dict[str, float]) -> dict[str, float]:
    """What summary.json and score_ray.eval's JSON hold: the logged names, and the problem count (eval/n)."""
    return {f"eval/{key}": value for key, value in metrics.items()}
