"""Entry point: ``python -m score_ray.launch [--config FILE] [key=value ...]``.

Order matters: the config is validated first, with nothing heavy imported, so a
typo costs a second, not a Ray start-up. Then the preflight reads the data and
the tokenizer, which catches bad files and template-less models before any actor
is placed. With no arguments it runs configs/cpu_demo.yaml.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from score_ray.config import Config, ConfigError, load_config

EXIT_CONFIG = 2
EXIT_PREFLIGHT = 3
EXIT_RUNTIME = 4  # resources the cluster cannot give, actors past their restarts
EXIT_HALTED = 5  # the run stopped itself (non-finite steps in a row) after a checkpoint


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m score_ray.launch",
        description="Train a model to self-correct with SCoRe on a Ray cluster (or a local one).",
        epilog="Overrides use dotted keys, e.g. algo.alpha=5 rollout.samples_per_prompt=8 model.path=tiny-random",
    )
    parser.add_argument("--config", default=None, help="YAML config (default: configs/cpu_demo.yaml)")
    parser.add_argument("--check", action="store_true", help="validate the config and run the preflight, then stop")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_intermixed_args(argv)  # key=value may follow the options too


def run_dir_for(config: Config) -> Path:
    """A new run folder, or with run.resume=true the newest folder of this run name that has a checkpoint."""
    # Absolute: inside `ray job submit` the working directory is a temporary copy that Ray deletes later.
    root = Path(config.run.output_dir).expanduser().resolve()
    if config.run.resume:
        from score_ray.checkpoints import whole_checkpoints

        candidates = sorted(
            (p for p in root.glob(f"{config.run.name}-*") if p.is_dir() and whole_checkpoints(p)),
            key=lambda p: p.stat().st_mtime,
        )
        if candidates:
            return candidates[-1]
        print(f"score_ray: run.resume=true but no checkpoint of run {config.run.name!r} in {root}; starting fresh")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"{config.run.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        run_dir = root / f"{config.run.name}-{stamp}-{suffix}"
        suffix += 1
    run_dir.mkdir(parents=True)  # the trainer writes the resolved config.yaml into it
    return run_dir


def preflight(config: Config) -> dict:
    """Cheap checks before any actor starts: data sources, model folder, chat template."""
    from score_ray.assets import model_folder
    from score_ray.data import load_problems
    from score_ray.prompts import TwoTurnPrompter

    found = {}
    for name in ("train", "eval"):
        problems, report = load_problems(getattr(config.data, name))
        print(f"data.{name}: {report.summary()}")
        found[name] = problems
    model_path = model_folder(config.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompter = TwoTurnPrompter(tokenizer, config.prompts)
    longest = max(len(prompter.turn1_ids(problem)) for problem in found["train"][:256] + found["eval"][:256])
    room = config.rollout.max_model_len - config.rollout.max_tokens_turn1 - config.rollout.max_tokens_turn2
    if longest > room:
        raise ValueError(
            f"a first-turn prompt has {longest} tokens but rollout.max_model_len leaves {room} after both turns' "
            "budgets; raise rollout.max_model_len or lower rollout.max_tokens_turn1/turn2"
        )
    check_memory_bounds(config, model_path)
    print(f"model: {model_path} (longest first-turn prompt {longest} tokens)")
    found["model_path"] = model_path
    return found


def kv_bytes_per_token(model_config, dtype: str) -> int:
    """KV-cache bytes one token takes in vLLM: keys and values of every layer's KV heads."""
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    return 2 * model_config.num_hidden_layers * heads * head_dim * width


def check_memory_bounds(config: Config, model_path: str) -> None:
    """Refuse, before any engine starts, a context the model cannot take or (CPU) a KV cache too small for
    one full-length sequence; vLLM would only say so after Ray and the engine came up."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except OSError:
        return  # a hub id not reachable from here: the engine checks on the cluster
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and config.rollout.max_model_len > limit:
        raise ValueError(
            f"rollout.max_model_len={config.rollout.max_model_len} exceeds the model's {limit} positions; lower it"
        )
    if config.rollout.gpus_per_generator:
        return  # on GPU the cache is what rollout.gpu_memory_utilization leaves after the weights
    dtype = "float32" if config.model.dtype == "float16" else config.model.dtype
    needed = kv_bytes_per_token(model_config, dtype) * config.rollout.max_model_len
    if needed > config.rollout.kv_cache_gib * 2**30:
        raise ValueError(
            f"one sequence of rollout.max_model_len={config.rollout.max_model_len} tokens needs "
            f"{needed / 2**30:.2f} GiB of KV cache but rollout.kv_cache_gib={config.rollout.kv_cache_gib}; "
            "raise rollout.kv_cache_gib or lower rollout.max_model_len"
        )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"score_ray: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        preflight(config)
    except (ValueError, OSError) as err:  # OSError: missing files, and a hub that cannot be reached
        print(f"score_ray: preflight failed: {err}", file=sys.stderr)
        return EXIT_PREFLIGHT
    if args.check:
        print("config and preflight OK")
        return 0
    run_dir = run_dir_for(config)
    print(f"run folder: {run_dir}", flush=True)
    from score_ray.faults import TrainingHalted
    from score_ray.trainer import train

    try:
        return train(config, run_dir)
    except TrainingHalted as err:
        print(f"score_ray: run stopped: {err}", file=sys.stderr)
        return EXIT_HALTED
    except RuntimeError as err:  # placement / resource problems, actors past their restarts: a message
        print(f"score_ray: {err}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
