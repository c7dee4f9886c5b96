"""Weights as one flat byte buffer plus a small header: the CPU weight sync's wire format.

Ray stores a numpy array in its shared-memory object store and hands readers a zero-copy view, so a
packed buffer costs one copy in (on learner rank 0) and none out (on the generator): the engine's
reload reads the tensors straight from shared memory. Offsets are aligned so every view is aligned
for its dtype.
"""

from __future__ import annotations

import warnings
from typing import Iterable

ALIGN = 64


def pack_tensors(tensors: Iterable[tuple[str, "object"]]) -> tuple[list[tuple[str, str, tuple, int, int]], "object"]:
    """(header, buffer) for (name, tensor) pairs: header rows are (name, dtype, shape, offset, nbytes)."""
    import numpy as np
    import torch

    items = [(name, tensor.detach().contiguous()) for name, tensor in tensors]
    header, offset = [], 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        header.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    buffer = np.empty(offset, dtype=np.uint8)
    target = torch.from_numpy(buffer)
    for (name, _, _, start, nbytes), (_, tensor) in zip(header, items):
        target[start : start + nbytes].copy_(tensor.cpu().reshape(-1).view(torch.uint8))
    return header, buffer


def unpack_tensors(header, buffer) -> list[tuple[str, "object"]]:
    """Tensors viewing ``buffer`` (no copy; a read-only buffer gives read-only views, which is fine to load from)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that a read-only numpy array gives a non-writable tensor
        flat = torch.from_numpy(buffer)
    return [
        (name, flat[start : start + nbytes].view(getattr(torch, dtype)).reshape(shape))
        for name, dtype, shape, start, nbytes in header
    ]
