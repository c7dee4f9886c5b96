"""The GPU weight-sync path, checked on CPU with real DeepSpeed: the ZeRO-3 weight source, one rank and two
through vLLM's own trainer engine (the layout, deadlines and engine side: tests/test_weight_sync_gpu.py).

No NCCL here (no CUDA). The DeepSpeed tests wrap the tiny model in a real ZeRO-3 engine
(gloo, one process); torch.distributed is initialised once per process, so one
module-scoped fixture holds the engine and tears the process group down after.
"""

import os
import subprocess
import sys

import pytest
import torch

from score_ray.placement import free_ports
from score_ray.weight_sync_gpu import (
    NcclWeightSync,
    Zero3WeightSource,
    transfer_layout,
)

pytestmark = pytest.mark.slow

SHAPE = dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256, seed=0)


@pytest.fixture(scope="module")
def zero3():
    """(HF reference weights in named_parameters order, DeepSpeed ZeRO-3 engine, HF names)."""
    from score_ray.assets import ensure_tiny_model, torch_extensions_dir

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_ports(1)[0]), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    # Reuse the cached build of DeepSpeed's CPU comm op instead of compiling it again.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    path = ensure_tiny_model(**SHAPE)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    weights = {name: param.detach().clone() for name, param in reference.named_parameters()}

    deepspeed.init_distributed(dist_backend="gloo")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    yield weights, engine
    del engine
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the ZeRO-3 source


def test_parameters_are_really_partitioned(zero3):
    _, engine = zero3
    params = list(engine.module.named_parameters())
    assert params and all(hasattr(p, "ds_id") for _, p in params)
    # Without a gather the local tensors hold nothing: shape metadata must come from ds_shape.
    assert all(p.numel() == 0 for _, p in params)
    assert all(tuple(p.ds_shape) != tuple(p.shape) for _, p in params)


def test_metadata_reports_full_shapes_in_model_order(zero3):
    weights, engine = zero3
    meta = Zero3WeightSource(engine, torch.bfloat16).metadata()
    assert [m.name for m in meta] == list(weights)  # HF named_parameters order
    assert [m.shape for m in meta] == [tuple(w.shape) for w in weights.values()]
    assert all(m.dtype == torch.bfloat16 for m in meta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_iteration_yields_the_original_weights(zero3, dtype):
    weights, engine = zero3
    source = Zero3WeightSource(engine, dtype)
    seen = []
    for name, tensor in source:
        seen.append(name)
        assert tensor.dtype == dtype and tensor.is_contiguous()
        assert torch.equal(tensor, weights[name].to(dtype)), name
    assert seen == list(weights)
    # Clones: the partitions are released again after each gather, the yielded copies stay.
    assert all(p.numel() == 0 for p in engine.module.parameters())
    # The source is re-iterable (one pass per sync round).
    assert [name for name, _ in source] == seen


def test_metadata_and_iteration_agree_by_vllms_own_checks(zero3):
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    _, engine = zero3
    source = Zero3WeightSource(engine, torch.bfloat16)
    meta = source.metadata()
    # The check vLLM's NCCL sender runs on every tensor before broadcasting it.
    assert len(list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))) == len(meta)
    # The base class's layer-by-layer batching accepts our order: embeddings, layer 0, layer 1, norm.
    groups = [names for names, _ in source.iter_groups()]
    assert [n for g in groups for n in g] == [m.name for m in meta]
    assert groups[0] == ["model.embed_tokens.weight"] and groups[-1] == ["model.norm.weight"]
    assert all(name.startswith("model.layers.0.") for name in groups[1])


def test_restricting_to_a_name_subset(zero3):
    weights, engine = zero3
    wanted = [name for name in weights if name.startswith("model.layers.1.") or name == "model.norm.weight"]
    source = Zero3WeightSource(engine, torch.bfloat16, names=set(wanted))
    assert [m.name for m in source.metadata()] == wanted
    pairs = list(source)
    assert [name for name, _ in pairs] == wanted
    assert all(torch.equal(t, weights[n].to(torch.bfloat16)) for n, t in pairs)
    with pytest.raises(ValueError, match="no such parameters"):
        Zero3WeightSource(engine, torch.bfloat16, names={"model.layers.9.nothing"})


def test_non_persistent_buffers_are_skipped(zero3):
    weights, engine = zero3
    buffers = dict(engine.module.named_buffers())
    assert any(name.endswith("rotary_emb.inv_freq") for name in buffers)  # present but non-persistent
    source = Zero3WeightSource(engine, torch.bfloat16, include_buffers=True)
    assert [m.name for m in source.metadata()] == list(weights)
    assert [name for name, _ in source] == list(weights)


def test_non_sender_ranks_gather_but_keep_nothing(zero3):
    weights, engine = zero3
    source = Zero3WeightSource(engine, torch.bfloat16, rank=1)
    assert not source.is_sender
    pairs = list(source)
    assert [name for name, _ in pairs] == list(weights) and all(t is None for _, t in pairs)


def test_non_sender_rank_runs_vllms_trainer_engine_without_nccl(zero3):
    # A rank other than 0 never opens the NCCL group: vLLM's trainer engine only
    # replays the source so the ZeRO-3 gathers stay in step, which runs on CPU.
    _, engine = zero3
    group = transfer_layout(2, 1, "127.0.0.1", 29601)
    sync = NcclWeightSync(group, rank=1, timeout_s=60)
    sync.connect(Zero3WeightSource(engine, torch.bfloat16, rank=1))
    assert not sync.engine.is_sender
    sync.send()
    sync.close()
    with pytest.raises(ValueError, match="does not match"):
        NcclWeightSync(group, rank=1).connect(Zero3WeightSource(engine, torch.bfloat16, rank=0))


# ----------------------------------------------------------------------------- two ranks through vLLM's own trainer engine


@pytest.fixture(scope="module")
def two_rank_nccl_path(tmp_path_factory):
    """Run tests/system/nccl_path_rank.py as ranks 0 and 1 of a ZeRO-3 group (gloo); their results, and the HF weights."""
    from transformers import AutoModelForCausalLM

    from score_ray.assets import ensure_tiny_model, torch_extensions_dir

    out = tmp_path_factory.mktemp("nccl-path")
    path = ensure_tiny_model(**SHAPE)
    env_base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0]), "WORLD_SIZE": "2",
                "LOCAL_RANK": "0", "TORCH_EXTENSIONS_DIR": str(torch_extensions_dir()), "OMP_NUM_THREADS": "1"}
    script = os.path.join(os.path.dirname(__file__), "nccl_path_rank.py")
    # 40 KB chunks: the tiny model's 1.2 MB in bf16 goes in many chunks, as a real model does in 256 MB ones
    args = [sys.executable, script, str(out), str(path), str(free_ports(1)[0]), str(40_000)]
    logs = [out / f"rank{rank}.log" for rank in (0, 1)]
    ranks = []
    try:
        for rank, log in zip((0, 1), logs):
            with open(log, "w") as handle:
                ranks.append(subprocess.Popen(args, env={**env_base, "RANK": str(rank)}, stdout=handle,
                                              stderr=subprocess.STDOUT))
        for rank in ranks:
            rank.wait(timeout=600)
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    logs = [log.read_text(errors="replace") for log in logs]
    assert [rank.returncode for rank in ranks] == [0, 0], "\n".join(
        f"--- rank {index}:\n{log[-3000:]}" for index, log in enumerate(logs))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    weights = {name: param.detach().to(torch.bfloat16) for name, param in reference.named_parameters()}
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)], weights


def test_two_zero3_ranks_satisfy_the_installed_vllms_weight_source_contract(two_rank_nccl_path):
    (rank0, rank1), weights = two_rank_nccl_path
    expected_meta = [(name, "torch.bfloat16", tuple(w.shape)) for name, w in weights.items()]
    for result in (rank0, rank1):
        contract = result["contract"]
        assert contract["partitioned"]  # each rank really held only a part of every parameter
        assert contract["meta"] == expected_meta  # full shapes, model order, the dtype the engine runs
        assert contract["names"] == list(weights)
    # rank 0 yields every tensor as declared (vLLM's own check passed), equal to the gathered state dict
    assert rank0["contract"]["checked"] == len(weights)
    assert rank0["contract"]["yielded"] == [("torch.bfloat16", tuple(w.shape), True) for w in weights.values()]
    assert all(torch.equal(rank0["contract"]["tensors"][n], w) for n, w in weights.items())
    assert rank1["contract"]["yielded"] == [None] * len(weights)  # gathered, kept nothing


def test_vllms_trainer_engine_sends_every_weight_to_the_engine_side_as_declared(two_rank_nccl_path):
    (rank0, rank1), weights = two_rank_nccl_path
    # Only rank 0 opens the transfer group and talks to the engines; rank 1 only joins the gathers.
    assert rank0["is_sender"] and rank0["opened"] == 1
    assert not rank1["is_sender"] and rank1["opened"] == 0
    # Two engines, two sends: the model was gathered once per send on both ranks, not once per engine.
    assert rank0["gather_passes"] == rank1["gather_passes"] == 2
    # The handshake vLLM's trainer engine makes: the group's size for two engines of TP 2 and our buffer
    # settings (RayEnginesClient then gives each engine its own rank offset: test_engines_client_*).
    init = rank0["init"]
    assert (init["master_address"], init["rank_offset"], init["world_size"]) == ("127.0.0.1", 1, 5)
    assert (init["packed"], init["packed_buffer_size_bytes"], init["packed_num_buffers"]) == (True, 40_000, 2)
    # Two rounds, each start -> update -> finish, after one init.
    assert rank0["calls"] == ["init", "start", "update", "finish", "start", "update", "finish"]
    update = rank0["update"]
    assert update["names"] == list(weights)
    assert update["shapes"] == [list(w.shape) for w in weights.values()]
    assert update["dtype_names"] == ["bfloat16"] * len(weights)
    # Many chunks, each near the buffer size; the second round sent the same bytes.
    assert rank0["chunks"] % 2 == 0 and rank0["chunks"] // 2 > 10 and rank0["rounds_equal"]
    assert max(rank0["chunk_bytes"]) < 40_000 + max(w.numel() * 2 for w in weights.values())
    # vLLM's engine-side receiver, fed the recorded bytes, rebuilds every tensor in order, bit for bit.
    assert rank0["replay_left"] == 0
    assert rank0["received_order"] == list(weights)
    assert all(torch.equal(rank0["received"][n], w) for n, w in weights.items())


# ----------------------------------------------------------------------------- the engines' client, real Ray actors


class Meeting:
    """Like an NCCL rendezvous: nobody leaves a step until every engine has arrived at it."""

    def __init__(self, expected):
        self.expected, self.arrived, self.everyone = expected, {}, {}

    async def arrive(self, step):
        import asyncio

        self.arrived[step] = self.arrived.get(step, 0) + 1
        event = self.everyone.setdefault(step, asyncio.Event())
        if self.arrived[step] == self.expected:
            event.set()
        await event.wait()


class RecordingEngine:
    """What a generator's weight_sync_init / weight_sync_update receive, meeting the other engines in each."""

    def __init__(self, meeting):
        self.meeting, self.calls = meeting, []

    def weight_sync_init(self, init_info):
        import ray

        self.calls.append(("init", init_info))
        ray.get(self.meeting.arrive.remote("init"))

    def weight_sync_update(self, update_info):
        import ray

        self.calls.append(("update", update_info))
        ray.get(self.meeting.arrive.remote("update"))

    def recorded(self):
        return self.calls


def test_engines_client_gives_each_engine_its_ranks_and_calls_them_all_at_once(ray_local):
    """One transfer group for three engines of TP 2: each engine joins at its own rank offset, and every call
    reaches all engines together (their workers meet the sender inside one NCCL call; an engine served after
    another would wait for ever)."""
    import ray
    from ray import cloudpickle

    from score_ray.weight_sync_gpu import RayEnginesClient

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors' classes live in this test file
    meeting = ray.remote(num_cpus=0)(Meeting).remote(3)
    engines = [ray.remote(num_cpus=0)(RecordingEngine).remote(meeting) for _ in range(3)]
    group = transfer_layout(3, 2, "127.0.0.1", 29611)
    client = RayEnginesClient(engines, group, timeout_s=60)
    # what vLLM's trainer engine hands the client: its worker-side info, always at rank offset 1
    client.init_weight_transfer_engine({"master_address": "127.0.0.1", "master_port": 29611, "world_size": 7,
                                        "rank_offset": 1, "packed": True})
    update = {"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[2]]}
    client.update_weights(update)
    calls = ray.get([engine.recorded.remote() for engine in engines])
    assert [[step for step, _ in engine_calls] for engine_calls in calls] == [["init", "update"]] * 3
    offsets = [engine_calls[0][1]["rank_offset"] for engine_calls in calls]
    assert offsets == [1, 3, 5] and all(engine_calls[0][1]["world_size"] == 7 for engine_calls in calls)
    assert all(engine_calls[1][1] == update for engine_calls in calls)

    # one engine short of a meeting of three: the call times out and names the engines that never returned
    short = ray.remote(num_cpus=0)(Meeting).remote(3)
    two = [ray.remote(num_cpus=0)(RecordingEngine).remote(short) for _ in range(2)]
    stuck = RayEnginesClient(two, transfer_layout(2, 2, "127.0.0.1", 29612), timeout_s=3)
    with pytest.raises(TimeoutError, match=r"engine update_weights.*engines \[0, 1\]"):
        stuck.update_weights(update)
