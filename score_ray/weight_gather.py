"""Full weights out of a DeepSpeed ZeRO learner, one parameter at a time, for inference engines.

Under ZeRO-3 a rank holds only its partition of each parameter (``p.shape`` is empty; the
full shape is ``p.ds_shape``), so sending weights means gathering them, and the gather is a
collective every rank joins. ``GatheredWeights`` does that and nothing else: it needs torch
and DeepSpeed only (not vLLM or Ray), so it runs wherever a learner runs, and the GPU
benchmark checks it on a box without vLLM. ``score_ray.weight_sync_gpu`` presents it to
vLLM as a ``WeightSource``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any, Optional

import torch


class GatheredWeights:
    """Full weights of a DeepSpeed engine's module (ZeRO-3 or not), one parameter at a time.

    ``shapes()`` reports full shapes without gathering: ``ds_shape`` for a
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
                raise ValueError(f"{type(self).__name__}: no such parameters in the model: {unknown[:5]}")

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

    def shapes(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype sent, full shape) of every tensor, in iteration order, without gathering."""
        return [
            (name, self.dtype, tuple(tensor.ds_shape if hasattr(tensor, "ds_id") else tensor.shape))
            for name, tensor in self._selected()
        ]

    def __iter__(self) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
        import deepspeed

        wait_for_pending_writes()
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


def wait_for_pending_writes() -> None:
    """Let every kernel already queued on this device finish: the optimiser's last writes to the weights.

    The consumer may gather on a stream of its own (vLLM's NCCL sender packs and gathers inside its packing
    streams), which does not wait for the default stream the optimiser step ran on; and DeepSpeed synchronises
    the device after a step only from its second global step on (its throughput timer). Without this the first
    syncs could send half-written tensors.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
