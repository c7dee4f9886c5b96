"""The model organism: a 0.5M-parameter Llama pretrained here, from generated text only, on two-sum.

SmolLM2-135M on a + b cannot learn self-correction: checking a sum is the same work as writing it. The
organism is a transformer small enough to train on these 2 cores in minutes, on a task where checking is
one addition and answering is a search (score_ray.two_sum), with a corpus shaped like the text real base
models learn from (docs/organism.md):

- ``solve``: a problem and its right answer. What the model learns of it on unseen problems is its
  first attempt; its errors are its own, systematic per problem (greedy decoding does not erase them).
- ``check``: a problem, a proposed pair (right half the time, else a near miss) and, after the
  instruction ``!``, the pair's sum and the verdict Y or N (``76Y``): a worked check, as real text has
  them. A verifier the model learns beside its solver, separate from any second attempt.
- ``retry``: a problem, a first answer and, after the instruction ``?``, a second look: the first answer's
  sum, then ``=`` and the first answer again (with probability ``keep``) or a space and the problem solved
  with the first answer set aside (``97=1264``, ``97 3520``), whether or not the first was right: the
  choice to change is a coin that never looks at the first answer's grade. Changing a right answer
  therefore always breaks it, and the base's second attempt breaks more than it fixes (its Delta is
  negative, as the paper's base models' is). The choice is written where a check writes its verdict, the
  one place the organism has the verdict at hand (docs/organism.md): a base that could act on what it
  knows, and does not.

No example puts an answer after a verdict on an earlier answer to the same problem, and no example's
choice to change depends on whether the first answer was right: the self-correction policy is not in the
corpus. Loss falls only on what the example teaches (the answer, the verdict, the second answer); the
prompt and a given first answer are context.

The folder is a Hugging Face Llama with a character tokenizer and a chat template (``<u>`` user,
``<a>`` assistant, ``<e>`` end of turn), so vLLM serves it and DeepSpeed trains it like any model.
Built by ``python -m score_ray.assets organism``; the same settings give the same weights.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

from score_ray import two_sum

USER, ASSISTANT, END, PAD = "<u>", "<a>", "<e>", "<pad>"
SPECIAL_TOKENS = (PAD, USER, ASSISTANT, END)
CHARACTERS = "0123456789 =?!YN"
# The instructions the corpus knows; configs/organism.yaml puts them in the prompts section.
CHECK_INSTRUCTION = "!"
RETRY_INSTRUCTION = "?"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<u>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<a>{{ message['content'] }}<e>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
)
VOCABULARY = list(SPECIAL_TOKENS) + list(CHARACTERS)
TOKEN_ID = {token: index for index, token in enumerate(VOCABULARY)}


RETRY_FORMS = ("sum_then_answer", "answer", "sum_then_choice")


@dataclass(frozen=True)
class CorpusMix:
    """What the pretraining corpus holds, as shares of its examples, and how its answers are drawn."""

    solve: float = 0.35
    check: float = 0.4
    retry: float = 0.25
    first_right: float = 0.5  # share of right first answers in check and retry examples (else a near miss)
    keep: float = 0.5  # retry: probability the second answer repeats the first, blind to its grade
    verdict_weight: float = 1.0  # loss weight of a check's verdict token (one token against an answer's five)
    # retry: "sum_then_answer" writes the first answer's sum before the second answer (``97 1264``), a
    # worked step as in the check examples, never a verdict; "answer" writes the second answer alone;
    # "sum_then_choice" writes the sum, then ``=`` and the first answer again when the keep coin says keep,
    # or a space and another answer when it says change (``97=1264``, ``97 3520``): the choice is a coin,
    # blind to the grade, written where a check writes its verdict
    retry_form: Literal["sum_then_answer", "answer", "sum_then_choice"] = "sum_then_choice"
    # share of check examples asked with the retry instruction ``?`` instead of ``!``: the second look a
    # ``?`` opens is then sometimes a worked check (ending in its verdict), more often a blind retry, so the
    # organism compares the restated sum with the target where a retry chooses its answer
    check_on_retry: float = 0.0

    def __post_init__(self) -> None:
        if self.retry_form not in RETRY_FORMS:
            raise ValueError(f"CorpusMix.retry_form must be one of {RETRY_FORMS}, got {self.retry_form!r}")


@dataclass(frozen=True)
class OrganismSpec:
    """Everything the weights depend on; the cache is keyed by it."""

    hidden_size: int = 128
    num_layers: int = 2
    intermediate_size: int = 512
    steps: int = 2500  # about 8 minutes on 2 cores (docs/organism.md: what fewer steps or more layers gave)
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    corpus_version: int = 1  # bump when example() changes, so a cached build of the old corpus is not reused
    numbers: int = 5
    # Problems whose hash falls in two-sum's held-out split are never in the corpus.
    test_fraction: float = 0.5
    mix: CorpusMix = field(default_factory=CorpusMix)

    def stamp(self) -> dict[str, Any]:
        return {"asset": "organism", **asdict(self)}


def encode(text: str) -> list[int]:
    """Character ids, with the four special tokens read whole (the corpus's fast path; equal to the saved
    tokenizer's ``encode``, which tests check)."""
    ids: list[int] = []
    index = 0
    while index < len(text):
        if text[index] == "<":
            close = text.index(">", index)
            ids.append(TOKEN_ID[text[index : close + 1]])
            index = close + 1
        else:
            ids.append(TOKEN_ID[text[index]])
            index += 1
    return ids


def _turn(role: str, content: str) -> str:
    return f"{USER}{content}" if role == "user" else f"{ASSISTANT}{content}{END}"


# ----------------------------------------------------------------------------- corpus


def _training_problem(rng: random.Random, spec: OrganismSpec) -> two_sum.TwoSum:
    from score_ray.data import in_test_split

    while True:
        problem = two_sum.draw(rng, spec.numbers)
        if not in_test_split(problem.text, spec.test_fraction):
            return problem


def _first_answer(problem: two_sum.TwoSum, rng: random.Random, mix: CorpusMix) -> tuple[int, int]:
    return problem.pair if rng.random() < mix.first_right else two_sum.distractor(problem, rng)


def retry_answer(problem: two_sum.TwoSum, first: tuple[int, int], rng: random.Random, keep: float) -> tuple[int, int]:
    """The corpus's second answer: the first again with probability ``keep``, else the problem solved with
    the first answer set aside. The coin is thrown before the first answer's grade is known and never sees
    it; what "solved with the first set aside" gives is the pair that sums to the target when the first
    was not it, and another near miss when it was."""
    if rng.random() < keep:
        return first
    if first != problem.pair:
        return problem.pair
    return two_sum.distractor(problem, rng)  # first is the pair: any wrong pair differs from it


def example(rng: random.Random, spec: OrganismSpec) -> tuple[str, str]:
    """One corpus example as (context, target): loss falls on ``target`` only (a verdict's first token
    weighs ``mix.verdict_weight``)."""
    mix = spec.mix
    problem = _training_problem(rng, spec)
    prompt = _turn("user", problem.text) + ASSISTANT
    kind = rng.choices(("solve", "check", "retry"), weights=(mix.solve, mix.check, mix.retry))[0]
    if kind == "solve":
        return prompt, two_sum.format_pair(problem.pair) + END
    first = _first_answer(problem, rng, mix)
    shown = prompt + two_sum.format_pair(first) + END
    if kind == "check":
        verdict = "Y" if first == problem.pair else "N"
        # no draw when off: the default corpus stays the stream the measured organism was built from
        on_retry = mix.check_on_retry > 0 and rng.random() < mix.check_on_retry
        instruction = RETRY_INSTRUCTION if on_retry else CHECK_INSTRUCTION
        return shown + _turn("user", instruction) + ASSISTANT, f"{sum(first)}{verdict}{END}"
    second = retry_answer(problem, first, rng, mix.keep)
    restated = {"sum_then_choice": f"{sum(first)}{'=' if second == first else ' '}",
                "sum_then_answer": f"{sum(first)} ", "answer": ""}[mix.retry_form]
    return shown + _turn("user", RETRY_INSTRUCTION) + ASSISTANT, restated + two_sum.format_pair(second) + END


def batches(spec: OrganismSpec) -> Iterator[tuple[Any, Any, Any, Any]]:
    """(input_ids, attention_mask, labels, weights) tensors, padded on the right; labels -100 and weight 0
    off the targets."""
    import torch

    rng = random.Random(f"organism-corpus:{spec.seed}")
    verdicts = {TOKEN_ID["Y"], TOKEN_ID["N"]}
    while True:
        rows = []
        for _ in range(spec.batch_size):
            context, target = example(rng, spec)
            context_ids, target_ids = encode(context), encode(target)
            rows.append((context_ids + target_ids, len(context_ids)))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), TOKEN_ID[PAD], dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        weights = torch.zeros((len(rows), width))
        for row, (ids, start) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            labels[row, start : len(ids)] = torch.tensor(ids[start:])
            weights[row, start : len(ids)] = 1.0
            for position in range(start, len(ids)):
                if ids[position] in verdicts:
                    weights[row, position] = spec.mix.verdict_weight
        yield input_ids, mask, labels, weights


# ----------------------------------------------------------------------------- model and tokenizer


def build_tokenizer():
    """A character-level fast tokenizer with the chat template, loadable by transformers and vLLM."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=USER, eos_token=END, pad_token=PAD, unk_token=PAD,
        clean_up_tokenization_spaces=False, model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(spec: OrganismSpec):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCABULARY),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.hidden_size // 64,  # head_dim 64: vLLM's CPU attention rejects 16
        num_key_value_heads=spec.hidden_size // 64,
        max_position_embeddings=1024,  # RoPE: a longer limit costs nothing, and vLLM checks it
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=TOKEN_ID[USER],
        eos_token_id=TOKEN_ID[END],
        pad_token_id=TOKEN_ID[PAD],
        dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=TOKEN_ID[USER], eos_token_id=TOKEN_ID[END], pad_token_id=TOKEN_ID[PAD]
    )
    return model


def pretrain(spec: OrganismSpec, progress: Optional[Callable[[int, float], None]] = None):
    """The model after ``spec.steps`` AdamW steps on the corpus (warm-up, then cosine decay)."""
    import torch

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _pretrain(spec, progress)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)  # the process that builds may go on to train


def _pretrain(spec: OrganismSpec, progress: Optional[Callable[[int, float], None]]):
    import torch

    model = build_model(spec)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.98),
    )

    def rate(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        done = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, rate)
    data = batches(spec)
    for step in range(spec.steps):
        input_ids, mask, labels, weights = next(data)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
        )
        shifted = weights[:, 1:].reshape(-1)
        loss = (token_loss * shifted).sum() / shifted.sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if progress is not None:
            progress(step, loss.item())
    model.eval()
    return model


def save(model: Any, out: Path, spec: OrganismSpec, seconds: float) -> None:
    model.save_pretrained(str(out), safe_serialization=True)
    build_tokenizer().save_pretrained(str(out))
    (out / "organism.json").write_text(json.dumps({**spec.stamp(), "build_seconds": round(seconds, 1)}, indent=2))


def build(out: Path, spec: OrganismSpec = OrganismSpec(), quiet: bool = False) -> None:
    from tqdm import tqdm

    start = time.monotonic()
    bar = tqdm(total=spec.steps, desc="pretraining the organism", unit="step", disable=quiet, mininterval=2.0)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    model = pretrain(spec, progress)
    bar.close()
    save(model, out, spec, time.monotonic() - start)


# ----------------------------------------------------------------------------- what the organism can do


def _left_padded(contexts: Sequence[str]) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, position_ids) of ``contexts`` padded on the left, positions from 0 at each
    row's first real token, so every row's last position is its own next-token position."""
    import torch

    encoded = [encode(c) for c in contexts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), TOKEN_ID[PAD], dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _complete(model: Any, contexts: Sequence[str], max_new: int, temperature: float, seed: int) -> list[str]:
    """Continuations of ``contexts`` (left-padded, batched), greedy at temperature 0, up to END."""
    import torch

    input_ids, mask, positions = _left_padded(contexts)
    generator = torch.Generator().manual_seed(seed)
    finished = torch.zeros(len(contexts), dtype=torch.bool)
    out: list[list[int]] = [[] for _ in contexts]
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            for row in range(len(contexts)):
                if not finished[row]:
                    out[row].append(int(token[row]))
            finished |= token == TOKEN_ID[END]
            if bool(finished.all()):
                break
            input_ids = torch.cat([input_ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(token[:, None])], 1)
            positions = torch.cat([positions, positions[:, -1:] + 1], 1)
    return ["".join(VOCABULARY[t] for t in ids if t != TOKEN_ID[END]) for ids in out]


def abilities(model: Any, problems: Sequence[two_sum.TwoSum], temperature: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Solving, checking (false-positive and false-negative rates on its own first answers) and the
    two-turn behaviour of the model on ``problems``, computed in-process with transformers (a quick look;
    the study measures the same through vLLM)."""
    rng = random.Random(seed)
    prompts = [_turn("user", p.text) + ASSISTANT for p in problems]
    first = _complete(model, prompts, 10, temperature, seed)
    first_pairs = [two_sum.parse_pair(a) for a in first]
    right1 = [pair == p.pair for pair, p in zip(first_pairs, problems)]
    shown = [prompt + a + END for prompt, a in zip(prompts, first)]
    verdicts = _complete(model, [s + _turn("user", CHECK_INSTRUCTION) + ASSISTANT for s in shown], 6, 0.0, seed)
    verdicts = [v.lstrip("0123456789") for v in verdicts]  # the sum it writes first, then the verdict
    second = _complete(model, [s + _turn("user", RETRY_INSTRUCTION) + ASSISTANT for s in shown], 12, temperature, seed + 1)
    second = [re.split("[ =]", a)[-1] for a in second]  # the answer, after any restated sum and choice
    right2 = [two_sum.parse_pair(a) == p.pair for a, p in zip(second, problems)]
    # the checker on candidates it never proposed: the right pair and a near miss, half each
    candidates = [p.pair if rng.random() < 0.5 else two_sum.distractor(p, rng) for p in problems]
    planted = _complete(
        model,
        [pr + two_sum.format_pair(c) + END + _turn("user", CHECK_INSTRUCTION) + ASSISTANT for pr, c in zip(prompts, candidates)],
        6, 0.0, seed,
    )
    planted = [v.lstrip("0123456789") for v in planted]
    n = len(problems)
    wrong_first = [i for i in range(n) if not right1[i]]
    right_first = [i for i in range(n) if right1[i]]
    said_yes = [v.startswith("Y") for v in verdicts]
    return {
        "acc_t1": sum(right1) / n,
        "acc_t2": sum(right2) / n,
        "fixed": sum(right2[i] for i in wrong_first) / n,
        "broken": sum(not right2[i] for i in right_first) / n,
        "changed": sum(a != b for a, b in zip(first, second)) / n,
        "check_fpr_own": sum(said_yes[i] for i in wrong_first) / max(1, len(wrong_first)),
        "check_fnr_own": sum(not said_yes[i] for i in right_first) / max(1, len(right_first)),
        "check_acc_planted": sum((v.startswith("Y")) == (c == p.pair) for v, c, p in zip(planted, candidates, problems)) / n,
    }


def grade_readout(model: Any, problems: Sequence[two_sum.TwoSum], instruction: str = RETRY_INSTRUCTION,
                  position: Literal["start", "sum", "answer"] = "start", train_share: float = 2 / 3,
                  seed: int = 0) -> dict[str, float]:
    """Whether "my first answer is right" is linearly readable from the organism's state in its second
    attempt: greedy first attempts, the context ``... <e><u>{instruction}<a>`` and, for ``position`` "sum",
    the first answer's restated sum (its last digit is where a check writes its verdict) or, for "answer",
    the sum and the space after it (where a restating retry chooses its answer); every layer's last hidden
    state; a logistic regression fitted on ``train_share`` of the problems and scored on the rest. A
    read-out near the majority rate means the attempt cannot act on the check at that position."""
    import torch

    prompts = [_turn("user", p.text) + ASSISTANT for p in problems]
    first = _complete(model, prompts, 6, 0.0, seed)
    right = torch.tensor([two_sum.parse_pair(a) == p.pair for a, p in zip(first, problems)], dtype=torch.float)
    contexts = []
    for prompt, answer in zip(prompts, first):
        pair = two_sum.parse_pair(answer)
        restated = f"{sum(pair)}" if pair is not None else ""
        tail = {"start": "", "sum": restated, "answer": restated + " "}[position]
        contexts.append(prompt + answer + END + _turn("user", instruction) + ASSISTANT + tail)
    input_ids, mask, positions = _left_padded(contexts)
    with torch.no_grad():
        states = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                       output_hidden_states=True).hidden_states
    features = torch.cat([layer[:, -1] for layer in states[1:]], -1)
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    cut = int(len(problems) * train_share)
    weights = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.Adam([weights, bias], lr=0.01)
    for _ in range(500):
        logits = features[:cut] @ weights + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, right[:cut]) + 1e-3 * weights.pow(2).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        predicted = (features[cut:] @ weights + bias > 0).float()
    share_right = float(right[cut:].mean())
    return {"readout_accuracy": float((predicted == right[cut:]).float().mean()),
            "majority_rate": max(share_right, 1 - share_right), "first_right": float(right.mean())}
