"""The SCoRe training loop. Read this first: ``train`` sets up, iterates, finishes; ``Trainer.iteration``
is one iteration, step by step:

    rollout    problems -> generators: turn 1, turn 2 (vLLM)            -> episodes   (score_ray.rollout)
    grade      episodes -> reward pool: r1, r2 (sandboxed graders)                    (score_ray.reward)
    reference  episodes -> reference: log-probs of both turns
    credit     rewards  -> shaped per-turn rewards, advantages, KL coefficients by stage (score_ray.algo)
               episodes -> learner samples                                           (score_ray.samples)
    learn      samples  -> learner group: one optimiser step (DeepSpeed ZeRO)          (score_ray.learner)
    sync       learner  -> every generator: the new weights                          (score_ray.weight_sync)
    then       metrics (score_ray.metrics); every k iterations a greedy two-turn eval on held-out
               problems; checkpoints (score_ray.checkpoints)

Each phase returns a typed record (score_ray.records); the iteration's ``IterationResult`` is all its metrics
are made of. The actors, their recovery and the policy version live in score_ray.actor_group; the problem order
and seeds in score_ray.batches; what a fault means in score_ray.faults.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from score_ray import algo
from score_ray.actor_group import ActorGroup, RolloutHandle
from score_ray.batches import next_batch, sampling_seeds
from score_ray.checkpoints import TrainerState, load_newest, roll_back_metrics, save_checkpoint, whole_checkpoints
from score_ray.config import Config, dump_config
from score_ray.data import Problem
from score_ray.episode import Episode
from score_ray.evaluate import format_table, two_turn_eval, write_eval_records
from score_ray.faults import (
    MAX_RECOVERIES_IN_ROW,
    LearnerLost,
    PlacementTimeout,
    TrainingHalted,
    account_step,
    grading_alarm,
)
from score_ray.metrics import ITERATION, PhaseTimer, eval_metrics, eval_summary, iteration_metrics
from score_ray.placement import check_resources, ray_init
from score_ray.records import (
    Credit,
    Evaluation,
    Grades,
    IterationResult,
    ReferenceLogprobs,
    Rollout,
    StepStats,
    SyncStats,
)
from score_ray.reward import grade_episodes
from score_ray.samples import (
    SUPERVISED_TURNS,
    build_samples,
    first_attempt_groups,
    pair_sft_episodes,
    position_temperatures,
    star_episodes,
    supervised_credit,
    trained_positions,
    turn_kl_sums,
)


def train(config: Config, run_dir: Path) -> int:
    """Train; returns a process exit code."""
    import ray

    from score_ray.assets import model_folder
    from score_ray.data import load_problems

    (run_dir / "config.yaml").write_text(dump_config(config))
    model_path = model_folder(config.model)
    train_problems, _ = load_problems(config.data.train)
    eval_problems, _ = load_problems(config.data.eval)
    eval_problems = eval_problems[: config.eval.max_problems] if config.eval.max_problems else eval_problems

    ray_init(config)
    check_resources(config)
    resuming = config.run.resume and bool(whole_checkpoints(run_dir))
    print(f"starting actors: {config.rollout.num_generators} generator(s), {config.learner.num_ranks} learner rank(s) "
          f"(ZeRO-{config.learner.zero_stage}), "
          f"{'the reference on the learner ranks' if config.learner.serves_reference else '1 reference'}, "
          f"{config.reward.workers} reward actor(s)", flush=True)
    actors = ActorGroup(config, run_dir)
    trainer = None
    try:
        trainer = Trainer(config, run_dir, actors, train_problems, eval_problems)
        trainer.start(resuming)
        while trainer.state.iteration < len(trainer.plan):
            try:
                trainer.iteration()
            except LearnerLost as lost:
                trainer.recover(lost)
        trainer.finish(model_path)
        return 0
    except (ray.exceptions.RayActorError, LearnerLost) as err:  # outside the loop's recovery: set-up, final save
        raise RuntimeError(f"an actor died ({str(err).splitlines()[0][:300]}); the run stops here: resume it "
                           "with run.resume=true from the last checkpoint") from err
    finally:
        if trainer is not None:
            trainer.close()
        actors.shutdown()


class Trainer:
    """The state of a run between iterations, and its steps."""

    def __init__(self, config: Config, run_dir: Path, actors: ActorGroup, train_problems: list[Problem],
                 eval_problems: list[Problem]):
        self.config, self.run_dir, self.actors = config, run_dir, actors
        self.train_problems, self.eval_problems = train_problems, eval_problems
        schedule = config.algo.schedule
        self.plan = algo.stage_plan(schedule.stage1_iterations, schedule.stage2_iterations, schedule.rounds)
        self.overlap = config.rollout.overlap
        self.state = TrainerState()
        self.logger = None
        self.bar = None
        self.stage_name = ""
        self.durations: list[float] = []
        self.prefetched: Optional[tuple[RolloutHandle, tuple[int, int]]] = None  # rollout.overlap: in flight

    # ------------------------------------------------------------------ start, finish
    def start(self, resuming: bool) -> None:
        """Resume from the newest whole checkpoint, open the logs, evaluate the base model."""
        from tqdm import tqdm

        from score_ray.tracking import MetricsLogger

        resumed_from = None
        if resuming:
            resumed_from, self.state = load_newest(self.run_dir, self.actors.learner)
        if resumed_from is not None:
            moved = roll_back_metrics(self.run_dir, self.state.iteration)
            self.actors.sync_weights()
            print(f"resumed from {resumed_from.name}: iteration {self.state.iteration}"
                  + (f" ({moved} metric rows logged after it moved to metrics.rolled_back.jsonl)" if moved else ""),
                  flush=True)
        self.logger = MetricsLogger(self.run_dir, self.config, resume=resumed_from is not None)
        if resumed_from is None and self.config.eval.at_start:
            base = self.evaluate("base eval")
            self.state.base_eval = base.metrics
            self.logger.log({ITERATION: 0, **eval_metrics(base.metrics)})
            self.logger.log_samples(0, base.episodes)
            write_eval_records(self.run_dir / "eval_base.jsonl", base.episodes)
            print("base model:\n" + format_table({"base": base.metrics}), flush=True)
        self.bar = tqdm(total=len(self.plan), initial=self.state.iteration, desc="SCoRe", unit="it", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    def finish(self, model_path: str) -> None:
        """Final eval, the trained model (HF folder), summary.json and plots."""
        from transformers import AutoTokenizer

        from score_ray.tracking import write_plots

        if self.bar is not None:
            self.bar.close()
        self.actors.sync_if_behind()
        final = self.evaluate("final eval")
        final_metrics = final.metrics
        self.logger.log({ITERATION: self.state.iteration, **eval_metrics(final_metrics)})
        self.logger.log_samples(self.state.iteration, final.episodes)
        write_eval_records(self.run_dir / "eval_final.jsonl", final.episodes)
        final_dir = self.run_dir / "final_model"
        self.actors.learner.save_hf(str(final_dir))
        AutoTokenizer.from_pretrained(model_path).save_pretrained(str(final_dir))
        base_eval = self.state.base_eval
        rows = {"base": base_eval, "trained": final_metrics} if base_eval else {"trained": final_metrics}
        summary = {
            "iterations": self.state.iteration,
            "final_eval": eval_summary(final_metrics),
            "base_eval": eval_summary(base_eval or {}),
            "final_model": str(final_dir),
            "eval_problems": len(self.eval_problems),
            "skipped_steps": self.state.skipped_steps,
            "generator_restarts": self.actors.restarts,
            "learner_replacements": self.actors.learner_replacements,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plots = write_plots(self.run_dir)
        self.logger.finish({k: v for k, v in summary["final_eval"].items() if isinstance(v, float)})
        self.logger = None
        print(format_table(rows))
        print(f"run folder: {self.run_dir} (summary.json, metrics.jsonl, eval_final.jsonl, final_model/, "
              + ", ".join(p.name for p in plots) + ")", flush=True)

    def close(self) -> None:
        """Stopped early: close the W&B run so what was logged is kept."""
        if self.logger is not None:
            self.logger.finish(exit_code=1)
            self.logger = None

    # ------------------------------------------------------------------ one iteration
    def iteration(self) -> None:
        """One SCoRe iteration: rollout, grade, reference, credit, learn, sync; then log, eval, checkpoint."""
        iteration, stage = self.state.iteration + 1, self.plan[self.state.iteration]
        self.stage_name = "I" if stage == algo.STAGE_I else "II"
        timer, start = PhaseTimer(), time.monotonic()

        with self.phase(timer, "rollout"):
            rollout = self.rollout(iteration)
        sync = self.prefetch(iteration + 1) if self.overlap else None
        with self.phase(timer, "grading"):
            grades = grade_episodes(self.actors.pool, rollout.episodes)
        alarm = self.check_grades(iteration, grades)
        chosen = self.supervised_choice(rollout.episodes, grades)  # the baselines' episodes to imitate; None for RL
        with self.phase(timer, "reference"):
            reference, chosen_reference = self.reference(rollout.episodes, chosen or [])
        trained = reference if chosen is None else chosen_reference  # whose sequences the learner trains on
        with self.phase(timer, "credit"):
            credit, samples = self.credit(stage, rollout.episodes, reference, grades, chosen, chosen_reference)
        with self.phase(timer, "learner"):
            step, off_policy = self.learn(samples, rollout, trained.trunk_rows)
        halt = self.account(iteration, step)
        if not self.overlap:
            self.bar.set_postfix_str(f"stage {self.stage_name} | sync")
            sync = self.actors.sync_weights()
        self.state.iteration = iteration

        result = IterationResult(iteration, stage, rollout, grades, reference, credit, step, off_policy,
                                 alarm=alarm is not None, skipped_steps=self.state.skipped_steps,
                                 phase_seconds=timer.seconds, sync=sync, overlapped=self.overlap)
        if self.eval_due(iteration) and halt is None:
            result.evaluation, eval_sync = self.evaluate_during_training(iteration)
            result.sync = eval_sync or result.sync
        result.seconds, result.wall_time = time.monotonic() - start, time.time()
        self.logger.log(iteration_metrics(result))
        self.checkpoint(iteration, halt)
        self.report(result)

    @contextmanager
    def phase(self, timer: PhaseTimer, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(f"stage {self.stage_name} | {name}")
        with timer.phase(name):
            yield

    def start_rollout(self, iteration: int) -> tuple[RolloutHandle, tuple[int, int]]:
        """Submit ``iteration``'s problems to the generators; returns the handle and the data position after
        them (the state is not advanced until the rollout is collected)."""
        config = self.config
        indices, epoch, position = next_batch(self.state.epoch, self.state.position, len(self.train_problems),
                                              config.rollout.prompts_per_iteration, config.run.seed)
        problems = [self.train_problems[i] for i in indices]
        seeds = sampling_seeds(config.run.seed, iteration, problems)
        return self.actors.start_rollout(problems, config.rollout.samples_per_prompt, seeds=seeds,
                                         turn2_samples=config.rollout.turn2_samples), (epoch, position)

    def rollout(self, iteration: int) -> Rollout:
        handle, position = self.prefetched if self.prefetched is not None else self.start_rollout(iteration)
        self.prefetched = None
        rollout = self.actors.finish_rollout(handle)
        self.state.epoch, self.state.position = position
        return rollout

    def prefetch(self, iteration: int) -> Optional[SyncStats]:
        """rollout.overlap: the generators take the learner's newest weights, then sample ``iteration``'s batch
        while the learner trains on this one (which came from the weights one step older)."""
        if iteration > len(self.plan):
            return None
        sync = self.actors.sync_if_behind()
        self.prefetched = self.start_rollout(iteration)
        return sync

    def supervised_choice(self, episodes: list[Episode], grades: Grades) -> Optional[list[Episode]]:
        """algo.objective star / pair_sft: the episodes to fine-tune on (score_ray.samples); None for RL."""
        objective = self.config.algo.objective
        if objective == "star":
            return star_episodes(episodes, grades.r2)
        if objective == "pair_sft":
            return pair_sft_episodes(episodes, grades.r1, grades.r2)
        return None

    def check_grades(self, iteration: int, grades: Grades) -> Optional[str]:
        alarm = grading_alarm(grades.results, self.config.reward.alarm_fraction)
        if alarm:
            print(f"score_ray: ALARM iteration {iteration}: {alarm}", file=sys.stderr, flush=True)
        return alarm

    def reference(self, sampled: list[Episode], chosen: list[Episode]) -> tuple[ReferenceLogprobs, ReferenceLogprobs]:
        """The reference's log-probs of the sampled episodes (with the pass's compute seconds) and of the
        baselines' chosen ones, from one pass. The KL needs them at the trained positions only."""
        episodes = sampled + chosen
        result = self.actors.reference_logprobs([e.sequence for e in episodes],
                                                [trained_positions(e) for e in episodes],
                                                [position_temperatures(e) for e in episodes])
        count, rows = len(sampled), result.trunk_rows
        return (ReferenceLogprobs(result.logps[:count], result.compute_seconds, rows[:count] if rows else None),
                ReferenceLogprobs(result.logps[count:], 0.0, rows[count:] if rows else None))

    def credit(self, stage: int, episodes: list[Episode], reference: ReferenceLogprobs, grades: Grades,
               chosen: Optional[list[Episode]], chosen_reference: ReferenceLogprobs) -> tuple[Optional[Credit], list]:
        """(the sampled episodes' credit, learner samples). RL: the stage's shaped per-turn rewards, advantages
        and KL coefficients (score_ray.algo); the supervised baselines: no credit of the sampled episodes (no
        shaping), advantage 1 on the chosen ones and no KL."""
        settings = self.config.algo
        if chosen is not None:
            # one sharpness for every imitated token, whichever turn's temperature sampled it
            samples = build_samples(chosen, chosen_reference.logps, supervised_credit(len(chosen)),
                                    SUPERVISED_TURNS[settings.objective], temperature=self.config.rollout.temperature)
            return None, samples
        ref_logps = reference.logps
        kl_sums = [turn_kl_sums(e, ref) for e, ref in zip(episodes, ref_logps)]
        branched = self.config.rollout.turn2_samples > 1  # turn 2 compared within each first attempt's group
        credit = algo.assign_credit(
            stage, grades.r1, grades.r2, [e.problem.id for e in episodes], settings.alpha, settings.beta1,
            settings.beta2, advantage=settings.advantage, normalize_advantages=settings.normalize_advantages,
            kl_in_reward=settings.kl_in == "reward", kl1=[k[0] for k in kl_sums], kl2=[k[1] for k in kl_sums],
            turn2_groups=first_attempt_groups(episodes) if branched else None,
            trains_turn1=[e.trains_turn1 for e in episodes],
        )
        return credit, build_samples(episodes, ref_logps, credit, tuple(settings.train_turns))

    def learn(self, samples, rollout: Rollout, trunk_rows: Optional[list[int]]) -> tuple[StepStats, bool]:
        """The optimiser step(s) on this batch; (the learner's stats, whether older weights sampled it).
        ``trunk_rows``: each sample's row in the reference pass (learner.share_trunk; see LearnerGroup)."""
        settings = self.config.algo
        off_policy = self.actors.sampled_by_older_weights(rollout)
        if not any(any(s.loss_mask) for s in samples):  # a baseline found nothing to imitate: no step
            self.actors.learner_stepped()
            return StepStats(), off_policy
        step: Optional[StepStats] = None
        for _ in range(algo.learner_passes(settings.policy_loss, settings.ppo_epochs)):
            latest = self.actors.learner.train_step(samples, off_policy=off_policy, trunk_rows=trunk_rows)
            step = latest if step is None else latest.after(step)
        self.actors.learner_stepped()
        return step, off_policy

    def account(self, iteration: int, step: StepStats) -> Optional[str]:
        """Count a skipped (non-finite) step; the reason to halt when too many came in a row."""
        halt = account_step(self.state, step.applied, self.config.learner.max_skipped_steps_in_row)
        if not step.applied:
            print(f"score_ray: iteration {iteration}: non-finite loss or gradient, optimiser step skipped "
                  f"({self.state.skipped_in_row} in a row, {self.state.skipped_steps} in all)", file=sys.stderr,
                  flush=True)
        return halt

    def eval_due(self, iteration: int) -> bool:
        every = self.config.eval.every
        return bool(every) and iteration % every == 0 and iteration < len(self.plan)  # the last: the final eval

    def evaluate_during_training(self, iteration: int) -> tuple[Evaluation, Optional[SyncStats]]:
        """The held-out eval (its seconds include a sync first, under overlap), and that sync if there was one."""
        self.bar.set_postfix_str("eval")
        start = time.monotonic()
        sync = self.actors.sync_if_behind()  # overlap: the generators are one step behind
        evaluation = self.evaluate(f"eval @ {iteration}")
        evaluation.seconds = time.monotonic() - start
        self.logger.log_samples(iteration, evaluation.episodes)
        return evaluation, sync

    def evaluate(self, label: str) -> Evaluation:
        """Greedy two-turn episodes on the held-out problems, graded (score_ray.evaluate)."""
        start = time.monotonic()
        if not sys.stderr.isatty():
            print(f"{label}: greedy two-turn eval on {len(self.eval_problems)} held-out problems ...", flush=True)
        metrics, episodes = two_turn_eval(lambda batch: self.actors.generate(batch, 1, greedy=True), self.actors.pool,
                                          self.eval_problems, label=label,
                                          chunk=self.config.eval.batch_problems * len(self.actors.generators))
        seconds = time.monotonic() - start
        if not sys.stderr.isatty():
            print(f"{label}: done in {seconds:.0f}s", flush=True)
        return Evaluation(metrics, episodes, seconds)

    def checkpoint(self, iteration: int, halt: Optional[str]) -> None:
        config = self.config
        if halt is not None:
            folder = save_checkpoint(self.run_dir, self.actors.learner, self.state, config.checkpoint.keep)
            raise TrainingHalted(f"{halt}. Checkpoint of the last good state: {folder}")
        if config.checkpoint.every and iteration % config.checkpoint.every == 0:
            self.bar.set_postfix_str("checkpoint")
            save_checkpoint(self.run_dir, self.actors.learner, self.state, config.checkpoint.keep)

    def report(self, result: IterationResult) -> None:
        """The progress bar on a terminal; a line per iteration with an ETA in a log."""
        grades, iteration = result.grades, result.iteration
        reward1, reward2 = sum(grades.r1) / len(grades.r1), sum(grades.r2) / len(grades.r2)
        self.bar.update(1)
        self.bar.set_postfix_str(f"r1 {reward1:.2f} r2 {reward2:.2f}")
        self.durations.append(result.seconds)
        if not sys.stderr.isatty():
            eta = sum(self.durations) / len(self.durations) * (len(self.plan) - iteration)
            print(f"iteration {iteration}/{len(self.plan)} stage {self.stage_name}: reward t1 {reward1:.3f} "
                  f"t2 {reward2:.3f} ({result.seconds:.0f}s, ETA {eta / 60:.1f} min + final eval)", flush=True)

    # ------------------------------------------------------------------ a lost learner node
    def recover(self, lost: LearnerLost) -> None:
        """A lost node took a learner rank or the reference: place them again, roll back to the last whole
        checkpoint and go on; the redone iterations sample and learn what the lost ones did."""
        self.prefetched = None
        for attempt in range(1, MAX_RECOVERIES_IN_ROW + 1):
            try:
                self.replace_learner(f"{lost}")
                break
            except LearnerLost as again:  # lost once more while being placed or reloaded
                if attempt == MAX_RECOVERIES_IN_ROW:
                    raise
                lost = again
        self.bar.n = self.state.iteration
        self.bar.refresh()

    def replace_learner(self, reason: str) -> None:
        """Replace the lost learner group (waiting for capacity), load the newest whole checkpoint into it (or
        start over when none was written yet), move the metric rows logged after it aside, re-sync."""
        config, actors = self.config, self.actors
        timeout = config.cluster.resource_timeout_s
        where = (f"the last whole checkpoint is {whole_checkpoints(self.run_dir)[0].name}: resume with "
                 "run.resume=true" if whole_checkpoints(self.run_dir) else "no checkpoint was written yet: start it again")
        if actors.weights.cannot_recover:
            raise RuntimeError(f"{reason}; {actors.weights.cannot_recover}, so the run stops here; {where}")
        print(f"score_ray: {reason}; placing the learner again (waiting up to {timeout:g}s for capacity) ...",
              file=sys.stderr, flush=True)
        try:
            actors.replace_learner(self.state.iteration, reason)
        except PlacementTimeout as err:
            raise RuntimeError(f"{reason}, and no capacity for it came back within cluster.resource_timeout_s="
                               f"{timeout:g}s ({err}); the run stops here; {where}") from err
        folder, state = load_newest(self.run_dir, actors.learner)
        if folder is None:
            state.base_eval = self.state.base_eval
        moved = roll_back_metrics(self.run_dir, state.iteration)
        actors.sync_weights()
        # only now: a loss during the reload or re-sync is retried from the iteration that was lost
        self.state = state
        print(f"score_ray: learner placed again; continuing from {folder.name if folder else 'the start'} "
              f"(iteration {state.iteration}; {moved} metric rows moved to metrics.rolled_back.jsonl)",
              file=sys.stderr, flush=True)
