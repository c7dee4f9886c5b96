"""Studies: methods x seeds, run one after another on the same held-out problems, then the paper's table.

    python -m score_ray.study configs/studies/cpu_study.yaml [--report-only] [--only METHOD ...]

A study file names a base config, overrides for every run, and the methods, each with its seeds and
overrides (``train: false`` evaluates the config's model untrained: the paper's base row); it may start
from another study file with ``base: other.yaml`` and add overrides and methods. Each finished run
leaves ``results/<study>/<method>/seed-<seed>/`` (summary.json, metrics.jsonl, eval_final.jsonl: small,
meant to be committed); a run whose folder is there is skipped, so a study spans several sittings, and a
run cut short resumes from its last checkpoint (``run.resume=true``). The full run folders (models,
checkpoints) go to ``runs_dir``. The report (score_ray.study.report) is rewritten after every run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

KEPT_FILES = ("summary.json", "metrics.jsonl", "eval_final.jsonl", "eval_base.jsonl", "config.yaml")


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: bool = Field(True, description="false: evaluate the config's model as it is (two-turn prompting)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    overrides: list[str] = Field(default_factory=list, description="key=value, after the study's own")

    @field_validator("overrides")
    @classmethod
    def _same_held_out_set(cls, value: list[str]) -> list[str]:
        for item in value:
            key = item.partition("=")[0].strip()
            if key.startswith(("data.eval", "eval.max_problems")):
                raise ValueError(f"{item!r}: every method is evaluated on the study's held-out problems; "
                                 "set data.eval in the study's config or overrides")
        return value


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    config: str = Field(description="the run config every method starts from (as for --config)")
    overrides: list[str] = Field(default_factory=list)
    results_dir: str = "results"
    runs_dir: str = "runs/studies"
    control: str = Field("base", description="the method the gain is measured against")
    treated: str = Field("score", description="the method whose gain is reported")
    methods: dict[str, MethodSpec] = Field(min_length=1)


def _read_study(path: Path) -> dict:
    """The study file as a dict, with its ``base: other.yaml`` chain (config.read_base_chain) folded in:
    each file's settings over its base's, its ``overrides`` after the base's and its ``methods`` replacing
    the base's of the same name. A variant of a recipe is then one line of overrides, not a copy of every
    method."""
    from score_ray.config import ConfigError, read_base_chain

    try:
        chain = read_base_chain(Path(path))
    except ConfigError as err:
        raise SystemExit(f"score_ray.study: {err}") from None
    study: dict = {}
    for layer in chain:
        study = {**study, **layer, "overrides": list(study.get("overrides", [])) + list(layer.get("overrides", [])),
                 "methods": {**study.get("methods", {}), **layer.get("methods", {})}}
    return study


def load_study(path: Path) -> StudySpec:
    raw = _read_study(Path(path))
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as err:
        raise SystemExit(f"score_ray.study: {path}: {err}") from None


def run_folder(spec: StudySpec, method: str, seed: int) -> Path:
    return Path(spec.results_dir) / spec.name / method / f"seed-{seed}"


def is_done(spec: StudySpec, method: str, seed: int) -> bool:
    return (run_folder(spec, method, seed) / "summary.json").is_file()


def _command(spec: StudySpec, method: str, seed: int, records: Path, output: Path) -> list[str]:
    chosen = spec.methods[method]
    overrides = spec.overrides + chosen.overrides
    if not chosen.train:
        from score_ray.config import load_config

        model = load_config(spec.config, overrides).model.path
        return [sys.executable, "-m", "score_ray.eval", model, *overrides, f"run.seed={seed}", "--config", spec.config,
                "--records", str(records), "--output", str(output)]
    return [sys.executable, "-m", "score_ray.launch", "--config", spec.config, *overrides,
            f"run.name={spec.name}-{method}-s{seed}", f"run.seed={seed}", f"run.output_dir={spec.runs_dir}",
            "run.resume=true"]


def run_one(spec: StudySpec, method: str, seed: int) -> bool:
    """Run (or evaluate) one method at one seed and keep its small files; False when it failed."""
    dest = run_folder(spec, method, seed)
    work = Path(spec.runs_dir).resolve() / f"{spec.name}-{method}-s{seed}.work"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    from score_ray.config import ConfigError

    try:
        command = _command(spec, method, seed, work / "eval_final.jsonl", work / "eval.json")
    except ConfigError as err:
        print(f"  failed: {err}", flush=True)
        return False
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(f"  failed (exit {code}); its output: {log}", flush=True)
        return False
    dest.mkdir(parents=True, exist_ok=True)
    if spec.methods[method].train:
        folders = sorted(Path(spec.runs_dir).glob(f"{spec.name}-{method}-s{seed}-*"), key=lambda p: p.stat().st_mtime)
        if not folders or not (folders[-1] / "eval_final.jsonl").is_file():
            print(f"  failed: the run left no run folder with eval_final.jsonl in {spec.runs_dir}; see {log}", flush=True)
            return False
        source = folders[-1]
    else:
        source = work
        metrics = json.loads((work / "eval.json").read_text())
        (work / "summary.json").write_text(json.dumps({"iterations": 0, "final_eval": metrics}, indent=2))
    for name in KEPT_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    return True


def study_order(spec: StudySpec, only: Optional[list[str]] = None) -> list[tuple[str, int]]:
    """(method, seed) pairs, seed-major: every method's first seed in the file's order, then every method's
    second, ... so a study cut short has each method at as many seeds as the others, give or take one."""
    chosen = {m: spec.methods[m].seeds for m in spec.methods if not only or m in only}
    depth = max((len(seeds) for seeds in chosen.values()), default=0)
    return [(m, seeds[i]) for i in range(depth) for m, seeds in chosen.items() if i < len(seeds)]


def run_study(spec: StudySpec, only: Optional[list[str]] = None) -> int:
    """Every (method, seed) not done yet, in ``study_order``; the report after each. Returns the failures."""
    from score_ray.study.report import write_report

    todo = study_order(spec, only)
    failures = 0
    for index, (method, seed) in enumerate(todo, start=1):
        if is_done(spec, method, seed):
            print(f"[{index}/{len(todo)}] {method} seed {seed}: done before, skipped", flush=True)
            continue
        start = time.monotonic()
        print(f"[{index}/{len(todo)}] {method} seed {seed}: {'training' if spec.methods[method].train else 'evaluating'}"
              " ...", flush=True)
        if run_one(spec, method, seed):
            print(f"  done in {(time.monotonic() - start) / 60:.1f} min", flush=True)
            write_report(spec)
        else:
            failures += 1
    write_report(spec, show=True)
    return failures
