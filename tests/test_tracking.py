"""score_ray.tracking: reading back what W&B wrote offline."""

from pathlib import Path


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
