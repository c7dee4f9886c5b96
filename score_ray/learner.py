"""LearnerGroup: N Ray actors forming one DeepSpeed ZeRO group, and the optimiser step they take.

Each rank sets the torch.distributed environment itself and joins the group with
``deepspeed.init_distributed`` (gloo on CPU, NCCL on GPU). A training step takes
token-level samples (``samples.LearnerSample``: ids, which tokens are trained,
advantages and KL coefficients per token, sampler and reference log-probs), splits
them into micro-batches bounded by tokens, and makes one optimiser step. Every rank runs the same number of
micro-batches (ZeRO-3 needs every rank in every forward), padding with empty ones.

Weights leave the group through rank 0 (score_ray.weight_export, score_ray.weight_sync). With
learner.share_trunk the ranks also serve the reference (score_ray.reference.SharedTrunk).

The group's rendezvous (torch's TCPStore, MASTER_ADDR / MASTER_PORT) lives on rank
0's node, read there once the placement group has put rank 0 somewhere: on a cluster
the driver runs on a CPU-only head where nothing listens. A rank that dies (its node
lost) fails the group's call at once with ``LearnerLost``; the trainer replaces the
group and reloads the last whole checkpoint (with NCCL weight sync it stops instead).
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import ray

from score_ray import algo
from score_ray.actor_calls import call_ranks, gather
from score_ray.config import AlgoConfig, LearnerConfig, ModelConfig
from score_ray.placement import kill_actors
from score_ray.records import SUMMED_STEP_FIELDS, ReferenceLogprobs, StepStats
from score_ray.reference import SharedTrunk
from score_ray.samples import POSITION_FIELDS, LearnerSample, PositionTemperatures


def trainable_names(model, mode: str, top_layers: int) -> set[str]:
    """Names of the parameters a learner trains: all, or the last ``top_layers`` blocks + final norm."""
    names = [name for name, _ in model.named_parameters()]
    if mode == "all":
        return set(names)
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


@ray.remote
class LearnerWorker:
    """One DeepSpeed rank. Built in two steps: the actor starts (``__init__``, cheap), rank 0 names
    the rendezvous on its own node (``rendezvous``), then every rank joins it (``setup``)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        model: ModelConfig,
        learner: LearnerConfig,
        algo_config: AlgoConfig,
        seed: int,
    ):
        self.rank, self.world_size = rank, world_size
        self.model_config = model
        self.seed, self.dtype = seed, model.dtype
        self.learner, self.algo_config = learner, algo_config

    def rendezvous(self) -> tuple[str, int]:
        """(this node's address, a port free on it): where the group's TCPStore will listen (rank 0)."""
        from score_ray.placement import free_ports

        return ray.util.get_node_ip_address(), free_ports(1)[0]

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        """Join the process group at rank 0's address, load the model, build the DeepSpeed engine."""
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            # Ray gives each rank its own GPU(s) through CUDA_VISIBLE_DEVICES: the first visible one is ours.
            LOCAL_RANK="0",
        )
        from score_ray.assets import model_folder, torch_extensions_dir

        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
        import deepspeed
        import torch

        from score_ray.modeling import load_causal_lm, set_torch_threads
        from score_ray.placement import this_node

        learner, dtype = self.learner, self.dtype
        self.on_gpu = bool(ray.get_gpu_ids())
        set_torch_threads(learner.cpus_per_rank)
        torch.manual_seed(self.seed)
        deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo")
        model_path = model_folder(self.model_config)  # on this node: the driver's paths may not exist here
        model = load_causal_lm(model_path, dtype="float32" if not self.on_gpu else dtype)
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        keep = trainable_names(model, learner.trainable, learner.trainable_top_layers)
        for name, param in model.named_parameters():
            param.requires_grad_(name in keep)
        self.trainable = [name for name, param in model.named_parameters() if param.requires_grad]
        if learner.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        config = deepspeed_config(learner, bf16=self.on_gpu and dtype == "bfloat16")
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=learner.lr, weight_decay=learner.weight_decay
        )
        # taken from the base weights before any checkpoint loads (score_ray.reference)
        self.shared_trunk = SharedTrunk(model, learner.trainable_top_layers) if learner.shares_trunk else None
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        if self.shared_trunk is not None:
            self.shared_trunk.to(self.engine.device)
        return {**this_node(), "rank": self.rank, "gpus": [str(g) for g in ray.get_gpu_ids()]}

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
            from score_ray.rollout import is_out_of_memory

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

    def sequence_logprobs(self, sequences: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        from score_ray.modeling import sequence_logprobs

        self.engine.eval()
        return sequence_logprobs(self.engine, sequences, self.pad_id, temperature=temperature)

    def publish_weights(self, dtype: str = "float32") -> Optional[tuple[list, int, float]]:
        """Rank 0 packs the trainable weights into one buffer in the object store and returns ([ref], bytes,
        seconds); None on the others (score_ray.weight_export)."""
        from score_ray.weight_export import packed_on_rank0

        start = time.monotonic()
        packed = packed_on_rank0(self.engine.module, self.rank, set(self.trainable), dtype)
        if packed is None:
            return None
        return [packed[0]], packed[1], time.monotonic() - start

    def transfer_endpoints(self, count: int) -> tuple[str, list[int]]:
        """(this node's address, ``count`` ports free on it) for the NCCL transfer groups rank 0 hosts."""
        from score_ray.placement import free_ports

        return ray.util.get_node_ip_address(), free_ports(count)

    def nccl_connect(self, groups: list, generators: list, dtype: str) -> None:
        """GPU: join one vLLM NCCL transfer group per engine (rank 0 sends; every rank gathers)."""
        import torch

        from score_ray.weight_sync_gpu import NcclWeightSync, RayEngineClient, Zero3WeightSource

        source = Zero3WeightSource(self.engine, getattr(torch, dtype), rank=self.rank, names=set(self.trainable))
        clients = [RayEngineClient(handle) for handle in generators] if self.rank == 0 else None
        self.nccl = NcclWeightSync(groups, rank=self.rank, clients=clients)
        self.nccl.connect(source)

    def nccl_send(self) -> None:
        self.nccl.send()

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


def deal_to_ranks(lengths: Sequence[int], ranks: int) -> list[list[int]]:
    """Indices per rank, balanced by tokens: longest first to the least-loaded rank."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    shares: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0] * ranks
    for index in order:
        target = loads.index(min(loads))
        shares[target].append(index)
        loads[target] += lengths[index]
    return shares


def micro_batch_indices(lengths: Sequence[int], ranks: int, max_tokens: int,
                        shares: Optional[list[list[int]]] = None) -> list[list[list[int]]]:
    """Per rank, its micro-batches as indices into ``lengths``: the sequences dealt to ranks (balanced by
    tokens, or as ``shares`` says), each rank's share cut into token-bounded micro-batches, every rank padded
    with empty ones to the same count."""
    from score_ray.modeling import token_budget_batches

    shares = shares if shares is not None else deal_to_ranks(lengths, ranks)
    per_rank = []
    for share in shares:
        batches = token_budget_batches([lengths[i] for i in share], max_tokens)
        per_rank.append([[share[i] for i in batch] for batch in batches])
    count = max(1, max(len(batches) for batches in per_rank))
    return [batches + [[]] * (count - len(batches)) for batches in per_rank]


def deal_by_trunk(trunk_shares: Optional[list[list[int]]], trunk_rows: Sequence[int]) -> Optional[list[list[int]]]:
    """Sample indices per rank when sample i is row ``trunk_rows[i]`` of a reference pass whose rows each rank
    kept as ``trunk_shares`` says: each sample to the rank that kept its row, in that rank's order. None when
    nothing is kept or a row is not one of that pass's (the step then runs the whole model)."""
    if trunk_shares is None:
        return None
    sample_of = {row: index for index, row in enumerate(trunk_rows)}
    deal = [[sample_of[row] for row in rows if row in sample_of] for rows in trunk_shares]
    return deal if sum(len(share) for share in deal) == len(trunk_rows) else None


class LearnerGroup:
    """Places N learner ranks (a placement group with a timeout) and drives them together."""

    def __init__(self, model: ModelConfig, learner: LearnerConfig, algo_config: AlgoConfig, seed: int, timeout_s: float):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {**learner.resources, "CPU": learner.cpus_per_rank}
        if learner.gpus_per_rank:
            bundle["GPU"] = learner.gpus_per_rank
        self.group = placement_group([dict(bundle) for _ in range(learner.num_ranks)], strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=timeout_s)
        if not ready:
            ray.util.remove_placement_group(self.group)
            raise RuntimeError(
                f"the cluster could not place {learner.num_ranks} learner ranks of {bundle} within {timeout_s:.0f}s "
                f"(available: {ray.available_resources()}); lower learner.num_ranks / cpus_per_rank / gpus_per_rank, "
                "or raise cluster.resource_timeout_s while the cluster adds nodes"
            )
        self.workers = [
            LearnerWorker.options(
                num_cpus=learner.cpus_per_rank,
                num_gpus=learner.gpus_per_rank,
                resources=dict(learner.resources),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
            ).remote(rank, learner.num_ranks, model, learner, algo_config, seed)
            for rank in range(learner.num_ranks)
        ]
        try:
            # The TCPStore listens on rank 0's node, not the driver's (a CPU-only head on a cluster).
            address, port = gather([self.workers[0].rendezvous.remote()])[0]
            self.nodes = call_ranks(self.workers, "setup", address, port)
        except BaseException:
            self.shutdown()  # a half-built group must not hold its placement
            raise
        self.max_tokens = learner.micro_batch_tokens
        self.trunk_shares: Optional[list[list[int]]] = None  # rows each rank kept in the last reference pass

    def train_step(self, samples: Sequence[LearnerSample], off_policy: bool = False,
                   trunk_rows: Optional[Sequence[int]] = None) -> StepStats:
        """One optimiser step on the whole batch; ``applied`` is False when DeepSpeed skipped it (non-finite).

        ``trunk_rows[i]``: the row of the last ``reference_logprobs`` pass that scored sample i's sequence
        (learner.share_trunk). Each sample then goes to the rank that kept its trunk, which runs only the top
        blocks on it; without them (or when they are not all that pass's rows) every rank runs the whole model."""
        deal = deal_by_trunk(self.trunk_shares, trunk_rows) if trunk_rows is not None else None
        per_rank = micro_batch_indices([len(s.input_ids) for s in samples], len(self.workers), self.max_tokens, deal)
        batches = [[[samples[i] for i in batch] for batch in rank_batches] for rank_batches in per_rank]
        rows = ([[[trunk_rows[i] for i in batch] for batch in rank_batches] for rank_batches in per_rank]
                if deal is not None else [None] * len(per_rank))
        total = int(sum(sum(s.loss_mask) for s in samples))
        results = call_ranks(self.workers, "train_step",
                             per_rank=[(mine, total, off_policy, kept) for mine, kept in zip(batches, rows)])
        return StepStats.of_ranks(results, micro_batches=len(per_rank[0]))

    def publish_weights(self, dtype: str = "float32") -> tuple[Any, int, float]:
        """(ObjectRef of rank 0's packed trainable weights, their size in bytes, seconds spent building them)."""
        published = call_ranks(self.workers, "publish_weights", dtype)[0]
        return published[0][0], published[1], published[2]

    def connect_nccl(self, generators: list, tensor_parallel_size: int, dtype: str, buffer_bytes: int) -> None:
        """GPU: one vLLM NCCL transfer group per engine, each on its own port (score_ray.weight_sync_gpu)."""
        from score_ray.weight_sync_gpu import transfer_layout

        # Rank 0 hosts every group's TCPStore: its address, and ports free on its node.
        address, ports = gather([self.workers[0].transfer_endpoints.remote(len(generators))])[0]
        groups = transfer_layout(len(generators), tensor_parallel_size, address, ports, buffer_bytes=buffer_bytes)
        call_ranks(self.workers, "nccl_connect", groups, generators, dtype)

    def send_nccl(self) -> None:
        call_ranks(self.workers, "nccl_send")

    def reference_logprobs(self, sequences: list[list[int]], select: list[list[float]],
                           temperature: PositionTemperatures = 1.0) -> ReferenceLogprobs:
        """The reference's log-probs from the ranks' shared trunk (learner.share_trunk), in the order given:
        sequence i is row i of this pass, scored (and its trunk kept) by the rank it is dealt to."""
        shares = deal_to_ranks([len(s) for s in sequences], len(self.workers))
        per_position = not isinstance(temperature, (int, float))
        results = call_ranks(self.workers, "reference_logprobs", per_rank=[(
            [sequences[i] for i in share], share, [select[i] for i in share],
            [temperature[i] for i in share] if per_position else temperature,
        ) for share in shares])
        self.trunk_shares = shares
        merged: list[list[float]] = [[] for _ in sequences]
        for share, result in zip(shares, results):
            for index, logp in zip(share, result.logps):
                merged[index] = logp
        return ReferenceLogprobs(merged, compute_seconds=max(result.compute_seconds for result in results),
                                 trunk_rows=list(range(len(sequences))))

    def sequence_logprobs(self, sequences: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        # Every rank must join a ZeRO-3 forward; rank 0's answer is kept.
        return call_ranks(self.workers, "sequence_logprobs", sequences, temperature)[0]

    def save_hf(self, path: str) -> None:
        call_ranks(self.workers, "save_hf", path)

    def save_checkpoint(self, folder: str, tag: str) -> None:
        call_ranks(self.workers, "save_checkpoint", folder, tag)

    def load_checkpoint(self, folder: str, tag: str) -> None:
        self.trunk_shares = None  # the ranks forget what they kept: nothing to hand over
        call_ranks(self.workers, "load_checkpoint", folder, tag)

    def shutdown(self) -> None:
        """Kill every rank (survivors of a lost one may be blocked in a collective) and free the placement."""
        kill_actors(self.workers)
        try:
            ray.util.remove_placement_group(self.group)
        except Exception:  # noqa: BLE001 - removed already
            pass
