"""A real study on the smoke config: an untrained base and SCoRe, run by ``python -m score_ray.study``;
a second invocation skips what finished; a method that fails is reported and the others still run.
(STaR's choice of episodes is tested in test_samples.py: on the random tiny model no second attempt is ever
right, so a STaR run here would only show that an iteration with nothing to imitate takes no step.)"""

import json

import pytest

from conftest import run_module

pytestmark = pytest.mark.slow


def test_a_study_runs_each_method_once_and_reports_the_paired_table(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(
        f"name: tiny\nconfig: configs/smoke.yaml\nresults_dir: {tmp_path / 'results'}\nruns_dir: {tmp_path / 'runs'}\n"
        "overrides: [data.eval.count=12]\n"
        "methods:\n"
        "  base: {train: false}\n"
        "  score: {seeds: [0]}\n"
        "  broken: {seeds: [0], overrides: [learner.zero_stage=9]}\n")
    first = run_module("score_ray.study", str(study), timeout=1200)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]  # broken failed, the rest ran
    assert "broken seed 0: training" in first.stdout and "failed (exit 2)" in first.stdout
    out = tmp_path / "results" / "tiny"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_problems"] == 12 and set(summary["methods"]) == {"base", "score"}
    for method in ("base", "score"):
        records = (out / method / "seed-0" / "eval_final.jsonl").read_text().splitlines()
        assert len(records) == 12 and all({"id", "r1", "r2"} <= set(json.loads(r)) for r in records)
    score_rows = [json.loads(r) for r in (out / "score" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in score_rows if "train/stage" in r] == [1, 2]
    assert "gain" in summary and (out / "table.md").is_file() and (out / "plot.png").is_file()

    again = run_module("score_ray.study", str(study), "--only", "base", "score", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, skipped") == 2
