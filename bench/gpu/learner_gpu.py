"""What one GPU box with only torch, transformers and DeepSpeed can check and time of the GPU path.

    python bench/gpu/learner_gpu.py              # one H100 / H200, about 3-5 minutes
    python bench/gpu/learner_gpu.py --smoke      # CPU, a tiny model, seconds (checks the script)

Imports torch, transformers, deepspeed and score_ray.weight_gather only (no Ray, no vLLM), so it
runs on a bare GPU box with this repository's files. For random-initialised Qwen2-shaped models of
0.5B and 1.5B parameters (the shapes of Qwen2.5-0.5B / 1.5B: tied embeddings, 151936 tokens):

* checks: the bf16 ZeRO-3 learner's loss falls over the timed steps (the same batch each step), and
  the weight source the NCCL sync sends from (``GatheredWeights``, behind ``Zero3WeightSource``)
  yields every parameter in full, bit-equal to DeepSpeed's own consolidated 16-bit state dict;
* learner: one DeepSpeed ZeRO rank (ZeRO-3 by default; a single-process group joined with
  ``deepspeed.init_distributed`` from MASTER_ADDR / MASTER_PORT / RANK=0 / WORLD_SIZE=1, as the
  project's LearnerWorker does), bf16, torch AdamW, gradient checkpointing on, a causal-LM loss
  on random tokens. Reports tokens/s of full optimiser steps and model FLOPs utilisation,
  MFU = 6 * N * tokens / seconds / peak, with N the parameters that take part in matmuls (every
  parameter; the tied embedding counted once, as the LM head) and peak the card's dense bf16
  FLOPS (H100 SXM / H200: 989 TFLOPS). 6N counts neither attention scores nor the recompute of
  gradient checkpointing (the hardware does about 8N per token here), the usual MFU convention.
* generation: transformers ``generate``, greedy with the KV cache, batch 32, 256 new tokens after
  a 128-token random prompt, bf16. Reports generated tokens/s.

Prints a table and what it did NOT check (vLLM's GPU engine, the NCCL transfer itself, Ray
placement, more than one rank: they need vLLM and Ray, which this box lacks), and writes
learner_gpu.json to $OUT if set, else to bench/results/.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

# score_ray.weight_gather needs only torch and DeepSpeed; the repository root is not on sys.path by default.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

NOT_CHECKED = [
    "vLLM's GPU engine and its NCCL receive (vLLM is not on this box)",
    "the NCCL transfer between learner rank 0 and the engines (needs vLLM)",
    "Ray placement, the weight sync round trip, more than one learner rank",
]

# Qwen2 shapes (Qwen2.5-0.5B and -1.5B): hidden, layers, heads, kv heads, intermediate.
SHAPES = {
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512),
}

# Dense (not sparse) bf16 tensor-core peak, TFLOPS, by a substring of torch.cuda.get_device_name.
# Most specific first.
PEAK_BF16_TFLOPS = [
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
]


def peak_tflops(name: str) -> Optional[float]:
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def join_single_process_group(backend: str) -> None:
    """A one-rank torch.distributed group from environment variables, joined through DeepSpeed."""
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend=backend)


def build_model(shape: dict[str, int], device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Only keys that transformers 4.x and 5.x both take; rotary settings do not change the FLOPs.
    config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True, use_cache=True,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialise directly on the GPU: seconds instead of a minute on the host
        model = Qwen2ForCausalLM(config)
    return model.to(dtype=dtype)


def matmul_parameters(model) -> int:
    """Parameters that take part in matmuls: all of them, the tied embedding once (as the LM head)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    if not model.config.tie_word_embeddings:
        total -= model.get_input_embeddings().weight.numel()  # an untied input embedding is a lookup
    return total


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_learner(name: str, args: argparse.Namespace, device: str, dtype: torch.dtype, peak: Optional[float]):
    import deepspeed

    model = build_model(SHAPES[name], device, dtype)
    n_params = matmul_parameters(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, SHAPES[name]["vocab_size"], (args.batch, args.seq), generator=generator).to(engine.device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    seconds = statistics.median(times)
    tokens = args.batch * args.seq
    source_check = check_weight_source(engine, dtype) if args.zero_stage == 3 else None
    result = {
        "model": name, "params_matmul": n_params, "zero_stage": args.zero_stage, "batch": args.batch, "seq": args.seq,
        "tokens_per_step": tokens, "step_seconds_median": seconds, "step_seconds": times,
        "tokens_per_s": tokens / seconds, "model_tflops_per_s": 6 * n_params * tokens / seconds / 1e12,
        "mfu": (6 * n_params * tokens / seconds / 1e12 / peak) if peak else None,
        "loss_first": losses[0], "loss_last": losses[-1], "loss_falls": losses[-1] < losses[0],
        "weight_source": source_check,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, optimizer, model, ids, loss
    free_memory()
    return result


def check_weight_source(engine, dtype: torch.dtype) -> dict[str, Any]:
    """GatheredWeights (what Zero3WeightSource sends) against DeepSpeed's consolidated 16-bit state dict."""
    from score_ray.weight_gather import GatheredWeights

    start = time.perf_counter()
    expected = engine._zero3_consolidated_16bit_state_dict()  # DeepSpeed's own gather (rank 0 keeps it)
    source = GatheredWeights(engine, dtype)
    declared = source.shapes()
    mismatches, count, sent_bytes = [], 0, 0
    for (name, tensor), (declared_name, declared_dtype, shape) in zip(source, declared):
        count += 1
        sent_bytes += tensor.numel() * tensor.element_size()
        if name != declared_name or tensor.dtype != declared_dtype or tuple(tensor.shape) != shape:
            mismatches.append(f"{name}: yielded {tensor.dtype} {tuple(tensor.shape)}, declared {declared_dtype} {shape}")
        elif not torch.equal(tensor, expected[name].to(device=tensor.device, dtype=dtype)):  # the dict is on the CPU
            mismatches.append(f"{name}: values differ from the consolidated state dict")
    # every parameter once (the consolidated dict also lists a tied lm_head under its own name)
    parameters = [name for name, _ in engine.module.named_parameters()]
    missing = sorted(set(parameters) - {name for name, _, _ in declared})
    if missing:
        mismatches.append(f"not sent: {missing[:5]}")
    released = all(p.numel() == 0 for p in engine.module.parameters())  # nothing gathered stays behind
    if not released:
        mismatches.append("gathered parameters were not released")
    return {"tensors": count, "declared": len(declared), "mismatches": mismatches[:5],
            "ok": not mismatches and count == len(declared) == len(parameters), "bytes": sent_bytes,
            "seconds": time.perf_counter() - start}


@torch.inference_mode()
def timed_generate(model, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, int]:
    """Seconds of one greedy generate call with the KV cache, and the tokens it generated."""
    sync(device)
    start = time.perf_counter()
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, use_cache=True)
    sync(device)
    return time.perf_counter() - start, int(out.shape[0] * (out.shape[1] - prompt.shape[1]))


def bench_generate(name: str, args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict[str, Any]:
    model = build_model(SHAPES[name], device, dtype).eval()
    generator = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(1, SHAPES[name]["vocab_size"], (args.gen_batch, args.gen_prompt), generator=generator).to(device)
    timed_generate(model, prompt, min(8, args.gen_tokens), device)  # warm-up: kernels, allocator
    calls = [timed_generate(model, prompt, args.gen_tokens, device) for _ in range(args.gen_repeats)]
    seconds = statistics.median(c[0] for c in calls)
    tokens = calls[0][1]
    del model, prompt
    free_memory()
    return {"model": name, "batch": args.gen_batch, "prompt_tokens": args.gen_prompt, "new_tokens": args.gen_tokens,
            "generated_tokens": tokens, "seconds_median": seconds, "seconds": [c[0] for c in calls],
            "tokens_per_s": tokens / seconds}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny model, fp32, gloo: checks the script in seconds")
    parser.add_argument("--models", default="0.5B,1.5B")
    parser.add_argument("--zero-stage", type=int, default=3, choices=[1, 2, 3],
                        help="3 (default) also checks the ZeRO-3 weight source")
    parser.add_argument("--batch", type=int, default=8, help="sequences per learner step")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gen-batch", type=int, default=32)
    parser.add_argument("--gen-prompt", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=256)
    parser.add_argument("--gen-repeats", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, help="override the card's dense bf16 peak")
    parser.add_argument("--smoke-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="--smoke only: bfloat16 runs the GPU path's DeepSpeed bf16 set-up on the CPU")
    args = parser.parse_args()
    begin = time.perf_counter()

    if args.smoke:
        device, dtype, backend, models = "cpu", getattr(torch, args.smoke_dtype), "gloo", ["smoke"]
        args.batch, args.seq, args.warmup, args.steps = 2, 64, 1, 2
        args.gen_batch, args.gen_prompt, args.gen_tokens, args.gen_repeats = 4, 8, 8, 1
        card = "CPU (smoke test: no MFU)"
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        # DeepSpeed's CPU comm op is compiled once into the project's cache (score_ray.assets.torch_extensions_dir).
        try:
            from score_ray.assets import torch_extensions_dir

            extensions = str(torch_extensions_dir())
        except ImportError:
            cache = Path(os.environ.get("SCORE_RAY_CACHE", Path.home() / ".cache" / "score_ray"))
            extensions = str(cache / "torch_extensions")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device; use --smoke to check the script on a CPU")
        device, dtype, backend = "cuda", torch.bfloat16, "nccl"
        models = [m.strip() for m in args.models.split(",")]
        torch.cuda.set_device(0)
        card = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or (peak_tflops(card) if device == "cuda" else None)
    join_single_process_group(backend)

    import deepspeed
    import transformers

    learner, generation = [], []
    for name in models:
        learner.append(bench_learner(name, args, device, dtype, peak))
        print(f"  learner {name}: {learner[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
        generation.append(bench_generate(name, args, device, dtype))
        print(f"  generate {name}: {generation[-1]['tokens_per_s']:.0f} tokens/s", flush=True)

    result = {
        "card": card, "peak_bf16_tflops": peak, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
        "learner": learner, "generation": generation, "wall_seconds": time.perf_counter() - begin,
    }
    print(f"{card}; dense bf16 peak {peak or 'n/a'} TFLOPS; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")
    print(f"{'learner step (ZeRO-' + str(args.zero_stage) + ', ' + result['dtype'] + ', AdamW, grad ckpt)':58} "
          f"{'params':>8} {'tokens':>7} {'step s':>7} {'tokens/s':>10} {'TFLOPS':>7} {'MFU':>6} {'mem GiB':>8}")
    print("-" * 118)
    for row in learner:
        mfu = f"{100 * row['mfu']:5.1f}%" if row["mfu"] is not None else "   n/a"
        mem = f"{row['max_memory_gib']:8.1f}" if row["max_memory_gib"] is not None else "     n/a"
        label = f"Qwen2-shaped {row['model']} ({row['batch']} x {row['seq']} tokens)"
        params = f"{row['params_matmul'] / 1e9:.3f}B" if row["params_matmul"] >= 1e7 else f"{row['params_matmul'] / 1e6:.2f}M"
        print(f"{label:58} {params:>8} {row['tokens_per_step']:7d} {row['step_seconds_median']:7.3f} "
              f"{row['tokens_per_s']:10.0f} {row['model_tflops_per_s']:7.1f} {mfu} {mem}")
    print()
    print(f"{'transformers generate (greedy, KV cache)':58} {'batch':>8} {'new':>7} {'seconds':>7} {'tokens/s':>10}")
    print("-" * 118)
    for row in generation:
        print(f"{'Qwen2-shaped ' + row['model']:58} {row['batch']:8d} {row['new_tokens']:7d} {row['seconds_median']:7.2f} "
              f"{row['tokens_per_s']:10.0f}")
    print(f"(MFU = 6 N tokens / s / peak bf16, N = all parameters, the tied embedding once; "
          f"total {result['wall_seconds']:.0f} s)")
    print()
    checks = []
    for row in learner:
        checks.append((f"learner {row['model']}: loss falls ({row['loss_first']:.3f} -> {row['loss_last']:.3f})",
                       row["loss_falls"]))
        source = row["weight_source"]
        if source is not None:
            detail = (f"{source['tensors']} tensors, {source['bytes'] / 2**30:.2f} GiB in {source['seconds']:.1f} s"
                      + (f"; {source['mismatches']}" if source["mismatches"] else ""))
            checks.append((f"learner {row['model']}: ZeRO-3 weight source = consolidated state dict ({detail})",
                           source["ok"]))
    for label, ok in checks:
        print(f"  [{'ok' if ok else 'FAILED'}] {label}")
    for label in NOT_CHECKED:
        print(f"  [not checked here] {label}")
    result["checks"] = [{"check": label, "ok": ok} for label, ok in checks]
    result["not_checked"] = NOT_CHECKED
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent.parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "learner_gpu.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'learner_gpu.json'}")
    if not all(ok for _, ok in checks):
        raise SystemExit("a check FAILED (see above)")


if __name__ == "__main__":
    main()
