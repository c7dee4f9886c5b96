"""score_ray.checkpoints: one definition of a whole checkpoint; checkpoints cut short or torn; pruning;
metric rows rolled back on resume."""

import json
import shutil
from pathlib import Path

import pytest

from score_ray.checkpoints import (
    COMPLETE,
    TrainerState,
    load_state,
    roll_back_metrics,
    save_checkpoint,
    scan_checkpoints,
    verify_checkpoint,
    whole_checkpoints,
)


def test_a_checkpoint_cut_short_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "iter-000002").mkdir(parents=True)
    (root / "iter-000002" / COMPLETE).write_text(json.dumps({"files": {}}))
    (root / "iter-000004").mkdir()  # no COMPLETE marker: a crash mid-write
    (root / ".iter-000006.partial").mkdir()
    assert [p.name for p in whole_checkpoints(tmp_path)] == ["iter-000002"]


class FileWritingLearner:
    """Writes checkpoint files the way a DeepSpeed engine does (a folder of binary shards), optionally
    dying half-way: the subject here is the trainer's checkpoint protocol, not DeepSpeed."""

    def __init__(self, crash_after: int = -1):
        self.crash_after = crash_after

    def save_checkpoint(self, folder: str, tag: str) -> None:
        target = Path(folder) / tag
        target.mkdir(parents=True)
        for index in range(3):
            if index == self.crash_after:
                raise KeyboardInterrupt("killed mid-write")
            (target / f"shard_{index}.pt").write_bytes(bytes(range(256)) * (index + 1))


def test_a_checkpoint_cut_short_mid_write_is_skipped_for_the_previous_one(tmp_path):
    save_checkpoint(tmp_path, FileWritingLearner(), TrainerState(iteration=1, position=8), keep=3)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, FileWritingLearner(crash_after=1), TrainerState(iteration=2), keep=3)
    whole, damaged = scan_checkpoints(tmp_path)
    assert [p.name for p in whole] == ["iter-000001"]
    assert [(p.name, reason) for p, reason in damaged] == [(".iter-000002.partial", "left half-written by a crash")]
    assert load_state(whole[0]).position == 8
    # the next save of that iteration replaces the partial folder
    save_checkpoint(tmp_path, FileWritingLearner(), TrainerState(iteration=2), keep=3)
    assert [p.name for p in whole_checkpoints(tmp_path)] == ["iter-000002", "iter-000001"]
    assert scan_checkpoints(tmp_path)[1] == []


def test_a_torn_or_unmarked_checkpoint_is_detected(tmp_path):
    for iteration in (1, 2, 3):
        save_checkpoint(tmp_path, FileWritingLearner(), TrainerState(iteration=iteration), keep=3)
    root = tmp_path / "checkpoints"
    shard = root / "iter-000003" / "deepspeed" / "state" / "shard_2.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # a copy torn by a full disk or a crashed sync
    (root / "iter-000002" / "COMPLETE").unlink()  # a marker that never got written
    assert verify_checkpoint(root / "iter-000003") == "deepspeed/state/shard_2.pt has 100 bytes, 768 were written"
    assert verify_checkpoint(root / "iter-000002") == "no COMPLETE marker (the write was cut short)"
    whole, damaged = scan_checkpoints(tmp_path)
    assert [p.name for p in whole] == ["iter-000001"]
    assert [p.name for p, _ in damaged] == ["iter-000003", "iter-000002"]
    shutil.rmtree(root / "iter-000001" / "deepspeed" / "state")
    assert verify_checkpoint(root / "iter-000001").endswith("is missing")


def test_keep_prunes_old_checkpoints_only_after_the_new_one_is_whole(tmp_path):
    for iteration in (1, 2, 3):
        save_checkpoint(tmp_path, FileWritingLearner(), TrainerState(iteration=iteration), keep=2)
    assert [p.name for p in whole_checkpoints(tmp_path)] == ["iter-000003", "iter-000002"]
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, FileWritingLearner(crash_after=0), TrainerState(iteration=4), keep=2)
    assert [p.name for p in whole_checkpoints(tmp_path)] == ["iter-000003", "iter-000002"]


def test_metric_rows_after_the_resumed_checkpoint_are_moved_aside_not_lost(tmp_path):
    rows = [{"iteration": 0, "eval/acc_t1": 0.1}, {"iteration": 1, "train/loss": 1.0},
            {"iteration": 2, "train/loss": 0.9}, {"iteration": 3, "train/loss": 0.8}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 4, "train/lo'  # torn by the crash
    (tmp_path / "metrics.jsonl").write_text(text)
    assert roll_back_metrics(tmp_path, 2) == 2
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:3]
    aside = (tmp_path / "metrics.rolled_back.jsonl").read_text().splitlines()
    assert json.loads(aside[0]) == rows[3] and aside[1].startswith('{"iteration": 4')
    assert roll_back_metrics(tmp_path, 2) == 0


def test_a_torn_checkpoint_is_never_resumed_from_nor_counted_when_pruning(tmp_path):
    # the launch, the resume and the pruning share verify_checkpoint: a torn newest one is passed over by all
    for iteration in (1, 2):
        save_checkpoint(tmp_path, FileWritingLearner(), TrainerState(iteration=iteration), keep=1)
    assert [p.name for p in whole_checkpoints(tmp_path)] == ["iter-000002"]
    shard = tmp_path / "checkpoints" / "iter-000002" / "deepspeed" / "state" / "shard_0.pt"
    shard.write_bytes(b"torn")
    assert whole_checkpoints(tmp_path) == []
    save_checkpoint(tmp_path, FileWritingLearner(), TrainerState(iteration=3), keep=1)
    assert [p.name for p in whole_checkpoints(tmp_path)] == ["iter-000003"]
    assert (tmp_path / "checkpoints" / "iter-000002").exists()  # damaged: kept for a look, never pruned as whole
