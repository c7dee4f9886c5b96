"""Held-out eval throughput: greedy two-turn problems per minute as the trainer's eval sends them (chunks of
25 problems per generator call) against larger chunks, on one GeneratorActor, taking turns in one run.

    python bench/eval_throughput.py [--config cpu_demo] [--n 100] [--chunks 25,100] [--repeats 2]

Also the machine's fp32 matrix-multiply rate and the FLOPs per generated token (2 x parameters), so the
generation rate can be read as a fraction of what the cores can do. Prints a table and writes
bench/results/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def matmul_gflops(threads: int, size: int = 1024, repeats: int = 20) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def parameter_count(model_path: str) -> int:
    """Parameters of the model (tied embeddings once)."""
    from flops import meta_model  # bench/ is on the path when a bench script runs

    return sum(p.numel() for p in meta_model(model_path).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cpu_demo")
    parser.add_argument("--n", type=int, default=100, help="held-out problems per pass")
    parser.add_argument("--chunks", default="25,100", help="problems per generate call, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray

    from score_ray.assets import resolve_model_path
    from score_ray.config import load_config
    from score_ray.data import load_problems
    from score_ray.eval import start_engine

    config = load_config(args.config)
    path = resolve_model_path(config.model.path, config.model.tiny.model_dump())
    problems = load_problems(config.data.eval)[0][: args.n]
    chunks = [int(c) for c in args.chunks.split(",")]
    generator, pool = start_engine(config, path)
    parameters = parameter_count(path)
    ray.get(generator.generate.remote(problems[:4], 1, True))  # warm-up
    passes: dict[int, list[dict]] = {chunk: [] for chunk in chunks}
    for _ in range(args.repeats):
        for chunk in chunks:  # taking turns: the machine's load falls on both alike
            start, tokens = time.perf_counter(), 0
            for first in range(0, len(problems), chunk):
                episodes = ray.get(generator.generate.remote(problems[first : first + chunk], 1, True)).episodes
                tokens += sum(len(e.y1) + len(e.y2) for e in episodes)
            seconds = time.perf_counter() - start
            passes[chunk].append({"seconds": seconds, "tokens": tokens})
    pool.shutdown()
    ray.shutdown()
    cores = os.cpu_count() or 1
    peak = matmul_gflops(config.rollout.cpus_per_generator and int(config.rollout.cpus_per_generator) or cores)
    rows = {}
    for chunk, results in passes.items():
        seconds = statistics.median(r["seconds"] for r in results)
        tokens = statistics.median(r["tokens"] for r in results)
        rate = tokens / seconds
        rows[chunk] = {"problems_per_minute": 60 * len(problems) / seconds, "tokens_per_second": rate,
                       "gflops": rate * 2 * parameters / 1e9, "passes": results}
    base = rows[chunks[0]]["problems_per_minute"]
    print(f"{args.config}: {len(problems)} held-out problems, greedy two turns, medians of {args.repeats} passes; "
          f"model {parameters / 1e6:.0f}M parameters, fp32 matmul {peak:.0f} GFLOP/s on this machine")
    print(f"{'chunk':>6} {'problems/min':>13} {'tokens/s':>9} {'GFLOP/s':>8} {'of matmul':>10} {'vs first':>9}")
    for chunk, row in rows.items():
        print(f"{chunk:>6} {row['problems_per_minute']:>13.1f} {row['tokens_per_second']:>9.1f} {row['gflops']:>8.1f} "
              f"{row['gflops'] / peak:>9.1%} {row['problems_per_minute'] / base:>8.2f}x")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "eval_throughput.json").write_text(json.dumps(
        {"config": args.config, "problems": len(problems), "parameters": parameters, "matmul_gflops": peak,
         "rows": {str(k): v for k, v in rows.items()}, "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
