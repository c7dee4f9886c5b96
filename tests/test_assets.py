"""Model assets: SmolLM2 converted from its GGUF, tiny random models, both loadable by vLLM."""

import pytest

CODE = 'def f(x):\n\tif x > 0:\n        return "naïve ✓"\n    return [1, 2]  # done\n\n\nprint(f(3))\n'


def test_smollm2_tokenizer_round_trips_code_and_newlines(tokenizer):
    for text in (CODE, "Final Answer: The final answer is $\\frac{2}{3}$. I hope it is correct.", "  lead\n\ntrail  "):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("\n", add_special_tokens=False)) == ["Ċ"]
    # Digits one by one, as SmolLM2 was trained.
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" 123", add_special_tokens=False)) == ["Ġ", "1", "2", "3"]


def test_smollm2_special_tokens_and_chat_template(tokenizer):
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token_id == 2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_weights_are_the_full_model(smollm2_path):
    from safetensors import safe_open

    with safe_open(f"{smollm2_path}/model.safetensors", "pt") as handle:
        names = list(handle.keys())
        total = sum(_numel(handle.get_slice(name).get_shape()) for name in names)
    assert sum(name.startswith("model.layers.29.") for name in names) == 9  # 30 Llama blocks
    assert 134_000_000 < total < 163_000_000  # 134.5M parameters (+ the lm_head copy if stored untied)


def _numel(shape):
    count = 1
    for size in shape:
        count *= size
    return count


def test_model_path_resolution_errors(tmp_path):
    from score_ray.assets import resolve_model_path

    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    assert resolve_model_path("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
