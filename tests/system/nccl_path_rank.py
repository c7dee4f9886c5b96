"""One learner rank of a two-rank ZeRO-3 group driving vLLM's own NCCL trainer engine on CPU.

Run by tests/system/test_zero3_weight_source.py as two processes (RANK 0 and 1, gloo). Everything is the real code:
DeepSpeed ZeRO-3, our ``Zero3WeightSource`` and ``NcclWeightSync``, vLLM 0.32's
``WeightTransferTrainerFactory`` / ``NCCLTrainerWeightTransferEngine`` (handshake, metadata, checks,
packing) and, for the engine side, vLLM's ``packed_nccl_broadcast_consumer``. Only the CUDA transport is
replaced: the NCCL communicator (``open_trainer_endpoint``) records what rank 0 broadcasts, CUDA streams
are no-ops, and the engine's receive replays the recorded chunks into its buffers.

Usage: python nccl_path_rank.py OUT_DIR MODEL_DIR TRANSFER_PORT BUFFER_BYTES
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch


class NoStream:
    def synchronize(self) -> None:
        pass


class RecordingGroup:
    """Stands in for vLLM's PyNcclCommunicator on the sender: keeps a copy of each broadcast tensor."""

    def __init__(self, init_info) -> None:
        self.init_info = init_info
        self.sent: list[torch.Tensor] = []

    def broadcast(self, tensor, src=0, stream=None) -> None:
        assert src == 0
        self.sent.append(tensor.detach().clone())

    def destroy(self) -> None:
        pass


class ReplayGroup:
    """Stands in for the communicator on the engine side: each receive gets the next recorded chunk."""

    def __init__(self, chunks: list[torch.Tensor]) -> None:
        self.chunks = list(chunks)
        self.sizes: list[int] = []

    def broadcast(self, tensor, src=0, stream=None) -> None:
        chunk = self.chunks.pop(0)
        self.sizes.append(tensor.numel())
        assert tensor.numel() == chunk.numel(), f"engine expects {tensor.numel()} bytes, trainer sent {chunk.numel()}"
        tensor.copy_(chunk)


class RecordingClient:
    """vLLM's VLLMWeightSyncClient protocol: records what reaches the engine side, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def init_weight_transfer_engine(self, init_info) -> None:
        self.calls.append(("init", dict(init_info)))

    def start_weight_update(self) -> None:
        self.calls.append(("start",))

    def update_weights(self, update_info) -> None:
        self.calls.append(("update", dict(update_info)))

    def finish_weight_update(self, weight_version=None) -> None:
        self.calls.append(("finish",))


def counting_source():
    from score_ray.weight_sync_gpu import Zero3WeightSource

    class Counting(Zero3WeightSource):
        """Counts full passes over the model: each is one ZeRO-3 gather of every parameter."""

        passes = 0

        def __iter__(self):
            self.passes += 1
            return super().__iter__()

    return Counting


def replace_cuda_transport() -> list[RecordingGroup]:
    from vllm.distributed.weight_transfer import nccl_engine, packed_tensor

    groups: list[RecordingGroup] = []

    def open_endpoint(init_info):
        groups.append(RecordingGroup(init_info))
        return groups[-1]

    nccl_engine.open_trainer_endpoint = open_endpoint
    packed_tensor._get_streams = lambda device, count: tuple(NoStream() for _ in range(count))
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.accelerator.current_device_index = lambda: 0
    return groups


def main() -> None:
    out, model_dir, port, buffer_bytes = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rank = int(os.environ["RANK"])
    import deepspeed
    from transformers import AutoModelForCausalLM

    from score_ray.weight_sync_gpu import NcclWeightSync, Zero3WeightSource, transfer_layout

    deepspeed.init_distributed(dist_backend="gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                "zero_allow_untested_optimizer": True, "steps_per_print": 10**9},
    )
    partitioned = all(hasattr(p, "ds_id") and p.numel() < p.ds_numel for p in engine.module.parameters())

    # 1. The WeightSource contract of the installed vLLM, with the parameters really split over two ranks.
    source = Zero3WeightSource(engine, torch.bfloat16, rank=rank)
    meta = source.metadata()
    pairs = list(source)
    contract = {
        "partitioned": partitioned,
        "meta": [(m.name, str(m.dtype), tuple(m.shape)) for m in meta],
        "names": [name for name, _ in pairs],
        "yielded": [None if t is None else (str(t.dtype), tuple(t.shape), t.is_contiguous()) for _, t in pairs],
    }
    if rank == 0:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

        # vLLM's own per-tensor check, over the pairs already gathered (iterating the source again would
        # be a collective rank 1 does not join)
        checked = list(NCCLTrainerWeightTransferEngine._checked_iter(pairs, meta))  # raises on any mismatch
        contract["checked"] = len(checked)
        contract["tensors"] = {name: tensor for name, tensor in checked}

    # 2. The NCCL path: handshake and send through vLLM's trainer engine, both ranks, to two engines of TP 2.
    groups = replace_cuda_transport()
    layout = transfer_layout(2, 2, "127.0.0.1", port, buffer_bytes=buffer_bytes)  # never dialled: no NCCL here
    client = RecordingClient() if rank == 0 else None
    sync = NcclWeightSync(layout, rank=rank, client=client, timeout_s=120)
    counted = counting_source()(engine, torch.bfloat16, rank=rank)
    sync.connect(counted)
    sync.send()
    sync.send()  # a second round: the source is re-iterable, the same bytes go again
    result = {"contract": contract, "is_sender": sync.engine.is_sender, "opened": len(groups),
              "gather_passes": counted.passes}
    if rank == 0:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_consumer

        chunks = groups[0].sent
        update = next(call[1] for call in client.calls if call[0] == "update")
        received: list[tuple[str, torch.Tensor]] = []
        half = len(chunks) // 2
        engine_side = ReplayGroup(chunks[:half])
        init = client.calls[0][1]
        expected = zip(update["names"], zip(update["shapes"], [getattr(torch, d) for d in update["dtype_names"]]))
        packed_nccl_broadcast_consumer(
            iterator=iter(expected), group=engine_side, src=0, post_unpack_func=received.extend,
            buffer_size_bytes=init["packed_buffer_size_bytes"], num_buffers=init["packed_num_buffers"], device="cpu",
        )
        result.update(
            calls=[call[0] for call in client.calls], init=init, update=update, chunks=len(chunks),
            chunk_bytes=[c.numel() for c in chunks], rounds_equal=all(
                torch.equal(a, b) for a, b in zip(chunks[:half], chunks[half:])),
            received={name: tensor.clone() for name, tensor in received},
            received_order=[name for name, _ in received], replay_left=len(engine_side.chunks),
        )
    torch.save(result, out / f"rank{rank}.pt")
    sync.close()


if __name__ == "__main__":
    main()
