"""Token log-probs at each position's own temperature, and the decoder split at a layer (learner.share_trunk)
computes what the whole model computes."""

import copy
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from score_ray.modeling import (
    batch_token_logprobs,
    check_splittable,
    head_logprobs,
    selected_token_logprobs,
    sequence_logprobs,
    top_logprobs,
    trunk_hidden,
)


@pytest.fixture
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def batch():
    """Two right-padded rows, log-probs wanted at some positions of each."""
    ids = torch.randint(1, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    select = torch.zeros((2, 11), dtype=torch.bool)
    select[0, 4:] = True
    select[1, 3:7] = True
    return ids, mask, select


def test_each_position_is_scored_at_its_own_temperature_on_every_path(model):
    """Positions before 6 at 1.3 (a hot first attempt), the rest at 0.7: each equals one-temperature scoring of
    that position, on the full pass, the selected-positions head, the split decoder and the list API."""
    ids, mask, select = batch()
    temperature = torch.full((2, 11), 0.7)
    temperature[:, :6] = 1.3
    hot, cool = (batch_token_logprobs(model, ids, mask, temperature=t)[0] for t in (1.3, 0.7))
    expected = torch.where(temperature == 1.3, hot, cool)
    assert (hot - cool).abs().max() > 1e-2  # the two temperatures really differ
    full, _ = batch_token_logprobs(model, ids, mask, temperature=temperature)
    assert torch.allclose(full, expected, atol=1e-6)
    chosen, _ = selected_token_logprobs(model, ids, mask, select, temperature=temperature)
    assert torch.allclose(chosen, expected[select], atol=1e-6)
    decoder = model.get_decoder()
    split, _ = top_logprobs(model, trunk_hidden(model, ids, mask, 2), ids, mask, select, decoder.layers[2:],
                            decoder.norm, temperature=temperature)
    assert torch.allclose(split, expected[select], atol=1e-6)
    lengths = [12, 8]
    sequences = [ids[row, :n].tolist() for row, n in enumerate(lengths)]
    listed = sequence_logprobs(model, sequences, pad_id=0, temperature=[temperature[row, : n - 1].tolist()
                                                                        for row, n in enumerate(lengths)])
    for row, n in enumerate(lengths):
        assert torch.allclose(torch.tensor(listed[row]), expected[row, : n - 1], atol=1e-5)


@pytest.mark.parametrize("cut", [0, 1, 3])
def test_trunk_then_top_blocks_equals_the_whole_forward(model, cut):
    ids, mask, select = batch()
    whole, _ = selected_token_logprobs(model, ids, mask, select)
    decoder = model.get_decoder()
    split, _ = top_logprobs(model, trunk_hidden(model, ids, mask, cut), ids, mask, select, decoder.layers[cut:],
                            decoder.norm)
    assert whole.shape == (int(select.sum()),)
    assert torch.allclose(split, whole, atol=1e-6), (split - whole).abs().max()
    assert len(decoder.layers) == 4  # the model's own blocks are back in place


def test_the_references_copied_top_blocks_score_as_the_base_model_after_the_policy_moved(model):
    ids, mask, select = batch()
    base = copy.deepcopy(model)
    decoder = model.get_decoder()
    reference_top = copy.deepcopy(decoder.layers[2:]), copy.deepcopy(decoder.norm)
    with torch.no_grad():  # the policy's top blocks move; the trunk (blocks 0-1, embedding) is shared
        for param in decoder.layers[2:].parameters():
            param.add_(0.05 * torch.randn_like(param))
    trunk = trunk_hidden(model, ids, mask, 2)
    reference, _ = top_logprobs(model, trunk, ids, mask, select, *reference_top)
    policy, _ = top_logprobs(model, trunk, ids, mask, select, decoder.layers[2:], decoder.norm)
    expected, _ = selected_token_logprobs(base, ids, mask, select)
    assert torch.allclose(reference, expected, atol=1e-6)
    assert (policy - expected).abs().max() > 1e-2  # the policy really differs, so the check above can fail
    moved, _ = selected_token_logprobs(model, ids, mask, select)
    assert torch.allclose(policy, moved, atol=1e-6)


def test_gradients_through_the_top_blocks_match_the_whole_forward(model):
    ids, mask, select = batch()
    decoder = model.get_decoder()
    trained = [p for p in decoder.layers[2:].parameters()] + [decoder.norm.weight]
    whole, _ = selected_token_logprobs(model, ids, mask, select)
    expected = torch.autograd.grad(whole.sum(), trained)
    with torch.no_grad():
        trunk = trunk_hidden(model, ids, mask, 2)
    split, _ = top_logprobs(model, trunk, ids, mask, select, decoder.layers[2:], decoder.norm)
    got = torch.autograd.grad(split.sum(), trained)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_model_the_split_would_compute_wrongly_is_refused_naming_the_setting(model):
    check_splittable(model)  # llama, one attention kind
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "full_attention"]
    with pytest.raises(ValueError, match="learner.share_trunk=false"):
        check_splittable(model)
    model.config.layer_types = None
    model.config.model_type = "gemma2"
    with pytest.raises(ValueError, match="gemma2"):
        check_splittable(model)


def test_log_probs_in_chunks_equal_the_whole_and_so_do_their_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=False)
    model = type("WithHead", (), {"get_output_embeddings": lambda self: head})()
    hidden = torch.randn(3, 41, 16, requires_grad=True)
    ids = torch.randint(0, 1000, (3, 41))
    select = torch.rand(3, 40) > 0.3  # about 84 tokens
    temperature = 0.5 + torch.rand(3, 40)
    results = []
    for chunk in (None, 7, 1000):
        hidden.grad, head.weight.grad = None, None
        taken, entropy = head_logprobs(model, hidden, ids, select, with_entropy=True, temperature=temperature,
                                       chunk_tokens=chunk)
        (taken * torch.linspace(-1, 1, taken.numel())).sum().backward()
        results.append((taken.detach(), entropy, hidden.grad.clone(), head.weight.grad.clone()))
    whole = results[0]
    for chunked in results[1:]:
        for got, want in zip(chunked, whole):
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)


PEAK = """
import resource, sys, psutil, torch
from score_ray.modeling import head_logprobs
tokens, chunk = int(sys.argv[1]), (int(sys.argv[2]) or None)
torch.manual_seed(0)
head = torch.nn.Linear(64, 151936, bias=False)  # Qwen2.5's vocabulary
model = type("WithHead", (), {"get_output_embeddings": lambda self: head})()
hidden = torch.randn(1, tokens + 1, 64, requires_grad=True)
ids = torch.randint(0, 151936, (1, tokens + 1))
before = psutil.Process().memory_info().rss
taken, entropy = head_logprobs(model, hidden, ids, torch.ones(1, tokens, dtype=torch.bool), with_entropy=True,
                               chunk_tokens=chunk)
taken.sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20)
"""


def peak_mb(tokens: int, chunk: int) -> float:
    """Peak memory (MB) a learner's log-probs, entropies and backward over ``tokens`` selected tokens add."""
    result = subprocess.run([sys.executable, "-c", PEAK, str(tokens), str(chunk)], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.strip().splitlines()[-1])


def test_the_peak_memory_of_log_probs_is_bounded_by_the_chunk_not_the_micro_batch():
    # 256 tokens' logits over 151,936 words are 156 MB: four times as many tokens selected add almost nothing
    small, large = peak_mb(1024, 256), peak_mb(4096, 256)
    assert large - small < 150, (small, large)
    # without chunks, 1,024 tokens already cost gigabytes (their logits are 622 MB, and several are alive)
    assert peak_mb(1024, 0) > small + 1000, small
