"""Generation throughput: the GeneratorActor next to raw vLLM, and vLLM next to transformers.

    .venv/bin/python bench/generation.py [--model smollm2|tiny-random] [--repeats 3]
        [--prompts 4] [--samples 4] [--max-tokens 32] [--temperature 0.7]

Three workloads, each with the same model, prompts, sampling settings and token budget:

1. Two-turn episodes, sampled (the trainer's rollout; 4 prompts x 4 samples by default, the demo
   uses 8 x 4): ``GeneratorActor.generate`` timed from the driver (Ray call, both turns, turn-2
   prompts built from the sampled ids, the episodes sent back) against raw in-process
   ``LLM.generate`` making the very same two calls: turn-2 prompts built the same way
   (``TwoTurnPrompter``), the same engine arguments and ``SamplingParams`` (per-problem seeds, as
   the trainer passes them). Whole two-turn sequences rather than single calls, because the actor's
   overhead (RPC, Problem records, building x2, log-prob lists, decoding text, returning the
   episodes) only exists over the sequence. Lengths are sampled, so the tokens actually produced
   are counted and rates compared.
2. The same, greedy: both sides produce identical tokens, so the work is equal by construction.
3. Turn 1 only, an exact budget (vLLM ``ignore_eos``, transformers ``min_new_tokens``), no
   log-probs: raw vLLM against transformers ``generate`` (batched, left-padded, KV cache). Both
   produce exactly prompts x samples x max-tokens tokens. This is why the rollout uses vLLM.

Each engine lives in its own process (the actor in Ray, raw vLLM and transformers in plain
subprocesses), all with 2 threads, and they take turns: exactly one engine runs at a time, the
order alternating every round, so background load on a shared machine falls on both sides of
each ratio alike. The idle engines' CPU use during the others' calls is measured and printed
(it should be ~0). Each round uses a fresh slice of problems (the same slice for every engine),
so prefix caching helps no one across rounds; one warm-up call per engine precedes them. The
default (4 prompts x 4 samples, 32 tokens per turn, 3 rounds) takes about 3 minutes on 2 cores.

Figures are medians over rounds; a ratio is the median over rounds of the two rates measured back
to back in that round, leaving out rounds in which other processes kept 0.25 cores or more busy
during either call (the ratio of the medians and every round are in the JSON too). The table
also shows how many cores other processes kept busy during each engine's calls (from
/proc/stat), so a noisy run shows itself. Prints a table and writes bench/results/generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from cpu_load import cpu_seconds, machine_busy_seconds  # bench/ is on sys.path when run as a script

THREADS = 2  # the demo's generator: cpus_per_generator: 2


def _config(args: argparse.Namespace):
    from score_ray.config import load_config

    base = "smoke" if args.model == "tiny-random" else "cpu_demo"
    return load_config(base, [
        f"rollout.temperature={args.temperature}", "rollout.top_p=1.0",
        f"rollout.max_tokens_turn1={args.max_tokens}", f"rollout.max_tokens_turn2={args.max_tokens}",
        "rollout.max_model_len=1024", f"data.train.count={max(64, args.prompts * (args.repeats + 1))}",
    ])


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    """Everything a worker process needs, as plain data."""
    from score_ray.assets import resolve_model_path
    from score_ray.data import load_problems

    config = _config(args)
    problems, _ = load_problems(config.data.train)
    need = args.prompts * (args.repeats + 1)
    if len(problems) < need:
        raise SystemExit(f"only {len(problems)} problems for {need} (prompts x (repeats + 1)); lower --prompts or --repeats")
    slices = [[p.to_dict() for p in problems[i * args.prompts : (i + 1) * args.prompts]] for i in range(args.repeats + 1)]
    return {
        "model_path": resolve_model_path(config.model.path, config.model.tiny.model_dump()),
        "rollout": config.rollout.model_dump(),
        "prompts": config.prompts.model_dump(),
        "slices": slices,  # slices[0] warms up; one slice per timed round
        "samples": args.samples,
        "max_tokens": args.max_tokens,
        "seed": 0,
    }


def _seeds(index: int, count: int) -> list[int]:
    """Per-problem sampling seeds, as the trainer passes them (score_ray.batches.sampling_seeds), same on both sides."""
    return [1000 * (index + 1) + i for i in range(count)]


def _problem(p: dict[str, Any]):
    from score_ray.data import Problem

    return Problem(**{**p, "fewshot": tuple(tuple(s) for s in p.get("fewshot", ()))})  # JSON made the tuples lists


def _prompter(spec: dict[str, Any]):
    from transformers import AutoTokenizer

    from score_ray.config import PromptsConfig
    from score_ray.prompts import TwoTurnPrompter

    return TwoTurnPrompter(AutoTokenizer.from_pretrained(spec["model_path"]), PromptsConfig(**spec["prompts"]))


# ----------------------------------------------------------------------------- engines in worker processes


class RawVllm:
    """The engine exactly as GeneratorActor builds it on CPU, driven in-process."""

    def __init__(self, spec: dict[str, Any]):
        from score_ray.assets import vllm_cpu_environment

        self.spec, self.rollout = spec, spec["rollout"]
        vllm_cpu_environment(int(self.rollout["kv_cache_gib"]))
        from vllm import LLM

        self.prompter = _prompter(spec)
        from score_ray.config import RolloutConfig
        from score_ray.rollout import engine_arguments

        # exactly GeneratorActor's engine on CPU
        self.llm = LLM(**engine_arguments(spec["model_path"], "float32", RolloutConfig(**self.rollout), spec["seed"],
                                          on_gpu=False))

    def _params(self, max_tokens: int, greedy: bool, n: int = 1, seed: Optional[int] = None):
        from vllm import SamplingParams

        if greedy:
            return SamplingParams(n=n, temperature=0.0, max_tokens=max_tokens, logprobs=0)
        return SamplingParams(n=n, temperature=self.rollout["temperature"], top_p=self.rollout["top_p"],
                              max_tokens=max_tokens, logprobs=0, seed=seed)

    def episodes(self, problems: list[dict], greedy: bool, seeds: list[Optional[int]]) -> int:
        """GeneratorActor.generate's two vLLM calls with the same prompts and parameters, and nothing else."""
        from vllm.inputs import TokensPrompt

        samples, limit = (1 if greedy else self.spec["samples"]), self.rollout["max_model_len"]
        seeds = [None] * len(problems) if greedy else seeds
        x1s = [self.prompter.turn1_ids(_problem(p)) for p in problems]
        first = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in x1s],
                                  [self._params(self.rollout["max_tokens_turn1"], greedy, samples, seed) for seed in seeds],
                                  use_tqdm=False)
        x2s, seeds2, produced = [], [], 0
        for problem, x1, output, seed in zip(problems, x1s, first, seeds):
            for index, sample in enumerate(output.outputs):
                produced += len(sample.token_ids)
                x2s.append(self.prompter.turn2_ids(problem["kind"], x1, list(sample.token_ids)))
                seeds2.append(None if seed is None else seed + samples + index)
        second = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in x2s],
                                   [self._params(min(self.rollout["max_tokens_turn2"], limit - len(ids)), greedy, seed=seed)
                                    for ids, seed in zip(x2s, seeds2)], use_tqdm=False)
        return produced + sum(len(o.outputs[0].token_ids) for o in second)

    def fixed(self, problems: list[dict]) -> int:
        """Turn 1 only, exactly max_tokens per sample (ignore_eos), no log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        x1s = [self.prompter.turn1_ids(_problem(p)) for p in problems]
        params = SamplingParams(n=self.spec["samples"], temperature=self.rollout["temperature"], top_p=1.0,
                                max_tokens=self.spec["max_tokens"], ignore_eos=True)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in x1s], params, use_tqdm=False)
        return sum(len(s.token_ids) for o in outputs for s in o.outputs)


class Transformers:
    """transformers ``generate``: batched, left-padded, KV cache, the same sampling distribution."""

    def __init__(self, spec: dict[str, Any]):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(THREADS)
        self.spec, self.prompter = spec, _prompter(spec)
        self.model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32).eval()
        config = self.model.config
        self.pad = config.pad_token_id if config.pad_token_id is not None else 0

    def fixed(self, problems: list[dict]) -> int:
        import torch

        x1s = [self.prompter.turn1_ids(_problem(p)) for p in problems]
        width, budget = max(len(ids) for ids in x1s), self.spec["max_tokens"]
        ids = torch.tensor([[self.pad] * (width - len(x)) + x for x in x1s])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in x1s])
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                      temperature=self.spec["rollout"]["temperature"], top_p=1.0, top_k=0,
                                      num_return_sequences=self.spec["samples"], max_new_tokens=budget,
                                      min_new_tokens=budget, pad_token_id=self.pad)
        return int(out.shape[0] * (out.shape[1] - width))


def serve(role: str, spec_file: str) -> None:
    """A worker process: build the engine, then answer one JSON request per line until stdin closes."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library logs go to stderr, the protocol keeps the real stdout
    spec = json.loads(Path(spec_file).read_text())
    engine = {"raw": RawVllm, "hf": Transformers}[role](spec)
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        problems = spec["slices"][request["slice"]]
        start = time.perf_counter()
        if request["what"] == "fixed":
            tokens = engine.fixed(problems)
        else:
            tokens = engine.episodes(problems, request["what"] == "greedy", _seeds(request["slice"], len(problems)))
        protocol.write(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}) + "\n")


class Worker:
    def __init__(self, role: str, spec_file: str, log):
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        self.role = role
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", role, "--spec", spec_file], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        self.pid = self.proc.pid

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.role} worker died (exit {self.proc.wait()}); see its log above")
        return json.loads(line)

    def ready(self) -> None:
        self._read()

    def run(self, what: str, index: int) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"what": what, "slice": index}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class ActorSide:
    """The real GeneratorActor, timed from the driver as the trainer calls it."""

    role = "actor"

    def __init__(self, spec: dict[str, Any]):
        from score_ray.config import ModelConfig, PromptsConfig, RolloutConfig
        from score_ray.rollout import GeneratorActor

        self.spec = spec
        self.actor = GeneratorActor.options(num_cpus=THREADS).remote(
            ModelConfig(path=spec["model_path"]), RolloutConfig(**spec["rollout"]), PromptsConfig(**spec["prompts"]),
            spec["seed"])

    def ready(self) -> None:
        import ray

        ray.get(self.actor.ready.remote())
        self.pid = ray.get(self.actor.__ray_call__.remote(lambda actor: os.getpid()))

    def run(self, what: str, index: int) -> dict[str, Any]:
        import ray

        greedy, problems = what == "greedy", [_problem(p) for p in self.spec["slices"][index]]
        start = time.perf_counter()
        generated = ray.get(self.actor.generate.remote(problems, self.spec["samples"], greedy,
                                                       None if greedy else _seeds(index, len(problems))))
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": sum(len(e.y1) + len(e.y2) for e in generated.episodes),
                "inside": generated.seconds}

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


# ----------------------------------------------------------------------------- driver


def _summary(calls: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [c["tokens"] / c["seconds"] for c in calls]
    return {"tokens_per_s": statistics.median(rates), "median_seconds": statistics.median(c["seconds"] for c in calls),
            "median_tokens": statistics.median(c["tokens"] for c in calls), "calls": calls}


QUIET = 0.25  # cores: a round counts for a ratio only if other processes used less than this during both calls


def _ratios(top: dict[str, Any], bottom: dict[str, Any], name: str) -> dict[str, Any]:
    """Per-round ratios of rates (the two calls of a round ran back to back) and their median over the quiet
    rounds (other load below QUIET cores during both calls; all rounds if none was quiet)."""
    paired = [(a["tokens"] / a["seconds"]) / (b["tokens"] / b["seconds"]) for a, b in zip(top["calls"], bottom["calls"])]
    quiet = [i for i, (a, b) in enumerate(zip(top["calls"], bottom["calls"]))
             if max(a["foreign_cores"], b["foreign_cores"]) < QUIET]
    used = quiet or list(range(len(paired)))
    return {f"ratio_{name}": statistics.median(paired[i] for i in used), f"ratio_{name}_per_round": paired,
            f"ratio_{name}_quiet_rounds": quiet, f"ratio_{name}_of_medians": top["tokens_per_s"] / bottom["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny-random"])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--prompts", type=int, default=4, help="problems per call (the demo: 8, about 5 minutes)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32, help="per turn (the demo uses 64: twice the time)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--worker", choices=["raw", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(args.worker, args.spec)
        return

    import ray

    begin = time.perf_counter()
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # the actor's process inherits it, as the workers do
    spec = _spec(args)
    tmp = tempfile.TemporaryDirectory()
    spec_file = str(Path(tmp.name) / "spec.json")
    Path(spec_file).write_text(json.dumps(spec))
    log = open(Path(tmp.name) / "workers.log", "w")
    ray.init(address="local", num_cpus=THREADS, include_dashboard=False, log_to_driver=False)  # never join a running cluster
    engines = {"actor": ActorSide(spec), "raw": Worker("raw", spec_file, log), "hf": Worker("hf", spec_file, log)}
    try:
        for engine in engines.values():  # start-up overlaps; it is not measured
            engine.ready()
        startup = time.perf_counter() - begin
        pids = {name: engine.pid for name, engine in engines.items()}
        idle: list[float] = []  # CPU seconds per wall second that the idle engines used during a timed call

        def timed(name: str, what: str, index: int) -> dict[str, Any]:
            time.sleep(0.3)  # OpenMP threads spin a little after a call: let the last engine's settle first
            others = {o: cpu_seconds(p) for o, p in pids.items() if o != name}
            own, busy = cpu_seconds(pids[name]), machine_busy_seconds()
            result = engines[name].run(what, index)
            result["cpu_seconds"] = cpu_seconds(pids[name]) - own
            idle_cpu = sum(cpu_seconds(pids[o]) - c for o, c in others.items())
            idle.append(idle_cpu / result["seconds"])
            # cores busy with anything but this engine and ours (another user's jobs; Ray's own processes)
            result["foreign_cores"] = max(0.0, machine_busy_seconds() - busy - result["cpu_seconds"] - idle_cpu) / result["seconds"]
            return result

        pairs = [("sampled", "actor", "raw"), ("greedy", "actor", "raw"), ("fixed", "raw", "hf")]
        for what, name in (("sampled", "actor"), ("sampled", "raw"), ("fixed", "hf")):  # one warm-up each, slice 0
            timed(name, what, 0)
        idle.clear()
        calls: dict[tuple[str, str], list] = {}
        for index in range(1, args.repeats + 1):
            for what, first, second in pairs:
                order = (first, second) if index % 2 else (second, first)  # alternate who goes first
                for name in order:
                    calls.setdefault((what, name), []).append(timed(name, what, index))
    finally:
        for engine in engines.values():
            engine.close()
        ray.shutdown()
        log.close()
        if sys.exc_info()[0] is not None:
            sys.stderr.write((Path(tmp.name) / "workers.log").read_text()[-6000:])
        tmp.cleanup()

    rows: dict[str, dict[str, Any]] = {}
    for what in ("sampled", "greedy"):
        actor, raw = _summary(calls[(what, "actor")]), _summary(calls[(what, "raw")])
        actor["actor_internal_seconds"] = statistics.median(c["inside"] for c in calls[(what, "actor")])
        rows[f"episodes_{what}"] = {"actor": actor, "raw_vllm": raw, **_ratios(actor, raw, "actor_over_raw")}
    raw, hf = _summary(calls[("fixed", "raw")]), _summary(calls[("fixed", "hf")])
    rows["turn1_fixed_budget"] = {"raw_vllm": raw, "transformers": hf, **_ratios(raw, hf, "vllm_over_transformers")}
    foreign = [c["foreign_cores"] for entries in calls.values() for c in entries]
    result = {
        "model": args.model, "model_path": spec["model_path"], "threads": THREADS, "repeats": args.repeats,
        "prompts": args.prompts, "samples": args.samples, "max_tokens_per_turn": args.max_tokens,
        "temperature": args.temperature, "workloads": rows, "idle_engines_cpu_share_max": max(idle),
        "foreign_cores_median": statistics.median(foreign), "foreign_cores_max": max(foreign),
        "startup_seconds": startup, "wall_seconds": time.perf_counter() - begin,
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
    }

    p, n, m = args.prompts, args.samples, args.max_tokens
    print(f"model {args.model}, {THREADS} threads per engine, one engine at a time, medians of {args.repeats} rounds")
    print(f"{'workload':38} {'engine':26} {'tokens':>6} {'seconds':>7} {'tok/s':>7} {'other load':>10}")
    print("-" * 100)

    def line(label: str, name: str, entry: dict[str, Any]) -> None:
        foreign = statistics.median(c["foreign_cores"] for c in entry["calls"])
        print(f"{label:38} {name:26} {entry['median_tokens']:6.0f} {entry['median_seconds']:7.2f} "
              f"{entry['tokens_per_s']:7.1f} {foreign:7.2f} cores")

    def ratio(label: str, row: dict[str, Any], name: str) -> None:
        quiet = row[f"ratio_{name}_quiet_rounds"]
        spread = " ".join(f"{r:.2f}" + ("" if i in quiet else "*") for i, r in enumerate(row[f"ratio_{name}_per_round"]))
        print(f"{'':38} {label:26} {'':6} {'':7} {row[f'ratio_{name}']:7.2f}   (rounds: {spread})")

    labels = {"episodes_sampled": f"two turns, T={args.temperature}, {p} prompts x {n}",
              "episodes_greedy": f"two turns, greedy, {p} prompts x 1"}
    for key, label in labels.items():
        line(label, "GeneratorActor (Ray call)", rows[key]["actor"])
        line("", "raw vLLM, same two calls", rows[key]["raw_vllm"])
        ratio("ratio actor / raw", rows[key], "actor_over_raw")
    row = rows["turn1_fixed_budget"]
    line(f"turn 1 only, exactly {m} tokens, {p} x {n}", "raw vLLM (ignore_eos)", row["raw_vllm"])
    line("", "transformers generate", row["transformers"])
    ratio("ratio vLLM / transformers", row, "vllm_over_transformers")
    print(f"(ratios: median over rounds of the two rates measured back to back; * marks a round left out because "
          f"other processes used {QUIET} cores or more during one of its calls (all are used if none was quiet). Actor seconds: the Ray call's wall "
          f"time from the driver; inside the actor generate took {rows['episodes_sampled']['actor']['actor_internal_seconds']:.2f} s "
          f"sampled, {rows['episodes_greedy']['actor']['actor_internal_seconds']:.2f} s greedy. Other load: cores busy "
          f"with other processes during the call (of {os.cpu_count()}); idle engines used at most "
          f"{result['idle_engines_cpu_share_max']:.2f} cores.)")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "generation.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
