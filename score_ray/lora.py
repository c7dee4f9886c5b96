"""LoRA (learner.trainable=lora): the adapter on the learner's model, and the same adapter as vLLM reads it.

The learner wraps its model with peft (``with_adapter``); the reference is that model with the adapter off
(peft's ``disable_adapter``), so no second copy of the model exists. A weight sync sends only the adapter's
tensors; each generator writes them as a PEFT folder (``write_adapter``: adapter_config.json and
adapter_model.safetensors, the names peft saves and vLLM loads) and serves it as a new LoRA (score_ray.rollout).
The run's ``final_model/`` is that folder; ``python -m score_ray.assets merge RUN`` writes the base with the
adapter merged in, as a plain Hugging Face model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

from score_ray.config import LoraConfig

# The max_lora_rank values vLLM 0.32 accepts (vllm/config/lora.py); an engine is started with the smallest one
# that holds the adapter.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name for a model's one adapter; its parameter names carry it


def peft_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")


def with_adapter(model, lora: LoraConfig):
    """``model`` wrapped by peft with a fresh adapter (B = 0: the policy starts as the base model); only the
    adapter's parameters require gradients. The adapter keeps the base's dtype (bf16 on GPU): peft's fp32 upcast
    would mix dtypes inside one ZeRO-3 gather."""
    from peft import get_peft_model

    missing = [name for name in lora.target_modules
               if not any(module.rsplit(".", 1)[-1] == name for module, _ in model.named_modules())]
    if missing:
        raise ValueError(f"learner.lora.target_modules: the model has no {missing} layers "
                         f"({type(model).__name__}; e.g. q_proj, v_proj for Llama and Qwen)")
    return get_peft_model(model, peft_config(lora), autocast_adapter_dtype=False)


def is_adapter_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def saved_name(name: str) -> str:
    """A parameter's name as peft saves it and vLLM loads it: without the adapter's own name
    (``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``)."""
    return name.replace(f".{ADAPTER_NAME}.", ".")


def adapter_config(lora: LoraConfig, base_model: str = "") -> dict[str, Any]:
    """adapter_config.json: what vLLM needs (r, lora_alpha, target_modules) and peft reads back."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": sorted(lora.target_modules), "bias": "none",
            "base_model_name_or_path": base_model}


def write_adapter(folder: Path, tensors: Iterable[tuple[str, Any]], lora: LoraConfig, base_model: str = "") -> Path:
    """A PEFT adapter folder from the learner's adapter tensors (named as the learner's parameters)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = {saved_name(name): torch.as_tensor(tensor).detach().contiguous().clone() for name, tensor in tensors}
    if not weights or not all(is_adapter_parameter(name) for name in weights):
        raise ValueError(f"not a LoRA adapter's tensors: {sorted(weights)[:3]}")
    save_file(weights, str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora, base_model), indent=1))
    return folder


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of ``rank``."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"learner.lora.rank={rank}: vLLM serves adapters up to rank {VLLM_MAX_LORA_RANKS[-1]}")


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def merge_adapter(adapter: Path, base: str, out: Path, dtype: str = "float32") -> Path:
    """``base`` (a Hugging Face model folder) with the adapter in ``adapter`` merged into its weights, written to
    ``out`` as a plain Hugging Face model with the base's tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(base).save_pretrained(str(out))
    return out


def adapter_base(adapter: Path) -> Optional[str]:
    """The base model an adapter folder names (its adapter_config.json), if any."""
    return json.loads((Path(adapter) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or None


def merged_model(target: Path, base: Optional[str] = None, output: Optional[Path] = None) -> Path:
    """The Hugging Face folder of a LoRA run's model: ``target`` is a run folder (its config.yaml names the base,
    final_model/ holds the adapter; written to final_model_merged/) or an adapter folder (its adapter_config.json
    names the base; written beside it, ``<folder>-merged``). Merged once: a merged folder newer than the adapter
    is reused."""
    from score_ray.assets import model_folder
    from score_ray.config import ModelConfig, load_config

    target = Path(target)
    if (target / "config.yaml").is_file() and (target / "final_model").is_dir():
        adapter, model = target / "final_model", load_config(str(target / "config.yaml")).model
        output = output or target / "final_model_merged"
    elif is_adapter_folder(target):
        adapter, model = target, ModelConfig(path=base or adapter_base(target) or "")
        output = output or target.with_name(target.name + "-merged")
    else:
        raise FileNotFoundError(f"{target} is neither a run folder with final_model/ nor a LoRA adapter folder "
                                f"(no {ADAPTER_CONFIG})")
    if not is_adapter_folder(adapter):
        raise FileNotFoundError(f"{adapter} holds no LoRA adapter ({ADAPTER_CONFIG}): the run trained whole weights, "
                                "and its final_model/ is already a Hugging Face model")
    if base is not None:
        model = ModelConfig(path=base)
    if not model.path:
        raise ValueError(f"{adapter}: its adapter_config.json names no base model; give one (--base)")
    done = output / "config.json"
    if done.is_file() and done.stat().st_mtime >= (adapter / ADAPTER_WEIGHTS).stat().st_mtime:
        return output
    return merge_adapter(adapter, str(model_folder(model)), output)
