"""The SCoRe training loop. Read this first: one iteration, top to bottom.

    problems -> generators: turn 1, turn 2 (vLLM)          -> episodes
    episodes -> reward pool: r1, r2 (sandboxed graders)
    episodes -> reference: log-probs of both turns
    rewards  -> algo: shaped per-turn rewards, advantages, KL coefficients (by stage)
    samples  -> learner group: one optimiser step (DeepSpeed ZeRO)
    learner  -> every generator: weight sync (before the next rollout)
    every k iterations: greedy two-turn eval on held-out problems; checkpoints

State that makes a resume exact lives in ``TrainerState`` (iteration, data epoch and
position, Python RNG); the learner's weights and optimiser state are in DeepSpeed's
checkpoint. Checkpoints are written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from score_ray import algo
from score_ray.config import Config, dump_config

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"


@dataclass
class TrainerState:
    iteration: int = 0  # iterations completed
    epoch: int = 0
    position: int = 0  # next index into this epoch's order of training problems
    rng_state: Any = None
    base_eval: Optional[dict[str, float]] = None
    skipped_steps: int = 0


# ----------------------------------------------------------------------------- data order


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def next_batch(state: TrainerState, count: int, size: int, seed: int) -> list[int]:
    """The next ``size`` problem indices; a new epoch starts with a new shuffle (nothing skipped or repeated)."""
    picked: list[int] = []
    while len(picked) < size:
        order = epoch_order(count, seed, state.epoch)
        take = order[state.position : state.position + size - len(picked)]
        picked += take
        state.position += len(take)
        if state.position >= count:
            state.epoch += 1
            state.position = 0
    return picked


# ----------------------------------------------------------------------------- episodes -> learner samples


def kl_k3_mean(logp: list[float], ref: list[float]) -> float:
    if not logp:
        return 0.0
    total = 0.0
    for a, b in zip(logp, ref):
        x = min(b - a, 20.0)
        total += math.exp(x) - 1.0 - x
    return total / len(logp)


def trained_positions(episode: dict) -> list[float]:
    """1.0 at the log-prob positions of the sampled y1 and y2 tokens of an episode, else 0.0."""
    flags = [0.0] * (len(episode["x2"]) + len(episode["y2"]) - 1)
    for start, tokens in ((len(episode["x1"]), episode["y1"]), (len(episode["x2"]), episode["y2"])):
        for offset in range(len(tokens)):
            flags[start + offset - 1] = 1.0
    return flags


def build_samples(
    episodes: list[dict], ref_logps: list[list[float]], scored: dict[str, list[float]], turns: tuple = (1, 2)
) -> list[dict]:
    """Token-level learner samples: the full sequence x2 + y2, with turn-1 (y1) and turn-2 (y2) tokens trained
    (only the turns in ``turns``: [1] is single-turn RL).

    logp position t scores token t + 1, so the tokens at sequence indices [a, b) are positions [a - 1, b - 1).
    """
    samples = []
    for index, (episode, ref) in enumerate(zip(episodes, ref_logps)):
        sequence = episode["x2"] + episode["y2"]
        width = len(sequence) - 1
        mask = [0.0] * width
        advantage = [0.0] * width
        coef = [0.0] * width
        old = [0.0] * width
        spans = (
            (1, len(episode["x1"]), episode["y1"], episode["y1_logp"], scored["adv1"][index], scored["kl_coef1"][index]),
            (2, len(episode["x2"]), episode["y2"], episode["y2_logp"], scored["adv2"][index], scored["kl_coef2"][index]),
        )
        for turn, start, tokens, sampler_logp, adv, kl_coef in spans:
            if turn not in turns:
                continue
            for offset in range(len(tokens)):
                position = start + offset - 1
                mask[position] = 1.0
                advantage[position] = adv
                coef[position] = kl_coef
                old[position] = sampler_logp[offset]
        samples.append(
            {"input_ids": sequence, "loss_mask": mask, "advantage": advantage, "kl_coef": coef, "old_logp": old, "ref_logp": ref}
        )
    return samples


def turn_kl_sums(episode: dict, ref: list[float]) -> tuple[float, float]:
    """Summed log(pi/ref) of the sampled tokens of each turn (for KL in the reward)."""
    a = len(episode["x1"]) - 1
    b = len(episode["x2"]) - 1
    kl1 = sum(p - r for p, r in zip(episode["y1_logp"], ref[a : a + len(episode["y1"])]))
    kl2 = sum(p - r for p, r in zip(episode["y2_logp"], ref[b : b + len(episode["y2"])]))
    return kl1, kl2


def turn_metrics(episodes: list[dict], ref_logps: list[list[float]], r1: list[float], r2: list[float]) -> dict[str, float]:
    n = len(episodes)
    out: dict[str, float] = {"train/reward_t1": sum(r1) / n, "train/reward_t2": sum(r2) / n}
    for turn, start_key in ((1, "x1"), (2, "x2")):
        lengths = [len(e[f"y{turn}"]) for e in episodes]
        kls, entropies = [], []
        for episode, ref in zip(episodes, ref_logps):
            start = len(episode[start_key]) - 1
            logp = episode[f"y{turn}_logp"]
            kls.append(kl_k3_mean(logp, ref[start : start + len(logp)]))
            # -log p of on-policy samples is an unbiased per-token entropy estimate
            entropies.append(-sum(logp) / max(1, len(logp)))
        out[f"train/kl_t{turn}"] = sum(kls) / n
        out[f"train/entropy_t{turn}"] = sum(entropies) / n
        out[f"train/length_t{turn}"] = sum(lengths) / n
        out[f"train/truncated_t{turn}"] = sum(e[f"y{turn}_truncated"] for e in episodes) / n
    corrected = sum(a < 0.5 <= b for a, b in zip(r1, r2)) / n
    broken = sum(b < 0.5 <= a for a, b in zip(r1, r2)) / n
    out["train/i2c"] = corrected
    out["train/c2i"] = broken
    return out


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder without COMPLETE was cut short and is ignored)."""
    root = run_dir / CHECKPOINTS
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter-") and (p / COMPLETE).exists())


def save_checkpoint(run_dir: Path, learner, state: TrainerState, keep: int) -> Path:
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter-{state.iteration:06d}"
    partial = root / f".iter-{state.iteration:06d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    learner.save_checkpoint(str(partial / "deepspeed"), tag="state")
    (partial / "trainer_state.json").write_text(json.dumps(asdict(state)))
    (partial / COMPLETE).write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for old in checkpoint_folders(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(folder: Path) -> TrainerState:
    data = json.loads((folder / "trainer_state.json").read_text())
    state = TrainerState(**data)
    if state.rng_state is not None:
        state.rng_state = (state.rng_state[0], tuple(state.rng_state[1]), state.rng_state[2])
    return state


# ----------------------------------------------------------------------------- the run


def _ray_init(config: Config) -> None:
    import ray

    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)  # inside `ray job submit` plain init joins the job's cluster
        return
    needed = (
        config.rollout.num_generators * config.rollout.cpus_per_generator
        + (config.learner.num_ranks + 1) * config.learner.cpus_per_rank
        + config.reward.workers * config.reward.cpus_per_worker
    )
    # Logical CPUs: actors take fractional shares of what a small machine really has.
    ray.init(num_cpus=max(int(math.ceil(needed)), os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)


def check_resources(config: Config) -> None:
    """Fail in seconds, naming the keys, when the cluster can never fit the run (no autoscaler pending)."""
    import ray

    total = ray.cluster_resources()
    gpus_needed = (
        config.rollout.num_generators * config.rollout.gpus_per_generator
        + (config.learner.num_ranks + 1) * config.learner.gpus_per_rank
    )
    if gpus_needed > total.get("GPU", 0.0) and not os.environ.get("SCORE_RAY_AUTOSCALING"):
        raise RuntimeError(
            f"this run needs {gpus_needed:g} GPUs (rollout.num_generators x rollout.gpus_per_generator + "
            f"(learner.num_ranks + 1) x learner.gpus_per_rank) but the cluster has {total.get('GPU', 0.0):g}; "
            "on an autoscaling cluster set SCORE_RAY_AUTOSCALING=1 to wait for nodes instead"
        )


class Run:
    """Holds the actors of one run and performs its phases."""

    def __init__(self, config: Config, run_dir: Path, model_path: str):
        import ray

        from score_ray.learner import LearnerGroup, ReferenceActor
        from score_ray.reward.pool import RewardPool
        from score_ray.rollout import GeneratorActor

        self.config, self.run_dir = config, run_dir
        rollout, learner = config.rollout, config.learner
        on_gpu = rollout.gpus_per_generator > 0 and learner.gpus_per_rank > 0
        self.nccl = learner.weight_sync == "nccl" or (learner.weight_sync == "auto" and on_gpu)
        self.generators = [
            GeneratorActor.options(num_cpus=rollout.cpus_per_generator, num_gpus=rollout.gpus_per_generator).remote(
                model_path, rollout.model_dump(), config.prompts.model_dump(), config.run.seed + index, config.model.dtype,
                self.nccl,
            )
            for index in range(rollout.num_generators)
        ]
        self.reference = ReferenceActor.options(num_cpus=learner.cpus_per_rank, num_gpus=learner.gpus_per_rank).remote(
            model_path, learner.cpus_per_rank, config.model.dtype
        )
        self.pool = RewardPool.from_config(config.reward)
        self.learner = LearnerGroup(model_path, learner, config.algo, config.run.seed, config.model.dtype,
                                    config.cluster.resource_timeout_s, temperature=rollout.temperature)
        ready = [g.ready.remote() for g in self.generators] + [self.reference.ready.remote()]
        done, pending = ray.wait(ready, num_returns=len(ready), timeout=max(600.0, config.cluster.resource_timeout_s))
        if pending:
            raise RuntimeError("generators or the reference did not start in time; check the cluster's free resources")
        if self.nccl:
            self.learner.connect_nccl(self.generators, rollout.tensor_parallel_size, config.model.dtype)
        self.version = 0

    def rollout(self, problems: list[dict], samples: int) -> list[dict]:
        import ray

        shares = [problems[i :: len(self.generators)] for i in range(len(self.generators))]
        parts = ray.get([g.generate.remote(s, samples) for g, s in zip(self.generators, shares) if s])
        return [episode for part in parts for episode in part]

    def sync_weights(self) -> dict[str, float]:
        import ray

        start = time.monotonic()
        if self.nccl:  # GPU: vLLM's NCCL weight transfer, layer by layer from the learner's rank 0
            self.learner.send_nccl()
            self.version += 1
            return {"perf/sync_seconds": time.monotonic() - start}
        payload = self.learner.weights_payload()
        reference = ray.put(payload)
        self.version += 1
        results = ray.get([g.update_weights.remote(reference, self.version) for g in self.generators])
        return {"perf/sync_seconds": time.monotonic() - start, "perf/sync_mb": len(payload) / 1e6,
                "perf/sync_load_seconds": max(r["seconds"] for r in results)}

    def shutdown(self) -> None:
        import ray

        self.pool.shutdown()
        self.learner.shutdown()
        for actor in self.generators + [self.reference]:
            ray.kill(actor)


def evaluate(run: Run, eval_problems: list[dict], label: str) -> tuple[dict[str, float], list[dict]]:
    from score_ray.evaluate import two_turn_eval

    start = time.monotonic()
    if not sys.stderr.isatty():
        print(f"{label}: greedy two-turn eval on {len(eval_problems)} held-out problems ...", flush=True)
    result = two_turn_eval(run.generators, run.pool, eval_problems, label=label)
    if not sys.stderr.isatty():
        print(f"{label}: done in {time.monotonic() - start:.0f}s", flush=True)
    return result


def run(config: Config, run_dir: Path) -> int:
    """Train; returns a process exit code."""
    import ray
    from tqdm import tqdm

    from score_ray.assets import resolve_model_path
    from score_ray.data import load_problems
    from score_ray.evaluate import format_table, grade_episodes
    from score_ray.tracking import MetricsLogger, write_plots

    (run_dir / "config.yaml").write_text(dump_config(config))
    model_path = resolve_model_path(config.model.path, config.model.tiny.model_dump())
    train_problems, _ = load_problems(config.data.train)
    eval_problems, _ = load_problems(config.data.eval)
    if config.eval.max_problems:
        eval_problems = eval_problems[: config.eval.max_problems]
    train_dicts = [p.to_dict() for p in train_problems]
    eval_dicts = [p.to_dict() for p in eval_problems]
    plan = algo.stage_plan(config.algo.schedule.stage1_iterations, config.algo.schedule.stage2_iterations,
                           config.algo.schedule.rounds)

    _ray_init(config)
    check_resources(config)
    state = TrainerState()
    resumed_from = None
    if config.run.resume and checkpoint_folders(run_dir):
        resumed_from = checkpoint_folders(run_dir)[-1]
        state = load_state(resumed_from)
    rng = random.Random(config.run.seed)
    if state.rng_state is not None:
        rng.setstate(state.rng_state)

    print(f"starting actors: {config.rollout.num_generators} generator(s), {config.learner.num_ranks} learner rank(s) "
          f"(ZeRO-{config.learner.zero_stage}), 1 reference, {config.reward.workers} reward actor(s)", flush=True)
    logger = MetricsLogger(run_dir, config, resume=resumed_from is not None)
    actors = Run(config, run_dir, model_path)
    try:
        if resumed_from is not None:
            actors.learner.load_checkpoint(str(resumed_from / "deepspeed"), tag="state")
            actors.sync_weights()
            print(f"resumed from {resumed_from.name}: iteration {state.iteration}", flush=True)
        elif config.eval.at_start:
            metrics, episodes = evaluate(actors, eval_dicts, "base eval")
            state.base_eval = metrics
            logger.log({"iteration": 0, **{f"eval/{k}": v for k, v in metrics.items() if k != "n"}})
            logger.log_samples(0, episodes)
            print("base model:\n" + format_table({"base": metrics}), flush=True)

        bar = tqdm(total=len(plan), initial=state.iteration, desc="SCoRe", unit="it", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())
        durations: list[float] = []
        while state.iteration < len(plan):
            iteration = state.iteration + 1
            stage = plan[state.iteration]
            timings: dict[str, float] = {}
            start = time.monotonic()

            bar.set_postfix_str(f"stage {'I' if stage == 1 else 'II'} | rollout")
            indices = next_batch(state, len(train_dicts), config.rollout.prompts_per_iteration, config.run.seed)
            problems = [train_dicts[i] for i in indices]
            t = time.monotonic()
            episodes = actors.rollout(problems, config.rollout.samples_per_prompt)
            timings["perf/rollout_seconds"] = time.monotonic() - t

            bar.set_postfix_str(f"stage {'I' if stage == 1 else 'II'} | grading")
            t = time.monotonic()
            r1, r2, graded = grade_episodes(actors.pool, episodes)
            timings["perf/grading_seconds"] = time.monotonic() - t

            bar.set_postfix_str(f"stage {'I' if stage == 1 else 'II'} | reference")
            t = time.monotonic()
            trained = [trained_positions(e) for e in episodes]  # the KL needs reference log-probs there only
            ref_logps = ray.get(actors.reference.sequence_logprobs.remote(
                [e["x2"] + e["y2"] for e in episodes], trained, config.rollout.temperature
            ))
            timings["perf/reference_seconds"] = time.monotonic() - t

            groups = [(e["problem"]["id"]) for e in episodes]
            kl_sums = [turn_kl_sums(e, ref) for e, ref in zip(episodes, ref_logps)]
            scored = algo.score_turns(
                stage, r1, r2, groups, config.algo.alpha, config.algo.beta1, config.algo.beta2,
                estimator=config.algo.estimator, normalize_advantages=config.algo.normalize_advantages,
                kl_in_reward=config.algo.kl_in == "reward", kl1=[k[0] for k in kl_sums], kl2=[k[1] for k in kl_sums],
            )
            samples = build_samples(episodes, ref_logps, scored, tuple(config.algo.train_turns))

            bar.set_postfix_str(f"stage {'I' if stage == 1 else 'II'} | learner")
            t = time.monotonic()
            learner_stats = {}
            for _ in range(config.algo.ppo_epochs if config.algo.estimator == "ppo" else 1):
                learner_stats = actors.learner.train_step(samples)
            timings["perf/learner_seconds"] = time.monotonic() - t

            bar.set_postfix_str(f"stage {'I' if stage == 1 else 'II'} | sync")
            sync = actors.sync_weights()

            state.iteration = iteration
            tokens = max(1.0, learner_stats["tokens"])
            statuses = [g["status"] for g in graded]
            metrics: dict[str, Any] = {
                "iteration": iteration,
                "train/stage": stage,
                **turn_metrics(episodes, ref_logps, r1, r2),
                "train/shaped_reward_t2": sum(scored["reward2"]) / len(episodes),
                "train/loss": learner_stats["loss"] / tokens,
                "train/pg_loss": learner_stats["pg"] / tokens,
                "train/kl_loss": learner_stats["kl"] / tokens,
                "train/clip_fraction": learner_stats["clipped"] / tokens,
                "train/learner_entropy": learner_stats["entropy"] / tokens,
                "train/grad_norm": learner_stats["grad_norm"],
                "train/grader_timeouts": statuses.count("timeout") / len(statuses),
                "train/grader_errors": statuses.count("error") / len(statuses),
                **timings,
                **sync,
                "perf/learner_micro_batches": learner_stats["micro_batches"],
                "perf/generated_tokens": float(episodes[0]["gen_tokens"]) if episodes else 0.0,
            }
            if config.eval.every and iteration % config.eval.every == 0 and iteration < len(plan):
                bar.set_postfix_str("eval")
                t = time.monotonic()
                eval_metrics, eval_episodes = evaluate(actors, eval_dicts, f"eval @ {iteration}")
                metrics.update({f"eval/{k}": v for k, v in eval_metrics.items() if k != "n"})
                metrics["perf/eval_seconds"] = time.monotonic() - t
                logger.log_samples(iteration, eval_episodes)
            metrics["perf/iteration_seconds"] = time.monotonic() - start
            state.rng_state = rng.getstate()
            logger.log(metrics)
            if config.checkpoint.every and iteration % config.checkpoint.every == 0:
                bar.set_postfix_str("checkpoint")
                save_checkpoint(run_dir, actors.learner, state, config.checkpoint.keep)
            bar.update(1)
            bar.set_postfix_str(f"r1 {metrics['train/reward_t1']:.2f} r2 {metrics['train/reward_t2']:.2f}")
            durations.append(metrics["perf/iteration_seconds"])
            if not sys.stderr.isatty():
                eta = sum(durations) / len(durations) * (len(plan) - iteration)
                print(f"iteration {iteration}/{len(plan)} stage {'I' if stage == 1 else 'II'}: reward t1 "
                      f"{metrics['train/reward_t1']:.3f} t2 {metrics['train/reward_t2']:.3f} "
                      f"({metrics['perf/iteration_seconds']:.0f}s, ETA {eta / 60:.1f} min + final eval)", flush=True)
        bar.close()

        final_metrics, final_episodes = evaluate(actors, eval_dicts, "final eval")
        logger.log({"iteration": state.iteration, **{f"eval/{k}": v for k, v in final_metrics.items() if k != "n"}})
        logger.log_samples(state.iteration, final_episodes)
        final_dir = run_dir / "final_model"
        actors.learner.save_hf(str(final_dir))
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_path).save_pretrained(str(final_dir))
        rows = {"trained": final_metrics}
        if state.base_eval:
            rows = {"base": state.base_eval, "trained": final_metrics}
        table = format_table(rows)
        summary = {
            "iterations": state.iteration,
            "final_eval": {f"eval/{k}": v for k, v in final_metrics.items()},
            "base_eval": {f"eval/{k}": v for k, v in (state.base_eval or {}).items()},
            "final_model": str(final_dir),
            "eval_problems": len(eval_dicts),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plots = write_plots(run_dir)
        logger.finish({k: v for k, v in summary["final_eval"].items() if isinstance(v, float)})
        print(table)
        print(f"run folder: {run_dir} (summary.json, metrics.jsonl, final_model/, "
              + ", ".join(p.name for p in plots) + ")", flush=True)
        return 0
    finally:
        actors.shutdown()
