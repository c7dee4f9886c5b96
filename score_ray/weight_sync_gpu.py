"""GPU weight sync: DeepSpeed ZeRO-3 learner -> vLLM engines over NCCL.

Built on vLLM's stateful weight-transfer API (``vllm.distributed.weight_transfer``):

* the trainer hands its weights to vLLM as a ``WeightSource``; here that is
  ``Zero3WeightSource``, which gathers ZeRO-3 partitions one parameter at a time;
* each vLLM engine is built with ``weight_transfer_config=WeightTransferConfig(backend="nccl")``
  and joins a transfer group through ``LLM.init_weight_transfer_engine``;
* the trainer side is vLLM's own NCCL trainer engine, created with
  ``WeightTransferTrainerFactory.trainer_init(NCCLTrainerInitInfo(...))``, which
  broadcasts from rank 0 while the engine runs ``LLM.update_weights``.

All engines share one transfer group on one port: the learner's rank 0 at NCCL rank 0
and engine i's TP x PP workers after it, so a sync gathers the ZeRO-3 weights once and
one broadcast reaches every engine. ``transfer_layout`` computes that layout.

Engine side, a Ray actor that holds ``self.llm`` exposes two methods, e.g.::

    def weight_sync_init(self, init_info):
        NcclWeightSync.engine_init(self.llm, init_info)

    def weight_sync_update(self, update_info):
        NcclWeightSync.engine_update(self.llm, update_info)

Trainer side, every learner rank (all of them take part in the ZeRO-3 gathers)::

    source = Zero3WeightSource(engine, torch.bfloat16, rank=rank, names=trainable)
    group = transfer_layout(len(actors), tp, rank0_address, port)
    sync = NcclWeightSync(group, rank=rank, client=RayEnginesClient(actors, group) if rank == 0 else None)
    sync.connect(source)   # once
    sync.send()            # after each optimiser step

NCCL calls block forever when a peer is gone, so every blocking step runs under a
deadline and raises ``TimeoutError`` naming the step. After such an error the
transfer group is unusable: close it and restart the engines.

Only GPU runs use this module (vLLM's NCCL engine needs CUDA), but it imports on
CPU: torch, DeepSpeed and vLLM are imported where they are used, except for the
``WeightSource`` base class, which is needed to define ``Zero3WeightSource``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

import torch

# The abstract source and its metadata record (vllm/distributed/weight_transfer/base.py, vLLM 0.32: a
# ``metadata()`` method and ``__iter__``; 0.33 changed both, which is why vLLM is pinned to 0.32 everywhere).
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from score_ray.weight_gather import GatheredWeights

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 600.0


# ----------------------------------------------------------------------------- deadlines


def call_with_timeout(step: str, fn: Callable[..., T], *args: Any, timeout_s: float, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` and wait for it at most ``timeout_s`` seconds.

    The call runs in a daemon thread: a blocked NCCL or Ray call cannot be
    interrupted, but a daemon thread does not keep the process alive at exit (a
    ThreadPoolExecutor worker would be joined and hang it). Exceptions raised by
    ``fn`` propagate unchanged.
    """
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error
        finally:
            done.set()

    threading.Thread(target=target, name=f"weight-sync:{step}", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError(
            f"weight sync step {step!r} did not finish within {timeout_s:g}s "
            "(a peer may have died or never joined the NCCL group); "
            "the transfer group is now unusable: close it and restart the engines"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _on_this_device(fn: Callable[[], T]) -> Callable[[], T]:
    """Pin a side thread to the caller's CUDA device.

    vLLM's NCCL helpers use ``torch.accelerator.current_device_index()`` and the
    current stream, which are per thread; a fresh thread would start on device 0.
    """
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return fn
    device = torch.cuda.current_device()

    def pinned() -> T:
        torch.cuda.set_device(device)
        return fn()

    return pinned


# ----------------------------------------------------------------------------- source


class Zero3WeightSource(GatheredWeights, WeightSource):
    """vLLM 0.32's ``WeightSource`` (``metadata()`` and ``__iter__``) over ``GatheredWeights``.

    vLLM's NCCL sender checks every yielded tensor against ``metadata()`` (name, dtype, shape) and
    only rank 0 sends; the other ranks iterate so the ZeRO-3 gathers stay in step.
    """

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, dtype, shape) for name, dtype, shape in self.shapes()]


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class TransferGroup:
    """The one NCCL transfer group of a run: the learner's rank 0 (NCCL rank 0, the sender) and every engine's
    workers after it, engine ``i``'s TP x PP workers at ``engine_rank_offsets[i]`` onwards.

    ``trainer_init_info`` has the fields of vLLM's ``NCCLTrainerInitInfo`` (what
    ``WeightTransferTrainerFactory.trainer_init`` takes; ``rank`` there is the learner rank, 0 = sender).
    vLLM's trainer engine derives the engines' side from it with ``rank_offset`` 1; ``RayEnginesClient``
    hands each engine its own offset instead.
    """

    master_address: str
    master_port: int
    world_size: int
    workers_per_engine: int
    engine_rank_offsets: tuple[int, ...]
    trainer_init_info: dict[str, Any] = field(default_factory=dict)

    def engine_ranks(self, index: int) -> range:
        """NCCL ranks of engine ``index``'s workers (vLLM adds a worker's rank inside its engine to the offset)."""
        offset = self.engine_rank_offsets[index]
        return range(offset, offset + self.workers_per_engine)


# vLLM packs tensors into chunks of about this size (a chunk may pass it by one tensor) and keeps this many
# in flight; each engine worker allocates them outside gpu_memory_utilization (see rollout.engine_memory_fraction).
TRANSFER_BUFFERS = 2


def transfer_layout(
    num_engines: int,
    tensor_parallel_size: int,
    master_address: str,
    port: int,
    *,
    pipeline_parallel_size: int = 1,
    packed: bool = True,
    buffer_bytes: int = 256 * 2**20,
) -> TransferGroup:
    """One transfer group for ``num_engines`` independent vLLM engines: a sync gathers the ZeRO-3 weights
    once and one broadcast reaches every engine's workers (NCCL fans it out along its ring or tree).

    ``master_address`` must be the address of the learner's rank 0, which hosts the group's TCPStore on
    ``port`` (learner.transfer_port, or a port found free there: ``LearnerWorker.transfer_endpoint``).
    """
    if num_engines < 1 or tensor_parallel_size < 1 or pipeline_parallel_size < 1:
        raise ValueError("transfer_layout needs at least one engine and one worker per engine")
    if not 0 < int(port) < 65536:
        raise ValueError(f"transfer_layout needs a TCP port, got {port!r}")
    workers = tensor_parallel_size * pipeline_parallel_size
    world_size = 1 + num_engines * workers
    return TransferGroup(
        master_address=master_address,
        master_port=int(port),
        world_size=world_size,
        workers_per_engine=workers,
        engine_rank_offsets=tuple(1 + index * workers for index in range(num_engines)),
        trainer_init_info={
            "master_address": master_address, "master_port": int(port), "world_size": world_size,
            "packed": packed, "packed_buffer_size_bytes": int(buffer_bytes),
            "packed_num_buffers": TRANSFER_BUFFERS, "rank": 0,
        },
    )


# ----------------------------------------------------------------------------- orchestration


class RayEnginesClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol (base.py) for every engine of the group at once, each a Ray
    actor holding a ``vllm.LLM``.

    The actors expose two methods (names configurable) that call ``NcclWeightSync.engine_init`` and
    ``NcclWeightSync.engine_update``. vLLM's trainer engine thinks it talks to one engine: this client hands
    the init to every engine with its own rank offset, and each update to all of them, concurrently (their
    workers meet the sender inside the same NCCL calls, so one engine waiting for another would hang). One
    update is a single actor call that runs start -> update -> finish -> reset prefix cache, so an engine is
    never left mid-update between two RPCs; the protocol's ``start_weight_update`` / ``finish_weight_update``
    are therefore no-ops here. Every call is bounded by ``ray.get(timeout=...)``.
    """

    def __init__(
        self,
        handles: Sequence[Any],
        group: TransferGroup,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        init_method: str = "weight_sync_init",
        update_method: str = "weight_sync_update",
    ) -> None:
        if len(handles) != len(group.engine_rank_offsets):
            raise ValueError(f"the transfer group has {len(group.engine_rank_offsets)} engines, got {len(handles)} "
                             "engine actors")
        self.handles = list(handles)
        self.group = group
        self.timeout_s = timeout_s
        self.init_method = init_method
        self.update_method = update_method

    def _call_all(self, step: str, method: str, arguments: Sequence[Any]) -> None:
        import ray

        pending = [getattr(handle, method).remote(argument) for handle, argument in zip(self.handles, arguments)]
        try:
            ray.get(pending, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as error:
            late = [index for index, ref in enumerate(pending) if not ray.wait([ref], timeout=0)[0]]
            raise TimeoutError(
                f"weight sync step {step!r} did not finish within {self.timeout_s:g}s on engines {late}"
            ) from error

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        infos = [{**init_info, "rank_offset": offset} for offset in self.group.engine_rank_offsets]
        self._call_all("engine init_weight_transfer_engine", self.init_method, infos)

    def start_weight_update(self) -> None:
        pass  # started inside each engine's update call

    def update_weights(self, update_info: Any) -> None:
        self._call_all("engine update_weights", self.update_method, [update_info] * len(self.handles))

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None:
        pass  # finished inside each engine's update call


class _NoClient:
    """Placeholder client for learner ranks other than 0: vLLM's trainer engine never calls it there."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("only learner rank 0 talks to the vLLM engines")

    init_weight_transfer_engine = start_weight_update = update_weights = finish_weight_update = _refuse


def nccl_weight_transfer_config():
    """The ``weight_transfer_config`` to pass to ``vllm.LLM(...)`` so the engine can receive over NCCL."""
    from vllm.config import WeightTransferConfig

    return WeightTransferConfig(backend="nccl")


class NcclWeightSync:
    """Drives vLLM's NCCL trainer engine for the run's one transfer group, from every learner rank.

    Uses vLLM's ``WeightTransferTrainerFactory`` and ``NCCLTrainerInitInfo`` (nccl_engine.py). Rank 0 opens
    the group and broadcasts; the other ranks hold no communicator but still iterate the source, since the
    ZeRO-3 gathers need them. A send gathers the model once, whatever the number of engines.
    """

    def __init__(
        self,
        group: TransferGroup,
        *,
        rank: int,
        client: Optional[Any] = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if rank == 0 and client is None:
            raise ValueError("learner rank 0 needs a client for the engines (RayEnginesClient)")
        self.group = group
        self.rank = rank
        self.client = client if rank == 0 else _NoClient()
        self.timeout_s = timeout_s
        self.engine: Optional[Any] = None

    # -------------------------------------------------------------- engine side (inside the actor)
    @staticmethod
    def engine_init(llm: Any, init_info: dict[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Join the trainer's transfer group (blocks until the trainer's rank 0 joins too)."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        request = WeightTransferInitRequest(init_info=dict(init_info))
        call_with_timeout("init_weight_transfer_engine", llm.init_weight_transfer_engine, request, timeout_s=timeout_s)

    @staticmethod
    def engine_update(llm: Any, update_info: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """One update: start -> receive (concurrent with the trainer's broadcast) -> finish -> reset prefix cache.

        The prefix cache must go: cached KV blocks were computed with the old weights.
        """
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        call_with_timeout("start_weight_update", llm.start_weight_update, timeout_s=timeout_s)
        request = WeightTransferUpdateRequest(update_info=update_info)
        call_with_timeout("update_weights", llm.update_weights, request, timeout_s=timeout_s)
        call_with_timeout("finish_weight_update", llm.finish_weight_update, timeout_s=timeout_s)
        call_with_timeout("reset_prefix_cache", llm.reset_prefix_cache, timeout_s=timeout_s)

    # -------------------------------------------------------------- trainer side (every learner rank)
    def _trainer_init_info(self, group: TransferGroup):
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(**{**group.trainer_init_info, "rank": self.rank})

    def connect(self, source: Zero3WeightSource) -> None:
        """Open the group; rank 0 also makes every engine join it."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        if source.is_sender != (self.rank == 0):
            raise ValueError(f"source rank {source.rank} does not match learner rank {self.rank}")
        init_info = self._trainer_init_info(self.group)

        def init():
            return WeightTransferTrainerFactory.trainer_init(init_info, client=self.client, source=source)

        where = f"{self.group.master_address}:{self.group.master_port}"
        try:
            self.engine = call_with_timeout(f"trainer_init ({where}, {len(self.group.engine_rank_offsets)} engines)",
                                            _on_this_device(init), timeout_s=self.timeout_s)
        except TimeoutError as err:
            raise TimeoutError(
                f"{err}. Every generator node must reach {where} (TCP) on learner rank 0's node "
                "(learner.transfer_port fixes it), and NCCL's own connections between those nodes; on nodes with "
                "several network interfaces name the shared one (cluster.env_vars: NCCL_SOCKET_IFNAME). "
                "cluster/README.md lists the ports to open"
            ) from err

    def send(self) -> None:
        """Push the current weights to every engine (all learner ranks call this together)."""
        if self.engine is None:
            raise RuntimeError("NcclWeightSync.send() before connect()")
        call_with_timeout("send_weights", _on_this_device(self.engine.send_weights), timeout_s=self.timeout_s)

    def close(self) -> None:
        """Destroy the trainer-side communicator."""
        if self.engine is not None:
            self.engine.shutdown()
        self.engine = None
