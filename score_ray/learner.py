"""LearnerGroup: N Ray actors forming one DeepSpeed ZeRO group, and the frozen ReferenceActor.

Each rank sets the torch.distributed environment itself and joins the group with
``deepspeed.init_distributed`` (gloo on CPU, NCCL on GPU). A training step takes
token-level samples (``samples.LearnerSample``: ids, which tokens are trained,
advantages and KL coefficients per token, sampler and reference log-probs), splits
them into micro-batches bounded by tokens, and makes one optimiser step. Every rank runs the same number of
micro-batches (ZeRO-3 needs every rank in every forward), padding with empty ones.

Weights leave the group through rank 0 (score_ray.weight_sync): under ZeRO-3 each
parameter is gathered on every rank (all must take part) and rank 0 keeps the full
tensor.

The group's rendezvous (torch's TCPStore, MASTER_ADDR / MASTER_PORT) lives on rank
0's node, read there once the placement group has put rank 0 somewhere: on a cluster
the driver runs on a CPU-only head where nothing listens. A rank that dies (its node
lost) fails the group's call at once with ``LearnerLost``; the trainer replaces the
group and reloads the last whole checkpoint (with NCCL weight sync it stops instead).
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Optional, Sequence

import ray

from score_ray import algo
from score_ray.config import AlgoConfig, LearnerConfig, ModelConfig
from score_ray.faults import LearnerLost
from score_ray.placement import kill_actors
from score_ray.records import SUMMED_STEP_FIELDS, ReferenceLogprobs, StepStats
from score_ray.samples import POSITION_FIELDS, LearnerSample, PositionTemperatures


def gather(refs: list, role: str = "learner rank", grace_s: float = 60.0) -> list:
    """``ray.get`` of every ref, raising ``LearnerLost`` as soon as ONE actor died: the others may be
    blocked in a collective with the dead one and would never answer.

    A survivor's collective often fails (connection reset by the dead peer) before Ray reports the death
    itself; after such an error the other refs get ``grace_s`` to show whether a peer died, which makes the
    failure a ``LearnerLost``, before the error is raised as it is.
    """
    pending = {ref: index for index, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    first_error: Optional[BaseException] = None
    deadline = None
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
        if not done:  # grace over: no peer reported dead
            break
        index = pending.pop(done[0])
        try:
            results[index] = ray.get(done[0])
        except ray.exceptions.RayActorError as err:
            raise LearnerLost(f"{role} {index} died ({str(err).splitlines()[0][:240]})") from err
        except Exception as err:  # noqa: BLE001 - re-raised below unless a peer turns out dead
            if first_error is None:
                first_error, deadline = err, time.monotonic() + grace_s
    if first_error is not None:
        raise first_error
    return results


def _set_threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def trainable_names(model, mode: str, top_layers: int) -> set[str]:
    """Names of the parameters a learner trains: all, or the last ``top_layers`` blocks + final norm."""
    names = [name for name, _ in model.named_parameters()]
    if mode == "all":
        return set(names)
    layers = model.config.num_hidden_layers
    keep = {f".layers.{index}." for index in range(max(0, layers - top_layers), layers)}
    return {name for name in names if any(tag in name for tag in keep) or name.endswith("model.norm.weight")}


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
        self.learner, self.algo = learner, algo_config

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

        from score_ray.modeling import load_causal_lm
        from score_ray.placement import this_node

        learner, dtype = self.learner, self.dtype
        self.on_gpu = bool(ray.get_gpu_ids())
        _set_threads(learner.cpus_per_rank)
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
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": learner.grad_clip,
            "zero_optimization": {"stage": learner.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.on_gpu and dtype == "bfloat16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=learner.lr, weight_decay=learner.weight_decay
        )
        # The reference's copies of the blocks above the cut (and the final norm), taken from the base weights
        # before any checkpoint loads: the blocks below are frozen, so the base model is these on the trunk.
        self.cut, self.reference_top, self.trunk_cache = None, None, {}
        if learner.shares_trunk:
            from score_ray.modeling import check_splittable

            check_splittable(model)
            decoder = model.get_decoder()
            self.cut = max(0, len(decoder.layers) - learner.trainable_top_layers)
            self.reference_top = (copy.deepcopy(decoder.layers[self.cut:]).requires_grad_(False).eval(),
                                  copy.deepcopy(decoder.norm).requires_grad_(False).eval())
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        if self.reference_top is not None:
            self.reference_top = tuple(part.to(self.engine.device) for part in self.reference_top)
        return {**this_node(), "rank": self.rank, "gpus": [str(g) for g in ray.get_gpu_ids()]}

    # ------------------------------------------------------------------ training
    def train_step(
        self, micro_batches: list[list[LearnerSample]], total_tokens: int, off_policy: bool = False
    ) -> StepStats:
        """One optimiser step over this rank's micro-batches (all ranks get the same count).

        Each micro-batch's loss is (sum over its trained tokens) / (trained tokens on ALL ranks),
        multiplied by world size and micro-batch count to undo DeepSpeed's averaging over ranks
        and gradient accumulation: the step follows the mean token loss of the whole batch.

        A non-finite gradient norm makes DeepSpeed's ZeRO optimiser drop the step (weights and
        optimiser state untouched); ``applied`` reports it so the trainer can count and stop.
        """
        try:
            return self._train_step(micro_batches, total_tokens, off_policy)
        except Exception as err:  # noqa: BLE001 - an OOM is re-raised with the settings that bound memory
            from score_ray.rollout import is_out_of_memory

            if is_out_of_memory(err):
                raise RuntimeError(
                    f"learner rank {self.rank} ran out of memory ({str(err)[:300]}); lower learner.micro_batch_tokens, "
                    "set learner.gradient_checkpointing=true, or shard more (learner.zero_stage=3, more learner.num_ranks)"
                ) from err
            raise

    def _train_step(self, micro_batches: list[list[LearnerSample]], total_tokens: int, off_policy: bool) -> StepStats:
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
            logp, entropy, from_trunk = self._policy_logprobs(batch, ids.to(device), attention.to(device),
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
                policy_loss=self.algo.policy_loss,
                kl_estimator=self.algo.kl_estimator,
                kl_in_loss=self.algo.kl_in == "loss",
                clip_eps=self.algo.clip_eps,
                importance_cap=self.algo.importance_cap if off_policy else None,
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

    def _policy_logprobs(self, batch: list[LearnerSample], ids, attention, select, temperature):
        """(the policy's log-probs with gradient, entropies, whether they came from a kept trunk) at ``select``:
        from the trunk this rank kept for the batch's sequences in ``reference_logprobs`` (the top blocks
        alone), else the whole model."""
        import torch

        from score_ray.modeling import selected_token_logprobs, top_logprobs

        kept = [self.trunk_cache.get(tuple(sample.input_ids)) for sample in batch]
        if not batch or any(trunk is None for trunk in kept):
            return (*selected_token_logprobs(self.engine, ids, attention, select, with_entropy=True,
                                             temperature=temperature), False)
        trunk = torch.zeros((*ids.shape, kept[0].shape[-1]), dtype=kept[0].dtype, device=ids.device)
        for row, hidden in enumerate(kept):
            trunk[row, : hidden.shape[0]] = hidden
        decoder = self.engine.module.get_decoder()
        return (*top_logprobs(self.engine, trunk, ids, attention, select, decoder.layers[self.cut:], decoder.norm,
                              with_entropy=True, temperature=temperature), True)

    # ------------------------------------------------------------------ log-probs and weights
    def reference_logprobs(self, sequences: list[list[int]], select: list[list[float]],
                           temperature: PositionTemperatures = 1.0) -> ReferenceLogprobs:
        """The base model's log-probs at the ``select``-ed positions, from one pass through
        the frozen trunk and the reference's copies of the top blocks (learner.share_trunk). The trunk's
        hidden states are kept until the next call (every pass of the iteration's step can use them), and
        ``train_step`` then runs the top blocks only."""
        import torch

        from score_ray.modeling import sequence_logprobs, top_logprobs, trunk_hidden

        start = time.monotonic()
        self.engine.eval()
        module, (layers, norm) = self.engine.module, self.reference_top
        self.trunk_cache = {}

        def score_batch(ids, mask, flags, batch, batch_temperature):
            trunk = trunk_hidden(module, ids, mask, self.cut)
            for row, index in enumerate(batch):
                self.trunk_cache[tuple(sequences[index])] = trunk[row, : len(sequences[index])].clone()
            return top_logprobs(module, trunk, ids, mask, flags, layers, norm, temperature=batch_temperature)[0]

        with torch.no_grad():
            result = sequence_logprobs(module, sequences, self.pad_id, max_tokens=self.learner.micro_batch_tokens,
                                       select=select, temperature=temperature, score_batch=score_batch)
        return ReferenceLogprobs(result, compute_seconds=time.monotonic() - start)

    def sequence_logprobs(self, sequences: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        from score_ray.modeling import sequence_logprobs

        self.engine.eval()
        return sequence_logprobs(self.engine, sequences, self.pad_id, temperature=temperature)

    def _full_parameters(self, names: Optional[set[str]] = None):
        """Yield (name, full tensor) in model order; under ZeRO-3 every rank must iterate together."""
        import deepspeed

        for name, param in self.engine.module.named_parameters():
            if names is not None and name not in names:
                continue
            if hasattr(param, "ds_id"):  # ZeRO-3 partitioned
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    yield name, param.detach().clone().contiguous()
            else:
                yield name, param.detach().contiguous()

    def _trainable_on_rank0(self, dtype: str) -> Optional[list[tuple[str, Any]]]:
        """(name, full tensor in ``dtype``) of the trainable weights on rank 0, None elsewhere (every rank
        must call: ZeRO-3 gathers each parameter on all ranks)."""
        import torch

        pairs = []
        for name, tensor in self._full_parameters(set(self.trainable)):
            if self.rank == 0:
                pairs.append((name, tensor.to(getattr(torch, dtype))))
        return pairs if self.rank == 0 else None

    def publish_weights(self, dtype: str = "float32") -> Optional[tuple[list, int, float]]:
        """Rank 0 packs the trainable weights into one buffer in the object store (score_ray.weight_pack) and
        returns ([ref], bytes, seconds); generators read it zero-copy, without a trip through the driver."""
        from score_ray.weight_pack import pack_tensors

        start = time.monotonic()
        pairs = self._trainable_on_rank0(dtype)
        if pairs is None:
            return None
        header, buffer = pack_tensors(pairs)
        return [ray.put((header, buffer))], int(buffer.nbytes), time.monotonic() - start

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
        state = {}
        for name, tensor in self._full_parameters():
            if self.rank == 0:
                state[name] = tensor.cpu()
        if self.rank != 0:
            return None
        module = self.engine.module
        module.save_pretrained(path, state_dict=state, safe_serialization=True)
        return path

    def save_checkpoint(self, folder: str, tag: str) -> None:
        self.engine.save_checkpoint(folder, tag=tag)

    def load_checkpoint(self, folder: str, tag: str) -> None:
        self.trunk_cache = {}  # still right (the trunk is frozen), but a reload starts from nothing kept
        path, _ = self.engine.load_checkpoint(folder, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {folder}")


@ray.remote
class ReferenceActor:
    """The frozen base model: per-token log-probs of both turns."""

    def __init__(self, model: ModelConfig, cpus: float = 1.0):
        from score_ray.assets import model_folder
        from score_ray.modeling import load_causal_lm

        _set_threads(cpus)
        on_gpu = bool(ray.get_gpu_ids())
        model_path = model_folder(model)  # on this node
        self.model = load_causal_lm(model_path, dtype=model.dtype if on_gpu else "float32",
                                    device="cuda" if on_gpu else "cpu")
        self.model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0

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

        return sequence_logprobs(self.model, sequences, self.pad_id, select=select, temperature=temperature)

    def reference_logprobs(self, sequences: list[list[int]], select: list[list[float]],
                           temperature: PositionTemperatures = 1.0) -> ReferenceLogprobs:
        """``sequence_logprobs`` at the ``select``-ed positions, with the seconds they took here."""
        start = time.monotonic()
        logps = self.sequence_logprobs(sequences, select, temperature)
        return ReferenceLogprobs(logps, compute_seconds=time.monotonic() - start)


def deal_to_ranks(lengths: Sequence[int], ranks: int) -> list[list[int]]:
    """Indices per rank, balanced by tokens: longest first to the least-loaded rank. The reference pass and
    the train step deal the same sequences alike, so each rank finds its trunk kept (learner.share_trunk)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    shares: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0] * ranks
    for index in order:
        target = loads.index(min(loads))
        shares[target].append(index)
        loads[target] += lengths[index]
    return shares


def split_micro_batches(samples: Sequence[LearnerSample], ranks: int, max_tokens: int) -> list[list[list[LearnerSample]]]:
    """Deal samples to ranks (balanced by tokens), then cut each rank's share into token-bounded
    micro-batches, padding every rank to the same micro-batch count."""
    from score_ray.modeling import token_budget_batches

    shares = [[samples[i] for i in share] for share in deal_to_ranks([len(s.input_ids) for s in samples], ranks)]
    per_rank = []
    for share in shares:
        lengths = [len(s.input_ids) for s in share]
        per_rank.append([[share[i] for i in batch] for batch in token_budget_batches(lengths, max_tokens)])
    count = max(1, max(len(batches) for batches in per_rank))
    return [batches + [[]] * (count - len(batches)) for batches in per_rank]


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
            self.nodes = gather([worker.setup.remote(address, port) for worker in self.workers])
        except BaseException:
            self.shutdown()  # a half-built group must not hold its placement
            raise
        self.max_tokens = learner.micro_batch_tokens

    def train_step(self, samples: Sequence[LearnerSample], off_policy: bool = False) -> StepStats:
        """One optimiser step on the whole batch; ``applied`` is False when DeepSpeed skipped it (non-finite)."""
        shares = split_micro_batches(samples, len(self.workers), self.max_tokens)
        total = int(sum(sum(s.loss_mask) for s in samples))
        results = gather([w.train_step.remote(share, total, off_policy) for w, share in zip(self.workers, shares)])
        return StepStats.of_ranks(results, micro_batches=len(shares[0]))

    def publish_weights(self, dtype: str = "float32") -> tuple[Any, int, float]:
        """(ObjectRef of rank 0's packed trainable weights, their size in bytes, seconds spent building them)."""
        published = gather([w.publish_weights.remote(dtype) for w in self.workers])[0]
        return published[0][0], published[1], published[2]

    def connect_nccl(self, generators: list, tensor_parallel_size: int, dtype: str, buffer_bytes: int) -> None:
        """GPU: one vLLM NCCL transfer group per engine, each on its own port (score_ray.weight_sync_gpu)."""
        from score_ray.weight_sync_gpu import transfer_layout

        # Rank 0 hosts every group's TCPStore: its address, and ports free on its node.
        address, ports = gather([self.workers[0].transfer_endpoints.remote(len(generators))])[0]
        groups = transfer_layout(len(generators), tensor_parallel_size, address, ports, buffer_bytes=buffer_bytes)
        gather([w.nccl_connect.remote(groups, generators, dtype) for w in self.workers])

    def send_nccl(self) -> None:
        gather([w.nccl_send.remote() for w in self.workers])

    def reference_logprobs(self, sequences: list[list[int]], select: list[list[float]],
                           temperature: PositionTemperatures = 1.0) -> ReferenceLogprobs:
        """The reference's log-probs from the ranks' shared trunk (learner.share_trunk), each rank scoring the
        share it will train on, in the order given."""
        shares = deal_to_ranks([len(s) for s in sequences], len(self.workers))
        per_position = not isinstance(temperature, (int, float))
        results = gather([worker.reference_logprobs.remote(
            [sequences[i] for i in share], [select[i] for i in share],
            [temperature[i] for i in share] if per_position else temperature,
        ) for worker, share in zip(self.workers, shares)])
        merged: list[list[float]] = [[] for _ in sequences]
        for share, result in zip(shares, results):
            for index, logp in zip(share, result.logps):
                merged[index] = logp
        return ReferenceLogprobs(merged, compute_seconds=max(result.compute_seconds for result in results))

    def sequence_logprobs(self, sequences: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        # Every rank must join a ZeRO-3 forward; rank 0's answer is kept.
        return gather([w.sequence_logprobs.remote(sequences, temperature) for w in self.workers])[0]

    def save_hf(self, path: str) -> None:
        gather([w.save_hf.remote(path) for w in self.workers])

    def save_checkpoint(self, folder: str, tag: str) -> None:
        gather([w.save_checkpoint.remote(folder, tag) for w in self.workers])

    def load_checkpoint(self, folder: str, tag: str) -> None:
        gather([w.load_checkpoint.remote(folder, tag) for w in self.workers])

    def shutdown(self) -> None:
        """Kill every rank (survivors of a lost one may be blocked in a collective) and free the placement."""
        kill_actors(self.workers)
        try:
            ray.util.remove_placement_group(self.group)
        except Exception:  # noqa: BLE001 - removed already
            pass
