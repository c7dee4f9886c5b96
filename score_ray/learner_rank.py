"""One DeepSpeed ZeRO rank of the learner: its model, optimiser and step, and its share of the reference.

No Ray and no vLLM here (torch, transformers and DeepSpeed only): the Ray actor ``score_ray.learner.LearnerWorker``
is a ``LearnerRank`` plus the group's rendezvous and the weight sync, and ``bench/gpu/learner_gpu.py`` drives the
same class on a GPU box that has neither.

A training step takes token-level samples (``samples.LearnerSample``: ids, which tokens are trained, advantages
and KL coefficients per token, sampler and reference log-probs) already cut into micro-batches
(``score_ray.learner.micro_batch_indices``) and makes one optimiser step over them.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from score_ray import algo
from score_ray.config import AlgoConfig, LearnerConfig
from score_ray.records import SUMMED_STEP_FIELDS, ReferenceLogprobs, StepStats
from score_ray.samples import POSITION_FIELDS, LearnerSample, PositionTemperatures
from score_ray.shared_trunk import SharedTrunk


def trainable_names(model, mode: str, top_layers: int) -> set[str]:
    """Names of the parameters a learner trains: all, the last ``top_layers`` blocks + final norm, or a LoRA
    adapter's (the model already wrapped by score_ray.lora.with_adapter)."""
    from score_ray.lora import is_adapter_parameter

    names = [name for name, _ in model.named_parameters()]
    if mode == "all":
        return set(names)
    if mode == "lora":
        return {name for name in names if is_adapter_parameter(name)}
    layers = model.config.num_hidden_layers
    keep = {f".layers.{index}." for index in range(max(0, layers - top_layers), layers)}
    return {name for name in names if any(tag in name for tag in keep) or name.endswith("model.norm.weight")}


def deepspeed_config(learner: LearnerConfig, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed engine's config. Gradients accumulate over a step's micro-batches in fp32 whatever the
    weights' dtype: DeepSpeed's default is the weights' dtype, and a bf16 sum of many micro-batches loses the
    small ones (its ZeRO-1/2/3 optimisers keep a separate fp32 buffer when the two differ)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # set per step: the micro-batch count varies (train_step)
        "gradient_clipping": learner.grad_clip,
        "zero_optimization": {"stage": learner.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "data_types": {"grad_accum_dtype": "fp32"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def collate(samples: Sequence[LearnerSample], pad_id: int):
    """Right-padded tensors: ids, attention mask and per-token training fields aligned to logp[t-1]. No
    samples give one row of two pad tokens, nothing trained: an empty micro-batch still joins the forward
    (ZeRO-3 gathers parameters in it)."""
    import torch

    from score_ray.modeling import pad_batch, pad_positions

    if samples:
        ids, attention = pad_batch([s.input_ids for s in samples], pad_id)
    else:
        ids = torch.full((1, 2), pad_id, dtype=torch.long)
        attention = torch.ones_like(ids)
    rows = [[getattr(s, name) for s in samples] or [[]] for name in POSITION_FIELDS]
    # padding is never trained; its temperature is 1 so that dividing logits by it stays finite
    fields = {name: pad_positions(values, ids.shape[1] - 1, 1.0 if name == "temperature" else 0.0)
              for name, values in zip(POSITION_FIELDS, rows)}
    return ids, attention, fields


class LearnerRank:
    """One rank. Built in two steps: ``__init__`` (cheap: settings only), then ``build`` once this process
    has joined the group's torch.distributed process group (``deepspeed.init_distributed``)."""

    def __init__(self, rank: int, world_size: int, learner: LearnerConfig, algo_config: AlgoConfig):
        self.rank, self.world_size = rank, world_size
        self.learner, self.algo_config = learner, algo_config

    def build(self, model, bf16: bool) -> None:
        """Wrap ``model`` (loaded in the dtype it trains in, on the CPU or this rank's GPU) in a DeepSpeed
        engine with its optimiser; with learner.share_trunk, copy the reference's top blocks first."""
        import deepspeed
        import torch

        learner = self.learner
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        if learner.trainable == "lora":
            from score_ray.lora import with_adapter

            model = with_adapter(model, learner.lora)
        keep = trainable_names(model, learner.trainable, learner.trainable_top_layers)
        for name, param in model.named_parameters():
            param.requires_grad_(name in keep)
        self.trainable = [name for name, param in model.named_parameters() if param.requires_grad]
        if learner.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=learner.lr, weight_decay=learner.weight_decay
        )
        # taken from the base weights before any checkpoint loads (score_ray.shared_trunk)
        self.shared_trunk = SharedTrunk(model, learner.trainable_top_layers) if learner.shares_trunk else None
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(learner, bf16=bf16))
        if self.shared_trunk is not None:
            self.shared_trunk.to(self.engine.device)

    # ------------------------------------------------------------------ training
    def train_step(
        self, micro_batches: list[list[LearnerSample]], total_tokens: int, off_policy: bool = False,
        trunk_rows: Optional[list[list[int]]] = None,
    ) -> StepStats:
        """One optimiser step over this rank's micro-batches (all ranks get the same count).

        Each micro-batch's loss is (sum over its trained tokens) / (trained tokens on ALL ranks),
        multiplied by world size and micro-batch count to undo DeepSpeed's averaging over ranks
        and gradient accumulation: the step follows the mean token loss of the whole batch.

        A non-finite gradient norm makes DeepSpeed's ZeRO optimiser drop the step (weights and
        optimiser state untouched); ``applied`` reports it so the trainer can count and stop.
        ``trunk_rows``: per micro-batch, the reference pass's row of each sample (learner.share_trunk).
        """
        try:
            return self._train_step(micro_batches, total_tokens, off_policy, trunk_rows)
        except Exception as err:  # noqa: BLE001 - an OOM is re-raised with the settings that bound memory
            from score_ray.faults import is_out_of_memory

            if is_out_of_memory(err):
                raise RuntimeError(
                    f"learner rank {self.rank} ran out of memory ({str(err)[:300]}); lower learner.micro_batch_tokens, "
                    "set learner.gradient_checkpointing=true, or shard more (learner.zero_stage=3, more learner.num_ranks)"
                ) from err
            raise

    def _train_step(self, micro_batches: list[list[LearnerSample]], total_tokens: int, off_policy: bool,
                    trunk_rows: Optional[list[list[int]]]) -> StepStats:
        import torch

        start = time.monotonic()
        count = len(micro_batches)
        self.engine.set_train_batch_size(count * self.world_size)  # gradient accumulation = count
        self.engine.train()
        sums = dict.fromkeys(SUMMED_STEP_FIELDS, 0.0)
        scale = self.world_size * count / max(1, total_tokens)
        for index, batch in enumerate(micro_batches):
            # The step lands after the LAST micro-batch. DeepSpeed's own boundary counts micro-steps since
            # the engine started, so once the count changed between steps it fell mid-batch: half a
            # batch stepped, the rest leaked into the next step, reported as a skipped step.
            self.engine.set_gradient_accumulation_boundary(index == count - 1)
            ids, attention, fields = collate(batch, self.pad_id)
            device = self.engine.device
            select = fields["loss_mask"] > 0
            if not bool(select.any()):
                select[0, 0] = True  # keep the forward (ZeRO-3 gathers happen in it); its loss weight is 0
            # Only trained tokens go through the LM head; the fields are flattened the same way.
            # each position at its turn's sampling temperature (score_ray.modeling)
            temperature = fields["temperature"].to(device)
            rows = trunk_rows[index] if trunk_rows is not None else None
            logp, entropy, from_trunk = self._policy_logprobs(rows, ids.to(device), attention.to(device),
                                                              select.to(device), temperature)
            sums["trunk_batches"] += float(from_trunk)
            sums["filled_batches"] += float(bool(batch))
            fields = {k: v[select].to(device) for k, v in fields.items()}
            loss_sum, stats = algo.token_loss(
                logp,
                fields["old_logp"],
                fields["ref_logp"],
                fields["advantage"],
                fields["kl_coef"],
                fields["loss_mask"],
                policy_loss=self.algo_config.policy_loss,
                kl_estimator=self.algo_config.kl_estimator,
                kl_in_loss=self.algo_config.kl_in == "loss",
                clip_eps=self.algo_config.clip_eps,
                importance_cap=self.algo_config.importance_cap if off_policy else None,
            )
            self.engine.backward(loss_sum * scale)
            self.engine.step()  # a no-op but for the micro-step count until the boundary
            sums["loss"] += float(loss_sum.detach())
            for key in ("pg", "kl", "clipped"):
                sums[key] += stats[key]
            sums["entropy"] += float((entropy * fields["loss_mask"]).sum())
            sums["tokens"] += float(fields["loss_mask"].sum())
        return StepStats(**sums, compute_seconds=time.monotonic() - start,
                         grad_norm=float(self.engine.get_global_grad_norm() or 0.0),
                         applied=bool(self.engine.was_step_applied()), micro_batches=count)

    def _policy_logprobs(self, rows: Optional[list[int]], ids, attention, select, temperature):
        """(the policy's log-probs with gradient, entropies, whether they came from a kept trunk) at ``select``:
        the top blocks alone on the trunks this rank kept for ``rows`` in its reference pass, else the whole
        model."""
        from score_ray.modeling import selected_token_logprobs

        trunk = self.shared_trunk
        if trunk is not None and trunk.holds(rows):
            return (*trunk.policy_logprobs(self.engine, rows, ids, attention, select, temperature,
                                           self.learner.logprob_chunk_tokens), True)
        return (*selected_token_logprobs(self.engine, ids, attention, select, with_entropy=True,
                                         temperature=temperature, chunk_tokens=self.learner.logprob_chunk_tokens),
                False)

    # ------------------------------------------------------------------ log-probs and weights
    def reference_logprobs(self, sequences: list[list[int]], rows: list[int], select: list[list[float]],
                           temperature: PositionTemperatures = 1.0) -> ReferenceLogprobs:
        """The base model's log-probs of this rank's share (rows ``rows`` of the pass) through the shared trunk
        (learner.share_trunk); each row's trunk is kept for ``train_step``."""
        start = time.monotonic()
        self.engine.eval()
        logps = self.shared_trunk.reference_logprobs(self.engine.module, sequences, rows, select, temperature,
                                                     self.pad_id, self.learner.micro_batch_tokens,
                                                     self.learner.logprob_chunk_tokens)
        return ReferenceLogprobs(logps, compute_seconds=time.monotonic() - start)

    def adapter_off_logprobs(self, batches: Sequence[tuple[list[list[int]], list[list[float]], PositionTemperatures]]
                             ) -> ReferenceLogprobs:
        """trainable=lora: the reference's log-probs, the base weights with the adapter off, of this rank's
        micro-batches (sequences, their selected positions, temperatures), in order. Every rank is given the same
        number of micro-batches (ZeRO-3 gathers inside each forward); an empty one still runs a forward."""
        import torch

        from score_ray.modeling import sequence_logprobs

        start = time.monotonic()
        self.engine.eval()
        logps: list[list[float]] = []
        with torch.no_grad(), self.engine.module.disable_adapter():
            for sequences, select, temperature in batches:
                if not sequences:
                    pad = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.engine.device)
                    self.engine(input_ids=pad, attention_mask=torch.ones_like(pad), use_cache=False)
                    continue
                # one forward for the whole micro-batch, as the group cut it
                width = max(len(s) for s in sequences) * len(sequences)
                logps += sequence_logprobs(self.engine, sequences, self.pad_id, max_tokens=width, select=select,
                                           temperature=temperature, chunk_tokens=self.learner.logprob_chunk_tokens)
        return ReferenceLogprobs(logps, compute_seconds=time.monotonic() - start)

    def sequence_logprobs(self, sequences: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        from score_ray.modeling import sequence_logprobs

        self.engine.eval()
        return sequence_logprobs(self.engine, sequences, self.pad_id, temperature=temperature)

    def save_hf(self, path: str) -> Optional[str]:
        """Write the full model as a Hugging Face folder (rank 0 writes; all ranks take part)."""
        from score_ray.weight_export import save_hf

        return save_hf(self.engine.module, self.rank, path)

    def save_checkpoint(self, folder: str, tag: str) -> None:
        self.engine.save_checkpoint(folder, tag=tag)

    def load_checkpoint(self, folder: str, tag: str) -> None:
        if self.shared_trunk is not None:
            self.shared_trunk.forget()
        path, _ = self.engine.load_checkpoint(folder, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {folder}")
