"""Token log-probs of causal LMs, shared by the learner and the reference.

Sequences are lists of token ids; ``logp[t]`` is log p(token t | tokens < t), so a
sequence of n tokens has n - 1 log-probs (position 0 has none). Log-probs are taken
at the sampling temperature (logits / T) with no truncation: the distribution vLLM
samples from and reports with ``logprobs_mode="processed_logprobs"``. Scoring at
T = 1 while sampling at T = 0.7 would compare different distributions (a KL that is
not zero at step 0, a PPO ratio that is not 1 on-policy). A temperature is one number for every
position, or a tensor [B, T - 1] of each position's own (rollout.temperature_turn1 samples the first
attempt hotter than the second, so one sequence holds tokens of two temperatures).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

# one temperature for every position, or each position's own: [B, T - 1], aligned with the log-probs
Temperature = Union[float, torch.Tensor]


def set_torch_threads(cpus: float) -> None:
    """torch's intra-op threads for an actor given ``cpus`` (at least one)."""
    torch.set_num_threads(max(1, int(cpus)))


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def pad_positions(rows: Sequence[Sequence[float]], width: int, fill: float = 0.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sequence values of the log-prob positions, right-padded with ``fill`` to [len(rows), width]."""
    tensor = torch.full((len(rows), width), fill, dtype=dtype)
    for row, values in enumerate(rows):
        tensor[row, : len(values)] = torch.tensor(list(values), dtype=torch.float32).to(dtype)
    return tensor


def batch_token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_entropy: bool = False,
    temperature: Temperature = 1.0,
):
    """[B, T-1] log-probs of each next token (and the full-distribution entropy when asked)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    logits = logits / (temperature.unsqueeze(-1) if torch.is_tensor(temperature) else temperature)
    # gather - logsumexp avoids materialising a second [B, T, vocab] tensor when no entropy is needed
    normaliser = torch.logsumexp(logits, dim=-1)
    taken = logits.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1) - normaliser
    if not with_entropy:
        return taken, None
    with torch.no_grad():  # a statistic, not part of the objective
        log_probs = logits - normaliser.unsqueeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return taken, entropy


def selected_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor,
                            with_entropy: bool = False, temperature: Temperature = 1.0,
                            chunk_tokens: Optional[int] = None):
    """Log-probs (and entropies) only at positions where ``select`` [B, T-1] is set, flattened in row order.

    The LM head over a 49k-token vocabulary costs more than the transformer body for small models;
    prompts need no log-probs, so the head runs on the trained positions only.

    ``model`` may be a DeepSpeed engine: the forward then goes through the engine, whose bookkeeping
    (ZeRO-3 counts micro-steps there to accumulate gradients) a direct call of the module would skip.
    """
    hidden = final_hidden(model, input_ids=input_ids, attention_mask=attention_mask)
    return head_logprobs(model, hidden, input_ids, select, with_entropy, temperature, chunk_tokens)


def final_hidden(model, **inputs) -> torch.Tensor:
    """The decoder's normed last hidden states [B, T, H] from the model's own forward (an engine's forward
    when ``model`` is one), caught at the final norm; the model's head runs on one position only."""
    caught: list[torch.Tensor] = []
    handle = model.get_decoder().norm.register_forward_hook(lambda module, args, output: caught.append(output))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return caught[-1]


def head_logprobs(model, hidden: torch.Tensor, input_ids: torch.Tensor, select: torch.Tensor,
                  with_entropy: bool = False, temperature: Temperature = 1.0, chunk_tokens: Optional[int] = None):
    """The LM head at the ``select``-ed positions of the final (normed) hidden states [B, T, H].

    Each selected token's logits span the whole vocabulary (151,936 floats for Qwen2.5), and about four such
    [tokens, vocab] tensors are alive at once. With ``chunk_tokens`` (learner.logprob_chunk_tokens) at most
    that many tokens' logits exist at a time: each chunk's are freed once its log-probs are taken and, when a
    gradient is needed, computed again in the backward pass (activation checkpointing of the head), so peak
    memory stays flat however many tokens a micro-batch selects. Each token's values are its own row's, so
    chunks change nothing but memory."""
    chosen = select.bool()
    if torch.is_tensor(temperature):
        temperature = temperature.to(hidden.device)[chosen].unsqueeze(-1)
    states = hidden[:, :-1][chosen]
    targets = input_ids[:, 1:][chosen]
    head = model.get_output_embeddings()
    count = states.shape[0]
    if chunk_tokens is None or count <= chunk_tokens:
        return _head_chunk(head, states, targets, temperature, with_entropy)
    from torch.utils.checkpoint import checkpoint

    taken, entropies = [], []
    for start in range(0, count, chunk_tokens):
        part = slice(start, start + chunk_tokens)
        part_temperature = temperature[part] if torch.is_tensor(temperature) else temperature
        args = (head, states[part], targets[part], part_temperature, with_entropy)
        if torch.is_grad_enabled() and states.requires_grad:
            piece, entropy = checkpoint(_head_chunk, *args, use_reentrant=False)
        else:
            piece, entropy = _head_chunk(*args)
        taken.append(piece)
        entropies.append(entropy)
    return torch.cat(taken), torch.cat(entropies) if with_entropy else None


def _head_chunk(head, states: torch.Tensor, targets: torch.Tensor, temperature: Temperature, with_entropy: bool):
    """(log-probs of ``targets``, entropies or None) of the head's distributions at ``states`` [N, H]."""
    logits = head(states).float() / temperature
    normaliser = torch.logsumexp(logits, dim=-1)
    taken = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
    if not with_entropy:
        return taken, None
    with torch.no_grad():  # a statistic, not part of the objective
        log_probs = logits - normaliser.unsqueeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return taken, entropy


# ---------------------------------------------------------------- a decoder split at a layer
# With trainable=top_layers the policy and the frozen reference share every block below the cut (and the
# embedding): one pass through that trunk serves both, and only the blocks above it run twice
# (score_ray.learner, learner.share_trunk). The split runs the model's own forward with other blocks in
# place, so masks and rotary positions are built exactly as in the whole pass (a test checks the two
# agree); it relies on the decoder keeping its blocks in ``layers`` and its final norm in ``norm``, on
# embeddings passed in unscaled, and on one attention mask for every block (``check_splittable``).
SPLITTABLE_MODEL_TYPES = ("llama", "qwen2")  # SmolLM2 is a llama; Gemma scales embeddings, so it is not


def check_splittable(model) -> None:
    """Refuse, naming the setting, a model whose decoder the split would compute wrongly."""
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or ["one"])
    if config.model_type not in SPLITTABLE_MODEL_TYPES or len(kinds) > 1:
        raise ValueError(
            f"learner.share_trunk: a {config.model_type} model with attention kinds {sorted(kinds)} cannot be split "
            f"at a layer (supported: {', '.join(SPLITTABLE_MODEL_TYPES)} with one attention kind); set "
            "learner.share_trunk=false to score the reference with a reference actor"
        )


@contextmanager
def decoder_blocks(model, layers: torch.nn.ModuleList, norm: torch.nn.Module):
    """The model's decoder runs ``layers`` and ends with ``norm`` inside the block."""
    decoder = model.get_decoder()
    saved = decoder.layers, decoder.norm
    decoder.layers, decoder.norm = layers, norm
    try:
        yield
    finally:
        decoder.layers, decoder.norm = saved


def trunk_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cut: int) -> torch.Tensor:
    """[B, T, H] hidden states entering block ``cut`` (the embedding and blocks below it; no final norm)."""
    decoder = model.get_decoder()
    with decoder_blocks(model, decoder.layers[:cut], torch.nn.Identity()):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def top_logprobs(model, trunk: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 select: torch.Tensor, layers: torch.nn.ModuleList, norm: torch.nn.Module,
                 with_entropy: bool = False, temperature: Temperature = 1.0, chunk_tokens: Optional[int] = None):
    """``selected_token_logprobs`` from the trunk's hidden states through ``layers`` and ``norm`` (the model's
    own top blocks, or the reference's copies of them). ``model`` may be a DeepSpeed engine (see above)."""
    with decoder_blocks(model, layers, norm):
        hidden = final_hidden(model, inputs_embeds=trunk, attention_mask=attention_mask)
    return head_logprobs(model, hidden, input_ids, select, with_entropy, temperature, chunk_tokens)


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> Iterator[list[int]]:
    """Group sequence indices (longest first) so each batch's padded size stays within max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for index in order:
        width = max([lengths[i] for i in batch] + [lengths[index]])
        if batch and width * (len(batch) + 1) > max_tokens:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


@torch.no_grad()
def sequence_logprobs(
    model,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    max_tokens: int = 8192,
    select: Optional[Sequence[Sequence[float]]] = None,
    temperature: Union[float, Sequence[Sequence[float]]] = 1.0,
    score_batch: Optional[Callable[..., torch.Tensor]] = None,
    chunk_tokens: Optional[int] = None,
) -> list[list[float]]:
    """Per-sequence lists of next-token log-probs (len n - 1), computed in token-bounded batches.

    With ``select`` (per sequence, n - 1 flags) only flagged positions are computed; the others are 0.
    ``temperature`` is one number, or per sequence its n - 1 positions' own (``position_temperatures``).
    ``score_batch(ids, mask, flags, batch, temperature)`` computes them for one padded batch (``batch``: the
    sequences' indices) in place of the whole model's forward (the learner's shared trunk). ``chunk_tokens``
    bounds the selected tokens whose logits exist at once (``head_logprobs``).
    """
    device = next(model.parameters()).device
    result: list[list[float]] = [[] for _ in sequences]
    for batch in token_budget_batches([len(s) for s in sequences], max_tokens):
        ids, mask = pad_batch([sequences[i] for i in batch], pad_id, device)
        batch_temperature = temperature
        if not isinstance(temperature, (int, float)):  # unscored padding at 1: no division by 0
            batch_temperature = pad_positions([temperature[i] for i in batch], ids.shape[1] - 1, 1.0).to(device)
        if select is None:
            logp, _ = batch_token_logprobs(model, ids, mask, temperature=batch_temperature)
            for row, index in enumerate(batch):
                result[index] = logp[row, : len(sequences[index]) - 1].tolist()
            continue
        flags = pad_positions([select[i] for i in batch], ids.shape[1] - 1, dtype=torch.bool)
        if score_batch is None:
            chosen, _ = selected_token_logprobs(model, ids, mask, flags.to(device), temperature=batch_temperature,
                                                chunk_tokens=chunk_tokens)
        else:
            chosen = score_batch(ids, mask, flags.to(device), batch, batch_temperature)
        chosen = chosen.tolist()
        cursor = 0
        for row, index in enumerate(batch):
            values = [0.0] * (len(sequences[index]) - 1)
            for position in flags[row].nonzero().flatten().tolist():
                values[position] = chosen[cursor]
                cursor += 1
            result[index] = values
    return result
