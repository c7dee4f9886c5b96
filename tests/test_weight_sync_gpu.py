"""The GPU weight-sync path's pure parts, on CPU: the transfer groups' layout, the deadlines, the engine-side
call order and the engine's memory budget (the ZeRO-3 weight source itself: tests/system/test_zero3_weight_source.py)."""

import subprocess
import sys
import threading
import time

import pytest

from score_ray.weight_sync_gpu import NcclWeightSync, call_with_timeout, transfer_layout


def test_rank_layout_for_three_engines_of_tp2():
    groups = transfer_layout(3, 2, "10.0.0.5")
    assert [g.engine_index for g in groups] == [0, 1, 2]
    assert len({g.master_port for g in groups}) == 3  # one port per group
    for group in groups:
        assert group.master_address == "10.0.0.5"
        assert group.world_size == 3 and group.trainer_rank == 0 and group.worker_ranks == (1, 2)
        assert group.trainer_init_info == {
            "master_address": "10.0.0.5",
            "master_port": group.master_port,
            "world_size": 3,
            "packed": True,
            "packed_buffer_size_bytes": 256 * 2**20,
            "packed_num_buffers": 2,
            "rank": 0,
        }
    # Within a group no two processes share a rank; across groups only ports must differ.
    for group in groups:
        ranks = [group.trainer_rank, *group.worker_ranks]
        assert sorted(ranks) == list(range(group.world_size))
    endpoints = {(g.master_port, r) for g in groups for r in (g.trainer_rank, *g.worker_ranks)}
    assert len(endpoints) == 9



def test_layout_dicts_are_what_vllms_init_info_classes_accept():
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    group = transfer_layout(2, 4, "127.0.0.1", ports=[30001, 30002], buffer_bytes=64 * 2**20)[1]
    trainer = NCCLTrainerInitInfo(**group.trainer_init_info)
    assert (trainer.master_port, trainer.world_size, trainer.packed, trainer.is_sender) == (30002, 5, True, True)
    assert (trainer.packed_buffer_size_bytes, trainer.packed_num_buffers) == (64 * 2**20, 2)
    assert trainer.backend == "nccl"



def test_layout_rejects_bad_ports():
    with pytest.raises(ValueError, match="distinct ports"):
        transfer_layout(2, 2, "127.0.0.1", ports=[30001, 30001])
    with pytest.raises(ValueError, match="distinct ports"):
        transfer_layout(3, 2, "127.0.0.1", ports=[30001, 30002])



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
