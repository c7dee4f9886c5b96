"""Metrics: metrics.jsonl in the run folder, W&B (online / offline / disabled), and PNG plots."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Optional

from score_ray.metrics import EVAL_SAMPLES, ITERATION


class MetricsLogger:
    """One JSON object per logged iteration in ``metrics.jsonl``; the same values to W&B."""

    def __init__(self, run_dir: Path, config, resume: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.run = None
        logging_config = config.logging
        if logging_config.wandb != "disabled":
            import wandb

            run_id_file = run_dir / "wandb_run_id"
            run_id = run_id_file.read_text().strip() if resume and run_id_file.exists() else uuid.uuid4().hex[:8]
            settings = dict(
                project=logging_config.project,
                entity=logging_config.entity,
                group=logging_config.group,
                tags=logging_config.tags,
                name=f"{config.run.name}-{run_dir.name}",
                resume="allow",
                mode=logging_config.wandb,
                dir=str(run_dir),
                config=config.model_dump(mode="json"),
            )
            try:
                self.run = wandb.init(id=run_id, **settings)
            except Exception as err:  # noqa: BLE001 - wandb raises its own error types
                if "in use" not in str(err):
                    raise
                # A W&B service shared through WANDB_SERVICE still holds the killed driver's stream for this
                # id: log to a new run of the same name and group (metrics.jsonl stays the complete record).
                run_id = uuid.uuid4().hex[:8]
                print(f"score_ray: W&B run {run_id_file.read_text().strip()} is still held by a dead process; "
                      f"logging to new run {run_id}", flush=True)
                self.run = wandb.init(id=run_id, **settings)
            run_id_file.write_text(run_id)
            # Every chart shares the iteration axis.
            self.run.define_metric("iteration")
            for prefix in ("train/*", "eval/*", "perf/*"):
                self.run.define_metric(prefix, step_metric="iteration")

    def log(self, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.run is not None:
            self.run.log(metrics)

    def log_samples(self, iteration: int, episodes: list, limit: int = 16) -> None:
        """A W&B table of sample eval episodes: problem, both attempts, rewards, whether corrected."""
        if self.run is None:
            return
        import wandb

        from score_ray.outcomes import corrected

        table = wandb.Table(columns=["iteration", "problem", "y1", "y2", "r1", "r2", "corrected"])
        for episode in episodes[:limit]:
            table.add_data(
                iteration, episode.problem.prompt, episode.y1_text, episode.y2_text,
                episode.r1, episode.r2, corrected(episode.r1, episode.r2),
            )
        self.run.log({ITERATION: iteration, EVAL_SAMPLES: table})

    def finish(self, summary: Optional[dict[str, Any]] = None, exit_code: int = 0) -> None:
        if self.run is not None:
            if summary:
                for key, value in summary.items():
                    self.run.summary[key] = value
            offline = self.run.settings.mode == "offline"
            sync_file = Path(self.run.settings.sync_file)
            self.run.finish(exit_code=exit_code)
            self.run = None
            if offline:
                # wandb's service can still be writing the offline log when finish() returns (seen with
                # wandb 0.31 on a loaded machine): wait for its exit record so the run folder is complete
                # for readers and `wandb sync`.
                wait_for_offline_run(sync_file)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finish(plt, fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(run_dir: Path) -> list[Path]:
    """acc_t1 / acc_t2 over evals and per-turn training rewards over iterations, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    written = []
    evals = [r for r in rows if "eval/acc_t1" in r]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        x = [r["iteration"] for r in evals]
        for key, label in (("eval/acc_t1", "Acc@t1"), ("eval/acc_t2", "Acc@t2")):
            y = [100 * r[key] for r in evals]
            se = [100 * r.get(key + "_se", 0.0) for r in evals]
            ax.errorbar(x, y, yerr=se, marker="o", capsize=3, label=label)
        written.append(_finish(plt, fig, ax, "iteration", "held-out accuracy (%)", "Two-turn accuracy (greedy)",
                               Path(run_dir) / "eval_accuracy.png"))
    train = [r for r in rows if "train/reward_t1" in r]
    if train:
        fig, ax = plt.subplots(figsize=(6, 4))
        x = [r["iteration"] for r in train]
        ax.plot(x, [r["train/reward_t1"] for r in train], marker=".", label="turn 1 reward")
        ax.plot(x, [r["train/reward_t2"] for r in train], marker=".", label="turn 2 reward")
        for r in train:
            if r.get("train/stage") == 1:
                ax.axvspan(r["iteration"] - 0.5, r["iteration"] + 0.5, color="grey", alpha=0.1, lw=0)
        written.append(_finish(plt, fig, ax, "iteration (shaded: Stage I)", "mean reward (sampled)",
                               "Training rewards per turn", Path(run_dir) / "train_rewards.png"))
    return written


def _records_in(file: Path):
    """The protobuf records of one ``.wandb`` file: LevelDB's log format (32 KiB blocks, 7-byte headers)."""
    import struct

    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    data = Path(file).read_bytes()
    position, block, pieces = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # block trailer padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            continue
        pieces = payload if kind in (1, 2) else pieces + payload
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(pieces)
        except DecodeError:  # the tail of a log still being written
            return
        yield record


def _wandb_records(run_dir: Path):
    """Every protobuf record of the offline W&B run(s) in ``run_dir/wandb``, in order, read with wandb's own types."""
    for file in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        yield from _records_in(file)


def wait_for_offline_run(sync_file: Path, timeout: float = 60.0) -> bool:
    """Wait until an offline run's ``.wandb`` log holds its exit record (the run is completely written)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        if Path(sync_file).exists() and any(r.WhichOneof("record_type") == "exit" for r in _records_in(sync_file)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows of an offline W&B run in ``run_dir/wandb``, read with wandb's own record types.

    This lets tests and users check what was logged without a W&B server.
    """
    rows: list[dict[str, Any]] = []
    for record in _wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append({_item_key(item): json.loads(item.value_json) for item in record.history.item})
    return rows


def read_wandb_run(run_dir: Path) -> dict[str, Any]:
    """What an offline W&B run in ``run_dir/wandb`` recorded about itself, without a W&B server.

    Returns ``id``, ``project``, ``entity``, ``name``, ``group``, ``tags`` (from the run record),
    ``config`` (the run record's config with later config updates applied; nested dicts as logged),
    ``summary`` (the last summary record's values) and ``step_metrics`` (``define_metric``: metric name
    or glob -> its step metric). Empty dict when no run record exists.
    """
    run: dict[str, Any] = {}
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    step_metrics: dict[str, str] = {}

    def apply(update) -> None:
        for item in update.update:
            config[_item_key(item)] = json.loads(item.value_json)
        for item in update.remove:
            config.pop(_item_key(item), None)

    for record in _wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = {"id": r.run_id, "project": r.project, "entity": r.entity, "name": r.display_name,
                   "group": r.run_group, "tags": list(r.tags)}
            apply(r.config)
        elif kind == "config":
            apply(record.config)
        elif kind == "summary":
            for item in record.summary.update:
                summary[_item_key(item)] = json.loads(item.value_json)
        elif kind == "metric" and not record.metric.expanded_from_glob:
            metric = record.metric
            step_metrics[metric.glob_name or metric.name] = metric.step_metric
    if not run:
        return {}
    config.pop("_wandb", None)  # wandb's own bookkeeping, not the run's config
    return {**run, "config": config, "summary": summary, "step_metrics": step_metrics}
