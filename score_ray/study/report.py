"""A study's report from its finished runs: ``summary.json``, ``table.md`` (the paper's table, mean over
seeds +- standard error, score_ray.study.stats) and ``plot.png`` (Delta and Acc@t2 per method; held-out
accuracy, sampled reward and truncation over iterations), all under results/<study>/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from score_ray import outcomes
from score_ray.study.stats import PER_PROBLEM, Records, change_estimates, common_problems, estimate, gain

if TYPE_CHECKING:
    from score_ray.study import StudySpec

KEYS = tuple(PER_PROBLEM)
# the second attempt's answer changes (score_ray.study.stats.change_estimates), where the records have them
CHANGE_KEYS = ("eval/changed", "eval/change_precision")
LABELS = {**{f"eval/{key}": label for key, label in outcomes.LABELS.items()},
          "eval/changed": "changed", "eval/change_precision": "precision of changes"}


# Where a re-graded report goes: results/<study>/<REGRADED>/, beside the report as the runs graded themselves.
REGRADED = "truncated_wrong"


def read_records(path: Path, truncated_wrong: bool = False) -> Records:
    """problem id -> (r1, r2) from a run's eval_final.jsonl.

    ``truncated_wrong`` re-grades a run made with ``reward.credit_truncated=true`` as the grader now grades
    (score_ray.reward.Grader): a response cut at the token cap earns 0. Failing closed only ever takes reward
    away from cut responses, so the stored rewards of whole ones stand and no text needs grading again.
    """
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            r1, r2 = float(row["r1"]), float(row["r2"])
            if truncated_wrong:
                if "truncated1" not in row or "truncated2" not in row:
                    raise ValueError(f"{path}: row {row['id']!r} has no truncated1/truncated2, so it cannot be re-graded")
                r1, r2 = (0.0 if row["truncated1"] else r1), (0.0 if row["truncated2"] else r2)
            records[row["id"]] = (r1, r2)
    return records


def read_changes(path: Path) -> Optional[dict[str, bool]]:
    """problem id -> whether the second attempt changed the final answer, from a run's eval_final.jsonl; None
    for records written before changes were recorded."""
    changes = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "changed" not in row:
                return None
            changes[row["id"]] = bool(row["changed"])
    return changes


def read_cut_first_attempts(path: Path) -> Optional[set[str]]:
    """The problem ids whose first attempt a run's eval_final.jsonl records as cut at the token cap; None for
    records written before truncation was recorded."""
    cut = set()
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "truncated1" not in row:
                return None
            if row["truncated1"]:
                cut.add(row["id"])
    return cut


def finished_runs(spec: "StudySpec") -> dict[str, dict[int, Path]]:
    """method -> seed -> the run's folder of kept files, for the runs that finished."""
    from score_ray.study import run_folder

    found: dict[str, dict[int, Path]] = {}
    for method, chosen in spec.methods.items():
        for seed in chosen.seeds:
            folder = run_folder(spec, method, seed)
            if (folder / "summary.json").is_file() and (folder / "eval_final.jsonl").is_file():
                found.setdefault(method, {})[seed] = folder
    return found


def summarise(spec: "StudySpec", runs: dict[str, dict[int, Path]], truncated_wrong: bool = False) -> dict:
    """The summary.json of the issue's shape: per method its seeds and the five metrics' mean and se, and the
    treated method's gain over the control, paired per problem (over the problems every run evaluated)."""
    records = {method: [read_records(folder / "eval_final.jsonl", truncated_wrong) for folder in seeds.values()]
               for method, seeds in runs.items()}
    problems = common_problems([run for runs_of in records.values() for run in runs_of])
    summary: dict = {"study": spec.name, "n_problems": len(problems), "methods": {}}
    for method, runs_of in records.items():
        summary["methods"][method] = {"seeds": sorted(runs[method]),
                                      **{key: estimate(runs_of, problems, key) for key in KEYS}}
        changes = [read_changes(folder / "eval_final.jsonl") for folder in runs[method].values()]
        if all(change is not None for change in changes):
            summary["methods"][method].update(change_estimates(runs_of, changes, problems))
    if problems and spec.treated in records and spec.control in records:
        summary["gain"] = {key: gain(records[spec.treated], records[spec.control], problems, key) for key in KEYS}
        summary["gain_of"] = f"{spec.treated} - {spec.control}"
        split = _gain_split_by_control_cut(records[spec.treated], records[spec.control],
                                           [folder / "eval_final.jsonl" for folder in runs[spec.control].values()],
                                           problems)
        if split:
            summary["gain_split"] = split
    return summary


def _gain_split_by_control_cut(treated: list[Records], control: list[Records], control_paths: list[Path],
                               problems: list[str]) -> dict:
    """The gain on the problems whose first attempt the control cut at the token cap (in every seed) and on
    the rest, each over its own problems: how much of a gain is answers that stopped running to the cap.
    Empty where the control's records predate truncation being recorded."""
    cut_sets = [read_cut_first_attempts(path) for path in control_paths]
    if any(cut is None for cut in cut_sets):
        return {}
    cut_everywhere = set.intersection(*cut_sets)
    parts = {"cut": [problem for problem in problems if problem in cut_everywhere],
             "finished": [problem for problem in problems if problem not in cut_everywhere]}
    return {part: {"n": len(chosen), **{key: gain(treated, control, chosen, key) for key in KEYS}}
            for part, chosen in parts.items() if chosen}


def table(summary: dict) -> str:
    changes = [key for key in CHANGE_KEYS if all(key in entry for entry in summary["methods"].values())]
    header = "| method | seeds | " + " | ".join(LABELS[k] for k in KEYS + tuple(changes)) + " |"
    lines = [header, "|" + "---|" * (len(KEYS) + len(changes) + 2)]
    rows = [(name, entry) for name, entry in summary["methods"].items()]
    if "gain" in summary:
        rows.append((f"gain: {summary['gain_of']}", {"seeds": [], **summary["gain"]}))
    control = summary.get("gain_of", " - ").split(" - ")[1]
    for part, entry in summary.get("gain_split", {}).items():
        rows.append((f"gain where {control}'s first attempt was {part} ({entry['n']})", {"seeds": [], **entry}))
    for name, entry in rows:
        cells = " | ".join(f"{100 * entry[k]['mean']:+.1f} +- {100 * entry[k]['se']:.1f}" if name.startswith("gain")
                           else f"{100 * entry[k]['mean']:.1f} +- {100 * entry[k]['se']:.1f}" for k in KEYS)
        cells += "".join(f" | {100 * entry[k]['mean']:.1f} +- {100 * entry[k]['se']:.1f}" if k in entry else " | "
                         for k in changes)
        seeds = len(entry["seeds"]) if entry["seeds"] else ""
        lines.append(f"| {name} | {seeds} | {cells} |")
    lines.append("")
    lines.append(f"Percent of {summary['n_problems']} held-out problems (greedy, two turns); mean over seeds +- one "
                 "standard error counting the problems (paired per problem) and the seeds.")
    if changes:
        lines.append("changed: the second attempt's final answer differs from the first's; precision of changes: of "
                     "those, the share whose first answer was wrong.")
    if summary.get("gain_split"):
        lines.append("The gain split by whether the control's greedy first attempt was cut at the token cap (in every "
                     "seed): percent of each row's own problems.")
    return "\n".join(lines) + "\n"


def metric_curves(runs: dict[str, dict[int, Path]], keys: tuple[str, ...]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """method -> key -> [(iteration, mean over the seeds that logged it)], from each run's metrics.jsonl."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for method, seeds in runs.items():
        points: dict[str, dict[int, list[float]]] = {key: {} for key in keys}
        for folder in seeds.values():
            path = folder / "metrics.jsonl"
            if not path.is_file():
                continue
            for line in path.read_text().splitlines():
                row = json.loads(line) if line.strip() else {}
                for key in keys:
                    if key in row:
                        points[key].setdefault(row["iteration"], []).append(row[key])
        found = {key: [(it, sum(v) / len(v)) for it, v in sorted(by_iteration.items())]
                 for key, by_iteration in points.items() if by_iteration}
        if found:
            curves[method] = found
    return curves


# the right-hand panels: what the held-out eval saw, and what training sampled (its reward and the share of
# first attempts cut at the token cap, where every collapsed run of the CPU studies ended)
CURVE_PANELS = (
    ("eval/acc_t2", "held-out Acc@t2 (%)", "Held-out accuracy over training"),
    ("train/reward_t2", "sampled turn-2 reward (%)", "Sampled second-attempt reward in training"),
    ("train/truncated_t1", "sampled first attempts cut (%)", "First attempts cut at the token cap in training"),
)


def plot(summary: dict, curves: dict, path: Path, control: str = "base") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary["methods"])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    bars, panels = axes[0][0], [axes[0][1], axes[1][0], axes[1][1]]
    width = 0.38
    for offset, key, label in ((-width / 2, "eval/delta", "Delta(t1,t2)"), (width / 2, "eval/acc_t2", "Acc@t2")):
        means = [100 * summary["methods"][m][key]["mean"] for m in methods]
        errors = [100 * summary["methods"][m][key]["se"] for m in methods]
        bars.bar([i + offset for i in range(len(methods))], means, width, yerr=errors, capsize=3, label=label)
    bars.axhline(0, color="black", linewidth=0.8)
    bars.set_xticks(range(len(methods)), methods, rotation=20)
    bars.set_ylabel("percent of held-out problems")
    bars.set_title(f"Delta and Acc@t2 per method (+- 1 SE, {summary['n_problems']} problems)")
    bars.legend()
    untrained = summary["methods"].get(control)
    for axis, (key, ylabel, title) in zip(panels, CURVE_PANELS):
        if key == "eval/acc_t2" and untrained is not None:
            # the control is every run's model before training: iteration 0 of each held-out curve
            axis.axhline(100 * untrained[key]["mean"], color="gray", linestyle="--", linewidth=0.8,
                         label=f"{control} Acc@t2")
        for method, by_key in curves.items():
            points = by_key.get(key, [])
            if key == "eval/acc_t2" and untrained is not None and points and points[0][0] > 0:
                points = [(0, untrained[key]["mean"])] + points
            if points:
                axis.plot([p[0] for p in points], [100 * p[1] for p in points], marker=".", label=method)
        axis.set_xlabel("iteration")
        axis.set_ylabel(ylabel)
        axis.set_title(f"{title} (mean over seeds)", fontsize=10)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(spec: "StudySpec", show: bool = False, truncated_wrong: bool = False) -> dict:
    """The report under results/<study>/; with ``truncated_wrong``, the runs' evals re-graded with cut responses
    wrong (read_records), under results/<study>/truncated_wrong/ (summary and table: the training curves in
    the plot were graded as the runs ran, so it is not redrawn)."""
    runs = finished_runs(spec)
    out = Path(spec.results_dir) / spec.name / (REGRADED if truncated_wrong else "")
    out.mkdir(parents=True, exist_ok=True)
    if not runs:
        return {}
    summary = summarise(spec, runs, truncated_wrong)
    if truncated_wrong:
        summary["regraded"] = "responses cut at the token cap counted wrong (eval records re-read, not re-run)"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(table(summary))
    if not truncated_wrong:
        plot(summary, metric_curves(runs, tuple(key for key, _, _ in CURVE_PANELS)), out / "plot.png", spec.control)
    if show:
        print(table(summary), flush=True)
    return summary
