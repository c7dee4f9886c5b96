"""Weight sync on CPU: learner -> object store -> vLLM, against an in-process copy of the same tensors.

    .venv/bin/python bench/weight_sync.py [--repeats 3] [--sizes 1,4,15,all] [--ranks 1] [--zero-stage 2]

The CPU strategy is timed by calling the trainer's own ``ObjectStoreSync.push`` (on a stand-in holding
just the learner group and the generator): rank 0 of the DeepSpeed group packs the trainable weights
into one flat buffer (``score_ray.weight_pack``) and puts it in Ray's object store itself
(``LearnerGroup.publish_weights``); ``GeneratorActor.update_weights`` reads it zero-copy from shared
memory and vLLM reloads the tensors in place (prefix cache reset).
The same state dict is then copied in-process two ways: torch ``copy_`` into preallocated, already
touched tensors (a memory-bandwidth floor) and safetensors ``save`` + ``load`` (the serialisation
the strategy needs, without any transport or engine).

A second sync per repeat runs the same steps through ``__ray_call__`` to time each one where it
happens: build (rank 0: gather, cast, pack), put (rank 0 -> object store), fetch
(object store -> the generator's process) and vLLM load. Sizes are the trainable set: the top k of
SmolLM2's 30 blocks (+ final norm; the demo trains k = 4) or all (embeddings included). One learner
group per size (its trainable set is fixed at start), one GeneratorActor for all, fp32 as on CPU.
The NCCL strategy (GPU: vLLM's weight-transfer engine) needs GPUs and is not run here. One warm-up
sync per size; figures are medians over repeats; the in-process copies are made right after each
sync, and a ratio is the median over repeats of a sync against the copies made right after it.
The cores other processes kept busy during the syncs are printed (from /proc/stat), so a noisy run
shows itself. Prints tables and writes bench/results/weight_sync.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

from cpu_load import cpu_seconds, machine_busy_seconds  # bench/ is on sys.path when run as a script


def _publish_timed(worker, dtype: str) -> tuple[float, float, list, int]:
    """Inside learner rank 0 (``__ray_call__``): what publish_weights does, each step timed."""
    import ray

    from score_ray.weight_export import on_rank0
    from score_ray.weight_pack import pack_tensors

    start = time.perf_counter()
    pairs = on_rank0(worker.engine.module, worker.rank, set(worker.trainable), dtype)
    header, buffer = pack_tensors(pairs)
    build = time.perf_counter() - start
    start = time.perf_counter()
    reference = ray.put((header, buffer))
    return build, time.perf_counter() - start, [reference], int(buffer.nbytes)  # a listed ref is not resolved


def _fetch_and_load(actor, references: list) -> tuple[float, float]:
    """Inside the GeneratorActor (``__ray_call__``): the argument fetch update_weights gets for free, timed."""
    import ray

    start = time.perf_counter()
    payload = ray.get(references[0])
    fetch = time.perf_counter() - start
    return fetch, actor.update_weights(payload)["seconds"]


class _TimedLearner:
    """The learner group as ObjectStoreSync.push sees it, with the driver's wait for publish_weights timed."""

    def __init__(self, group):
        self.group, self.seconds = group, 0.0

    def publish_weights(self, *args, **kwargs):
        start = time.perf_counter()
        published = self.group.publish_weights(*args, **kwargs)
        self.seconds = time.perf_counter() - start
        return published


def _in_process(tensors: dict, target: dict, times: int = 3) -> tuple[float, float]:
    """Medians of ``times``: copy_ into ``target`` (allocated and touched beforehand), and a safetensors
    save + load round trip."""
    from safetensors.torch import load, save

    copies, roundtrips = [], []
    for _ in range(times):
        start = time.perf_counter()
        for name, tensor in tensors.items():
            target[name].copy_(tensor)
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        loaded = load(save(tensors))
        roundtrips.append(time.perf_counter() - start)
        del loaded
    return statistics.median(copies), statistics.median(roundtrips)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny-random"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="1,4,15,all", help="top-k blocks trained, comma-separated; 'all' = every weight")
    parser.add_argument("--ranks", type=int, default=1, help="learner ranks (the demo: 1)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[2, 3])
    args = parser.parse_args()

    import ray
    import torch

    from score_ray.assets import resolve_model_path
    from score_ray.weight_pack import unpack_tensors
    from score_ray.config import load_config
    from score_ray.learner import LearnerGroup
    from score_ray.rollout import GeneratorActor
    from score_ray.weight_sync import ObjectStoreSync

    begin, load_start = time.perf_counter(), os.getloadavg()
    base = "smoke" if args.model == "tiny-random" else "cpu_demo"
    config = load_config(base, [f"learner.num_ranks={args.ranks}", f"learner.zero_stage={args.zero_stage}",
                                f"learner.cpus_per_rank={2 if args.ranks == 1 else 1}",
                                "rollout.cpus_per_generator=2"])
    path = resolve_model_path(config.model.path, config.model.tiny.model_dump())
    layers = json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]
    sizes = [s.strip() for s in args.sizes.split(",")]
    torch.set_num_threads(2)

    cpus = 2 + args.ranks * int(config.learner.cpus_per_rank)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)  # never join a running one
    generator = GeneratorActor.options(num_cpus=2).remote(config.model, config.rollout, config.prompts, 0)
    ray.get(generator.ready.remote())
    rows = []
    for size in sizes:
        overrides = {"trainable": "all"} if size == "all" else {"trainable": "top_layers",
                                                                 "trainable_top_layers": min(int(size), layers)}
        learner = config.learner.model_copy(update=overrides)
        group = LearnerGroup(config.model, learner, config.algo, 0, 300)
        # The trainer's own sync (the CPU transport), its learner timed.
        timed = _TimedLearner(group)
        sync = ObjectStoreSync(timed, [generator])
        sync.push()  # warm-up
        pids = [os.getpid()] + ray.get([a.__ray_call__.remote(lambda actor: os.getpid())
                                        for a in [generator, *group.workers]])
        syncs, steps, baseline, tensors = [], [], [], None
        for _ in range(args.repeats):
            ours, busy = sum(cpu_seconds(p) for p in pids), machine_busy_seconds()
            syncs.append(dataclasses.asdict(sync.push()))
            # cores other processes kept busy meanwhile (another user's jobs; Ray's own daemons count too)
            other = machine_busy_seconds() - busy - (sum(cpu_seconds(p) for p in pids) - ours)
            syncs[-1]["other_cores"] = max(0.0, other) / syncs[-1]["seconds"]
            time.sleep(0.5)
            syncs[-1]["publish"] = timed.seconds  # the rest of the sync is the generators' update_weights call
            # the same sync again, each step timed where it runs
            start = time.perf_counter()
            calls = [group.workers[0].__ray_call__.remote(_publish_timed, "float32")]
            calls += [w.publish_weights.remote("float32") for w in group.workers[1:]]  # ZeRO-3 gathers need all
            build, put, references, nbytes = ray.get(calls)[0]
            fetch, load_s = ray.get(generator.__ray_call__.remote(_fetch_and_load, references))
            steps.append({"build": build, "put": put, "fetch": fetch, "load": load_s,
                          "total": time.perf_counter() - start})
            if tensors is None:
                tensors = {name: view.clone() for name, view in unpack_tensors(*ray.get(references[0]))}
                target = {name: tensor.clone() for name, tensor in tensors.items()}  # allocated and touched
            del references
            time.sleep(0.5)  # OpenMP threads spin a while after their work: let them stop before the next step
            baseline.append(_in_process(tensors, target))
            time.sleep(0.5)
        group.shutdown()
        tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        step = {key: statistics.median(s[key] for s in steps) for key in steps[0]}
        total = statistics.median(s["seconds"] for s in syncs)
        row = {
            "trainable": "all" if size == "all" else f"top {min(int(size), layers)} of {layers}",
            "tensors": len(tensors), "tensor_bytes": tensor_bytes, "payload_bytes": nbytes,
            "sync_s": total, "sync_load_s": statistics.median(s["load_seconds"] for s in syncs),
            "sync_build_s": statistics.median(s["compute_seconds"] - s["load_seconds"] for s in syncs),
            "sync_publish_s": statistics.median(s["publish"] for s in syncs),
            "sync_update_s": statistics.median(s["seconds"] - s["publish"] for s in syncs),
            "other_cores": statistics.median(s["other_cores"] for s in syncs),
            "steps_median_s": step, "copy_s": statistics.median(b[0] for b in baseline),
            "safetensors_s": statistics.median(b[1] for b in baseline),
            "syncs": syncs, "steps": steps, "in_process": baseline,
        }
        row["gb_per_s"] = nbytes / 1e9 / total
        # paired: each sync against the in-process copies made right after it, then the median
        row["ratio_over_copy"] = statistics.median(s["seconds"] / b[0] for s, b in zip(syncs, baseline))
        row["ratio_over_safetensors"] = statistics.median(s["seconds"] / b[1] for s, b in zip(syncs, baseline))
        rows.append(row)
        del tensors, target
    ray.kill(generator)
    ray.shutdown()

    result = {"model": args.model, "ranks": args.ranks, "zero_stage": args.zero_stage, "repeats": args.repeats,
              "dtype": "float32", "rows": rows, "wall_seconds": time.perf_counter() - begin,
              "cpu_count": os.cpu_count(), "load_average_start": load_start, "load_average": os.getloadavg(),
              "nccl": "not run: needs GPUs (learner.weight_sync=nccl, score_ray.weight_sync_gpu)"}
    print(f"model {args.model}, fp32, {args.ranks} learner rank(s), ZeRO-{args.zero_stage}, "
          f"medians of {args.repeats} syncs per size (seconds)")
    print(f"{'':22} | {'each step timed where it runs':^39} | {'ObjectStoreSync.push, from the driver':^33}")
    print(f"{'trainable':14} {'MB':>7} | {'build':>7} {'put':>7} {'fetch':>7} {'load':>7} {'sum':>7} | "
          f"{'publish':>7} {'update':>7} {'total':>7} {'GB/s':>6}")
    print("-" * 98)
    for row in rows:
        step = row["steps_median_s"]
        print(f"{row['trainable']:14} {row['payload_bytes'] / 1e6:7.1f} | {step['build']:7.3f} {step['put']:7.3f} "
              f"{step['fetch']:7.3f} {step['load']:7.3f} {step['total']:7.3f} | {row['sync_publish_s']:7.3f} "
              f"{row['sync_update_s']:7.3f} {row['sync_s']:7.3f} {row['gb_per_s']:6.2f}")
    print(f"{'NCCL (GPU)':14} {'':7} | {'not run: no GPU here (vLLM NCCL weight transfer, learner.weight_sync=nccl)':<73}")
    print("(build: rank 0 gathers, casts and serialises; put: rank 0 -> object store; fetch: object store -> the "
          "generator's process; load: vLLM reload + prefix-cache reset; sum: the four with their calls. publish: "
          "LearnerGroup.publish_weights (build + put + call); update: the generators' update_weights call (fetch + "
          "load + call); total: ObjectStoreSync.push end to end, the sync a training iteration pays)")
    print()
    print(f"{'trainable':14} {'MB':>7} {'sync s':>8} {'copy_ s':>8} {'GB/s':>6} {'st s':>7} {'GB/s':>6} "
          f"{'sync/copy_':>10} {'sync/st':>8} {'other load':>11}")
    print("-" * 110)
    for row in rows:
        gb = row["tensor_bytes"] / 1e9
        print(f"{row['trainable']:14} {row['payload_bytes'] / 1e6:7.1f} {row['sync_s']:8.3f} {row['copy_s']:8.3f} "
              f"{gb / row['copy_s']:6.2f} {row['safetensors_s']:7.3f} {gb / row['safetensors_s']:6.2f} "
              f"{row['ratio_over_copy']:10.1f} {row['ratio_over_safetensors']:8.1f} {row['other_cores']:5.2f} cores")
    print("(copy_: torch copy_ into preallocated tensors, in-process; st: safetensors save + load, in-process; both "
          "medians of 3 right after each sync; ratios: medians over repeats of sync / copy made back to back; other "
          "load: cores that processes other than ours kept busy during the syncs (median; of "
          f"{os.cpu_count()}); load average at the start {result['load_average_start'][0]:.1f}, at the end {result['load_average'][0]:.1f})")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "weight_sync.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
