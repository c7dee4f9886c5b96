"""The frozen reference: the base model's log-probs, for the KL.

Served one of two ways:
- ``ReferenceActor``: a copy of the base model in an actor of its own;
- ``SharedTrunk`` (learner.share_trunk, with ``trainable: top_layers`` under ZeRO-2): the blocks below the
  trained ones are frozen, so the base model is the policy's own trunk plus copies of the top blocks taken
  before training. Each learner rank scores its share of the batch through them, and keeps each row's trunk
  hidden states; the optimiser step then runs only the top blocks on them. The hand-off is explicit: a
  reference pass numbers its rows, and ``train_step`` is told which row each sample is (``trunk_rows``).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Optional, Sequence

import ray

from score_ray.config import ModelConfig
from score_ray.records import ReferenceLogprobs
from score_ray.samples import PositionTemperatures


@ray.remote
class ReferenceActor:
    """The frozen base model: per-token log-probs of both turns."""

    def __init__(self, model: ModelConfig, cpus: float = 1.0, chunk_tokens: Optional[int] = None):
        from score_ray.assets import model_folder
        from score_ray.modeling import load_causal_lm, set_torch_threads

        set_torch_threads(cpus)
        on_gpu = bool(ray.get_gpu_ids())
        self.model = load_causal_lm(model_folder(model), dtype=model.dtype if on_gpu else "float32",
                                    device="cuda" if on_gpu else "cpu")
        self.model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        self.chunk_tokens = chunk_tokens  # learner.logprob_chunk_tokens

    def ready(self) -> dict[str, Any]:
        from score_ray.placement import this_node

        return this_node()

    def sequence_logprobs(
        self, sequences: list[list[int]], select: Optional[list[list[float]]] = None,
        temperature: PositionTemperatures = 1.0,
    ) -> list[list[float]]:
        """Log-probs of every position, or only of the ``select``-ed ones (the rest 0), at ``temperature``
        (one, or each position's own)."""
        from score_ray.modeling import sequence_logprobs

        return sequence_logprobs(self.model, sequences, self.pad_id, select=select, temperature=temperature,
                                 chunk_tokens=self.chunk_tokens)

    def reference_logprobs(self, sequences: list[list[int]], select: list[list[float]],
                           temperature: PositionTemperatures = 1.0) -> ReferenceLogprobs:
        """``sequence_logprobs`` at the ``select``-ed positions, with the seconds they took here."""
        start = time.monotonic()
        logps = self.sequence_logprobs(sequences, select, temperature)
        return ReferenceLogprobs(logps, compute_seconds=time.monotonic() - start)


class SharedTrunk:
    """One learner rank's reference (learner.share_trunk): copies of the base model's top ``top_layers``
    blocks and final norm, taken from ``model`` before any checkpoint loads, and the trunk hidden states of
    the rows of the last reference pass."""

    def __init__(self, model, top_layers: int):
        from score_ray.modeling import check_splittable

        check_splittable(model)
        decoder = model.get_decoder()
        self.cut = max(0, len(decoder.layers) - top_layers)
        self.layers = copy.deepcopy(decoder.layers[self.cut:]).requires_grad_(False).eval()
        self.norm = copy.deepcopy(decoder.norm).requires_grad_(False).eval()
        self.kept: dict[int, Any] = {}  # row of the last reference pass -> its trunk hidden states [T, H]

    def to(self, device) -> "SharedTrunk":
        self.layers, self.norm = self.layers.to(device), self.norm.to(device)
        return self

    def forget(self) -> None:
        """Drop the kept rows (a reload: still right, the trunk is frozen, but nothing is handed over)."""
        self.kept = {}

    def reference_logprobs(self, module, sequences: Sequence[list[int]], rows: Sequence[int],
                           select: Sequence[list[float]], temperature: PositionTemperatures, pad_id: int,
                           max_tokens: int, chunk_tokens: Optional[int] = None) -> list[list[float]]:
        """The base model's log-probs of ``sequences`` (rows ``rows`` of this pass) at the ``select``-ed
        positions, from one pass through ``module``'s frozen trunk and the copies of the top blocks; each
        row's trunk is kept, replacing the last pass's."""
        import torch

        from score_ray.modeling import sequence_logprobs, top_logprobs, trunk_hidden

        self.kept = {}

        def score_batch(ids, mask, flags, batch, batch_temperature):
            trunk = trunk_hidden(module, ids, mask, self.cut)
            for index_in_batch, index in enumerate(batch):
                self.kept[rows[index]] = trunk[index_in_batch, : len(sequences[index])].clone()
            return top_logprobs(module, trunk, ids, mask, flags, self.layers, self.norm,
                                temperature=batch_temperature, chunk_tokens=chunk_tokens)[0]

        with torch.no_grad():
            return sequence_logprobs(module, sequences, pad_id, max_tokens=max_tokens, select=select,
                                     temperature=temperature, score_batch=score_batch)

    def holds(self, rows: Optional[Sequence[int]]) -> bool:
        return bool(rows) and all(row in self.kept for row in rows)

    def policy_logprobs(self, engine, rows: Sequence[int], ids, attention, select, temperature,
                        chunk_tokens: Optional[int] = None):
        """(the policy's log-probs with gradient, entropies) at ``select`` for the kept ``rows``: the policy's
        own top blocks on their trunks (the blocks below are frozen, so this is the whole model's answer)."""
        import torch

        from score_ray.modeling import top_logprobs

        kept = [self.kept[row] for row in rows]
        trunk = torch.zeros((*ids.shape, kept[0].shape[-1]), dtype=kept[0].dtype, device=ids.device)
        for index, hidden in enumerate(kept):
            trunk[index, : hidden.shape[0]] = hidden
        decoder = engine.module.get_decoder()
        return top_logprobs(engine, trunk, ids, attention, select, decoder.layers[self.cut:], decoder.norm,
                            with_entropy=True, temperature=temperature, chunk_tokens=chunk_tokens)
