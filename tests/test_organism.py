"""The two-sum task and the organism's corpus, tokenizer and build (fast: no Ray, no vLLM)."""

import random
import re
from collections import Counter

import pytest

from score_ray import organism, two_sum
from score_ray.config import TwoSumSource
from score_ray.data import in_test_split, load_problems
from score_ray.reward.math import grade_math


def test_every_drawn_problem_has_exactly_one_pair_reaching_its_target():
    rng = random.Random(0)
    for _ in range(500):
        problem = two_sum.draw(rng)
        hits = [p for p in problem.pairs() if sum(p) == problem.target]
        assert len(hits) == 1 and problem.pair == hits[0]
        assert len(set(problem.numbers)) == 5 and all(10 <= n <= 99 for n in problem.numbers)
        wrong = two_sum.distractor(problem, rng)
        assert wrong in problem.pairs() and sum(wrong) != problem.target


def test_the_math_grader_takes_the_pair_written_together_and_nothing_else():
    problems, _ = load_problems(TwoSumSource(type="two_sum", split="test", count=20))
    problem = problems[0]
    low, high = two_sum.parse_pair(problem.answer)
    assert low < high and f"{low}{high}" == problem.answer
    target = int(problem.prompt.split("=")[1])
    assert low + high == target
    assert grade_math(problem.answer, problem.answer).reward == 1.0
    for wrong in (f"{high}{low}", str(target), str(low), f"{low} {high}", f"{low}{high}{low}", "", "Y", "N"):
        assert grade_math(wrong, problem.answer).reward == 0.0, wrong


def test_two_sum_source_is_deterministic_and_its_splits_disjoint():
    train, _ = load_problems(TwoSumSource(type="two_sum", split="train", count=300))
    again, _ = load_problems(TwoSumSource(type="two_sum", split="train", count=300))
    test, report = load_problems(TwoSumSource(type="two_sum", split="test", count=300))
    assert [p.prompt for p in train] == [p.prompt for p in again]
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert all(in_test_split(p.prompt, 0.5) for p in test) and report.source == "two_sum[test]"


SPECS = [organism.OrganismSpec(), organism.OrganismSpec(mix=organism.CorpusMix(check_on_retry=0.3))]


@pytest.mark.parametrize("spec", SPECS, ids=["checks_on_their_own_instruction", "some_checks_on_the_retry_one"])
def test_the_corpus_never_holds_a_held_out_problem_nor_an_answer_after_a_verdict(spec):
    rng = random.Random(1)
    kinds = Counter()
    for _ in range(3000):
        context, target = organism.example(rng, spec)
        problem_text = context.split(organism.ASSISTANT)[0].removeprefix(organism.USER)
        assert not in_test_split(problem_text, spec.test_fraction)
        turns = context.count(organism.USER)
        if turns == 1:
            kinds["solve"] += 1
        elif target[-len(organism.END) - 1] in "YN":
            kinds["check"] += 1
            instruction = context[-len(organism.ASSISTANT) - 1]
            kinds["check on ?"] += instruction == organism.RETRY_INSTRUCTION
            # a worked check: the shown pair's sum, then the verdict
            shown = context.split(organism.ASSISTANT)[1].split(organism.END)[0]
            low, high = two_sum.parse_pair(shown)
            target_sum = int(problem_text.split("=")[1])
            verdict = "Y" if low + high == target_sum else "N"
            assert target == f"{low + high}{verdict}{organism.END}"
        else:
            kinds["retry"] += 1
            assert context.endswith(organism.RETRY_INSTRUCTION + organism.ASSISTANT)
            # a retry's context holds the first answer and the instruction, never a verdict; its target
            # restates the first answer's sum (a worked step, no verdict), then `=` and the first answer
            # again, or a space and another answer
            first = context.split(organism.ASSISTANT)[1].split(organism.END)[0]
            restated, choice, answer = re.fullmatch(r"(\d+)([ =])(\d+)", target.removesuffix(organism.END)).groups()
            assert "Y" not in context + target and "N" not in context + target
            assert int(restated) == sum(two_sum.parse_pair(first)) and two_sum.parse_pair(answer) is not None
            assert (choice == "=") == (answer == first)
    shares = {kind: count / 3000 for kind, count in kinds.items()}
    for kind in ("solve", "check", "retry"):
        assert abs(shares[kind] - getattr(spec.mix, kind)) < 0.04, shares
    assert abs(kinds["check on ?"] / kinds["check"] - spec.mix.check_on_retry) < 0.05, kinds


@pytest.mark.parametrize("spec", SPECS, ids=["checks_on_their_own_instruction", "some_checks_on_the_retry_one"])
def test_the_corpus_changes_a_first_answer_as_often_whether_it_was_right_or_wrong(spec):
    """The self-correction policy is not in the corpus: in its retry examples the second answer differs from
    the first with probability 1 - keep, whatever the first answer's grade."""
    rng = random.Random(2)
    changed = {True: [], False: []}
    while len(changed[True]) + len(changed[False]) < 4000:
        context, target = organism.example(rng, spec)
        if context.count(organism.USER) == 1 or target[-len(organism.END) - 1] in "YN":
            continue  # a solve or a check
        problem_text = context.split(organism.ASSISTANT)[0].removeprefix(organism.USER)
        first = two_sum.parse_pair(context.split(organism.ASSISTANT)[1].split(organism.END)[0])
        second = two_sum.parse_pair(re.split("[ =]", target.removesuffix(organism.END))[-1])
        right = sum(first) == int(problem_text.split("=")[1])
        changed[right].append(second != first)
    rates = {right: sum(v) / len(v) for right, v in changed.items()}
    keep = spec.mix.keep
    assert abs(rates[True] - (1 - keep)) < 0.05 and abs(rates[False] - (1 - keep)) < 0.05, rates


def test_the_saved_tokenizer_reads_text_as_the_corpus_does_and_renders_both_turns():
    from score_ray.config import PromptsConfig
    from score_ray.data import Problem
    from score_ray.prompts import TwoTurnPrompter

    tokenizer = organism.build_tokenizer()
    text = "<u>37 12 85 64 20=76<a>1264<e><u>?<a>"
    assert tokenizer.encode(text, add_special_tokens=False) == organism.encode(text)
    assert tokenizer.decode(organism.encode("1264<e>"), skip_special_tokens=True) == "1264"
    prompts = PromptsConfig(math_first_turn="", math_user_template="{instruction}{problem}", math_self_correction="?")
    prompter = TwoTurnPrompter(tokenizer, prompts)
    problem = Problem(id="p", kind="math", prompt="37 12 85 64 20=76", answer="1264")
    first = prompter.turn1_ids(problem)
    assert first == organism.encode("<u>37 12 85 64 20=76<a>")
    response = organism.encode("1264<e>")
    assert prompter.turn2_ids("math", first, response) == organism.encode(text)


def test_the_build_is_deterministic_and_leaves_torch_as_it_found_it():
    import dataclasses

    import torch

    spec = organism.OrganismSpec(steps=3, batch_size=8, hidden_size=64, num_layers=1, intermediate_size=64)
    first, second = organism.pretrain(spec), organism.pretrain(spec)
    other = organism.pretrain(dataclasses.replace(spec, seed=1))
    assert not torch.are_deterministic_algorithms_enabled()
    for (name, a), (_, b), (_, c) in zip(first.state_dict().items(), second.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), other.state_dict().values()))
