"""Checkpoints of a run: what they hold, when one is whole, saving, listing, pruning, resuming.

A checkpoint is ``run_dir/checkpoints/iter-NNNNNN/`` with DeepSpeed's folder (weights and optimiser
state of every rank) and ``trainer_state.json`` (``TrainerState``: what makes a resume exact). It is
written into a hidden ``.iter-NNNNNN.partial`` folder and renamed when complete. A checkpoint is WHOLE
when its COMPLETE marker lists every file with its size and every file is there with that size
(``verify_checkpoint``): the one definition used by resume, pruning and the launch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from score_ray.faults import LearnerLost

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"


@dataclass
class TrainerState:
    """The trainer's side of a checkpoint (the learner's weights and optimiser are DeepSpeed's)."""

    iteration: int = 0  # iterations completed
    epoch: int = 0
    position: int = 0  # next index into this epoch's order of training problems
    base_eval: Optional[dict[str, float]] = None
    skipped_steps: int = 0  # optimiser steps DeepSpeed dropped for a non-finite gradient
    skipped_in_row: int = 0


def _manifest(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def verify_checkpoint(folder: Path) -> Optional[str]:
    """None when ``folder`` is whole, else why not: no COMPLETE marker, or a file missing or cut short
    (COMPLETE lists every file with its size, so a marker written over a torn copy is caught too)."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return "no COMPLETE marker (the write was cut short)"
    try:
        listed = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "COMPLETE marker unreadable"
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def scan_checkpoints(run_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(whole checkpoints newest first, [(damaged or partial folder, why)] newest first)."""
    root = run_dir / CHECKPOINTS
    whole, damaged = [], []
    if root.exists():
        folders = [p for p in root.iterdir() if p.is_dir() and p.name.lstrip(".").startswith("iter-")]
        for folder in sorted(folders, key=lambda p: p.name.lstrip("."), reverse=True):
            if folder.name.endswith(".partial"):
                damaged.append((folder, "left half-written by a crash"))
                continue
            reason = verify_checkpoint(folder)
            if reason is None:
                whole.append(folder)
            else:
                damaged.append((folder, reason))
    return whole, damaged


def whole_checkpoints(run_dir: Path) -> list[Path]:
    """The run's whole checkpoints, newest first."""
    return scan_checkpoints(run_dir)[0]


def save_checkpoint(run_dir: Path, learner, state: TrainerState, keep: int) -> Path:
    """Write into a hidden partial folder, list every file with its size in COMPLETE, rename, and only
    then prune the whole checkpoints beyond the newest ``keep``."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter-{state.iteration:06d}"
    partial = root / f".iter-{state.iteration:06d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    learner.save_checkpoint(str(partial / "deepspeed"), tag="state")
    (partial / "trainer_state.json").write_text(json.dumps(asdict(state)))
    marker = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "files": _manifest(partial)}
    (partial / COMPLETE).write_text(json.dumps(marker, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for old in whole_checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(folder: Path) -> TrainerState:
    data = json.loads((folder / "trainer_state.json").read_text())
    data.pop("rng_state", None)  # written by earlier versions, never drawn from: every seed is derived
    return TrainerState(**data)


def load_newest(run_dir: Path, learner) -> tuple[Optional[Path], TrainerState]:
    """Load the newest whole checkpoint into ``learner`` and return (its folder, its TrainerState); damaged
    ones, and whole ones that do not load, are reported and passed over. (None, a fresh state) when none loads."""
    whole, damaged = scan_checkpoints(run_dir)
    for folder, reason in damaged:
        print(f"score_ray: skipping checkpoint {folder.name}: {reason}", file=sys.stderr, flush=True)
    for folder in whole:
        try:
            state = load_state(folder)
            learner.load_checkpoint(str(folder / "deepspeed"), tag="state")
        except LearnerLost:  # the group itself went: not the checkpoint's fault
            raise
        except Exception as err:  # noqa: BLE001 - an unreadable checkpoint: fall back to the one before
            print(f"score_ray: skipping checkpoint {folder.name}: it does not load ({err})", file=sys.stderr, flush=True)
            continue
        return folder, state
    return None, TrainerState()


def roll_back_metrics(run_dir: Path, iteration: int) -> int:
    """Move metric rows past ``iteration`` (logged after the checkpoint a resume starts from) into
    metrics.rolled_back.jsonl, so the redone iterations are not counted twice and nothing is deleted."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # a line torn by the crash
            moved.append(line)
            continue
        (moved if row.get("iteration", 0) > iteration else keep).append(line)
    if moved:
        with open(run_dir / "metrics.rolled_back.jsonl", "a") as handle:
            handle.write("\n".join(moved) + "\n")
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return len(moved)
