"""The check a lent GPU runs: the learner's own step path at Qwen2.5-1.5B's shape, and what the weight sync
and the checkpoints rely on, on a box with only torch, transformers and DeepSpeed.

    python bench/gpu/learner_gpu.py            # one H100 / H200: a few minutes, at most 8
    python bench/gpu/learner_gpu.py --smoke    # CPU, a tiny model, every check (CI runs it)

No Ray, no vLLM: the learner is ``score_ray.learner_rank.LearnerRank`` (what each Ray learner actor is) in a
one-process DeepSpeed group, and the reference is the frozen model scored the way the reference actor scores
it (``modeling.sequence_logprobs``), resident on the same GPU. The model is Qwen2.5-1.5B's shape with random
weights (tied 151,936-token embedding), its embedding scaled so that its logits spread like a trained
model's (a random one's are nearly flat, which would hide bf16 drift).

Each check prints [ok] or [FAILED]; the exit status is 1 when any failed:

1. step: a fixed batch of two-turn samples cut into micro-batches of ``--micro-batch-tokens`` (16,384),
   bf16, ZeRO-3, gradient checkpointing, log-probs in chunks of 2,048 tokens: every step applied, the loss
   falls over the steps, the KL to the reference is ~0 at the first. Reports peak GPU memory (the reference
   resident), tokens/s and MFU = 6 N tokens / s / peak bf16 FLOPS (N: every parameter, the tied embedding
   once; recompute and attention scores not counted, the usual convention).
2. weights right after ``step()``: the gather the NCCL weight sync does (``GatheredWeights``), run on a side
   stream the moment the step returns, as vLLM's packer runs it, byte-equal to DeepSpeed's fp32 master
   weights rounded to bf16 (an independent copy: the optimiser's own).
3. bf16 against fp32: the selected-token log-probs of the same weights in both dtypes (the drift the
   sampler's and the learner's log-probs carry on GPU).
4. checkpoints: save, a step, load: the saved weights' logits again, exactly; the Hugging Face export,
   reloaded by transformers, gives the learner's logits.
5. generation (timing only): transformers ``generate``, greedy with the KV cache.

Writes learner_gpu.json to $OUT if set, else to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

# score_ray's learner needs torch, transformers and DeepSpeed only; the repository root is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

NOT_CHECKED = [
    "vLLM's GPU engine and its NCCL receive (vLLM is not on this box)",
    "the NCCL broadcast from learner rank 0 to the engines (needs vLLM)",
    "Ray placement, more than one learner rank (one GPU)",
]

# Qwen2 shapes (Qwen2.5-0.5B and -1.5B): hidden, layers, heads, kv heads, intermediate.
SHAPES = {
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=4096),
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

# bf16 keeps 8 bits of mantissa: a log-prob of about -10 moves by up to ~0.04 from rounding alone.
MAX_MEAN_DRIFT = 0.05  # mean |logp_bf16 - logp_fp32| over the selected tokens
MAX_FIRST_STEP_KL = 1e-3  # per token: the learner's bf16 path against the reference's, same weights
MAX_EXPORT_LOGIT_DIFF = 0.02  # of the largest logit: a few bf16 steps (1/128 each) where kernels round apart


# --smoke: a tiny model's batch of 6 short two-turn sequences in 3 micro-batches, a step size that moves it
SMOKE_DEFAULTS = dict(micro_batch_tokens=512, chunk_tokens=64, sequences=6, prompt=16, turn=96, instruction=8,
                      lr=1e-3, gen_batch=4, gen_prompt=8, gen_tokens=8, gen_repeats=1)


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


def build_model(shape: dict[str, int], device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, max_position_embeddings=8192, tie_word_embeddings=True, use_cache=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise directly on the GPU: seconds instead of a minute on the host
        model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # logits with a spread like a trained model's (std ~3 instead of ~0.8)
        model.get_input_embeddings().weight.mul_(4.0)
    return model.to(dtype=dtype)


def matmul_parameters(model) -> int:
    """Parameters that take part in matmuls: all of them, the tied embedding once (as the LM head)."""
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gib(value: float) -> float:
    return value / 2**30


# ----------------------------------------------------------------------------- the batch


def two_turn_batch(vocab: int, count: int, prompt: int, turn: int, instruction: int, seed: int = 0):
    """``count`` token sequences shaped like two-turn episodes (prompt, attempt, instruction, second attempt;
    the attempts' lengths vary) and, per sequence, the positions the learner trains (both attempts) and each
    sample's advantage (+1 or -1, half each)."""
    rng = random.Random(seed)
    sequences, selects, advantages = [], [], []
    for index in range(count):
        first, second = rng.randint(turn // 2, turn), rng.randint(turn // 2, turn)
        parts = [prompt, first, instruction, second]
        ids = [rng.randrange(1, vocab) for _ in range(sum(parts))]
        trained = [0.0] * (prompt - 1) + [1.0] * first + [0.0] * instruction + [1.0] * second
        sequences.append(ids)
        selects.append(trained)  # position t scores token t + 1: len(ids) - 1 entries
        advantages.append(1.0 if index % 2 == 0 else -1.0)
    return sequences, selects, advantages


def learner_samples(sequences, selects, advantages, ref_logps, kl_coef: float):
    """LearnerSamples as score_ray.samples builds them: the sampler's log-probs are the reference's (the
    first iteration samples from the base model), one temperature, the advantage over each trained token."""
    from score_ray.samples import LearnerSample

    samples = []
    for ids, select, advantage, ref in zip(sequences, selects, advantages, ref_logps):
        samples.append(LearnerSample(
            input_ids=ids, loss_mask=select, advantage=[advantage * s for s in select],
            kl_coef=[kl_coef * s for s in select], old_logp=list(ref), ref_logp=list(ref),
            temperature=[1.0] * len(select),
        ))
    return samples


# ----------------------------------------------------------------------------- the checks


def selected_flat(rows, selects) -> torch.Tensor:
    return torch.tensor([value for row, select in zip(rows, selects) for value, s in zip(row, select) if s > 0])


def check_side_stream_gather(rank, device: str) -> dict[str, Any]:
    """Right after a step returns (its kernels possibly still queued), gather every parameter the way the NCCL
    sync does, on a stream of its own, and compare each with the optimiser's fp32 master copy in bf16."""
    from deepspeed.utils import safe_get_full_fp32_param

    from score_ray.weight_gather import GatheredWeights

    start = time.perf_counter()
    side = torch.cuda.Stream() if device == "cuda" else None
    gathered = {}
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for name, tensor in GatheredWeights(rank.engine, torch.bfloat16):
            gathered[name] = tensor
    sync(device)
    parameters = dict(rank.engine.module.named_parameters())
    mismatches = []
    for name, param in parameters.items():
        if name not in gathered:
            mismatches.append(f"{name}: not sent")
            continue
        master = safe_get_full_fp32_param(param)
        if master is None:
            mismatches.append(f"{name}: DeepSpeed holds no fp32 master copy")
        elif not torch.equal(gathered[name], master.to(device=gathered[name].device, dtype=torch.bfloat16)):
            mismatches.append(f"{name}: differs from the fp32 master in bf16")
    released = all(p.numel() == 0 for p in parameters.values() if hasattr(p, "ds_id"))
    if not released:
        mismatches.append("gathered parameters were not released")
    return {"tensors": len(gathered), "parameters": len(parameters), "mismatches": mismatches[:5],
            "ok": not mismatches, "bytes": sum(t.numel() * t.element_size() for t in gathered.values()),
            "seconds": time.perf_counter() - start, "side_stream": side is not None}


def check_bf16_drift(shape, device: str, sequences, selects, chunk: int) -> dict[str, Any]:
    """The selected-token log-probs of the same weights in bf16 and in fp32."""
    from score_ray.modeling import sequence_logprobs

    rows = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = build_model(shape, device, dtype).eval()
        rows[dtype] = sequence_logprobs(model, sequences, 0, select=selects, chunk_tokens=chunk)
        del model
        free_memory()
    low, high = selected_flat(rows[torch.bfloat16], selects), selected_flat(rows[torch.float32], selects)
    drift = (low - high).abs()
    return {"tokens": int(drift.numel()), "mean_abs": float(drift.mean()), "max_abs": float(drift.max()),
            "mean_ratio_minus_one": float((low - high).exp().sub(1).abs().mean()),
            "mean_logp_fp32": float(high.mean()), "ok": float(drift.mean()) < MAX_MEAN_DRIFT}


@torch.no_grad()
def learner_logits(rank, ids: torch.Tensor) -> torch.Tensor:
    rank.engine.eval()
    logits = rank.engine(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    return logits.float()


def check_checkpoints(rank, micro_batches, total_tokens, vocab: int) -> dict[str, Any]:
    """Save, step, load -> the saved logits exactly. The Hugging Face export holds the learner's weights byte for
    byte, and transformers, reloading it, gives the learner's logits (to bf16 rounding: ZeRO-3 runs its linear
    layers through its own matmul, so the last bit of a bf16 logit may differ)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from score_ray.weight_gather import GatheredWeights

    probe = torch.randint(1, vocab, (2, 128), generator=torch.Generator().manual_seed(3)).to(rank.engine.device)
    folder = Path(tempfile.mkdtemp(prefix="learner-gpu-"))
    start = time.perf_counter()
    try:
        saved = learner_logits(rank, probe)
        rank.save_checkpoint(str(folder / "deepspeed"), "probe")
        rank.train_step(micro_batches, total_tokens)
        moved = float((learner_logits(rank, probe) - saved).abs().max())
        rank.load_checkpoint(str(folder / "deepspeed"), "probe")
        reloaded = learner_logits(rank, probe)
        rank.save_hf(str(folder / "hf"))
        dtype = next(rank.engine.module.parameters()).dtype
        written = {}
        for shard in sorted((folder / "hf").glob("*.safetensors")):
            written.update(load_file(shard))
        weights = dict(GatheredWeights(rank.engine, dtype))
        unequal = [name for name, tensor in weights.items()
                   if name not in written or not torch.equal(written[name], tensor.cpu())]
        unequal += [f"{name}: not gathered" for name, _ in rank.engine.module.named_parameters() if name not in weights]
        exported = AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=dtype).to(rank.engine.device).eval()
        with torch.no_grad():
            hf = exported(input_ids=probe, attention_mask=torch.ones_like(probe)).logits.float()
        del exported
        scale = float(reloaded.abs().max())
        export_diff = float((hf - reloaded).abs().max())
        same_top = float((hf.argmax(-1) == reloaded.argmax(-1)).float().mean())
        ok = (moved > 1e-6 * scale and bool(torch.equal(reloaded, saved)) and not unequal
              and export_diff <= MAX_EXPORT_LOGIT_DIFF * scale and same_top >= 0.99)
        return {"step_moved_logits_by": moved, "reload_exact": bool(torch.equal(reloaded, saved)),
                "export_weights": len(weights), "export_unequal": unequal[:5], "export_max_abs_diff": export_diff,
                "export_same_argmax": same_top, "logit_scale": scale, "ok": ok,
                "seconds": time.perf_counter() - start}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- the learner


def bench_learner(name: str, args: argparse.Namespace, device: str, dtype: torch.dtype,
                  peak: Optional[float]) -> dict[str, Any]:
    from score_ray.config import AlgoConfig, LearnerConfig
    from score_ray.learner_rank import LearnerRank
    from score_ray.modeling import sequence_logprobs, token_budget_batches

    shape = SHAPES[name]
    sequences, selects, advantages = two_turn_batch(shape["vocab_size"], args.sequences, args.prompt, args.turn,
                                                    args.instruction)
    # the frozen reference, resident beside the learner for the whole step, as learner.reference_gpus puts it
    reference = build_model(shape, device, dtype).eval().requires_grad_(False)
    sync(device)
    start = time.perf_counter()
    ref_logps = sequence_logprobs(reference, sequences, 0, select=selects, chunk_tokens=args.chunk_tokens)
    sync(device)
    reference_seconds = time.perf_counter() - start
    samples = learner_samples(sequences, selects, advantages, ref_logps, kl_coef=0.01)

    learner = LearnerConfig(zero_stage=args.zero_stage, lr=args.lr, micro_batch_tokens=args.micro_batch_tokens,
                            logprob_chunk_tokens=args.chunk_tokens, gradient_checkpointing=True)
    rank = LearnerRank(0, 1, learner, AlgoConfig(policy_loss="pg", kl_estimator="k3"))
    model = build_model(shape, device, dtype)
    n_params = matmul_parameters(model)
    rank.build(model, bf16=dtype == torch.bfloat16)
    del model
    lengths = [len(ids) for ids in sequences]
    micro_batches = [[samples[i] for i in batch] for batch in token_budget_batches(lengths, args.micro_batch_tokens)]
    trained = int(sum(sum(select) for select in selects))
    tokens = sum(lengths)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, stats = [], []
    for step in range(args.warmup + args.steps):
        sync(device)
        begin = time.perf_counter()
        stats.append(rank.train_step(micro_batches, trained))
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - begin)
    seconds = statistics.median(times)
    peak_memory = gib(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    losses = [s.loss / s.tokens for s in stats]
    first_kl = stats[0].kl / stats[0].tokens
    step_check = {
        "applied": all(s.applied for s in stats), "loss_per_token": losses,
        "loss_falls": losses[-1] < losses[0], "first_step_kl": first_kl,
        "ok": all(s.applied for s in stats) and losses[-1] < losses[0] and abs(first_kl) < MAX_FIRST_STEP_KL,
    }
    # right after a step, with nothing synchronised: the sync's gather on a side stream
    rank.train_step(micro_batches, trained)
    gather = check_side_stream_gather(rank, device)
    checkpoints = check_checkpoints(rank, micro_batches, trained, shape["vocab_size"])
    del reference
    result = {
        "model": name, "params_matmul": n_params, "zero_stage": args.zero_stage, "sequences": len(sequences),
        "tokens_per_step": tokens, "trained_tokens_per_step": trained, "micro_batches": len(micro_batches),
        "micro_batch_tokens": args.micro_batch_tokens, "logprob_chunk_tokens": args.chunk_tokens,
        "step_seconds_median": seconds, "step_seconds": times, "tokens_per_s": tokens / seconds,
        "model_tflops_per_s": 6 * n_params * tokens / seconds / 1e12,
        "mfu": (6 * n_params * tokens / seconds / 1e12 / peak) if peak else None,
        "reference_seconds": reference_seconds, "reference_tokens_per_s": tokens / reference_seconds,
        "peak_memory_gib": peak_memory, "step": step_check, "gather_after_step": gather, "checkpoints": checkpoints,
    }
    if hasattr(rank.engine, "destroy"):
        rank.engine.destroy()
    del rank
    free_memory()
    result["bf16_drift"] = check_bf16_drift(shape, device, sequences[: args.drift_sequences],
                                            selects[: args.drift_sequences], args.chunk_tokens)
    return result


# ----------------------------------------------------------------------------- generation (timing)


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
    model.config.use_cache = True
    generator = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(1, SHAPES[name]["vocab_size"], (args.gen_batch, args.gen_prompt), generator=generator)
    prompt = prompt.to(device)
    timed_generate(model, prompt, min(8, args.gen_tokens), device)  # warm-up: kernels, allocator
    calls = [timed_generate(model, prompt, args.gen_tokens, device) for _ in range(args.gen_repeats)]
    seconds = statistics.median(c[0] for c in calls)
    del model, prompt
    free_memory()
    return {"model": name, "batch": args.gen_batch, "prompt_tokens": args.gen_prompt, "new_tokens": args.gen_tokens,
            "generated_tokens": calls[0][1], "seconds_median": seconds, "seconds": [c[0] for c in calls],
            "tokens_per_s": calls[0][1] / seconds}


# ----------------------------------------------------------------------------- report


def checks_of(row: dict[str, Any]) -> list[tuple[str, bool]]:
    name, step, gather = row["model"], row["step"], row["gather_after_step"]
    drift, checkpoints = row["bf16_drift"], row["checkpoints"]
    losses = step["loss_per_token"]
    return [
        (f"{name} step: {len(losses)} steps applied, loss/token {losses[0]:.4f} -> {losses[-1]:.4f}, "
         f"first-step KL {step['first_step_kl']:.2e} (< {MAX_FIRST_STEP_KL:g})", step["ok"]),
        (f"{name} gather right after step() on a {'side stream' if gather['side_stream'] else 'CPU (no streams)'}: "
         f"{gather['tensors']} tensors, {gib(gather['bytes']):.2f} GiB in {gather['seconds']:.1f} s = fp32 master in "
         f"bf16" + (f"; {gather['mismatches']}" if gather["mismatches"] else ""), gather["ok"]),
        (f"{name} bf16 vs fp32 log-probs over {drift['tokens']} tokens: mean |d| {drift['mean_abs']:.4f} "
         f"(< {MAX_MEAN_DRIFT}), max {drift['max_abs']:.3f}, mean |ratio - 1| {drift['mean_ratio_minus_one']:.4f}",
         drift["ok"]),
        (f"{name} checkpoint: a step moved the logits by {checkpoints['step_moved_logits_by']:.3g}, load restored "
         f"them {'exactly' if checkpoints['reload_exact'] else 'NOT exactly'}; HF export: "
         f"{checkpoints['export_weights'] - len(checkpoints['export_unequal'])}/{checkpoints['export_weights']} "
         f"tensors byte-equal, transformers' logits within {checkpoints['export_max_abs_diff']:.3f} of "
         f"{checkpoints['logit_scale']:.1f}, same argmax at {100 * checkpoints['export_same_argmax']:.1f}%",
         checkpoints["ok"]),
    ]


def print_report(result: dict[str, Any]) -> list[tuple[str, bool]]:
    print(f"{result['card']}; dense bf16 peak {result['peak_bf16_tflops'] or 'n/a'} TFLOPS; torch {result['torch']}, "
          f"transformers {result['transformers']}, deepspeed {result['deepspeed']}")
    print(f"{'learner step (LearnerRank, ' + result['dtype'] + ', AdamW, grad ckpt)':52} {'params':>8} {'tokens':>7} "
          f"{'micro':>5} {'step s':>7} {'tokens/s':>9} {'TFLOPS':>7} {'MFU':>6} {'peak GiB':>8} {'ref tok/s':>9}")
    print("-" * 128)
    for row in result["learner"]:
        mfu = f"{100 * row['mfu']:5.1f}%" if row["mfu"] is not None else "   n/a"
        memory = f"{row['peak_memory_gib']:8.1f}" if row["peak_memory_gib"] is not None else "     n/a"
        label = f"Qwen2.5-{row['model']} shape, ZeRO-{row['zero_stage']}, {row['sequences']} sequences"
        params = (f"{row['params_matmul'] / 1e9:.3f}B" if row["params_matmul"] >= 1e7
                  else f"{row['params_matmul'] / 1e6:.2f}M")
        print(f"{label:52} {params:>8} {row['tokens_per_step']:7d} {row['micro_batches']:5d} "
              f"{row['step_seconds_median']:7.3f} {row['tokens_per_s']:9.0f} {row['model_tflops_per_s']:7.1f} {mfu} "
              f"{memory} {row['reference_tokens_per_s']:9.0f}")
    print(f"(micro-batches of {result['learner'][0]['micro_batch_tokens']} tokens, log-probs in chunks of "
          f"{result['learner'][0]['logprob_chunk_tokens']}; peak memory with the bf16 reference resident)")
    print()
    print(f"{'transformers generate (greedy, KV cache)':52} {'batch':>8} {'new':>7} {'seconds':>7} {'tokens/s':>9}")
    print("-" * 128)
    for row in result["generation"]:
        print(f"{'Qwen2.5-' + row['model'] + ' shape':52} {row['batch']:8d} {row['new_tokens']:7d} "
              f"{row['seconds_median']:7.2f} {row['tokens_per_s']:9.0f}")
    print()
    checks = [check for row in result["learner"] for check in checks_of(row)]
    for label, ok in checks:
        print(f"  [{'ok' if ok else 'FAILED'}] {label}")
    for label in NOT_CHECKED:
        print(f"  [not checked here] {label}")
    return checks


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny model, gloo: every check, in about a minute")
    parser.add_argument("--models", default="1.5B", help="comma-separated: 0.5B, 1.5B")
    parser.add_argument("--zero-stage", type=int, default=3, choices=[2, 3])
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--chunk-tokens", type=int, default=2048, help="learner.logprob_chunk_tokens")
    parser.add_argument("--sequences", type=int, default=28, help="two-turn sequences per step (4 micro-batches)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--turn", type=int, default=1024, help="longest attempt; each is half to all of it")
    parser.add_argument("--instruction", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--drift-sequences", type=int, default=4)
    parser.add_argument("--gen-batch", type=int, default=32)
    parser.add_argument("--gen-prompt", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=256)
    parser.add_argument("--gen-repeats", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, help="override the card's dense bf16 peak")
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**SMOKE_DEFAULTS)  # what is given on the command line still wins
    args = parser.parse_args(argv)
    begin = time.perf_counter()

    if args.smoke:
        device, dtype, backend, models = "cpu", torch.bfloat16, "gloo", ["smoke"]
        card = "CPU (smoke test: no MFU)"
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        from score_ray.assets import torch_extensions_dir  # DeepSpeed's CPU ops, compiled once into the cache

        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device; use --smoke to check the script on a CPU")
        device, dtype, backend = "cuda", torch.bfloat16, "nccl"
        models = [m.strip() for m in args.models.split(",")]
        torch.cuda.set_device(0)
        card = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or (peak_tflops(card) if device == "cuda" else None)
    import deepspeed
    import transformers

    if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (4, 56):
        raise SystemExit(f"transformers {transformers.__version__}: 4.56 or later is needed (from_pretrained's dtype)")
    join_single_process_group(backend)

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
    checks = print_report(result)
    result["checks"] = [{"check": label, "ok": ok} for label, ok in checks]
    result["not_checked"] = NOT_CHECKED
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent.parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "learner_gpu.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'learner_gpu.json'} (total {result['wall_seconds']:.0f} s)")
    if not all(ok for _, ok in checks):
        print("a check FAILED (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
