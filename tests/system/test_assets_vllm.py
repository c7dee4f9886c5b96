"""The shipped SmolLM2 as vLLM serves it: greedy continuations equal transformers' (a vLLM engine start)."""

import json

import pytest

from conftest import run_module

pytestmark = pytest.mark.slow


def test_transformers_and_vllm_greedy_outputs_agree():
    # The shipped model; the tiny test model's agreement is checked more strictly, token log-prob by token
    # log-prob against the learner, in tests/system/test_stack.py. A process of its own: vLLM's in-process
    # engine keeps global state.
    result = run_module("score_ray.assets", "verify", "smollm2", "--json", "--max-tokens", "32", timeout=900)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = report["rows"]
    assert len(rows) == 8
    diverged = [(row["prompt"], row["common_prefix"], row["transformers"], row["vllm"]) for row in rows if not row["match"]]
    assert not diverged, diverged
    assert all(row["length"] > 0 for row in rows)

