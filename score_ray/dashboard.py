"""The W&B dashboard of a SCoRe project, defined in code.

``SECTIONS`` is the definition as plain data (section -> panels -> metric keys, all over ``iteration``);
``build_workspace`` maps it to a saved W&B workspace (``wandb_workspaces.workspaces.Workspace``).
Every key is one of the logged metrics named in score_ray.metrics; ``check_keys`` (run by the tests and
before every save) fails on a key that is not.

    python -m score_ray.dashboard --project P [--entity E] [--name N] [--output FILE]  # JSON, offline
    python -m score_ray.dashboard --project P [--entity E] --save                      # push to W&B
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

X_AXIS = "iteration"  # MetricsLogger defines train/*, eval/*, perf/* over this step metric (metrics.ITERATION)
DEFAULT_NAME = "SCoRe self-correction"
WORKSPACES_PIN = "wandb-workspaces==0.4.13"


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]
    kind: Literal["line", "table"] = "line"  # table: a logged wandb.Table, shown from the run summary
    stacked: bool = False  # line panels only: a stacked area (parts of a whole, e.g. phase times)


@dataclass(frozen=True)
class Section:
    name: str
    panels: tuple[Panel, ...]


SECTIONS: tuple[Section, ...] = (
    Section("Self-correction", (
        Panel("Held-out accuracy per turn (greedy)", ("eval/acc_t1", "eval/acc_t2")),
        Panel("Delta(t1, t2) = Acc@t2 - Acc@t1", ("eval/delta",)),
        Panel("Delta i->c and c->i (fractions of all problems)", ("eval/delta_i2c", "eval/delta_c2i")),
    )),
    Section("Training per turn", (
        Panel("Reward per turn (sampled)", ("train/reward_t1", "train/reward_t2", "train/shaped_reward_t2")),
        Panel("KL to the reference per turn (k3, per token)", ("train/kl_t1", "train/kl_t2")),
        Panel("Entropy per turn (per token)", ("train/entropy_t1", "train/entropy_t2")),
        Panel("Length per turn (tokens)", ("train/length_t1", "train/length_t2")),
        Panel("Truncated per turn (fraction)", ("train/truncated_t1", "train/truncated_t2")),
        Panel("Sampled corrections i->c and c->i", ("train/i2c", "train/c2i")),
        Panel("Stage (1 or 2)", ("train/stage",)),
    )),
    Section("Loss", (
        Panel("Loss (per token)", ("train/loss", "train/pg_loss", "train/kl_loss")),
        Panel("Gradient norm", ("train/grad_norm",)),
        Panel("Learner entropy and PPO clip fraction", ("train/learner_entropy", "train/clip_fraction")),
    )),
    Section("Throughput and phase times", (
        Panel("Phase times (s)", ("perf/rollout_seconds", "perf/grading_seconds", "perf/reference_seconds",
                                  "perf/learner_seconds", "perf/sync_seconds"), stacked=True),
        Panel("Iteration and eval time (s)", ("perf/iteration_seconds", "perf/eval_seconds")),
        Panel("Generated tokens per rollout", ("perf/generated_tokens",)),
        Panel("Grader timeouts and errors (fraction)", ("train/grader_timeouts", "train/grader_errors")),
    )),
    Section("Health", (
        Panel("Faults: generator retries, skipped steps, grading alarms",
              ("perf/rollout_retries", "train/step_skipped", "train/grader_alarm")),
        Panel("Orchestration overhead (fraction of the iteration)", ("perf/orchestration_fraction",)),
        Panel("Off-policy iterations (rollout.overlap)", ("train/off_policy",)),
    )),
    Section("Eval samples", (
        Panel("Eval episodes: problem, both attempts, rewards", ("eval/samples",), kind="table"),
    )),
)


def dashboard_keys(sections: tuple[Section, ...] = SECTIONS) -> set[str]:
    """Every metric key the dashboard shows (the x axis included)."""
    return {X_AXIS} | {key for section in sections for panel in section.panels for key in panel.keys}


def check_keys(sections: tuple[Section, ...] = SECTIONS) -> None:
    """Raise ValueError naming every dashboard key the trainer does not log."""
    from score_ray.metrics import METRICS

    unknown = sorted(dashboard_keys(sections) - set(METRICS))
    if unknown:
        raise ValueError(f"dashboard keys the trainer does not log: {', '.join(unknown)}")


# ----------------------------------------------------------------------------- W&B workspace


def build_workspace(project: str, entity: Optional[str] = None, name: str = DEFAULT_NAME,
                    sections: tuple[Section, ...] = SECTIONS):
    """``SECTIONS`` as a ``wandb_workspaces.workspaces.Workspace`` (built offline; ``.save()`` needs W&B).

    ``entity=None`` leaves the entity empty; ``save`` resolves it to the API key's default entity.
    """
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise ImportError(f"the W&B dashboard needs {WORKSPACES_PIN} (pip install {WORKSPACES_PIN})") from err

    def panel(spec: Panel):
        if spec.kind == "table":
            (key,) = spec.keys
            return wr.WeavePanelSummaryTable(table_name=key, layout=wr.Layout(w=24, h=12))
        return wr.LinePlot(title=spec.title, x=X_AXIS, y=list(spec.keys), title_x=X_AXIS,
                           plot_type="stacked-area" if spec.stacked else None)

    return ws.Workspace(
        entity=entity or "",
        project=project,
        name=name,
        settings=ws.WorkspaceSettings(x_axis=X_AXIS),
        sections=[
            ws.Section(name=section.name, is_open=True, panels=[panel(p) for p in section.panels],
                       panel_settings=ws.SectionPanelSettings(x_axis=X_AXIS))
            for section in sections
        ],
    )


def workspace_json(workspace) -> dict[str, Any]:
    """The workspace as W&B stores it (the view and its spec), as JSON-ready data."""
    return workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def definition(project: str, entity: Optional[str] = None, name: str = DEFAULT_NAME) -> dict[str, Any]:
    """The plain definition plus the W&B view built from it: what ``python -m score_ray.dashboard`` prints."""
    return {
        "project": project,
        "entity": entity,
        "name": name,
        "x_axis": X_AXIS,
        "sections": json.loads(json.dumps([asdict(section) for section in SECTIONS])),  # tuples -> lists
        "workspace": workspace_json(build_workspace(project, entity, name)),
    }


class DashboardSaveError(RuntimeError):
    pass


def save_workspace(project: str, entity: Optional[str] = None, name: str = DEFAULT_NAME) -> str:
    """Push the workspace to W&B (needs network and an API key); returns its URL."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        raise DashboardSaveError(f"WANDB_MODE={mode}: saving a workspace needs W&B online "
                                 "(unset WANDB_MODE, run `wandb login`, then retry)")
    check_keys()
    import wandb

    try:
        api = wandb.Api(timeout=30)
        entity = entity or api.default_entity
        workspace = build_workspace(project, entity, name).save()
        return workspace.url
    except Exception as err:  # wandb.errors.Error, requests' connection errors, GraphQL errors
        raise DashboardSaveError(
            f"could not save the workspace to W&B ({type(err).__name__}: {err}). Saving needs network access "
            "to the W&B server and an API key (`wandb login` or WANDB_API_KEY); offline, print the definition "
            "without --save."
        ) from err


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m score_ray.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True, help="W&B project (logging.project of the runs)")
    parser.add_argument("--entity", default=None, help="W&B entity (default: the API key's default entity)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="name of the saved workspace view")
    parser.add_argument("--output", default=None, help="write the JSON definition to this file instead of stdout")
    parser.add_argument("--save", action="store_true", help="push the workspace to W&B (needs W&B online)")
    args = parser.parse_args(argv)

    if args.save:
        try:
            url = save_workspace(args.project, args.entity, args.name)
        except DashboardSaveError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"saved workspace {args.name!r}: {url}")
        return 0
    check_keys()
    text = json.dumps(definition(args.project, args.entity, args.name), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
