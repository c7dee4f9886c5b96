"""score_ray.metrics: the logged names, the per-turn metrics by hand, the phase timer."""

import math

import pytest

from conftest import make_episode
from score_ray import records
from score_ray.metrics import METRICS, PHASES, PhaseTimer, iteration_metrics, orchestration, turn_metrics
from score_ray.reward.types import GradeResult


def episode(y1_logp, y2_logp, truncated=(False, False)):
    x1 = [1, 2]
    y1 = list(range(10, 10 + len(y1_logp)))
    y2 = list(range(20, 20 + len(y2_logp)))
    return make_episode(x1=x1, y1=y1, instruction=[7], y2=y2, y1_logp=y1_logp, y2_logp=y2_logp,
                        y1_truncated=truncated[0], y2_truncated=truncated[1])


def test_per_turn_metrics_by_hand():
    first = episode([-0.5, -1.5], [-1.0], truncated=(True, False))
    second = episode([-1.0], [-2.0, -2.0])
    ref_first = [0.0] * (len(first.sequence) - 1)
    ref_first[1:3] = [-0.5, -0.5]  # turn 1: log pi/ref = 0 and -1; turn 2 (position 4): log pi/ref = -1
    ref_first[4] = 0.0
    ref_second = [0.0] * (len(second.sequence) - 1)
    ref_second[1] = -1.0  # turn 1: log pi/ref = 0
    ref_second[3:5] = [-2.0, -2.0]  # turn 2: 0, 0
    out = turn_metrics([first, second], [ref_first, ref_second], r1=[0.0, 1.0], r2=[1.0, 0.0])
    k3 = lambda x: math.exp(-x) - 1 + x  # noqa: E731 - the estimator at log-ratio x
    assert out["train/kl_t1"] == pytest.approx(((k3(0.0) + k3(-1.0)) / 2 + k3(0.0)) / 2)
    assert out["train/kl_t2"] == pytest.approx((k3(-1.0) + 0.0) / 2)
    assert out["train/entropy_t1"] == pytest.approx((1.0 + 1.0) / 2)
    assert out["train/entropy_t2"] == pytest.approx((1.0 + 2.0) / 2)
    assert (out["train/length_t1"], out["train/length_t2"]) == (1.5, 1.5)
    assert (out["train/truncated_t1"], out["train/truncated_t2"]) == (0.5, 0.0)
    assert (out["train/i2c"], out["train/c2i"]) == (0.5, 0.5)
    assert (out["train/reward_t1"], out["train/reward_t2"]) == (0.5, 0.5)


def test_every_metric_an_iteration_logs_is_named_in_the_catalogue():
    episodes = [episode([-0.5], [-0.5]), episode([-0.5], [-0.5])]
    refs = [[0.0] * (len(e.sequence) - 1) for e in episodes]
    step = records.StepStats(loss=2.0, pg=1.0, kl=0.5, clipped=0.0, entropy=1.0, tokens=4.0, grad_norm=0.3, applied=True,
                     micro_batches=1, compute_seconds=0.1, trunk_batches=3.0, filled_batches=4.0)
    graded = [GradeResult(0.0, s, 0.0) for s in ("correct", "wrong", "timeout", "error")]
    credit = records.Credit(reward1=[0.0, 1.0], reward2=[11.0, 1.0], adv1=[0.0, 0.0], adv2=[0.0, 0.0], kl_coef1=[0.0, 0.0],
                    kl_coef2=[0.0, 0.0])
    result = records.IterationResult(
        iteration=2, stage=2, rollout=records.Rollout(episodes, compute_seconds=0.5), grades=records.Grades([0.0, 1.0], [1.0, 1.0], graded, 0.2),
        reference=records.ReferenceLogprobs(refs, 0.1), credit=credit, step=step, off_policy=False, alarm=True, skipped_steps=0,
        phase_seconds={"rollout": 0.6, "learner": 1.1}, sync=records.SyncStats(0.3, 0.2, load_seconds=0.1, megabytes=1.0),
        evaluation=records.Evaluation({"acc_t1": 0.5, "n": 2.0}, [], seconds=0.4), seconds=2.0, wall_time=1.0)
    out = iteration_metrics(result)
    assert set(out) <= set(METRICS)
    assert out["train/loss"] == 0.5 and out["train/shaped_reward_t2"] == 6.0
    assert (out["train/grader_timeouts"], out["train/grader_errors"], out["train/grader_alarm"]) == (0.25, 0.25, 1.0)
    assert out["perf/generated_tokens"] == 4.0 and out["perf/learner_trunk_reused"] == 0.75
    assert (out["perf/rollout_seconds"], out["perf/sync_mb"], out["eval/acc_t1"]) == (0.6, 1.0, 0.5)
    timed = {"perf/iteration_seconds": 2.0, "perf/rollout_compute_seconds": 0.5, "perf/learner_compute_seconds": 1.0}
    assert orchestration(timed) == {"perf/orchestration_seconds": 0.5, "perf/orchestration_fraction": 0.25}
    assert set(orchestration(timed)) <= set(METRICS)


def test_the_phase_timer_names_each_phase_and_refuses_an_unknown_one():
    timer = PhaseTimer()
    with timer.phase("grading"):
        pass
    assert list(timer.seconds) == ["grading"] and timer.seconds["grading"] >= 0.0
    assert all(f"perf/{phase}_seconds" in METRICS for phase in PHASES)
    with pytest.raises(ValueError, match="unknown phase 'gradnig'"):
        with timer.phase("gradnig"):
            pass
