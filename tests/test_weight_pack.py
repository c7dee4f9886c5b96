"""score_ray.weight_pack: the CPU weight sync's wire format."""


def test_packed_weights_round_trip_exactly_with_aligned_zero_copy_views():
    import numpy as np
    import torch

    from score_ray.weight_pack import ALIGN, pack_tensors, unpack_tensors

    tensors = [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)), ("b", torch.tensor([1.5, -2.0], dtype=torch.bfloat16)),
               ("c", torch.arange(5, dtype=torch.int64))]
    header, buffer = pack_tensors(tensors)
    # a: 24 bytes at 0; b: 4 bytes at 64; c: 40 bytes at 128; every offset aligned
    assert [(name, start, nbytes) for name, _, _, start, nbytes in header] == [("a", 0, 24), ("b", 64, 4), ("c", 128, 40)]
    assert buffer.nbytes == 192 and all(start % ALIGN == 0 for *_, start, _ in header)
    buffer.setflags(write=False)  # as Ray's object store hands it out
    views = unpack_tensors(header, buffer)
    for (name, original), (unpacked_name, view) in zip(tensors, views):
        assert unpacked_name == name and view.dtype == original.dtype and torch.equal(view, original)
    # views, not copies: they share the buffer's memory
    assert views[0][1].data_ptr() == np.frombuffer(buffer, dtype=np.uint8).ctypes.data
