"""``python -m score_ray.grade --input IN.jsonl --output OUT.jsonl [--workers N]``.

Grades records offline with the same sandboxed graders and reward actors the
trainer uses. Input records:
  {"id", "kind": "math", "response", "answer"}
  {"id", "kind": "code", "response", "tests", "entry_point"?}
where ``tests`` is Python source run after the program (followed by
``check(<entry_point>)`` when given) or a list of assert strings. A record with
``"truncated": true`` (its response hit the generator's token cap) is graded wrong:
the grader never saw its end (``--credit-truncated`` grades it like the rest). Each output
record is the input plus ``reward`` (1.0 or 0.0), ``status`` (correct | wrong |
timeout | error) and ``seconds``. A line that is not a JSON object comes back as
an ``error`` record naming the line, so nothing is silently dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from score_ray.config import RewardConfig, SandboxConfig
from score_ray.reward.types import STATUSES, GradeRequest, GradeResult


def read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                record = {"id": f"line-{number}", "kind": None, "_invalid": f"line {number}: {err}"}
            records.append(record)
    return records


def summary_line(results: list[dict[str, Any]], seconds: float) -> str:
    counts = Counter(result["status"] for result in results)
    parts = ", ".join(f"{status} {counts.get(status, 0)}" for status in STATUSES)
    rate = len(results) / seconds if seconds > 0 else 0.0
    return f"graded {len(results)} records in {seconds:.1f}s ({rate:.1f}/s): {parts}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m score_ray.grade", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--workers", type=int, default=2, help="reward actors")
    parser.add_argument("--threads", type=int, default=4, help="records graded at once per actor")
    parser.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program")
    parser.add_argument("--math-timeout", type=float, default=5.0, help="seconds per symbolic math check")
    parser.add_argument("--credit-truncated", action="store_true",
                        help="grade records marked truncated like finished ones (as runs before the fix did)")
    args = parser.parse_args(argv)
    if not args.input.is_file():
        print(f"score_ray.grade: input {args.input} not found", file=sys.stderr)
        return 2
    config = RewardConfig(
        workers=args.workers,
        threads_per_worker=args.threads,
        cpus_per_worker=0.5,
        math_timeout_s=args.math_timeout,
        sandbox=SandboxConfig(wall_seconds=args.timeout),
        credit_truncated=args.credit_truncated,
    )
    records = read_records(args.input)
    import ray
    from tqdm import tqdm

    from score_ray.reward.pool import RewardPool

    # "local": a Ray of our own unless RAY_ADDRESS names one (never a stray local cluster of another program)
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False, include_dashboard=False)
    start = time.monotonic()
    pool = RewardPool(config)
    valid = [record for record in records if "_invalid" not in record]
    with tqdm(total=len(valid), unit="rec", disable=not sys.stderr.isatty(), desc="grading") as bar:
        graded = iter(pool.grade([GradeRequest.from_record(r) for r in valid], on_progress=bar.update))
    seconds = time.monotonic() - start
    results = []
    for record in records:
        if "_invalid" in record:
            result = GradeResult(0.0, "error", 0.0, detail=record.pop("_invalid")).to_dict()
        else:
            result = next(graded).to_dict()
        results.append({**record, **result})
    pool.shutdown()
    ray.shutdown()
    tmp = args.output.with_name(args.output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for result in results:
            handle.write(json.dumps(result) + "\n")
    os.replace(tmp, args.output)  # a crash never leaves half an output file
    print(summary_line(results, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
