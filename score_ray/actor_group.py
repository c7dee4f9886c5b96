"""The actors of one run: where they are placed, how a lost one is restarted or replaced, and
the policy version: which weights the learner and the generators hold.

    generators (vLLM)    rollout: a batch of problems dealt out in shares, a lost share redone
    reference            log-probs of the frozen base model
    learner group        DeepSpeed ZeRO ranks (score_ray.learner)
    reward pool          sandboxed graders (score_ray.reward.pool)
    weights              learner -> generators (score_ray.weight_sync)

Ray restarts a dead generator (a fresh engine with the base weights): it is given the last pushed
weights and its share is redone. A lost learner rank or reference (a lost node) is placed again with
``replace_learner``; the trainer then reloads the last whole checkpoint into it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from score_ray.config import Config
from score_ray.data import Problem
from score_ray.episode import Episode
from score_ray.faults import PlacementTimeout
from score_ray.placement import actor_runtime_env, kill_actors, reference_gpus
from score_ray.records import ReferenceLogprobs, Rollout, SyncStats


@dataclass
class RolloutHandle:
    """Generation in flight: one task per generator share, resubmitted if its generator dies."""

    shares: list[tuple[list[Problem], list[Optional[int]]]]
    samples: int
    greedy: bool
    tasks: dict  # ObjectRef -> share index
    policy_version: int  # the weights the generators held when it was submitted
    turn2_samples: int = 1


class ActorGroup:
    def __init__(self, config: Config, run_dir: Path):
        import ray

        from score_ray.reward.pool import RewardPool
        from score_ray.rollout import GeneratorActor
        from score_ray.weight_sync import uses_nccl, weight_sync_for

        self.config, self.run_dir = config, run_dir
        rollout, learner = config.rollout, config.learner
        # Each actor resolves the model on its own node (a built test model or a converted one lives in that
        # node's cache; on a cluster the driver's paths do not exist elsewhere).
        self.generators = [
            GeneratorActor.options(num_cpus=rollout.cpus_per_generator, num_gpus=rollout.gpus_per_generator,
                                   resources=dict(rollout.resources), max_restarts=rollout.max_restarts,
                                   max_task_retries=0, runtime_env=actor_runtime_env(config)).remote(
                config.model, rollout, config.prompts, config.run.seed + index, uses_nccl(config),
                learner.nccl_buffer_mb * 2**20, learner.lora if learner.trainable == "lora" else None,
            )
            for index in range(rollout.num_generators)
        ]
        self.reference = self._start_reference()
        self.pool = RewardPool(config.reward, restart_wait_s=max(60.0, config.cluster.resource_timeout_s),
                               runtime_env=actor_runtime_env(config))
        self.learner = self._start_learner()
        ready = [g.ready.remote() for g in self.generators] + [r.ready.remote() for r in self._references()]
        done, pending = ray.wait(ready, num_returns=len(ready), timeout=max(600.0, config.cluster.resource_timeout_s))
        if pending:
            raise RuntimeError("generators or the reference did not start in time; check the cluster's free resources")
        ray.get(done)  # an engine that failed to start (e.g. its KV cache does not fit) says why here
        self.weights = weight_sync_for(config, self.learner, self.generators)
        # The policy version, owned here alone: the generators hold the learner's weights as they were after
        # ``version`` syncs; the learner's count as many, plus one for every step not yet synced.
        self.version = 0
        self.learner_version = 0
        self.restarts = 0
        self.learner_replacements = 0
        self.placements: list[dict[str, Any]] = []
        self.record_placement(0, "start")

    def learner_stepped(self) -> None:
        """The learner took an optimiser step (or a batch with nothing to train on): its weights moved on."""
        self.learner_version += 1

    def sync_weights(self) -> SyncStats:
        """Every generator takes the learner's weights, whatever it held (a resume, a replaced learner)."""
        stats = self.weights.push()
        self.version += 1
        self.learner_version = self.version
        return stats

    def sync_if_behind(self) -> Optional[SyncStats]:
        """The learner's weights to every generator if they are newer than theirs; None when they are not."""
        return self.sync_weights() if self.version < self.learner_version else None

    def sampled_by_older_weights(self, rollout: Rollout) -> bool:
        """Whether weights older than the learner's sampled ``rollout`` (rollout.overlap)."""
        return rollout.policy_version < self.learner_version

    # ------------------------------------------------------------------ placement
    def _start_reference(self):
        """The frozen reference's actor; None when the learner ranks serve it (learner.share_trunk, or the base
        weights with the adapter off under trainable=lora)."""
        from score_ray.reference import ReferenceActor

        learner = self.config.learner
        if learner.serves_reference:
            return None
        return ReferenceActor.options(num_cpus=learner.cpus_per_rank, num_gpus=reference_gpus(self.config),
                                      resources=dict(learner.resources),
                                      runtime_env=actor_runtime_env(self.config)).remote(self.config.model, learner.cpus_per_rank,
                                                                                learner.logprob_chunk_tokens)

    def _start_learner(self):
        from score_ray.learner import LearnerGroup

        config = self.config
        # An autoscaling cluster adds GPU nodes in minutes: wait for the placement group that long.
        timeout = config.cluster.resource_timeout_s
        if os.environ.get("SCORE_RAY_AUTOSCALING"):
            timeout = max(timeout, 1800.0)
        return LearnerGroup(config.model, config.learner, config.algo, config.run.seed, timeout,
                            actor_runtime_env(config))

    def record_placement(self, iteration: int, reason: str) -> None:
        """Append where every role runs now to the run folder's nodes.json (the driver's node included)."""
        from score_ray.actor_calls import gather
        from score_ray.placement import this_node

        roles = {
            "iteration": iteration,
            "reason": reason,
            "learner_ranks": self.learner.nodes,
            "reference": (gather([self.reference.ready.remote()], "reference")[0] if self.reference is not None
                          else {**self.learner.nodes[0], "served_by": "learner ranks (" + (
                              "the base weights, adapter off" if self.config.learner.trainable == "lora"
                              else "learner.share_trunk") + ")"}),
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
        if self.reference is not None:
            try:
                ray.get(self.reference.ready.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                kill_actors([self.reference])
                self.reference = self._start_reference()
        try:
            self.learner = self._start_learner()
        except RuntimeError as err:  # LearnerGroup could not place its ranks in time
            raise PlacementTimeout(str(err)) from err
        wait = max(60.0, self.config.cluster.resource_timeout_s)
        try:
            ray.get([r.ready.remote() for r in self._references()], timeout=wait)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as err:
            raise PlacementTimeout(f"the reference was not placed again within {wait:g}s ({type(err).__name__})") from err
        self.weights.rebind(self.learner)
        self.learner_replacements += 1
        self.record_placement(iteration, reason)

    # ------------------------------------------------------------------ generation with recovery
    def start_rollout(self, problems: Sequence[Problem], samples: int, greedy: bool = False,
                      seeds: Optional[list[int]] = None, turn2_samples: int = 1) -> RolloutHandle:
        count = len(self.generators)
        seeds = seeds if seeds is not None else [None] * len(problems)
        shares = [(list(problems[i::count]), seeds[i::count]) for i in range(count)]
        handle = RolloutHandle(shares=shares, samples=samples, greedy=greedy, tasks={}, policy_version=self.version,
                               turn2_samples=turn2_samples)
        for index, share in enumerate(shares):
            if share[0]:
                handle.tasks[self._submit(index, handle)] = index
        return handle

    def _submit(self, index: int, handle: RolloutHandle):
        problems, seeds = handle.shares[index]
        return self.generators[index].generate.remote(problems, handle.samples, handle.greedy,
                                                      None if handle.greedy else seeds, handle.turn2_samples)

    def finish_rollout(self, handle: RolloutHandle) -> Rollout:
        """Wait for every share; a share whose generator died is redone on the restarted generator."""
        import ray

        parts: dict[int, Any] = {}
        retries = 0
        while handle.tasks:
            done, _ = ray.wait(list(handle.tasks), num_returns=1)
            index = handle.tasks.pop(done[0])
            try:
                parts[index] = ray.get(done[0])
            except ray.exceptions.RayActorError as err:
                retries += 1
                self._recover_generator(index, err)
                handle.tasks[self._submit(index, handle)] = index
        episodes = [episode for index in sorted(parts) for episode in parts[index].episodes]
        compute = max((part.seconds for part in parts.values() if part.episodes), default=0.0)
        return Rollout(episodes, compute_seconds=compute, retries=retries, policy_version=handle.policy_version)

    def generate(self, problems: Sequence[Problem], samples: int, greedy: bool = False,
                 seeds: Optional[list[int]] = None) -> list[Episode]:
        return self.finish_rollout(self.start_rollout(problems, samples, greedy, seeds)).episodes

    def _recover_generator(self, index: int, err: Exception) -> None:
        import ray

        reason = str(err).splitlines()[0][:200]
        if self.weights.cannot_recover:
            raise RuntimeError(f"generator {index} died ({reason}); {self.weights.cannot_recover}, so the run stops "
                               "here: resume it with run.resume=true from the last checkpoint")
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
        self.weights.resync(index)
        self.restarts += 1
        print(f"score_ray: generator {index} restarted, weights re-synced (version {self.version}); "
              "redoing its problems", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ the reference
    def _references(self) -> list:
        return [] if self.reference is None else [self.reference]

    def reference_logprobs(self, sequences: list[list[int]], select: list[list[float]],
                           temperatures: list[list[float]]) -> ReferenceLogprobs:
        """The frozen reference's log-probs at the ``select``-ed positions, each at its own sampling temperature."""
        from score_ray.actor_calls import gather

        if self.reference is None:  # the learner ranks serve it from their shared trunk
            return self.learner.reference_logprobs(sequences, select, temperatures)
        return gather([self.reference.reference_logprobs.remote(sequences, select, temperatures)], "reference")[0]

    def shutdown(self) -> None:
        self.pool.shutdown()
        self.learner.shutdown()
        kill_actors(self.generators + self._references())
