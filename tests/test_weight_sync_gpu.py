"""The GPU weight-sync path's pure parts, on CPU: the transfer group's layout, the deadlines, the engine-side
call order and the engine's memory budget (the ZeRO-3 weight source itself: tests/system/test_zero3_weight_source.py)."""

import subprocess
import sys
import threading
import time

import pytest

from score_ray.weight_sync_gpu import NcclWeightSync, call_with_timeout, transfer_layout


def test_one_group_holds_every_engines_workers_after_the_sender():
    group = transfer_layout(3, 2, "10.0.0.5", 29555)
    assert (group.master_address, group.master_port, group.world_size) == ("10.0.0.5", 29555, 7)
    assert group.engine_rank_offsets == (1, 3, 5) and group.workers_per_engine == 2
    # the sender at 0, then each engine's workers: every NCCL rank taken exactly once
    ranks = [0] + [rank for index in range(3) for rank in group.engine_ranks(index)]
    assert ranks == list(range(group.world_size))
    assert group.trainer_init_info == {
        "master_address": "10.0.0.5", "master_port": 29555, "world_size": 7, "packed": True,
        "packed_buffer_size_bytes": 256 * 2**20, "packed_num_buffers": 2, "rank": 0,
    }
    # tensor x pipeline parallel workers per engine
    assert transfer_layout(2, 2, "10.0.0.5", 29555, pipeline_parallel_size=2).engine_rank_offsets == (1, 5)


def test_layout_dicts_are_what_vllms_init_info_classes_accept():
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    group = transfer_layout(2, 4, "127.0.0.1", 30002, buffer_bytes=64 * 2**20)
    trainer = NCCLTrainerInitInfo(**group.trainer_init_info)
    assert (trainer.master_port, trainer.world_size, trainer.packed, trainer.is_sender) == (30002, 9, True, True)
    assert (trainer.packed_buffer_size_bytes, trainer.packed_num_buffers) == (64 * 2**20, 2)
    assert trainer.backend == "nccl"
    # what an engine is handed: vLLM's own worker-side info, with this engine's offset
    worker = NCCLWeightTransferInitInfo(master_address="127.0.0.1", master_port=30002, world_size=9,
                                        rank_offset=group.engine_rank_offsets[1])
    assert worker.rank_offset == 5


def test_layout_rejects_a_bad_port_or_shape():
    for port in (0, 70000):
        with pytest.raises(ValueError, match="TCP port"):
            transfer_layout(2, 2, "127.0.0.1", port)
    with pytest.raises(ValueError, match="at least one engine"):
        transfer_layout(0, 2, "127.0.0.1", 30001)


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



def test_rank_zero_needs_a_client_and_the_client_one_actor_per_engine():
    from score_ray.weight_sync_gpu import RayEnginesClient

    group = transfer_layout(2, 1, "127.0.0.1", 30001)
    with pytest.raises(ValueError, match="needs a client"):
        NcclWeightSync(group, rank=0)
    with pytest.raises(ValueError, match="has 2 engines, got 1 engine actors"):
        RayEnginesClient([object()], group)



def test_module_imports_on_cpu():
    result = subprocess.run(
        [sys.executable, "-c", "import score_ray.weight_sync_gpu as m; print(m.NcclWeightSync.__name__)"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("NcclWeightSync")



def test_transfer_buffers_are_taken_out_of_the_engines_memory_share():
    from score_ray.rollout import engine_memory_fraction

    gib = 2**30
    # 80 GiB GPU, 0.85 for vLLM, 2 x (256 MiB + one tensor) of buffers outside vLLM's budget
    assert engine_memory_fraction(0.85, 80 * gib, 4 * gib) == pytest.approx(0.85 - 0.05)
    assert engine_memory_fraction(0.85, 80 * gib, 0) == 0.85
    with pytest.raises(ValueError, match="learner.nccl_buffer_mb"):
        engine_memory_fraction(0.3, 16 * gib, 4 * gib)



def test_transfer_buffer_bound_counts_two_chunks_each_allowed_one_tensor_over(tmp_path):
    from transformers import LlamaConfig

    from score_ray.rollout import transfer_buffer_bytes

    LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    embedding = 1000 * 64 * 2  # the largest tensor, in bf16
    assert transfer_buffer_bytes(str(tmp_path), "bfloat16", 2**20) == 2 * (2**20 + embedding)


def test_the_gather_waits_for_queued_optimiser_writes_before_its_first_tensor(monkeypatch):
    """The consumer gathers on a stream of its own (vLLM packs on its packing streams), which does not wait for
    the optimiser's writes on the training stream: the source waits for the device before the first tensor.
    (Whether the bytes then match is bench/gpu/learner_gpu.py's side-stream check, on a GPU.)"""
    import torch

    from score_ray import weight_gather

    events = []
    monkeypatch.setattr(weight_gather, "wait_for_pending_writes", lambda: events.append("wait"))
    source = weight_gather.GatheredWeights(torch.nn.Linear(2, 2), torch.float32)
    for name, _ in source:
        events.append(name)
    assert events == ["wait", "weight", "bias"]


def test_engines_that_never_reach_the_transfer_port_fail_in_time_naming_the_keys():
    """vLLM's own trainer endpoint opens the group's TCPStore on rank 0 and waits for the engines: when they
    never arrive (a firewall, the wrong interface) the deadline names the address, the port and the keys."""
    import torch

    from score_ray.placement import free_ports
    from score_ray.weight_sync_gpu import Zero3WeightSource

    class EnginesThatNeverJoin:
        def __init__(self):
            self.release = threading.Event()

        def init_weight_transfer_engine(self, init_info):
            self.release.wait()

        def start_weight_update(self, *args):
            pass

        update_weights = finish_weight_update = start_weight_update

    port = free_ports(1)[0]
    client = EnginesThatNeverJoin()
    sync = NcclWeightSync(transfer_layout(2, 1, "127.0.0.1", port), rank=0, client=client, timeout_s=2)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"127\.0\.0\.1:{port}.*learner\.transfer_port.*NCCL_SOCKET_IFNAME"):
        sync.connect(Zero3WeightSource(torch.nn.Linear(2, 2), torch.float32))
    assert time.monotonic() - start < 30
    client.release.set()
