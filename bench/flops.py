"""Matrix-multiply FLOPs of each phase of a training iteration, to read measured phase times as a fraction of
what the cores can multiply (bench/eval_throughput.py measures that rate).

A decoder block costs 2 x (its weight-matrix parameters) FLOPs per token forward and twice that backward
(gradients of its input and of its weights); the frozen, tied LM head costs once more backward (its input's
gradient only). Attention's own products (2 x sequence x hidden per token and layer) are under 5% at these lengths and left
out, so the fractions are slight underestimates. The LM head runs only at the scored positions (the
sampled tokens), as score_ray.modeling.head_logprobs does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    block_params: int  # weight-matrix parameters of one decoder block (norms left out)
    layers: int
    head_params: int  # hidden x vocabulary


def meta_model(model_path: str):
    """A Hugging Face causal LM built on the meta device from its config: its shapes, no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))


def model_shape(model_path: str) -> ModelShape:
    model = meta_model(model_path)
    blocks = model.model.layers
    matrices = sum(p.numel() for p in blocks[0].parameters() if p.dim() == 2)
    return ModelShape(block_params=matrices, layers=len(blocks), head_params=model.get_output_embeddings().weight.numel())


def phase_flops(shape: ModelShape, sequence_tokens: float, scored_tokens: float, trained_layers: int,
                shared_trunk: bool) -> dict[str, float]:
    """FLOPs of the reference and learner phases for a batch of ``sequence_tokens`` tokens in all (prompts and
    responses), of which ``scored_tokens`` are sampled tokens, when the top ``trained_layers`` blocks train.

    Whole model: the reference runs every block and the head forward; the learner runs every block forward
    and the head and the trained blocks backward. Shared trunk: the reference phase runs the frozen blocks
    once plus the reference's top blocks and head; the learner runs only the trained blocks and the head,
    forward and backward, on the kept hidden states."""
    forward_per_block = 2 * shape.block_params * sequence_tokens
    head_forward = 2 * shape.head_params * scored_tokens
    everything_forward = shape.layers * forward_per_block + head_forward
    backward = 2 * trained_layers * forward_per_block + head_forward
    if shared_trunk:
        return {"reference": everything_forward,
                "learner": trained_layers * forward_per_block + head_forward + backward}
    return {"reference": everything_forward, "learner": everything_forward + backward}
