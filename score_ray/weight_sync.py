"""How weights cross from the learner to the engines: one interface, two transports.

- ``ObjectStoreSync`` (CPU; GPU with learner.weight_sync=object_store): learner rank 0 packs the
  trainable weights into one buffer in Ray's object store (score_ray.weight_pack); every generator
  reads it zero-copy and loads it in place through vLLM's reload (rollout.WeightReceiver).
- ``NcclSync`` (GPU): vLLM's NCCL weight transfer, streamed from rank 0 to every engine's workers
  (score_ray.weight_sync_gpu).

The actor group calls ``push`` and ``resync`` and reads ``cannot_recover``; it never asks which transport
it has. The policy version (how many pushes the generators have had) is the actor group's alone.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Protocol

from score_ray.config import Config
from score_ray.faults import LearnerLost
from score_ray.records import SyncStats


def uses_nccl(config: Config) -> bool:
    """learner.weight_sync: auto picks NCCL when both the learner and the engines have GPUs, for whole weights; a LoRA
    adapter (a few MB) always goes through the object store."""
    choice = config.learner.weight_sync
    if config.learner.trainable == "lora":
        return False
    on_gpu = config.rollout.gpus_per_generator > 0 and config.learner.gpus_per_rank > 0
    return choice == "nccl" or (choice == "auto" and on_gpu)


class WeightSync(Protocol):
    cannot_recover: Optional[str]  # why a restarted generator or a replaced learner cannot take weights again

    def push(self) -> SyncStats:
        """Every generator takes the learner's current weights."""

    def resync(self, index: int) -> None:
        """Generator ``index`` was restarted (base weights): give it the last pushed weights."""

    def rebind(self, learner: Any) -> None:
        """The learner group was replaced: later pushes come from ``learner``."""


class ObjectStoreSync:
    cannot_recover = None

    def __init__(self, learner, generators: list):
        self.learner, self.generators = learner, generators
        self.payload = None  # the last pushed weights (rank 0 owns them), kept for a restarted generator

    def push(self) -> SyncStats:
        import ray

        start = time.monotonic()
        self.payload, size, build_seconds = self.learner.publish_weights()
        try:
            results = ray.get([g.update_weights.remote(self.payload) for g in self.generators])
        except ray.exceptions.ObjectLostError as err:  # rank 0 owned the payload; its node went with it
            raise LearnerLost(f"the weights published by learner rank 0 were lost ({type(err).__name__})") from err
        load = max(r["seconds"] for r in results)
        return SyncStats(seconds=time.monotonic() - start, compute_seconds=build_seconds + load, load_seconds=load,
                         megabytes=size / 1e6)

    def resync(self, index: int) -> None:
        import ray

        if self.payload is None:  # nothing pushed yet: the restarted engine's base weights are current
            return
        try:
            ray.get(self.generators[index].update_weights.remote(self.payload))
        except ray.exceptions.ObjectLostError as lost:  # rank 0 owned the payload and was lost too
            raise LearnerLost(f"generator {index} and the weights published by learner rank 0 were lost "
                              f"({type(lost).__name__})") from lost

    def rebind(self, learner: Any) -> None:
        self.learner = learner


class NcclSync:
    cannot_recover = ("with NCCL weight sync the engines' transfer group belongs to the learner's rank 0 and the "
                      "engines' start, so a restarted engine or a replaced learner cannot rejoin it")

    def __init__(self, learner, generators: list, config: Config):
        self.learner = learner
        learner.connect_nccl(generators, config.rollout.tensor_parallel_size, config.model.dtype,
                             config.learner.nccl_buffer_mb * 2**20)

    def push(self) -> SyncStats:
        start = time.monotonic()
        self.learner.send_nccl()
        seconds = time.monotonic() - start
        return SyncStats(seconds=seconds, compute_seconds=seconds)

    def resync(self, index: int) -> None:
        raise RuntimeError(f"generator {index}: {self.cannot_recover}")

    def rebind(self, learner: Any) -> None:
        raise RuntimeError(self.cannot_recover)


def weight_sync_for(config: Config, learner, generators: list) -> WeightSync:
    return NcclSync(learner, generators, config) if uses_nccl(config) else ObjectStoreSync(learner, generators)
