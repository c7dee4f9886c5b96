"""``python -m score_ray.eval MODEL_OR_RUN [--config FILE] [--n N] [key=value ...]``.

Two-turn greedy evaluation of any Hugging Face model folder (or a run folder: its
``final_model`` and its own config) on the config's held-out set; prints the five
metrics as a table and, with ``--output``, writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from score_ray.config import ConfigError, load_config


def start_engine(config, path: str):
    """A local Ray, one generator on the model folder ``path`` (resolved on the driver, as printed: a relative
    folder means the one beside the user) and the reward pool."""
    from score_ray.placement import actor_runtime_env, ray_init
    from score_ray.reward.pool import RewardPool
    from score_ray.rollout import GeneratorActor

    # logical CPUs for every actor the config names, as the trainer does (cpu_demo's engine takes both cores)
    ray_init(config)
    generator = GeneratorActor.options(num_cpus=config.rollout.cpus_per_generator,
                                       num_gpus=config.rollout.gpus_per_generator,
                                       runtime_env=actor_runtime_env(config)).remote(
        config.model.model_copy(update={"path": path}), config.rollout, config.prompts, config.run.seed)
    return generator, RewardPool(config.reward, runtime_env=actor_runtime_env(config))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m score_ray.eval", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="HF model folder, run folder, 'smollm2', 'organism' or 'tiny-random'")
    parser.add_argument("--config", default=None, help="config for data, prompts and rollout (default: the run's own)")
    parser.add_argument("--n", type=int, default=None, help="evaluate on the first N held-out problems")
    parser.add_argument("--output", type=Path, default=None, help="write the metrics as JSON here")
    parser.add_argument("--records", type=Path, default=None, help="write one JSON line per problem (id, r1, r2) here")
    parser.add_argument("--on-train", action="store_true",
                        help="evaluate the config's TRAINING problems: probes for choosing settings (the held-out "
                             "split is for final numbers only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # key=value may follow the options too

    target = Path(args.model)
    config_file = args.config
    model_path = args.model
    if (target / "config.yaml").is_file() and (target / "final_model").is_dir():
        config_file = config_file or str(target / "config.yaml")
        model_path = str(target / "final_model")
    from score_ray.lora import is_adapter_folder, merged_model

    if is_adapter_folder(model_path):  # a LoRA run's model: its adapter merged into the base, once
        adapter_of = target if (target / "final_model").is_dir() else Path(model_path)
        try:
            model_path = str(merged_model(adapter_of))
        except (FileNotFoundError, ValueError) as err:
            print(f"score_ray.eval: {err}", file=sys.stderr)
            return 2
    try:
        config = load_config(config_file, args.overrides + [f"model.path={model_path}"])
    except ConfigError as err:
        print(f"score_ray.eval: {err}", file=sys.stderr)
        return 2

    import ray

    from score_ray.assets import model_folder
    from score_ray.data import load_problems
    from score_ray.evaluate import format_table, two_turn_eval, write_eval_records
    from score_ray.metrics import eval_summary
    try:
        path = model_folder(config.model)
        problems, report = load_problems(config.data.train if args.on_train else config.data.eval)
    except (FileNotFoundError, ValueError) as err:
        print(f"score_ray.eval: {err}", file=sys.stderr)
        return 3
    problems = problems[: args.n] if args.n else problems
    print(f"{report.source}: evaluating {len(problems)} problems with {path}", flush=True)
    generator, pool = start_engine(config, path)
    try:
        metrics, episodes = two_turn_eval(lambda batch: ray.get(generator.generate.remote(batch, 1, True)).episodes, pool,
                                          problems, chunk=config.eval.batch_problems)
    finally:
        pool.shutdown()
        ray.kill(generator)
        ray.shutdown()
    print(format_table({Path(path).name[:14]: metrics}, "training" if args.on_train else "held-out"))
    if args.records:
        write_eval_records(args.records, episodes)
    if args.output:
        args.output.write_text(json.dumps(eval_summary(metrics), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
