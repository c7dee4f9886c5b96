"""Reward actors on Ray and the offline grading CLI."""

import json
import time

import pytest

from conftest import run_module
from score_ray.config import RewardConfig
from score_ray.reward.types import GradeRequest

pytestmark = pytest.mark.slow

GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
BAD = "```python\ndef add(a, b):\n    return a - b\n```"
TESTS = ["assert add(2, 3) == 5"]


def requests(records):
    return [GradeRequest.from_record(record) for record in records]


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


def test_pool_grades_in_input_order_with_every_reward_right(ray_local):
    from score_ray.reward.pool import RewardPool

    pool = RewardPool(RewardConfig(workers=2, cpus_per_worker=0.5, threads_per_worker=2))
    records = mixed_records(40)
    progress = []
    results = pool.grade(requests(records), on_progress=progress.append)
    pool.shutdown()
    assert [r.reward for r in results] == [expected(r) for r in records]
    assert sum(progress) == 40
    assert all(r.status in ("correct", "wrong") and r.seconds >= 0 for r in results)


SLOW_GOOD = "```python\nimport time\ntime.sleep(1)\ndef add(a, b):\n    return a + b\n```"
SLOW_BAD = "```python\nimport time\ntime.sleep(1)\ndef add(a, b):\n    return a - b\n```"


def slow_records(n):
    """Alternating right and wrong programs, each taking a second: every reward is checkable by position."""
    return [{"id": i, "kind": "code", "response": SLOW_GOOD if i % 2 == 0 else SLOW_BAD, "tests": TESTS}
            for i in range(n)]


def test_a_killed_reward_actor_is_restarted_and_its_chunk_retried(ray_local):
    import threading

    import ray

    from score_ray.reward.pool import RewardPool

    pool = RewardPool(RewardConfig(workers=1, cpus_per_worker=0.5, threads_per_worker=1), chunk_size=4)
    records = slow_records(8)
    victim = pool.actors[0]
    ray.get(victim.node.remote())
    killer = threading.Timer(1.5, lambda: ray.kill(victim, no_restart=False))  # mid-way through the first chunk
    killer.start()
    results = pool.grade(requests(records))
    killer.join()
    pool.shutdown()
    # nothing lost, nothing counted twice: one result per record, each the reward of its own program
    assert [r.reward for r in results] == [1.0, 0.0] * 4
    assert [r.status for r in results] == ["correct", "wrong"] * 4


def test_a_reward_actor_past_its_restarts_leaves_the_pool_and_its_chunk_goes_to_another(ray_local):
    import threading

    import ray

    from score_ray.reward.pool import RewardPool

    pool = RewardPool(RewardConfig(workers=2, cpus_per_worker=0.5, threads_per_worker=1, max_restarts=0), chunk_size=2)
    ray.get([actor.node.remote() for actor in pool.actors])
    victim = pool.actors[0]
    killer = threading.Timer(1.5, lambda: ray.kill(victim, no_restart=False))
    killer.start()
    results = pool.grade(requests(slow_records(8)))
    killer.join()
    assert pool.lost_actors == 1 and len(pool.actors) == 1
    assert [r.reward for r in results] == [1.0, 0.0] * 4
    pool.shutdown()


def test_grader_timeouts_and_errors_score_zero_and_raise_the_alarm(ray_local):
    from score_ray.reward.pool import RewardPool
    from score_ray.config import SandboxConfig
    from score_ray.faults import grading_alarm

    pool = RewardPool(RewardConfig(workers=1, cpus_per_worker=0.5, threads_per_worker=4,
                                   sandbox=SandboxConfig(wall_seconds=1.0)))
    hang = {"kind": "code", "response": "```python\nwhile True: pass\n```", "tests": TESTS}
    crash = {"kind": "code", "response": GOOD}  # no tests: the grader reports an error, it does not raise
    good = {"kind": "code", "response": GOOD, "tests": TESTS}
    results = pool.grade(requests([hang, crash, good, good]))
    pool.shutdown()
    assert [r.status for r in results] == ["timeout", "error", "correct", "correct"]
    assert [r.reward for r in results] == [0.0, 0.0, 1.0, 1.0]
    message = grading_alarm(results, threshold=0.25)
    assert message is not None and message.startswith("50% of 4 grades failed (timeout 1, error 1")
    assert grading_alarm(results, threshold=0.5) is None


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
