"""The GPU weight-sync path, checked on CPU: the ZeRO-3 weight source, the rank layout, the deadlines.

No NCCL here. The DeepSpeed tests wrap the tiny model in a real ZeRO-3 engine
(gloo, one process); torch.distributed is initialised once per process, so one
module-scoped fixture holds the engine and tears the process group down after.
"""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from score_ray.weight_sync_gpu import (
    NcclWeightSync,
    Zero3WeightSource,
    call_with_timeout,
    transfer_layout,
)

SHAPE = dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256, seed=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def zero3():
    """(HF reference weights in named_parameters order, DeepSpeed ZeRO-3 engine, HF names)."""
    from score_ray.assets import ensure_tiny_model, torch_extensions_dir

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
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


@pytest.mark.slow
def test_parameters_are_really_partitioned(zero3):
    _, engine = zero3
    params = list(engine.module.named_parameters())
    assert params and all(hasattr(p, "ds_id") for _, p in params)
    # Without a gather the local tensors hold nothing: shape metadata must come from ds_shape.
    assert all(p.numel() == 0 for _, p in params)
    assert all(tuple(p.ds_shape) != tuple(p.shape) for _, p in params)


@pytest.mark.slow
def test_metadata_reports_full_shapes_in_model_order(zero3):
    weights, engine = zero3
    meta = Zero3WeightSource(engine, torch.bfloat16).metadata()
    assert [m.name for m in meta] == list(weights)  # HF named_parameters order
    assert [m.shape for m in meta] == [tuple(w.shape) for w in weights.values()]
    assert all(m.dtype == torch.bfloat16 for m in meta)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_non_persistent_buffers_are_skipped(zero3):
    weights, engine = zero3
    buffers = dict(engine.module.named_buffers())
    assert any(name.endswith("rotary_emb.inv_freq") for name in buffers)  # present but non-persistent
    source = Zero3WeightSource(engine, torch.bfloat16, include_buffers=True)
    assert [m.name for m in source.metadata()] == list(weights)
    assert [name for name, _ in source] == list(weights)


@pytest.mark.slow
def test_non_sender_ranks_gather_but_keep_nothing(zero3):
    weights, engine = zero3
    source = Zero3WeightSource(engine, torch.bfloat16, rank=1)
    assert not source.is_sender
    pairs = list(source)
    assert [name for name, _ in pairs] == list(weights) and all(t is None for _, t in pairs)


@pytest.mark.slow
def test_non_sender_rank_runs_vllms_trainer_engine_without_nccl(zero3):
    # A rank other than 0 never opens the NCCL group: vLLM's trainer engine only
    # replays the source so the ZeRO-3 gathers stay in step, which runs on CPU.
    _, engine = zero3
    groups = transfer_layout(2, 1, "127.0.0.1", ports=[29601, 29602])
    sync = NcclWeightSync(groups, rank=1, timeout_s=60)
    sync.connect(Zero3WeightSource(engine, torch.bfloat16, rank=1))
    assert len(sync.engines) == 2 and not any(e.is_sender for e in sync.engines)
    sync.send()
    sync.close()
    with pytest.raises(ValueError, match="does not match"):
        NcclWeightSync(groups, rank=1).connect(Zero3WeightSource(engine, torch.bfloat16, rank=0))


# ----------------------------------------------------------------------------- layout


def test_rank_layout_for_three_engines_of_tp2():
    groups = transfer_layout(3, 2, "10.0.0.5")
    assert [g.engine_index for g in groups] == [0, 1, 2]
    assert len({g.master_port for g in groups}) == 3  # one port per group
    for group in groups:
        assert group.master_address == "10.0.0.5"
        assert group.world_size == 3 and group.trainer_rank == 0 and group.worker_ranks == (1, 2)
        assert group.engine_init_info == {
            "master_address": "10.0.0.5",
            "master_port": group.master_port,
            "world_size": 3,
            "rank_offset": 1,
            "packed": True,
        }
        assert group.trainer_init_info == {
            "master_address": "10.0.0.5",
            "master_port": group.master_port,
            "world_size": 3,
            "packed": True,
            "rank": 0,
        }
    # Within a group no two processes share a rank; across groups only ports must differ.
    for group in groups:
        ranks = [group.trainer_rank, *group.worker_ranks]
        assert sorted(ranks) == list(range(group.world_size))
    endpoints = {(g.master_port, r) for g in groups for r in (g.trainer_rank, *g.worker_ranks)}
    assert len(endpoints) == 9


def test_layout_dicts_are_what_vllms_init_info_classes_accept():
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLWeightTransferInitInfo

    group = transfer_layout(2, 4, "127.0.0.1", ports=[30001, 30002])[1]
    worker = NCCLWeightTransferInitInfo(**group.engine_init_info)
    trainer = NCCLTrainerInitInfo(**group.trainer_init_info)
    assert (worker.master_port, worker.world_size, worker.rank_offset, worker.packed) == (30002, 5, 1, True)
    assert (trainer.master_port, trainer.world_size, trainer.packed, trainer.is_sender) == (30002, 5, True, True)
    assert trainer.backend == "nccl"


def test_layout_rejects_bad_ports():
    with pytest.raises(ValueError, match="distinct ports"):
        transfer_layout(2, 2, "127.0.0.1", ports=[30001, 30001])
    with pytest.raises(ValueError, match="distinct ports"):
        transfer_layout(3, 2, "127.0.0.1", ports=[30001, 30002])


# ----------------------------------------------------------------------------- deadlines and engine side


def test_timeout_names_the_step():
    blocker = threading.Event()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="update_weights"):
        call_with_timeout("update_weights", blocker.wait, timeout_s=0.3)
    assert time.monotonic() - start < 5
    blocker.set()  # release the abandoned thread


def test_timeout_passes_results_and_errors_through():
    assert call_with_timeout("add", lambda a, b: a + b, 2, b=3, timeout_s=5) == 5
    with pytest.raises(KeyError):
        call_with_timeout("lookup", {}.__getitem__, "x", timeout_s=5)


class _FakeLLM:
    """Records the vLLM LLM weight-transfer calls made on it."""

    def __init__(self, block_in: str = ""):
        self.calls = []
        self.block_in = block_in
        self.release = threading.Event()

    def _record(self, name, *args):
        self.calls.append((name, *args))
        if name == self.block_in:
            self.release.wait()

    def init_weight_transfer_engine(self, request):
        self._record("init", request.init_info)

    def start_weight_update(self):
        self._record("start")

    def update_weights(self, request):
        self._record("update", request.update_info)

    def finish_weight_update(self, weight_version=None):
        self._record("finish")

    def reset_prefix_cache(self):
        self._record("reset_prefix_cache")


def test_engine_side_update_order():
    llm = _FakeLLM()
    NcclWeightSync.engine_init(llm, {"master_port": 1}, timeout_s=5)
    info = {"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[2]]}
    NcclWeightSync.engine_update(llm, info, timeout_s=5)
    expected = [("init", {"master_port": 1}), ("start",), ("update", info), ("finish",), ("reset_prefix_cache",)]
    assert llm.calls == expected


def test_engine_side_hang_becomes_a_timeout():
    llm = _FakeLLM(block_in="update")
    with pytest.raises(TimeoutError, match="'update_weights'"):
        NcclWeightSync.engine_update(llm, {}, timeout_s=0.3)
    assert ("finish",) not in llm.calls
    llm.release.set()


def test_rank_zero_needs_a_client_per_engine():
    with pytest.raises(ValueError, match="one engine client per transfer group"):
        NcclWeightSync(transfer_layout(2, 1, "127.0.0.1", ports=[1, 2]), rank=0, clients=[object()])


def test_module_imports_on_cpu():
    result = subprocess.run(
        [sys.executable, "-c", "import score_ray.weight_sync_gpu as m; print(m.NcclWeightSync.__name__)"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("NcclWeightSync")
