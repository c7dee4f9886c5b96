"""``python -m score_ray.data``: a config's problems previewed, rows it skips and why, an empty source refused."""

import json
from pathlib import Path

from conftest import run_module


def test_preview_of_a_config_shows_counts_and_both_turns():
    result = run_module("score_ray.data", "preview", "configs/smoke.yaml", "--n", "1", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "data.train: arithmetic[train]: 64 valid, 0 skipped" in out
    assert "data.eval: arithmetic[test]: 16 valid, 0 skipped" in out
    assert out.count("[turn 1 prompt:") == 2 and out.count("[turn 2 prompt:") == 2
    assert "You are a math expert." in out
    assert "There might be an error in the solution above" in out


def test_preview_of_a_file_reports_skipped_rows_with_reasons(tmp_path: Path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(
        json.dumps({"question": "Add 2 and 3.", "answer": "2+3=5\n#### 5"}) + "\n"
        + json.dumps({"question": "Broken.", "answer": "no marker"}) + "\n"
        + "{oops\n"
    )
    result = run_module("score_ray.data", "preview", str(path), "--preset", "gsm8k", "--n", "1", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 valid, 2 skipped" in result.stdout
    assert "skipped row 2: no '#### <answer>'" in result.stdout
    assert "skipped row 3: not valid JSON" in result.stdout
    assert "reference: 5" in result.stdout


def test_preview_of_an_empty_source_fails_naming_the_field(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n")
    result = run_module("score_ray.data", "preview", str(path), "--preset", "gsm8k", timeout=120)
    assert result.returncode == 2
    assert "no valid rows" in result.stderr and "'question'" in result.stderr
