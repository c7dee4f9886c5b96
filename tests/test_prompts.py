"""Prompts: the paper's strings verbatim, chat-template rendering, turn 2 from sampled ids."""

import pytest

from score_ray import instructions
from score_ray.config import load_config
from score_ray.data import Problem
from score_ray.prompts import TwoTurnPrompter

def test_instructions_are_the_papers_words():
    assert instructions.MATH_FIRST_TURN == (
        "You are a math expert. When you respond, respond only with the Solution of the final Problem, thinking "
        "step by step. At the end of the Solution, when you give your final answer, write it in the form "
        "\"Final Answer: The final answer is $answer$. I hope it is correct.\""
    )
    assert instructions.MATH_SELF_CORRECTION == (
        "There might be an error in the solution above because of lack of understanding of the question. Please "
        "correct the error, if any, and rewrite the solution. Only output the final solution! At the end of the "
        "Solution, when you give your final answer, write it in the form "
        "\"Final Answer: The final answer is $answer$. I hope it is correct.\""
    )
    assert instructions.CODE_SELF_CORRECTION == (
        "There might be an error in the code above because of lack of understanding of the question. Please correct "
        "the error, if any, and rewrite the solution. Only output the final correct Python program!"
    )


MATH = Problem(id="m1", kind="math", prompt="What is 9 - 4 - 15?", answer="-10")


def test_turn1_is_the_chat_template_of_the_first_turn_text(tokenizer):
    prompter = TwoTurnPrompter(tokenizer)
    ids = prompter.turn1_ids(MATH)
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": instructions.MATH_FIRST_TURN + "\n\nProblem:\nWhat is 9 - 4 - 15?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer.decode(ids) == expected
    assert ids == tokenizer.encode(expected, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant


def test_turn2_equals_the_whole_conversation_rendered_when_turn1_ended_on_eos(tokenizer):
    prompter = TwoTurnPrompter(tokenizer)
    turn1 = prompter.turn1_ids(MATH)
    attempt = tokenizer.encode("9 - 4 = 5, 5 - 15 = -10.\nFinal Answer: -10", add_special_tokens=False)
    turn2 = prompter.turn2_ids("math", turn1, attempt + [tokenizer.eos_token_id])
    whole = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": instructions.MATH_FIRST_TURN + "\n\nProblem:\nWhat is 9 - 4 - 15?"},
            {"role": "assistant", "content": "9 - 4 = 5, 5 - 15 = -10.\nFinal Answer: -10"},
            {"role": "user", "content": instructions.MATH_SELF_CORRECTION},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer.decode(turn2) == whole


def test_turn2_keeps_the_sampled_ids_even_where_retokenising_would_change_them(tokenizer):
    prompter = TwoTurnPrompter(tokenizer)
    turn1 = prompter.turn1_ids(MATH)
    # "hello" sampled as single characters: re-encoding its text would give fewer, different ids.
    sampled = [tokenizer.convert_tokens_to_ids(c) for c in "hello"]
    assert tokenizer.encode("hello", add_special_tokens=False) != sampled
    turn2 = prompter.turn2_ids("math", turn1, sampled + [tokenizer.eos_token_id])
    assert turn2[: len(turn1)] == turn1
    assert turn2[len(turn1) : len(turn1) + 6] == sampled + [tokenizer.eos_token_id]
    assert tokenizer.decode(turn2).endswith(instructions.MATH_SELF_CORRECTION + "<|im_end|>\n<|im_start|>assistant\n")


def test_a_truncated_first_attempt_is_closed_by_the_template(tokenizer):
    prompter = TwoTurnPrompter(tokenizer)
    turn1 = prompter.turn1_ids(MATH)
    cut = tokenizer.encode("Let me think", add_special_tokens=False)
    turn2 = prompter.turn2_ids("math", turn1, cut)
    tail = tokenizer.decode(turn2[len(turn1) :])
    assert tail.startswith("Let me think<|im_end|>\n<|im_start|>user\nThere might be an error in the solution")
    assert tail.count("<|im_end|>") == 2


def test_code_problems_use_the_code_instruction_and_fewshot_turns(tokenizer):
    problem = Problem(
        id="c1", kind="code", prompt="Write a function f. Your code should pass these tests:\n\nassert f() == 1",
        tests="assert f() == 1", fewshot=(("Write g.", "def g():\n    return 2"),),
    )
    prompter = TwoTurnPrompter(tokenizer)
    text = prompter.turn1_text(problem)
    assert "You are an expert Python programmer, and here is your task: Write g." in text
    assert "<|im_start|>assistant\n```python\ndef g():\n    return 2\n```<|im_end|>" in text
    assert text.endswith("here is your task: Write a function f. Your code should pass these tests:\n\n"
                         "assert f() == 1<|im_end|>\n<|im_start|>assistant\n")
    turn2 = prompter.turn2_ids("code", prompter.turn1_ids(problem), [tokenizer.eos_token_id])
    assert tokenizer.decode(turn2).endswith(instructions.CODE_SELF_CORRECTION + "<|im_end|>\n<|im_start|>assistant\n")


def test_instructions_and_system_prompt_come_from_config(tokenizer):
    config = load_config("smoke", ["prompts.math_self_correction=Check again.", "prompts.system_prompt=Be brief."])
    prompter = TwoTurnPrompter(tokenizer, config.prompts)
    text = tokenizer.decode(prompter.turn2_ids("math", prompter.turn1_ids(MATH), [tokenizer.eos_token_id]))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>user\nCheck again.<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_without_the_problem_placeholder_is_a_config_error():
    from score_ray.config import ConfigError

    with pytest.raises(ConfigError, match="'prompts.math_user_template': template must contain \\{problem\\}"):
        load_config("smoke", ["prompts.math_user_template='{instruction} only'"])


def test_a_tokenizer_without_chat_template_is_refused(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        TwoTurnPrompter(plain)
