"""``python -m score_ray.study STUDY.yaml``: run a study's methods x seeds (skipping finished runs), then
write its table, plot and summary under results/<study>/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from score_ray.study import load_study, run_study
from score_ray.study.report import write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m score_ray.study", description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path, help="study file, e.g. configs/studies/cpu_study.yaml")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the finished runs")
    parser.add_argument("--truncated-wrong", action="store_true",
                        help="with --report-only: re-grade the runs' evals with responses cut at the token cap wrong "
                        "(as reward.credit_truncated=false grades), into results/<study>/truncated_wrong/")
    parser.add_argument("--only", nargs="+", default=None, metavar="METHOD", help="run only these methods")
    args = parser.parse_args(argv)
    spec = load_study(args.study)
    unknown = sorted(set(args.only or []) - set(spec.methods))
    if unknown:
        print(f"score_ray.study: --only names methods the study lacks: {', '.join(unknown)} "
              f"(it has {', '.join(spec.methods)})", file=sys.stderr)
        return 2
    if args.truncated_wrong and not args.report_only:
        print("score_ray.study: --truncated-wrong re-grades finished runs; use it with --report-only", file=sys.stderr)
        return 2
    if args.report_only:
        write_report(spec, show=True, truncated_wrong=args.truncated_wrong)
        return 0
    failures = run_study(spec, args.only)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
