"""Weights leaving a learner rank: whole tensors from a DeepSpeed engine, on rank 0.

Under ZeRO-3 each parameter is partitioned: it is gathered on every rank (all must take part, in the same
order) and rank 0 keeps the full tensor. The object-store sync packs rank 0's trainable tensors into one
buffer (score_ray.weight_pack); ``save_hf`` writes them all as a Hugging Face folder.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional


def full_parameters(module, names: Optional[set[str]] = None) -> Iterator[tuple[str, Any]]:
    """Yield (name, full tensor) in model order; under ZeRO-3 every rank must iterate together."""
    import deepspeed

    for name, param in module.named_parameters():
        if names is not None and name not in names:
            continue
        if hasattr(param, "ds_id"):  # ZeRO-3 partitioned
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.detach().clone().contiguous()
        else:
            yield name, param.detach().contiguous()


def on_rank0(module, rank: int, names: Optional[set[str]] = None,
             dtype: Optional[str] = None) -> Optional[list[tuple[str, Any]]]:
    """(name, full tensor, in ``dtype`` or as trained) of ``names`` (all when None) on rank 0, None on the
    others (which still take part in the gathers)."""
    import torch

    pairs = []
    for name, tensor in full_parameters(module, names):
        if rank == 0:
            pairs.append((name, tensor if dtype is None else tensor.to(getattr(torch, dtype))))
    return pairs if rank == 0 else None


def packed_on_rank0(module, rank: int, names: set[str], dtype: str) -> Optional[tuple[Any, int]]:
    """Rank 0: (the (header, buffer) pack of ``names`` put in Ray's object store, its size in bytes); None
    elsewhere. Generators read it zero-copy, without a trip through the driver."""
    import ray

    from score_ray.weight_pack import pack_tensors

    pairs = on_rank0(module, rank, names, dtype)
    if pairs is None:
        return None
    header, buffer = pack_tensors(pairs)
    return ray.put((header, buffer)), int(buffer.nbytes)


def save_hf(module, rank: int, path: str) -> Optional[str]:
    """Write the whole model as a Hugging Face folder (rank 0 writes; every rank takes part)."""
    state = on_rank0(module, rank)
    if state is None:
        return None
    module.save_pretrained(path, state_dict={name: tensor.cpu() for name, tensor in state}, safe_serialization=True)
    return path
