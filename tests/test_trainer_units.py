"""Trainer helpers and eval metrics: data order, token layout, checkpoints, the five metrics."""


from pathlib import Path

import pytest

from score_ray.evaluate import format_table, self_correction_metrics
from score_ray.trainer import (
    COMPLETE,
    TrainerState,
    build_samples,
    checkpoint_folders,
    next_batch,
    trained_positions,
    turn_kl_sums,
)


def test_five_metrics_by_hand():
    # 5 problems: (t1, t2) = (1,1) (0,1) (0,1) (1,0) (0,0)
    metrics = self_correction_metrics([1, 0, 0, 1, 0], [1, 1, 1, 0, 0])
    assert metrics["acc_t1"] == pytest.approx(0.4)
    assert metrics["acc_t2"] == pytest.approx(0.6)
    assert metrics["delta"] == pytest.approx(0.2)
    assert metrics["delta_i2c"] == pytest.approx(0.4)
    assert metrics["delta_c2i"] == pytest.approx(0.2)
    assert metrics["delta"] == pytest.approx(metrics["delta_i2c"] - metrics["delta_c2i"])
    # SE of acc_t1: sample sd of (1,0,0,1,0) = sqrt(0.3); / sqrt(5)
    assert metrics["acc_t1_se"] == pytest.approx((0.3 / 5) ** 0.5)
    table = format_table({"base": metrics})
    assert "Acc@t1" in table and "Delta_c->i" in table and "40.0" in table and "of 5 held-out" in table


def test_data_order_crosses_epochs_without_skipping_or_repeating():
    state = TrainerState()
    seen = []
    for _ in range(7):  # 7 batches of 3 over 10 problems: 2 epochs + 1 problem
        seen += next_batch(state, 10, 3, seed=1)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # each epoch reshuffles
    assert (state.epoch, state.position) == (2, 1)
    again = TrainerState()
    assert [next_batch(again, 10, 3, seed=1) for _ in range(7)] == [seen[i : i + 3] for i in range(0, 21, 3)]


def test_samples_train_exactly_the_sampled_tokens_of_each_turn():
    # x1 = [1, 2, 3], y1 = [4, 5], x2 = x1 + y1 + [6, 7], y2 = [8]
    episode = {"x1": [1, 2, 3], "y1": [4, 5], "y1_logp": [-0.4, -0.5], "x2": [1, 2, 3, 4, 5, 6, 7], "y2": [8], "y2_logp": [-0.8]}
    ref = [-1.0 * i for i in range(1, 8)]  # 8 tokens -> 7 positions
    scored = {"adv1": [2.0], "adv2": [-3.0], "kl_coef1": [0.1], "kl_coef2": [0.01]}
    (sample,) = build_samples([episode], [ref], scored)
    assert sample["input_ids"] == [1, 2, 3, 4, 5, 6, 7, 8]
    # position p scores token p + 1: y1 tokens (indices 3, 4) -> positions 2, 3; y2 (index 7) -> position 6
    assert sample["loss_mask"] == [0, 0, 1, 1, 0, 0, 1]
    assert trained_positions(episode) == sample["loss_mask"]  # the reference scores exactly these
    assert sample["advantage"] == [0, 0, 2.0, 2.0, 0, 0, -3.0]
    assert sample["kl_coef"] == [0, 0, 0.1, 0.1, 0, 0, 0.01]
    assert sample["old_logp"] == [0, 0, -0.4, -0.5, 0, 0, -0.8]
    assert sample["ref_logp"] == ref
    (single,) = build_samples([episode], [ref], scored, turns=(1,))  # single-turn RL: y2 is not trained
    assert single["loss_mask"] == [0, 0, 1, 1, 0, 0, 0] and single["advantage"][6] == 0
    kl1, kl2 = turn_kl_sums(episode, ref)
    assert kl1 == pytest.approx((-0.4 + 3.0) + (-0.5 + 4.0))
    assert kl2 == pytest.approx(-0.8 + 7.0)


def test_a_checkpoint_cut_short_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "iter-000002").mkdir(parents=True)
    (root / "iter-000002" / COMPLETE).write_text("x")
    (root / "iter-000004").mkdir()  # no COMPLETE marker: a crash mid-write
    (root / ".iter-000006.partial").mkdir()
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["iter-000002"]


def test_wandb_history_reader_on_a_real_offline_run(tmp_path, monkeypatch):
    import wandb

    from score_ray.tracking import read_wandb_history, wait_for_offline_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "300")  # a loaded 2-core machine starts the service slowly
    run = wandb.init(project="t", mode="offline", dir=str(tmp_path))
    for step in range(3):
        run.log({"iteration": step, "train/x": step * 1.5})
    sync_file = run.settings.sync_file
    run.finish()
    assert wait_for_offline_run(Path(sync_file))  # finish() can return before the log is flushed
    rows = read_wandb_history(tmp_path)
    assert [row["train/x"] for row in rows] == [0.0, 1.5, 3.0]


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
