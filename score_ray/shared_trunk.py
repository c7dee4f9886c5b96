"""The reference served by the learner ranks themselves (learner.share_trunk, with ``trainable: top_layers``
under ZeRO-2): the blocks below the trained ones are frozen, so the base model is the policy's own trunk plus
copies of the top blocks taken before training. Each learner rank scores its share of the batch through them,
and keeps each row's trunk hidden states; the optimiser step then runs only the top blocks on them. The
hand-off is explicit: a reference pass numbers its rows, and ``train_step`` is told which row each sample is
(``trunk_rows``).
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

from score_ray.samples import PositionTemperatures


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
