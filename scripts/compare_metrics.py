"""Compare two runs' metrics.jsonl value by value, timings aside: ``python scripts/compare_metrics.py RUN_A RUN_B``.

Rows are compared in order; both must log the same keys (perf/ included). Every value outside perf/ must be
equal, or within ``--tolerance`` absolute (scaled by the value when above 1); perf/ values are times and sizes
of the machine's work and are only checked for presence, except the counts named in ``COUNTS``. Exit 1 on a
difference, listing it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COUNTS = {"perf/rollout_retries", "perf/learner_micro_batches", "perf/generated_tokens", "perf/sync_mb"}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def compare(a: list[dict], b: list[dict], tolerance: float) -> tuple[int, list[str], list[str]]:
    """(values identical, values within tolerance as lines, differences as lines)."""
    if len(a) != len(b):
        return 0, [], [f"{len(a)} rows vs {len(b)}"]
    identical, close, different = 0, [], []
    for row_a, row_b in zip(a, b):
        where = f"iteration {row_a.get('iteration')}"
        if set(row_a) != set(row_b):
            different.append(f"{where}: keys differ: {sorted(set(row_a) ^ set(row_b))}")
            continue
        for key in sorted(row_a):
            if key.startswith("perf/") and key not in COUNTS:
                continue
            x, y = row_a[key], row_b[key]
            if x == y:
                identical += 1
            elif isinstance(x, (int, float)) and isinstance(y, (int, float)) and abs(x - y) <= tolerance * max(1.0, abs(x)):
                close.append(f"{where} {key}: {x!r} vs {y!r} (absolute {abs(x - y):.1e})")
            else:
                different.append(f"{where} {key}: {x!r} vs {y!r}")
    return identical, close, different


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.0)
    args = parser.parse_args()
    identical, close, different = compare(rows(args.run_a), rows(args.run_b), args.tolerance)
    for line in close + different:
        print("  " + line)
    print(f"{identical} values identical, {len(close)} within {args.tolerance:g}, {len(different)} different")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
