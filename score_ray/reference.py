"""The frozen reference: the base model's log-probs, for the KL.

Served one of two ways:
- ``ReferenceActor``: a copy of the base model in an actor of its own (here);
- ``SharedTrunk`` (learner.share_trunk): the learner ranks score it through the trunk they share with the
  policy (score_ray.shared_trunk).
"""

from __future__ import annotations

import time
from typing import Any, Optional

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
