"""LearnerGroup: N Ray actors forming one DeepSpeed ZeRO group, and the optimiser step they take.

Each rank (``LearnerWorker``: a ``score_ray.learner_rank.LearnerRank`` in a Ray actor) sets the
torch.distributed environment itself and joins the group with ``deepspeed.init_distributed`` (gloo on CPU,
NCCL on GPU). The group splits a step's samples into micro-batches bounded by tokens; every rank runs the
same number of micro-batches (ZeRO-3 needs every rank in every forward), padding with empty ones.

Weights leave the group through rank 0 (score_ray.weight_export, score_ray.weight_sync). With
learner.share_trunk the ranks also serve the reference (score_ray.shared_trunk).

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

from score_ray.actor_calls import call_ranks, gather
from score_ray.config import AlgoConfig, LearnerConfig, ModelConfig
from score_ray.learner_rank import LearnerRank
from score_ray.placement import kill_actors, port_on_this_node
from score_ray.records import ReferenceLogprobs, StepStats
from score_ray.samples import LearnerSample, PositionTemperatures


@ray.remote
class LearnerWorker(LearnerRank):
    """One DeepSpeed rank in a Ray actor. Built in three steps: the actor starts (``__init__``, cheap), rank 0
    names the rendezvous on its own node (``rendezvous``), then every rank joins it (``setup``)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        model: ModelConfig,
        learner: LearnerConfig,
        algo_config: AlgoConfig,
        seed: int,
    ):
        super().__init__(rank, world_size, learner, algo_config)
        self.model_config = model
        self.seed, self.dtype = seed, model.dtype

    def rendezvous(self) -> tuple[str, int]:
        """(this node's address, learner.rendezvous_port or a port free here): where the group's TCPStore will
        listen (rank 0)."""
        return ray.util.get_node_ip_address(), port_on_this_node(self.learner.rendezvous_port, "learner.rendezvous_port")

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

        self.on_gpu = bool(ray.get_gpu_ids())
        set_torch_threads(self.learner.cpus_per_rank)
        torch.manual_seed(self.seed)
        try:
            deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo")
        except Exception as err:  # noqa: BLE001 - most often a port a firewall keeps closed: say which
            raise RuntimeError(
                f"learner rank {self.rank} on {ray.util.get_node_ip_address()} could not join the group at "
                f"{master_addr}:{master_port} ({type(err).__name__}: {str(err)[:300]}). Every learner node must reach "
                "that TCP port on rank 0's node (learner.rendezvous_port fixes it; cluster/README.md lists the ports "
                "to open), and the collectives' interface must be one the nodes share (cluster.env_vars: "
                "GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)"
            ) from err
        model_path = model_folder(self.model_config)  # on this node: the driver's paths may not exist here
        dtype = self.dtype if self.on_gpu else "float32"
        self.build(load_causal_lm(model_path, dtype=dtype), bf16=dtype == "bfloat16")
        return {**this_node(), "rank": self.rank, "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def publish_weights(self, dtype: str = "float32") -> Optional[tuple[list, int, float]]:
        """Rank 0 packs the trainable weights into one buffer in the object store and returns ([ref], bytes,
        seconds); None on the others (score_ray.weight_export)."""
        from score_ray.weight_export import packed_on_rank0

        start = time.monotonic()
        packed = packed_on_rank0(self.engine.module, self.rank, set(self.trainable), dtype)
        if packed is None:
            return None
        return [packed[0]], packed[1], time.monotonic() - start

    def transfer_endpoint(self) -> tuple[str, int]:
        """(this node's address, learner.transfer_port or a port free here) for the NCCL transfer group rank 0
        hosts."""
        return ray.util.get_node_ip_address(), port_on_this_node(self.learner.transfer_port, "learner.transfer_port")

    def nccl_connect(self, group, generators: list, dtype: str) -> None:
        """GPU: join the engines' vLLM NCCL transfer group (rank 0 sends; every rank gathers)."""
        import torch

        from score_ray.weight_sync_gpu import NcclWeightSync, RayEnginesClient, Zero3WeightSource

        source = Zero3WeightSource(self.engine, getattr(torch, dtype), rank=self.rank, names=set(self.trainable))
        client = RayEnginesClient(generators, group) if self.rank == 0 else None
        self.nccl = NcclWeightSync(group, rank=self.rank, client=client)
        self.nccl.connect(source)

    def nccl_send(self) -> None:
        self.nccl.send()


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

    def __init__(self, model: ModelConfig, learner: LearnerConfig, algo_config: AlgoConfig, seed: int, timeout_s: float,
                 runtime_env: Optional[dict[str, Any]] = None):
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
                runtime_env=runtime_env,
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
        self.adapter = learner.trainable == "lora"  # the reference is the base weights, the adapter off
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
        """GPU: one vLLM NCCL transfer group for every engine, on one port (score_ray.weight_sync_gpu)."""
        from score_ray.weight_sync_gpu import transfer_layout

        # Rank 0 hosts the group's TCPStore: its address, and a port free on its node.
        address, port = gather([self.workers[0].transfer_endpoint.remote()])[0]
        group = transfer_layout(len(generators), tensor_parallel_size, address, port, buffer_bytes=buffer_bytes)
        call_ranks(self.workers, "nccl_connect", group, generators, dtype)

    def send_nccl(self) -> None:
        call_ranks(self.workers, "nccl_send")

    def reference_logprobs(self, sequences: list[list[int]], select: list[list[float]],
                           temperature: PositionTemperatures = 1.0) -> ReferenceLogprobs:
        """The reference's log-probs from the ranks themselves, in the order given: with trainable=lora their base
        weights with the adapter off; else their shared trunk (learner.share_trunk), where sequence i is row i of
        this pass, scored (and its trunk kept) by the rank it is dealt to."""
        per_position = not isinstance(temperature, (int, float))
        if self.adapter:
            return self._adapter_off_logprobs(sequences, select, temperature, per_position)
        shares = deal_to_ranks([len(s) for s in sequences], len(self.workers))
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

    def _adapter_off_logprobs(self, sequences: list[list[int]], select: list[list[float]],
                              temperature: PositionTemperatures, per_position: bool) -> ReferenceLogprobs:
        """Dealt to the ranks and cut into micro-batches as a training step is, so every rank runs as many forwards."""
        per_rank = micro_batch_indices([len(s) for s in sequences], len(self.workers), self.max_tokens)
        work = [[([sequences[i] for i in batch], [select[i] for i in batch],
                  [temperature[i] for i in batch] if per_position else temperature) for batch in batches]
                for batches in per_rank]
        results = call_ranks(self.workers, "adapter_off_logprobs", per_rank=[(mine,) for mine in work])
        merged: list[list[float]] = [[] for _ in sequences]
        for batches, result in zip(per_rank, results):
            for index, logp in zip([i for batch in batches for i in batch], result.logps):
                merged[index] = logp
        return ReferenceLogprobs(merged, compute_seconds=max(result.compute_seconds for result in results))

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
