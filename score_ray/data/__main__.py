"""``python -m score_ray.data preview SOURCE [--n N]``: see exactly what the trainer will see.

SOURCE is a run config (``configs/cpu_demo.yaml``: its train and eval sources), a
source type (``arithmetic``, ``two_sum``, ``gsm_symbolic``, ``humaneval``), or a data file
(``--preset`` gives its schema). It prints counts (valid / skipped, with reasons)
and N rendered turn-1 and turn-2 prompts, decoded from the very token ids the
generators receive.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from score_ray.config import Config, ConfigError, load_config
from score_ray.data import DataError, Problem, load_problems

_GENERATED = ("arithmetic", "two_sum", "gsm_symbolic", "humaneval")


def _sources(args: argparse.Namespace) -> tuple[list[tuple[str, Any]], Config]:
    """(label, source config) pairs and the config whose model and prompts render them."""
    target = args.source
    if target.endswith((".yaml", ".yml")) or (Path("configs") / f"{target}.yaml").is_file():
        config = load_config(target, args.overrides)
        return [("data.train", config.data.train), ("data.eval", config.data.eval)], config
    if target in _GENERATED:
        spec: dict[str, Any] = {"type": target}
    elif Path(target).is_file():
        spec = {"type": "file", "path": target, "preset": args.preset}
    else:
        raise ConfigError(f"{target!r} is neither a config, a source type {_GENERATED}, nor a file")
    overrides = [f"data.train.{item}" for item in args.overrides]
    raw_train = {"train": spec}
    if target in ("arithmetic", "two_sum", "gsm_symbolic"):
        raw_train["eval"] = {"type": target, "split": "test"}
    from score_ray.config import apply_overrides, format_validation_error
    from pydantic import ValidationError

    raw = apply_overrides({"data": raw_train}, overrides)
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source="preview")) from None
    return [("source", config.data.train)], config


def _show(label: str, problems: list[Problem], config: Config, count: int) -> None:
    from transformers import AutoTokenizer

    from score_ray.assets import model_folder
    from score_ray.prompts import TwoTurnPrompter

    tokenizer = AutoTokenizer.from_pretrained(model_folder(config.model))
    prompter = TwoTurnPrompter(tokenizer, config.prompts)
    rule = "-" * 78
    for problem in problems[:count]:
        turn1 = prompter.turn1_ids(problem)
        # A stand-in first attempt: the reference solution if there is one, else a marker.
        stand_in = problem.solution or (f"Final Answer: The final answer is ${problem.answer}$. I hope it is correct."
                                        if problem.kind == "math" else "<first attempt>")
        attempt = tokenizer.encode(stand_in, add_special_tokens=False) + [tokenizer.eos_token_id]
        turn2 = prompter.turn2_ids(problem.kind, turn1, attempt)
        reference = problem.answer if problem.kind == "math" else f"{len(problem.tests.splitlines())} lines of tests"
        print(f"{rule}\n{label} | {problem.id} | {problem.kind} | reference: {reference}")
        print(f"[turn 1 prompt: {len(turn1)} tokens]\n{tokenizer.decode(turn1)}")
        print(f"[turn 2 prompt: {len(turn2)} tokens; the first attempt below stands in for the sampled one]")
        print(tokenizer.decode(turn2[len(turn1):]))
    print(rule)


def _report_text_only(label: str, problems: list[Problem]) -> None:
    """Count the math references the symbolic judge cannot read whole: their answers are graded as text
    only (stricter: an equal value written another way earns 0), so a user sees it before training."""
    from tqdm import tqdm

    from score_ray.reward.math import MathJudge, needs_symbolic_reading

    references = list(dict.fromkeys(p.answer for p in problems if p.kind == "math" and needs_symbolic_reading(p.answer)))
    if not references:
        return
    judge = MathJudge(timeout_s=10.0)
    try:
        progress = tqdm(references, desc=f"{label}: reading references", leave=False, disable=not sys.stderr.isatty())
        strict = [reference for reference in progress if not judge.reads_whole(reference)]
    finally:
        judge.close()
    print(f"{label}: {len(strict)} of {len(problems)} math references are compared as text only "
          "(the symbolic judge cannot read them whole)")
    for reference in strict[:5]:
        print(f"  text only: {reference[:120]!r}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m score_ray.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    preview = sub.add_parser("preview", help="counts and rendered prompts of a source or a config's sources")
    preview.add_argument("source", help="config file, source type (arithmetic, two_sum, gsm_symbolic, humaneval) or data file")
    preview.add_argument("--n", type=int, default=2, help="prompts to render per source")
    preview.add_argument("--preset", default="custom", help="schema of a data file (math500, math, gsm8k, mbpp, humaneval)")
    preview.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (for a file: source keys)")
    args = parser.parse_args(argv)
    try:
        sources, config = _sources(args)
        for label, source in sources:
            problems, report = load_problems(source)
            print(f"{label}: {report.summary()}")
            for example in report.examples:
                print(f"  skipped {example}")
            _report_text_only(label, problems)
            if args.n > 0:
                _show(label, problems, config, args.n)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"score_ray: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
