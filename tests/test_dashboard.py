"""The W&B dashboard defined in code, and an offline W&B round trip of MetricsLogger (no W&B server)."""

import json

import pytest

from score_ray import dashboard
from score_ray.dashboard import SECTIONS, Panel, Section

LINE_PLOT = "Run History Line Plot"


def _consts(node):
    """Every string constant of a Weave expression (the table panel's key is one)."""
    if isinstance(node, dict):
        if node.get("nodeType") == "const" and isinstance(node.get("val"), str):
            yield node["val"]
        for value in node.values():
            yield from _consts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _consts(value)


def test_dashboard_sections_panels_and_keys_offline():
    pytest.importorskip("wandb_workspaces")
    spec = dashboard.definition("proj", "ent")
    assert json.loads(json.dumps(spec)) == spec  # JSON-ready as printed by the CLI
    names = ["Self-correction", "Training per turn", "Loss", "Throughput and phase times", "Health", "Eval samples"]
    assert [s["name"] for s in spec["sections"]] == names
    keys = {s["name"]: {k for p in s["panels"] for k in p["keys"]} for s in spec["sections"]}
    assert keys["Self-correction"] == {"eval/acc_t1", "eval/acc_t2", "eval/delta", "eval/delta_i2c", "eval/delta_c2i"}
    assert {"train/reward_t1", "train/reward_t2", "train/kl_t1", "train/kl_t2", "train/entropy_t1", "train/entropy_t2",
            "train/length_t1", "train/length_t2"} <= keys["Training per turn"]
    assert {"train/loss", "train/pg_loss", "train/kl_loss", "train/grad_norm"} <= keys["Loss"]
    perf = {"perf/rollout_seconds", "perf/grading_seconds", "perf/reference_seconds", "perf/learner_seconds",
            "perf/sync_seconds", "perf/iteration_seconds", "perf/generated_tokens"}
    assert perf <= keys["Throughput and phase times"]
    assert {"perf/rollout_retries", "train/step_skipped", "train/grader_alarm"} <= keys["Health"]
    assert keys["Eval samples"] == {"eval/samples"}

    # The W&B view built from it: same sections and keys, every chart over `iteration`.
    view = spec["workspace"]
    assert (view["entity"], view["project"], view["displayName"]) == ("ent", "proj", dashboard.DEFAULT_NAME)
    section_spec = view["spec"]["section"]
    assert section_spec["settings"]["xAxis"] == "iteration"
    wb_sections = section_spec["panelBankConfig"]["sections"]
    assert [s["name"] for s in wb_sections] == names
    for plain, wb in zip(SECTIONS, wb_sections):
        assert len(wb["panels"]) == len(plain.panels)
        for panel, wb_panel in zip(plain.panels, wb["panels"]):
            if panel.kind == "line":
                assert wb_panel["viewType"] == LINE_PLOT
                assert wb_panel["config"]["metrics"] == list(panel.keys)
                assert wb_panel["config"]["xAxis"] == "iteration"
                assert wb_panel["config"]["chartTitle"] == panel.title
            else:
                assert wb_panel["viewType"] == "Weave"
                assert "eval/samples" in set(_consts(wb_panel["config"]))


def test_every_dashboard_key_is_logged_by_the_trainer():
    from score_ray.metrics import METRICS

    logged = set(METRICS)  # what the trainer may log (tests/system/test_trainer_run.py checks a run logs only these)
    assert {"train/loss", "perf/learner_seconds", "train/kl_t2", "eval/delta_i2c", "eval/samples"} <= logged
    missing = dashboard.dashboard_keys() - logged
    assert not missing, f"dashboard keys the trainer does not log: {sorted(missing)}"
    dashboard.check_keys()
    drifted = SECTIONS + (Section("Old", (Panel("renamed", ("train/reward_turn1",)),)),)
    with pytest.raises(ValueError, match="train/reward_turn1"):
        dashboard.check_keys(drifted)


def test_cli_prints_offline_and_save_fails_clearly_offline(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb_workspaces")
    out = tmp_path / "dash.json"
    assert dashboard.main(["--project", "p", "--entity", "e", "--output", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["workspace"]["project"] == "p" and len(written["sections"]) == len(SECTIONS)

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert dashboard.main(["--project", "p", "--save"]) == 2
    assert "needs W&B online" in capsys.readouterr().err

    # Online mode without credentials: a clear error, not a traceback (no network call is made).
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert dashboard.main(["--project", "p", "--save"]) == 2
    err = capsys.readouterr().err
    assert "could not save the workspace" in err and "API key" in err


def eval_episode(prompt: str, y1_text: str, y2_text: str, r1: float, r2: float):
    from score_ray.data import Problem
    from conftest import make_episode

    return make_episode(problem=Problem(id=prompt, kind="math", prompt=prompt, answer="0"), x1=[], y1=[], instruction=[],
                        y2=[], y1_text=y1_text, y2_text=y2_text, r1=r1, r2=r2)


def test_metrics_logger_offline_round_trip(tmp_path, monkeypatch):
    from score_ray.config import load_config
    from score_ray.tracking import MetricsLogger, read_metrics, read_wandb_history, read_wandb_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "300")  # a loaded 2-core machine starts the service slowly
    config = load_config("configs/smoke.yaml", ["logging.wandb=offline", "run.name=x", "logging.group=g",
                                                "logging.tags=[a,b]", "algo.alpha=7.5"])
    run_dir = tmp_path / "x-20250101-000000"
    run_dir.mkdir()
    line_keys = sorted(dashboard.dashboard_keys() - {"iteration", "eval/samples"})
    rows = [{"iteration": i, **{key: i + n / 100 for n, key in enumerate(line_keys)}} for i in (1, 2)]
    episodes = [
        eval_episode("What is 2 + 2?", "5", "4", 0.0, 1.0),
        eval_episode("What is 3 + 3?", "6", "6", 1.0, 1.0),
    ]

    logger = MetricsLogger(run_dir, config)
    for row in rows:
        logger.log(row)
    logger.log_samples(2, episodes)
    logger.finish({"final/acc_t2": 0.5})

    assert read_metrics(run_dir) == rows
    history = read_wandb_history(run_dir)
    assert len(history) == 3
    for row, logged in zip(rows, history):
        assert {key: logged[key] for key in row} == row  # every dashboard chart key, recorded under its name

    # the samples table: a table file in the run's files/media folder, referenced by the history
    table_row = history[2]
    assert table_row["iteration"] == 2
    assert table_row["eval/samples/_type"] == "table-file"
    assert (table_row["eval/samples/nrows"], table_row["eval/samples/ncols"]) == (2, 7)
    (offline_run,) = run_dir.glob("wandb/offline-run-*")
    table = json.loads((offline_run / "files" / table_row["eval/samples/path"]).read_text())
    assert table["columns"] == ["iteration", "problem", "y1", "y2", "r1", "r2", "corrected"]
    assert table["data"] == [[2, "What is 2 + 2?", "5", "4", 0.0, 1.0, True],
                             [2, "What is 3 + 3?", "6", "6", 1.0, 1.0, False]]

    # the run record: name, group, tags, project and the resolved config; the summary; the step metric
    run = read_wandb_run(run_dir)
    assert run["id"] == (run_dir / "wandb_run_id").read_text().strip()
    assert run["name"] == f"x-{run_dir.name}"
    assert (run["group"], run["tags"], run["project"]) == ("g", ["a", "b"], config.logging.project)
    assert run["config"] == config.model_dump(mode="json")
    assert run["config"]["algo"]["alpha"] == 7.5
    assert run["summary"]["final/acc_t2"] == 0.5
    assert run["summary"]["train/loss"] == rows[-1]["train/loss"]
    assert {p: run["step_metrics"][p] for p in ("train/*", "eval/*", "perf/*")} == dict.fromkeys(
        ("train/*", "eval/*", "perf/*"), dashboard.X_AXIS)
