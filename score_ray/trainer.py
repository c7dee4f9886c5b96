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

import hashlib
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
from score_ray.placement import LearnerLost

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"


@dataclass
class TrainerState:
    iteration: int = 0  # iterations completed
    epoch: int = 0
    position: int = 0  # next index into this epoch's order of training problems
    rng_state: Any = None
    base_eval: Optional[dict[str, float]] = None
    skipped_steps: int = 0  # optimiser steps DeepSpeed dropped for a non-finite gradient
    skipped_in_row: int = 0


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


# ----------------------------------------------------------------------------- faults: seeds, grading, skipped steps


def sampling_seeds(seed: int, iteration: int, problems: list[dict]) -> list[int]:
    """One sampling seed per problem of an iteration, independent of which generator gets it: a rollout
    redone after a crash (or a resume) samples exactly what the lost one would have, given the weights."""
    seeds = []
    for index, problem in enumerate(problems):
        digest = hashlib.sha256(f"{seed}:{iteration}:{index}:{problem['id']}".encode()).digest()
        seeds.append(int.from_bytes(digest[:4], "little") & 0x3FFFFFFF)
    return seeds


def grading_alarm(graded: list[dict], threshold: float) -> Optional[str]:
    """A warning when more than ``threshold`` of the grades timed out or failed (their rewards are 0)."""
    if not graded:
        return None
    timeouts = [g for g in graded if g["status"] == "timeout"]
    errors = [g for g in graded if g["status"] == "error"]
    share = (len(timeouts) + len(errors)) / len(graded)
    if share <= threshold:
        return None
    first = (errors or timeouts)[0].get("detail", "")
    return (f"{share:.0%} of {len(graded)} grades failed (timeout {len(timeouts)}, error {len(errors)}; "
            f"reward.alarm_fraction={threshold:g}); they count as reward 0. First: {str(first)[:200]}")


class TrainingHalted(RuntimeError):
    """The run stopped itself (e.g. non-finite steps in a row) after checkpointing its last good state."""


def account_step(state: TrainerState, applied: bool, limit: int) -> Optional[str]:
    """Count a skipped (non-finite) optimiser step; the reason to stop once ``limit`` came in a row."""
    if applied:
        state.skipped_in_row = 0
        return None
    state.skipped_steps += 1
    state.skipped_in_row += 1
    if state.skipped_in_row < limit:
        return None
    return (f"{state.skipped_in_row} optimiser steps in a row had a non-finite loss or gradient and were skipped "
            f"(learner.max_skipped_steps_in_row={limit}); the weights are those of the last finite step. "
            "Lower learner.lr, check the rewards and advantages, or raise the limit")


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Checkpoints marked complete, oldest first (a folder without COMPLETE was cut short and is ignored)."""
    root = run_dir / CHECKPOINTS
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter-") and (p / COMPLETE).exists())


def _manifest(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def verify_checkpoint(folder: Path) -> Optional[str]:
    """None when ``folder`` is whole, else why not: no COMPLETE marker, or a file missing or cut short
    (COMPLETE lists every file with its size, so a marker written over a torn copy is caught too)."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return "no COMPLETE marker (the write was cut short)"
    try:
        listed = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "COMPLETE marker unreadable"
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def resumable_checkpoints(run_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(whole checkpoints newest first, [(damaged or partial folder, reason)])."""
    root = run_dir / CHECKPOINTS
    whole, damaged = [], []
    if root.exists():
        folders = [p for p in root.iterdir() if p.is_dir() and p.name.lstrip(".").startswith("iter-")]
        for folder in sorted(folders, key=lambda p: p.name.lstrip("."), reverse=True):
            if folder.name.endswith(".partial"):
                damaged.append((folder, "left half-written by a crash"))
                continue
            reason = verify_checkpoint(folder)
            if reason is None:
                whole.append(folder)
            else:
                damaged.append((folder, reason))
    return whole, damaged


def save_checkpoint(run_dir: Path, learner, state: TrainerState, keep: int) -> Path:
    """Write into a hidden partial folder, list every file with its size in COMPLETE, then rename."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter-{state.iteration:06d}"
    partial = root / f".iter-{state.iteration:06d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    learner.save_checkpoint(str(partial / "deepspeed"), tag="state")
    (partial / "trainer_state.json").write_text(json.dumps(asdict(state)))
    marker = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "files": _manifest(partial)}
    (partial / COMPLETE).write_text(json.dumps(marker, indent=1))
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


def roll_back_metrics(run_dir: Path, iteration: int) -> int:
    """Move metric rows past ``iteration`` (logged after the checkpoint a resume starts from) into
    metrics.rolled_back.jsonl, so the redone iterations are not counted twice and nothing is deleted."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # a line torn by the crash
            moved.append(line)
            continue
        (moved if row.get("iteration", 0) > iteration else keep).append(line)
    if moved:
        with open(run_dir / "metrics.rolled_back.jsonl", "a") as handle:
            handle.write("\n".join(moved) + "\n")
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return len(moved)


# ----------------------------------------------------------------------------- the run


def _ray_init(config: Config) -> None:
    import ray

    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)  # inside `ray job submit` plain init joins the job's cluster
        return
    needed = resource_needs(config)["CPU"]
    # Logical CPUs: actors take fractional shares of what a small machine really has. address="local":
    # a cluster of our own, even when another local Ray (e.g. from `ray start`) is running on this machine.
    ray.init(address="local", num_cpus=max(int(math.ceil(needed)), os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)


def reference_gpus(config: Config) -> float:
    share = config.learner.reference_gpus
    return config.learner.gpus_per_rank if share is None else share


def resource_needs(config: Config) -> dict[str, float]:
    """What the run's actors ask Ray for, summed."""
    rollout, learner = config.rollout, config.learner
    needs = {
        "GPU": rollout.num_generators * rollout.gpus_per_generator + learner.num_ranks * learner.gpus_per_rank
        + reference_gpus(config),
        "CPU": rollout.num_generators * rollout.cpus_per_generator + (learner.num_ranks + 1) * learner.cpus_per_rank
        + config.reward.workers * config.reward.cpus_per_worker,
    }
    for name, amount in rollout.resources.items():
        needs[name] = needs.get(name, 0.0) + rollout.num_generators * amount
    for name, amount in learner.resources.items():  # the ranks and the reference
        needs[name] = needs.get(name, 0.0) + (learner.num_ranks + 1) * amount
    return needs


def check_resources(config: Config) -> None:
    """Fail in seconds, naming the keys, when the cluster can never fit the run (no autoscaler pending)."""
    import ray

    total = ray.cluster_resources()
    needs = resource_needs(config)
    if os.environ.get("SCORE_RAY_AUTOSCALING"):
        return
    if needs["GPU"] > total.get("GPU", 0.0):
        raise RuntimeError(
            f"this run needs {needs['GPU']:g} GPUs (rollout.num_generators x rollout.gpus_per_generator + "
            f"learner.num_ranks x learner.gpus_per_rank + learner.reference_gpus) but the cluster has "
            f"{total.get('GPU', 0.0):g}; "
            "on an autoscaling cluster set SCORE_RAY_AUTOSCALING=1 to wait for nodes instead"
        )
    if needs["CPU"] > total.get("CPU", 0.0):
        raise RuntimeError(
            f"this run needs {needs['CPU']:g} CPUs (rollout.num_generators x rollout.cpus_per_generator + "
            f"(learner.num_ranks + 1) x learner.cpus_per_rank + reward.workers x reward.cpus_per_worker) but the "
            f"cluster has {total.get('CPU', 0.0):g}; lower those keys or add nodes (SCORE_RAY_AUTOSCALING=1 waits)"
        )
    for name in sorted(set(needs) - {"CPU", "GPU"}):
        if needs[name] > total.get(name, 0.0):
            raise RuntimeError(
                f"this run needs {needs[name]:g} of the custom resource {name!r} (rollout.resources x generators + "
                f"learner.resources x (ranks + reference)) but the cluster offers {total.get(name, 0.0):g}; start "
                "nodes with it (ray start --resources) or change those keys"
            )


@dataclass
class RolloutHandle:
    """Generation in flight: one task per generator share, resubmitted if its generator dies."""

    shares: list[tuple[list[dict], list[int]]]
    samples: int
    greedy: bool
    tasks: dict  # ObjectRef -> share index


class Run:
    """Holds the actors of one run and performs its phases."""

    def __init__(self, config: Config, run_dir: Path):
        import ray

        from score_ray.reward.pool import RewardPool
        from score_ray.rollout import GeneratorActor

        self.config, self.run_dir = config, run_dir
        rollout, learner = config.rollout, config.learner
        on_gpu = rollout.gpus_per_generator > 0 and learner.gpus_per_rank > 0
        self.nccl = learner.weight_sync == "nccl" or (learner.weight_sync == "auto" and on_gpu)
        # Each actor resolves the model on its own node (a built test model or a converted one lives in that
        # node's cache; on a cluster the driver's paths do not exist elsewhere).
        self.model_spec = (config.model.path, config.model.tiny.model_dump())
        # Ray restarts a dead generator (a fresh engine with the base weights); we re-sync it and redo its share.
        self.generators = [
            GeneratorActor.options(num_cpus=rollout.cpus_per_generator, num_gpus=rollout.gpus_per_generator,
                                   resources=dict(rollout.resources), max_restarts=rollout.max_restarts,
                                   max_task_retries=0).remote(
                config.model.path, rollout.model_dump(), config.prompts.model_dump(), config.run.seed + index,
                config.model.dtype, self.nccl, self.model_spec[1], learner.nccl_buffer_mb * 2**20,
            )
            for index in range(rollout.num_generators)
        ]
        self.reference = self._start_reference()
        self.pool = RewardPool.from_config(config.reward, restart_wait_s=max(60.0, config.cluster.resource_timeout_s))
        self.learner = self._start_learner()
        ready = [g.ready.remote() for g in self.generators] + [self.reference.ready.remote()]
        done, pending = ray.wait(ready, num_returns=len(ready), timeout=max(600.0, config.cluster.resource_timeout_s))
        if pending:
            raise RuntimeError("generators or the reference did not start in time; check the cluster's free resources")
        ray.get(done)  # an engine that failed to start (e.g. its KV cache does not fit) says why here
        if self.nccl:
            self.learner.connect_nccl(self.generators, rollout.tensor_parallel_size, config.model.dtype,
                                      learner.nccl_buffer_mb * 2**20)
        self.version = 0  # weights the generators hold: the learner's state after this many syncs
        self.weights_ref = None  # the last CPU payload, kept for re-syncing a restarted generator
        self.restarts = 0
        self.learner_replacements = 0
        self.placements: list[dict[str, Any]] = []
        self.record_placement(0, "start")

    def _start_reference(self):
        from score_ray.learner import ReferenceActor

        learner = self.config.learner
        return ReferenceActor.options(num_cpus=learner.cpus_per_rank, num_gpus=reference_gpus(self.config),
                                      resources=dict(learner.resources)).remote(
            self.config.model.path, learner.cpus_per_rank, self.config.model.dtype, self.model_spec[1]
        )

    def _start_learner(self):
        from score_ray.learner import LearnerGroup

        config = self.config
        # An autoscaling cluster adds GPU nodes in minutes: wait for the placement group that long.
        timeout = config.cluster.resource_timeout_s
        if os.environ.get("SCORE_RAY_AUTOSCALING"):
            timeout = max(timeout, 1800.0)
        return LearnerGroup(config.model.path, config.learner, config.algo, config.run.seed, config.model.dtype,
                            timeout, temperature=config.rollout.temperature, tiny_shape=self.model_spec[1])

    def record_placement(self, iteration: int, reason: str) -> None:
        """Append where every role runs now to the run folder's nodes.json (the driver's node included)."""
        from score_ray.learner import gather
        from score_ray.placement import this_node

        roles = {
            "iteration": iteration,
            "reason": reason,
            "learner_ranks": self.learner.nodes,
            "reference": gather([self.reference.ready.remote()], "reference")[0],
            "generators": [self._node_of(g) for g in self.generators],
            "reward_actors": self.pool.nodes(),
        }
        path = self.run_dir / "nodes.json"
        if not self.placements and path.exists():  # a resumed run: keep the earlier placements
            self.placements = json.loads(path.read_text()).get("placements", [])
        self.placements.append(roles)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"driver": this_node(), "placements": self.placements}, indent=1))
        os.replace(tmp, path)

    @staticmethod
    def _node_of(actor, timeout_s: float = 60.0) -> Optional[dict[str, Any]]:
        """An actor's node, or None when it does not answer in time (e.g. restarting, waiting for capacity)."""
        import ray

        try:
            return ray.get(actor.ready.remote(), timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None

    def replace_learner(self, iteration: int, reason: str) -> None:
        """A learner rank or the reference is gone (its node was lost): place the group (and the reference, if it
        went too) again, waiting ``cluster.resource_timeout_s`` for capacity, e.g. an autoscaler's new node.
        The new group starts from the base weights: the caller loads the last whole checkpoint into it.
        Raises ``PlacementTimeout`` when the cluster cannot place them in time."""
        import ray

        self.learner.shutdown()
        try:
            ray.get(self.reference.ready.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            try:
                ray.kill(self.reference)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
            self.reference = self._start_reference()
        try:
            self.learner = self._start_learner()
        except RuntimeError as err:  # LearnerGroup could not place its ranks in time
            raise PlacementTimeout(str(err)) from err
        wait = max(60.0, self.config.cluster.resource_timeout_s)
        try:
            ray.get(self.reference.ready.remote(), timeout=wait)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as err:
            raise PlacementTimeout(f"the reference was not placed again within {wait:g}s ({type(err).__name__})") from err
        self.learner_replacements += 1
        self.record_placement(iteration, reason)

    # ------------------------------------------------------------------ generation with recovery
    def start_rollout(self, problems: list[dict], samples: int, greedy: bool = False,
                      seeds: Optional[list[int]] = None) -> RolloutHandle:
        count = len(self.generators)
        seeds = seeds if seeds is not None else [None] * len(problems)
        shares = [(problems[i::count], seeds[i::count]) for i in range(count)]
        handle = RolloutHandle(shares=shares, samples=samples, greedy=greedy, tasks={})
        for index, share in enumerate(shares):
            if share[0]:
                handle.tasks[self._submit(index, share, samples, greedy)] = index
        return handle

    def _submit(self, index: int, share, samples: int, greedy: bool):
        problems, seeds = share
        return self.generators[index].generate.remote(problems, samples, greedy, None if greedy else seeds)

    def finish_rollout(self, handle: RolloutHandle) -> tuple[list[dict], dict[str, float]]:
        """Wait for every share; a share whose generator died is redone on the restarted generator."""
        import ray

        parts: dict[int, list[dict]] = {}
        retries = 0
        while handle.tasks:
            done, _ = ray.wait(list(handle.tasks), num_returns=1)
            index = handle.tasks.pop(done[0])
            try:
                parts[index] = ray.get(done[0])
            except ray.exceptions.RayActorError as err:
                retries += 1
                self._recover_generator(index, err)
                handle.tasks[self._submit(index, handle.shares[index], handle.samples, handle.greedy)] = index
        episodes = [episode for index in sorted(parts) for episode in parts[index]]
        compute = max((part[0]["gen_seconds"] for part in parts.values() if part), default=0.0)
        return episodes, {"perf/rollout_retries": float(retries), "perf/rollout_compute_seconds": compute}

    def generate(self, problems: list[dict], samples: int, greedy: bool = False,
                 seeds: Optional[list[int]] = None) -> list[dict]:
        return self.finish_rollout(self.start_rollout(problems, samples, greedy, seeds))[0]

    def _recover_generator(self, index: int, err: Exception) -> None:
        import ray

        reason = str(err).splitlines()[0][:200]
        if self.nccl:
            raise RuntimeError(
                f"generator {index} died ({reason}); with NCCL weight sync a restarted engine cannot rejoin its transfer "
                "group, so the run stops here: resume it with run.resume=true from the last checkpoint"
            )
        print(f"score_ray: generator {index} died ({reason}); waiting for its restart ...", file=sys.stderr, flush=True)
        deadline = time.monotonic() + max(600.0, self.config.cluster.resource_timeout_s)
        while True:
            try:
                ray.get(self.generators[index].ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except ray.exceptions.ActorUnavailableError:  # still restarting
                if time.monotonic() > deadline:
                    raise RuntimeError(f"generator {index} did not come back within the timeout") from None
                time.sleep(1.0)
            except ray.exceptions.RayActorError:
                raise RuntimeError(
                    f"generator {index} died and rollout.max_restarts={self.config.rollout.max_restarts} restarts are "
                    "used up; resume with run.resume=true from the last checkpoint"
                ) from None
        if self.weights_ref is not None:
            try:
                ray.get(self.generators[index].update_weights.remote(self.weights_ref, self.version))
            except ray.exceptions.ObjectLostError as lost:  # rank 0 owned the payload and was lost too
                raise LearnerLost(f"generator {index} and the weights published by learner rank 0 were lost "
                                  f"({type(lost).__name__})") from lost
        self.restarts += 1
        print(f"score_ray: generator {index} restarted, weights re-synced (version {self.version}); "
              "redoing its problems", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ weights
    def sync_weights(self) -> dict[str, float]:
        import ray

        start = time.monotonic()
        if self.nccl:  # GPU: vLLM's NCCL weight transfer, layer by layer from the learner's rank 0
            self.learner.send_nccl()
            self.version += 1
            seconds = time.monotonic() - start
            return {"perf/sync_seconds": seconds, "perf/sync_compute_seconds": seconds}
        self.weights_ref, size, build_seconds = self.learner.publish_weights()
        self.version += 1
        try:
            results = ray.get([g.update_weights.remote(self.weights_ref, self.version) for g in self.generators])
        except ray.exceptions.ObjectLostError as err:  # rank 0 owned the payload; its node went with it
            raise LearnerLost(f"the weights published by learner rank 0 were lost ({type(err).__name__})") from err
        load = max(r["seconds"] for r in results)
        return {"perf/sync_seconds": time.monotonic() - start, "perf/sync_mb": size / 1e6,
                "perf/sync_load_seconds": load, "perf/sync_compute_seconds": build_seconds + load}

    def reference_logprobs(self, sequences: list[list[int]], select: list[list[float]]) -> tuple[list[list[float]], float]:
        """(the frozen reference's log-probs at the ``select``-ed positions, its compute seconds)."""
        from score_ray.learner import gather

        result = gather([self.reference.sequence_logprobs.remote(sequences, select, self.config.rollout.temperature)],
                        "reference")[0]
        return result, gather([self.reference.last_call_seconds.remote()], "reference")[0]

    def shutdown(self) -> None:
        import ray

        self.pool.shutdown()
        self.learner.shutdown()
        for actor in self.generators + [self.reference]:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - an actor already gone with its node
                pass


def evaluate(run: Run, eval_problems: list[dict], label: str) -> tuple[dict[str, float], list[dict]]:
    from score_ray.evaluate import two_turn_eval

    start = time.monotonic()
    if not sys.stderr.isatty():
        print(f"{label}: greedy two-turn eval on {len(eval_problems)} held-out problems ...", flush=True)
    result = two_turn_eval(lambda batch: run.generate(batch, 1, greedy=True), run.pool, eval_problems, label=label,
                           chunk=25 * len(run.generators))
    if not sys.stderr.isatty():
        print(f"{label}: done in {time.monotonic() - start:.0f}s", flush=True)
    return result


def _resume(run_dir: Path, actors: Run) -> tuple[Optional[Path], TrainerState]:
    """Load the newest whole checkpoint (damaged ones are reported and passed over)."""
    whole, damaged = resumable_checkpoints(run_dir)
    for folder, reason in damaged:
        print(f"score_ray: skipping checkpoint {folder.name}: {reason}", file=sys.stderr, flush=True)
    for folder in whole:
        try:
            state = load_state(folder)
            actors.learner.load_checkpoint(str(folder / "deepspeed"), tag="state")
        except LearnerLost:  # the group itself went: not the checkpoint's fault
            raise
        except Exception as err:  # noqa: BLE001 - an unreadable checkpoint: fall back to the one before
            print(f"score_ray: skipping checkpoint {folder.name}: it does not load ({err})", file=sys.stderr, flush=True)
            continue
        return folder, state
    return None, TrainerState()


MAX_RECOVERIES_IN_ROW = 3  # learner losses while the previous one is still being recovered


class PlacementTimeout(RuntimeError):
    """The cluster did not place a role again within cluster.resource_timeout_s."""


def recover_learner(actors: Run, run_dir: Path, state: TrainerState, config: Config, rng: random.Random,
                    reason: str) -> tuple[TrainerState, random.Random]:
    """Replace a lost learner group (waiting for capacity), load the newest whole checkpoint into it (or start
    over when none was written yet), move the metric rows logged after it aside and re-sync the generators."""
    timeout = config.cluster.resource_timeout_s
    whole = resumable_checkpoints(run_dir)[0]
    where = (f"the last whole checkpoint is {whole[0].name}: resume with run.resume=true" if whole
             else "no checkpoint was written yet: start it again")
    if actors.nccl:
        raise RuntimeError(f"{reason}; with NCCL weight sync the engines' transfer groups belong to the lost rank 0, "
                           f"so the run stops here; {where}")
    print(f"score_ray: {reason}; placing the learner again (waiting up to {timeout:g}s for capacity) ...",
          file=sys.stderr, flush=True)
    try:
        actors.replace_learner(state.iteration, reason)
    except PlacementTimeout as err:
        raise RuntimeError(f"{reason}, and no capacity for it came back within cluster.resource_timeout_s="
                           f"{timeout:g}s ({err}); the run stops here; {where}") from err
    base_eval = state.base_eval
    folder, state = _resume(run_dir, actors)
    if folder is None:
        state.base_eval = base_eval
    rng = random.Random(config.run.seed)
    if state.rng_state is not None:
        rng.setstate(state.rng_state)
    moved = roll_back_metrics(run_dir, state.iteration)
    actors.sync_weights()
    print(f"score_ray: learner placed again; continuing from "
          f"{folder.name if folder else 'the start'} (iteration {state.iteration}; {moved} metric rows moved to "
          "metrics.rolled_back.jsonl)", file=sys.stderr, flush=True)
    return state, rng


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
    overlap = config.rollout.overlap

    _ray_init(config)
    check_resources(config)
    resuming = config.run.resume and bool(resumable_checkpoints(run_dir)[0])
    print(f"starting actors: {config.rollout.num_generators} generator(s), {config.learner.num_ranks} learner rank(s) "
          f"(ZeRO-{config.learner.zero_stage}), 1 reference, {config.reward.workers} reward actor(s)", flush=True)
    actors = Run(config, run_dir)
    logger = None
    try:
        state = TrainerState()
        resumed_from = None
        if resuming:
            resumed_from, state = _resume(run_dir, actors)
        if resumed_from is not None:
            moved = roll_back_metrics(run_dir, state.iteration)
            actors.sync_weights()
            print(f"resumed from {resumed_from.name}: iteration {state.iteration}"
                  + (f" ({moved} metric rows logged after it moved to metrics.rolled_back.jsonl)" if moved else ""),
                  flush=True)
        logger = MetricsLogger(run_dir, config, resume=resumed_from is not None)
        rng = random.Random(config.run.seed)
        if state.rng_state is not None:
            rng.setstate(state.rng_state)
        if resumed_from is None and config.eval.at_start:
            metrics, episodes = evaluate(actors, eval_dicts, "base eval")
            state.base_eval = metrics
            logger.log({"iteration": 0, **{f"eval/{k}": v for k, v in metrics.items() if k != "n"}})
            logger.log_samples(0, episodes)
            print("base model:\n" + format_table({"base": metrics}), flush=True)

        def next_rollout(iteration: int):
            """Problems, seeds and data position after them for ``iteration``; the state is not advanced yet."""
            probe = TrainerState(epoch=state.epoch, position=state.position)
            indices = next_batch(probe, len(train_dicts), config.rollout.prompts_per_iteration, config.run.seed)
            problems = [train_dicts[i] for i in indices]
            seeds = sampling_seeds(config.run.seed, iteration, problems)
            return actors.start_rollout(problems, config.rollout.samples_per_prompt, seeds=seeds), (probe.epoch, probe.position)

        bar = tqdm(total=len(plan), initial=state.iteration, desc="SCoRe", unit="it", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())
        durations: list[float] = []
        prefetched = None  # rollout.overlap: the next iteration's generation, already running
        learner_steps = actors.version  # weights the learner holds, counted like the generators' version
        while state.iteration < len(plan):
            try:
                iteration = state.iteration + 1
                stage = plan[state.iteration]
                name = "I" if stage == 1 else "II"
                timings: dict[str, float] = {}
                start = time.monotonic()

                bar.set_postfix_str(f"stage {name} | rollout")
                handle, position = prefetched if prefetched is not None else next_rollout(iteration)
                prefetched = None
                episodes, rollout_info = actors.finish_rollout(handle)
                state.epoch, state.position = position
                timings["perf/rollout_seconds"] = time.monotonic() - start
                sync: dict[str, float] = {}
                if overlap and iteration < len(plan):
                    # The generators take the learner's newest weights, then sample the next batch while the
                    # learner trains on this one (which came from the weights one step older).
                    if actors.version < learner_steps:
                        sync = actors.sync_weights()
                    prefetched = next_rollout(iteration + 1)

                bar.set_postfix_str(f"stage {name} | grading")
                t = time.monotonic()
                r1, r2, graded = grade_episodes(actors.pool, episodes)
                timings["perf/grading_seconds"] = time.monotonic() - t
                timings["perf/grading_compute_seconds"] = actors.pool.last_busy_seconds
                alarm = grading_alarm(graded, config.reward.alarm_fraction)
                if alarm:
                    print(f"score_ray: ALARM iteration {iteration}: {alarm}", file=sys.stderr, flush=True)

                bar.set_postfix_str(f"stage {name} | reference")
                t = time.monotonic()
                trained = [trained_positions(e) for e in episodes]  # the KL needs reference log-probs there only
                ref_logps, timings["perf/reference_compute_seconds"] = actors.reference_logprobs(
                    [e["x2"] + e["y2"] for e in episodes], trained)
                timings["perf/reference_seconds"] = time.monotonic() - t

                t = time.monotonic()
                groups = [(e["problem"]["id"]) for e in episodes]
                kl_sums = [turn_kl_sums(e, ref) for e, ref in zip(episodes, ref_logps)]
                scored = algo.score_turns(
                    stage, r1, r2, groups, config.algo.alpha, config.algo.beta1, config.algo.beta2,
                    estimator=config.algo.estimator, normalize_advantages=config.algo.normalize_advantages,
                    kl_in_reward=config.algo.kl_in == "reward", kl1=[k[0] for k in kl_sums], kl2=[k[1] for k in kl_sums],
                )
                samples = build_samples(episodes, ref_logps, scored, tuple(config.algo.train_turns))
                timings["perf/scoring_seconds"] = time.monotonic() - t

                bar.set_postfix_str(f"stage {name} | learner")
                t = time.monotonic()
                learner_stats: dict[str, float] = {}
                off_policy = any(e["weight_version"] < learner_steps for e in episodes)
                for _ in range(config.algo.ppo_epochs if config.algo.estimator == "ppo" else 1):
                    learner_stats = actors.learner.train_step(samples, off_policy=off_policy)
                timings["perf/learner_seconds"] = time.monotonic() - t
                timings["perf/learner_compute_seconds"] = learner_stats["seconds"]
                learner_steps += 1
                halt = account_step(state, learner_stats["applied"] > 0, config.learner.max_skipped_steps_in_row)
                if learner_stats["applied"] <= 0:
                    print(f"score_ray: iteration {iteration}: non-finite loss or gradient, optimiser step skipped "
                          f"({state.skipped_in_row} in a row, {state.skipped_steps} in all)", file=sys.stderr, flush=True)

                if not overlap:
                    bar.set_postfix_str(f"stage {name} | sync")
                    sync = actors.sync_weights()

                state.iteration = iteration
                tokens = max(1.0, learner_stats["tokens"])
                statuses = [g["status"] for g in graded]
                metrics: dict[str, Any] = {
                    "iteration": iteration,
                    "train/stage": stage,
                    "train/episodes": len(episodes),
                    **turn_metrics(episodes, ref_logps, r1, r2),
                    "train/shaped_reward_t2": sum(scored["reward2"]) / len(episodes),
                    "train/loss": learner_stats["loss"] / tokens,
                    "train/pg_loss": learner_stats["pg"] / tokens,
                    "train/kl_loss": learner_stats["kl"] / tokens,
                    "train/clip_fraction": learner_stats["clipped"] / tokens,
                    "train/learner_entropy": learner_stats["entropy"] / tokens,
                    "train/grad_norm": learner_stats["grad_norm"],
                    "train/step_skipped": 0.0 if learner_stats["applied"] > 0 else 1.0,
                    "train/skipped_steps": float(state.skipped_steps),
                    "train/off_policy": float(off_policy),
                    "train/grader_timeouts": statuses.count("timeout") / len(statuses),
                    "train/grader_errors": statuses.count("error") / len(statuses),
                    "train/grader_alarm": 1.0 if alarm else 0.0,
                    **timings,
                    **rollout_info,
                    **sync,
                    "perf/learner_micro_batches": learner_stats["micro_batches"],
                    "perf/generated_tokens": float(sum(len(e["y1"]) + len(e["y2"]) for e in episodes)),
                }
                if config.eval.every and iteration % config.eval.every == 0 and iteration < len(plan) and halt is None:
                    bar.set_postfix_str("eval")
                    t = time.monotonic()
                    if actors.version < learner_steps:
                        metrics.update(actors.sync_weights())  # overlap: the generators are one step behind
                    eval_metrics, eval_episodes = evaluate(actors, eval_dicts, f"eval @ {iteration}")
                    metrics.update({f"eval/{k}": v for k, v in eval_metrics.items() if k != "n"})
                    metrics["perf/eval_seconds"] = time.monotonic() - t
                    logger.log_samples(iteration, eval_episodes)
                metrics["perf/iteration_seconds"] = time.monotonic() - start
                if not overlap:  # phases run one after another: what no phase computed is orchestration
                    compute = sum(metrics.get(k, 0.0) for k in (
                        "perf/rollout_compute_seconds", "perf/grading_compute_seconds", "perf/reference_compute_seconds",
                        "perf/scoring_seconds", "perf/learner_compute_seconds", "perf/sync_compute_seconds",
                        "perf/eval_seconds"))
                    metrics["perf/orchestration_seconds"] = metrics["perf/iteration_seconds"] - compute
                    metrics["perf/orchestration_fraction"] = metrics["perf/orchestration_seconds"] / metrics["perf/iteration_seconds"]
                metrics["perf/wall_time"] = time.time()
                state.rng_state = rng.getstate()
                logger.log(metrics)
                if halt is not None:
                    folder = save_checkpoint(run_dir, actors.learner, state, config.checkpoint.keep)
                    raise TrainingHalted(f"{halt}. Checkpoint of the last good state: {folder}")
                if config.checkpoint.every and iteration % config.checkpoint.every == 0:
                    bar.set_postfix_str("checkpoint")
                    save_checkpoint(run_dir, actors.learner, state, config.checkpoint.keep)
                bar.update(1)
                bar.set_postfix_str(f"r1 {metrics['train/reward_t1']:.2f} r2 {metrics['train/reward_t2']:.2f}")
                durations.append(metrics["perf/iteration_seconds"])
                if not sys.stderr.isatty():
                    eta = sum(durations) / len(durations) * (len(plan) - iteration)
                    print(f"iteration {iteration}/{len(plan)} stage {name}: reward t1 "
                          f"{metrics['train/reward_t1']:.3f} t2 {metrics['train/reward_t2']:.3f} "
                          f"({metrics['perf/iteration_seconds']:.0f}s, ETA {eta / 60:.1f} min + final eval)", flush=True)
            except LearnerLost as lost:
                # A lost node took a learner rank or the reference: place them again, roll back to the last
                # whole checkpoint and go on; the redone iterations sample and learn what the lost ones did.
                prefetched = None
                for attempt in range(1, MAX_RECOVERIES_IN_ROW + 1):
                    try:
                        state, rng = recover_learner(actors, run_dir, state, config, rng, f"{lost}")
                        break
                    except LearnerLost as again:  # lost once more while being placed or reloaded
                        if attempt == MAX_RECOVERIES_IN_ROW:
                            raise
                        lost = again
                learner_steps = actors.version
                bar.n = state.iteration
                bar.refresh()
        bar.close()

        if actors.version < learner_steps:
            actors.sync_weights()
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
            "skipped_steps": state.skipped_steps,
            "generator_restarts": actors.restarts,
            "learner_replacements": actors.learner_replacements,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plots = write_plots(run_dir)
        logger.finish({k: v for k, v in summary["final_eval"].items() if isinstance(v, float)})
        logger = None
        print(table)
        print(f"run folder: {run_dir} (summary.json, metrics.jsonl, final_model/, "
              + ", ".join(p.name for p in plots) + ")", flush=True)
        return 0
    except (ray.exceptions.RayActorError, LearnerLost) as err:  # outside the loop's recovery: set-up, final save
        raise RuntimeError(f"an actor died ({str(err).splitlines()[0][:300]}); the run stops here: resume it "
                           "with run.resume=true from the last checkpoint") from err
    finally:
        if logger is not None:  # stopped early: close the W&B run so what was logged is kept
            logger.finish(exit_code=1)
        actors.shutdown()
