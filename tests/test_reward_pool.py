"""Reward actors on Ray and the offline grading CLI."""

import json
import time

import pytest

from conftest import run_module

GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
BAD = "```python\ndef add(a, b):\n    return a - b\n```"
TESTS = ["assert add(2, 3) == 5"]


def mixed_records(n):
    records = []
    for i in range(n):
        if i % 3 == 0:
            records.append({"id": i, "kind": "code", "response": GOOD if i % 2 else BAD, "tests": TESTS})
        elif i % 3 == 1:
            records.append({"id": i, "kind": "math", "response": f"\\boxed{{{i}}}", "answer": str(i if i % 2 else i + 1)})
        else:
            records.append({"id": i, "kind": "math", "response": "\\boxed{2\\sqrt{2}}", "answer": "\\sqrt{8}"})
    return records


def expected(record):
    if record["kind"] == "code":
        return 1.0 if record["response"] == GOOD else 0.0
    if record["answer"] == "\\sqrt{8}":
        return 1.0
    return 1.0 if record["response"] == f"\\boxed{{{record['answer']}}}" else 0.0


@pytest.mark.slow
def test_pool_grades_in_input_order_with_every_reward_right(ray_local):
    from score_ray.reward.pool import RewardPool

    pool = RewardPool(workers=2, cpus_per_worker=0.5, threads_per_worker=2)
    records = mixed_records(40)
    progress = []
    results = pool.grade(records, on_progress=progress.append)
    pool.shutdown()
    assert [r["reward"] for r in results] == [expected(r) for r in records]
    assert sum(progress) == 40
    assert all(r["status"] in ("correct", "wrong") and r["seconds"] >= 0 for r in results)


@pytest.mark.slow
def test_a_killed_reward_actor_is_restarted_and_its_chunk_retried(ray_local):
    import ray

    from score_ray.reward.pool import RewardPool

    slow = "```python\nimport time\ntime.sleep(1)\ndef add(a, b):\n    return a + b\n```"
    pool = RewardPool(workers=1, cpus_per_worker=0.5, threads_per_worker=1, chunk_size=4)
    records = [{"id": i, "kind": "code", "response": slow, "tests": TESTS} for i in range(8)]
    victim = pool.actors[0]
    ray.get(victim.ping.remote())

    import threading

    killer = threading.Timer(1.5, lambda: ray.kill(victim, no_restart=False))
    killer.start()
    results = pool.grade(records)
    killer.join()
    pool.shutdown()
    assert len(results) == 8 and all(r["status"] == "correct" for r in results)


@pytest.mark.slow
def test_grade_cli_writes_results_and_a_summary(tmp_path):
    records = mixed_records(9) + [{"id": "t", "kind": "code", "response": "```python\nwhile True: pass\n```", "tests": TESTS}]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n")
    target = tmp_path / "out.jsonl"
    start = time.monotonic()
    result = run_module("score_ray.grade", "--input", str(source), "--output", str(target), "--workers", "2",
                        "--timeout", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 11
    assert [row["reward"] for row in rows[:9]] == [expected(r) for r in records[:9]]
    assert rows[9]["status"] == "timeout" and rows[9]["id"] == "t"
    assert rows[10]["status"] == "error" and "line 11" in rows[10]["detail"]
    assert all(set(("reward", "status", "seconds")) <= set(row) for row in rows)
    counts = {s: sum(row["status"] == s for row in rows) for s in ("correct", "wrong", "timeout", "error")}
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("graded 11 records") and f"correct {counts['correct']}, wrong {counts['wrong']}" in line
    assert time.monotonic() - start < 120
