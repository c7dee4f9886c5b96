"""score_ray.lora's parts on their own: the adapter peft puts on a model, its names as vLLM loads them, the
engine's rank, and an adapter folder written and read back (the whole path on the stack: tests/system/test_lora_stack.py)."""

import json

import pytest
import torch

from score_ray.config import LoraConfig
from score_ray.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_folder, is_adapter_parameter, saved_name,
                            vllm_max_lora_rank, with_adapter, write_adapter)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))


def test_a_fresh_adapter_is_the_base_model_and_trains_alone():
    model = tiny_llama()
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        before = model(ids).logits
    wrapped = with_adapter(model, LoraConfig(rank=4, target_modules=["q_proj", "down_proj"]))
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    # A and B of two projections in each of two blocks, nothing else
    assert len(trainable) == 2 * 2 * 2 and all(is_adapter_parameter(name) for name in trainable)
    with torch.no_grad():
        assert torch.equal(wrapped(ids).logits, before)  # B starts at 0
    with pytest.raises(ValueError, match=r"learner.lora.target_modules: the model has no \['c_attn'\]"):
        with_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj", "c_attn"]))


def test_names_and_ranks_as_vllm_takes_them():
    assert saved_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ValueError, match="up to rank 512"):
        vllm_max_lora_rank(513)


def test_an_adapter_folder_reads_back_into_peft_as_the_learners_adapter(tmp_path):
    from peft import PeftModel

    lora = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    trained = with_adapter(tiny_llama(), lora)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if is_adapter_parameter(name):
                param.normal_(0.0, 0.2)  # a trained adapter: B no longer 0
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    tensors = [(name, p) for name, p in trained.named_parameters() if is_adapter_parameter(name)]
    folder = write_adapter(tmp_path / "v1", tensors, lora, base_model="tiny")
    assert is_adapter_folder(folder) and (folder / ADAPTER_WEIGHTS).is_file()
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["r"] == 4
    reread = PeftModel.from_pretrained(tiny_llama(), str(folder))
    with torch.no_grad():
        assert torch.allclose(reread(ids).logits, trained(ids).logits, atol=1e-6)
    with pytest.raises(ValueError, match="not a LoRA adapter's tensors"):
        write_adapter(tmp_path / "bad", [("model.norm.weight", torch.ones(4))], lora)

