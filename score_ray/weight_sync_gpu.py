"""GPU weight sync: DeepSpeed ZeRO-3 learner -> vLLM engines over NCCL.

Built on vLLM's stateful weight-transfer API (``vllm.distributed.weight_transfer``):

* the trainer hands its weights to vLLM as a ``WeightSource``; here that is
  ``Zero3WeightSource``, which gathers ZeRO-3 partitions one parameter at a time;
* each vLLM engine is built with ``weight_transfer_config=WeightTransferConfig(backend="nccl")``
  and joins a transfer group through ``LLM.init_weight_transfer_engine``;
* the trainer side is vLLM's own NCCL trainer engine, created with
  ``WeightTransferTrainerFactory.trainer_init(NCCLTrainerInitInfo(...))``, which
  broadcasts from rank 0 while the engine runs ``LLM.update_weights``.

Every independent engine (tensor parallel size TP) gets its own transfer group of
TP + 1 ranks on its own port: the learner's rank 0 at NCCL rank 0 and the engine's
workers at 1..TP. ``transfer_layout`` computes that layout.

Engine side, a Ray actor that holds ``self.llm`` exposes two methods, e.g.::

    def weight_sync_init(self, init_info):
        NcclWeightSync.engine_init(self.llm, init_info)

    def weight_sync_update(self, update_info):
        NcclWeightSync.engine_update(self.llm, update_info)

Trainer side, every learner rank (all of them take part in the ZeRO-3 gathers)::

    source = Zero3WeightSource(engine, torch.bfloat16, rank=rank, names=trainable)
    sync = NcclWeightSync(transfer_layout(...), rank=rank, clients=[RayEngineClient(h) for h in actors])
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

import dataclasses
import socket
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

import torch

# The abstract source and its metadata record (vllm/distributed/weight_transfer/base.py).
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

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


class Zero3WeightSource(WeightSource):
    """vLLM ``WeightSource`` over a DeepSpeed engine's module (ZeRO-3 or not).

    ``metadata()`` reports full shapes without gathering: ``ds_shape`` for a
    ZeRO-3 partitioned parameter (it carries ``ds_id``; its ``shape`` is empty),
    ``shape`` otherwise. Iteration gathers each parameter in model order with
    ``GatheredParameters([p], modifier_rank=None)``, so each rank holds at most
    one gathered parameter at a time (the sender's copies belong to the consumer).

    The gather is a collective: every learner rank must iterate the source, the
    same number of times and in the same order. Only the sender (rank 0) keeps
    the data: it yields contiguous clones cast to ``dtype`` (clones, because the
    gathered storage is released when the context exits, while vLLM's packed
    producer still holds earlier tensors). Other ranks yield ``(name, None)``,
    the convention vLLM's base class uses for data a rank does not send.
    """

    def __init__(
        self,
        engine: Any,
        dtype: torch.dtype,
        *,
        rank: int = 0,
        names: Optional[Collection[str]] = None,
        device: Optional[torch.device | str] = None,
        include_buffers: bool = False,
    ) -> None:
        """
        Args:
            engine: a DeepSpeed engine (its ``.module`` is read) or a plain module.
            dtype: the dtype the inference engine runs, e.g. ``torch.bfloat16``.
            rank: this learner rank; rank 0 is the only sender.
            names: send only these parameters (e.g. the trainable ones).
            device: move sent tensors here (e.g. "cuda" when ZeRO offloads parameters to CPU).
            include_buffers: also send persistent buffers; non-persistent ones
                (e.g. rotary ``inv_freq``) are never checkpoint tensors and are skipped.
        """
        self.module: torch.nn.Module = getattr(engine, "module", engine)
        self.dtype = dtype
        self.rank = rank
        self.is_sender = rank == 0
        self.device = torch.device(device) if device is not None else None
        self.include_buffers = include_buffers
        self.names = None if names is None else frozenset(names)
        if self.names is not None:
            unknown = sorted(self.names - {name for name, _ in self._tensors()})
            if unknown:
                raise ValueError(f"Zero3WeightSource: no such parameters in the model: {unknown[:5]}")

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, parameter or persistent buffer) in model order, each shared tensor once.

        Walks modules the way ``named_parameters()`` does (a module's own
        parameters, then its children), so with buffers off the order is exactly
        ``named_parameters()``; tied weights (lm_head = embed_tokens) appear once.
        """
        seen: set[int] = set()
        for prefix, module in self.module.named_modules():
            dot = prefix + "." if prefix else ""
            for local, param in module._parameters.items():
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                yield dot + local, param
            if not self.include_buffers:
                continue
            skipped = module._non_persistent_buffers_set
            for local, buffer in module._buffers.items():
                if buffer is None or local in skipped or id(buffer) in seen:
                    continue
                seen.add(id(buffer))
                yield dot + local, buffer

    def _selected(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._tensors():
            if self.names is None or name in self.names:
                yield name, tensor

    def metadata(self) -> list[ParamMeta]:
        return [
            ParamMeta(name, self.dtype, tuple(tensor.ds_shape if hasattr(tensor, "ds_id") else tensor.shape))
            for name, tensor in self._selected()
        ]

    def __iter__(self) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
        import deepspeed

        for name, tensor in self._selected():
            # A no-op for tensors without ds_id (ZeRO-1/2 parameters, buffers).
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                if not self.is_sender:
                    yield name, None
                    continue
                full = tensor.detach()
                if self.device is not None:
                    full = full.to(self.device)
                yield name, full.to(dtype=self.dtype, memory_format=torch.contiguous_format, copy=True)


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class TransferGroup:
    """One vLLM engine's NCCL transfer group: the learner's rank 0 plus the engine's workers.

    ``engine_init_info`` has the fields of vLLM's ``NCCLWeightTransferInitInfo``
    (what ``LLM.init_weight_transfer_engine`` takes); ``trainer_init_info`` those
    of ``NCCLTrainerInitInfo`` (what ``WeightTransferTrainerFactory.trainer_init``
    takes; ``rank`` there is the learner rank, 0 = sender).
    """

    engine_index: int
    master_address: str
    master_port: int
    world_size: int
    trainer_rank: int
    worker_ranks: tuple[int, ...]
    engine_init_info: dict[str, Any] = field(default_factory=dict)
    trainer_init_info: dict[str, Any] = field(default_factory=dict)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on this machine (all sockets held until all are picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def transfer_layout(
    num_engines: int,
    tensor_parallel_size: int,
    master_address: str,
    ports: Optional[Sequence[int]] = None,
    *,
    pipeline_parallel_size: int = 1,
    packed: bool = True,
) -> list[TransferGroup]:
    """Rank layout for ``num_engines`` independent vLLM engines.

    One group per engine, each with its own port, so ranks never collide across
    engines: NCCL rank 0 is the learner's rank 0 (vLLM's trainer engine always
    sends from rank 0) and the engine's TP x PP workers sit at 1..TP x PP (vLLM
    adds ``rank_offset`` = 1 to each worker's rank inside its engine).

    ``master_address`` must be the address of the learner's rank 0, which hosts
    every group's TCPStore; ``ports`` default to free ports picked here, so call
    this on that machine or pass ports known to be free there.
    """
    if num_engines < 1 or tensor_parallel_size < 1 or pipeline_parallel_size < 1:
        raise ValueError("transfer_layout needs at least one engine and one worker per engine")
    ports = list(ports) if ports is not None else free_ports(num_engines)
    if len(ports) != num_engines or len(set(ports)) != num_engines:
        raise ValueError(f"transfer_layout needs {num_engines} distinct ports, got {ports}")
    workers = tensor_parallel_size * pipeline_parallel_size
    world_size = workers + 1
    groups = []
    for index, port in enumerate(ports):
        common = {"master_address": master_address, "master_port": int(port), "world_size": world_size}
        groups.append(
            TransferGroup(
                engine_index=index,
                master_address=master_address,
                master_port=int(port),
                world_size=world_size,
                trainer_rank=0,
                worker_ranks=tuple(range(1, world_size)),
                engine_init_info={**common, "rank_offset": 1, "packed": packed},
                trainer_init_info={**common, "packed": packed, "rank": 0},
            )
        )
    return groups


# ----------------------------------------------------------------------------- orchestration


class RayEngineClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol (base.py) for one Ray actor holding a ``vllm.LLM``.

    The actor exposes two methods (names configurable) that call
    ``NcclWeightSync.engine_init`` and ``NcclWeightSync.engine_update``. One
    update is a single actor call that runs start -> update -> finish -> reset
    prefix cache, so an engine is never left mid-update between two RPCs; the
    protocol's ``start_weight_update`` / ``finish_weight_update`` are therefore
    no-ops here. Every call is bounded by ``ray.get(timeout=...)``.
    """

    def __init__(
        self,
        handle: Any,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        init_method: str = "weight_sync_init",
        update_method: str = "weight_sync_update",
    ) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.init_method = init_method
        self.update_method = update_method

    def _call(self, step: str, method: str, *args: Any) -> None:
        import ray

        try:
            ray.get(getattr(self.handle, method).remote(*args), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as error:
            raise TimeoutError(
                f"weight sync step {step!r} on the engine actor did not finish within {self.timeout_s:g}s"
            ) from error

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._call("engine init_weight_transfer_engine", self.init_method, init_info)

    def start_weight_update(self) -> None:
        pass  # started inside the engine's update call

    def update_weights(self, update_info: Any) -> None:
        self._call("engine update_weights", self.update_method, update_info)

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None:
        pass  # finished inside the engine's update call


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
    """Drives one vLLM NCCL trainer engine per inference engine, from every learner rank.

    Uses vLLM's ``WeightTransferTrainerFactory`` and ``NCCLTrainerInitInfo``
    (nccl_engine.py). Rank 0 opens each group and broadcasts; other ranks hold
    no communicator but still iterate the source, since the ZeRO-3 gathers need
    them. Engines are served one after the other: each send re-gathers the
    model, because a ``WeightSource`` pass feeds exactly one group.
    """

    def __init__(
        self,
        groups: Sequence[TransferGroup],
        *,
        rank: int,
        clients: Optional[Sequence[Any]] = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if rank == 0 and (clients is None or len(clients) != len(groups)):
            raise ValueError("learner rank 0 needs one engine client per transfer group")
        self.groups = list(groups)
        self.rank = rank
        self.clients = list(clients) if rank == 0 else [_NoClient() for _ in self.groups]
        self.timeout_s = timeout_s
        self.engines: list[Any] = []

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

    @staticmethod
    def engine_close(llm: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        call_with_timeout("shutdown_weight_transfer_engine", llm.shutdown_weight_transfer_engine, timeout_s=timeout_s)

    # -------------------------------------------------------------- trainer side (every learner rank)
    def _trainer_init_info(self, group: TransferGroup):
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        info = {**group.trainer_init_info, "rank": self.rank}
        accepted = {f.name for f in dataclasses.fields(NCCLTrainerInitInfo)}
        if "packed" not in accepted:  # packed transfer is a newer vLLM option
            info.pop("packed", None)
        return NCCLTrainerInitInfo(**info)

    def connect(self, source: Zero3WeightSource) -> None:
        """Open every group; rank 0 also makes each engine join its group."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        if source.is_sender != (self.rank == 0):
            raise ValueError(f"source rank {source.rank} does not match learner rank {self.rank}")
        for group, client in zip(self.groups, self.clients):
            init_info = self._trainer_init_info(group)

            def init(init_info=init_info, client=client):
                return WeightTransferTrainerFactory.trainer_init(init_info, client=client, source=source)

            engine = call_with_timeout(
                f"trainer_init (engine {group.engine_index}, port {group.master_port})",
                _on_this_device(init),
                timeout_s=self.timeout_s,
            )
            self.engines.append(engine)

    def send(self) -> None:
        """Push the current weights to every engine (all learner ranks call this together)."""
        if len(self.engines) != len(self.groups):
            raise RuntimeError("NcclWeightSync.send() before connect()")
        for group, engine in zip(self.groups, self.engines):
            call_with_timeout(
                f"send_weights (engine {group.engine_index})",
                _on_this_device(engine.send_weights),
                timeout_s=self.timeout_s,
            )

    def close(self) -> None:
        """Destroy the trainer-side communicators (engines: ``engine_close``)."""
        for engine in self.engines:
            engine.shutdown()
        self.engines = []
