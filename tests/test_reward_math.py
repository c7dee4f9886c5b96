"""Math grader: extraction, equivalence both ways, and a judge that cannot be hung."""

import time

import pytest

from score_ray.reward.math import MathJudge, as_number, extract_answer, grade_math, normalize

PAPER_FORM = "Final Answer: The final answer is ${}$. I hope it is correct."


@pytest.fixture(scope="module")
def judge():
    # Generous: a loaded 2-core machine can take seconds over an ordinary sympy check.
    judge = MathJudge(timeout_s=10.0)
    yield judge
    judge.close()


def test_extraction_order_paper_form_then_last_box():
    assert extract_answer("x \\boxed{1} ... " + PAPER_FORM.format("\\frac{1}{2}")) == "$\\frac{1}{2}$"
    assert extract_answer("first \\boxed{1} then \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
    assert extract_answer("no answer at all") is None


@pytest.mark.parametrize(
    "response, reference",
    [
        (PAPER_FORM.format("\\frac{1}{2}"), "0.5"),
        (PAPER_FORM.format("0.5"), "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac34"),
        ("\\boxed{1,200}", "1200"),
        ("\\boxed{5 \\text{ cm}}", "5"),
        ("\\boxed{x = 3}", "3"),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
        ("\\boxed{x^2+2x+1}", "(x+1)^2"),
        ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)"),
        ("\\boxed{2^3}", "8"),
        ("So 3 + 4 = 7, and the answer is 7", "7"),  # plain final number: reference is a plain number
        ("28 + 1 = 29\n\nThe final answer is correct.", "29"),  # a final-answer phrase without a number
        ("\\boxed{-10}", "-10"),
        ("\\boxed{50\\%}", "50"),
    ],
)
def test_equivalent_answers_are_correct(judge, response, reference):
    result = grade_math(response, reference, judge)
    assert (result.reward, result.status) == (1.0, "correct"), result.detail


@pytest.mark.parametrize(
    "response, reference",
    [
        (PAPER_FORM.format("\\frac{1}{3}"), "0.3333"),
        ("\\boxed{0.3333}", "\\frac{1}{3}"),
        ("\\boxed{2\\sqrt{3}}", "\\sqrt{8}"),
        ("\\boxed{(x-1)^2}", "(x+1)^2"),
        ("\\boxed{(2,1)}", "(1,2)"),
        ("So the answer is 8", "7"),
        ("I think it is seven.", "7"),
        ("\\boxed{}", "7"),
        ("The answer is x + 1", "\\frac{\\pi}{3}"),  # not a plain-number reference: no last-number fallback
    ],
)
def test_different_answers_are_wrong(judge, response, reference):
    result = grade_math(response, reference, judge)
    assert (result.reward, result.status) == (0.0, "wrong"), result.detail


def test_no_answer_is_wrong_not_an_error(judge):
    result = grade_math("I do not know.", "\\frac{\\pi}{3}", judge)
    assert result.status == "wrong" and result.detail == "no final answer found"


def test_fast_path_needs_no_judge_process():
    assert as_number("\\frac{-3}{4}") == as_number("-0.75")
    assert normalize("$\\left(1, 2\\right)$.") == "(1,2)"
    assert grade_math("\\boxed{12}", "12", judge=None).reward == 1.0


def test_a_hanging_expression_times_out_and_the_judge_recovers(judge):
    start = time.monotonic()
    result = grade_math("\\boxed{9^{9^{9^{9}}}}", "\\frac{\\pi}{3}", judge)
    assert result.status == "timeout" and result.reward == 0.0
    assert time.monotonic() - start < 10.0 + 5.0  # the timeout plus killing the process
    assert judge.restarts >= 1
    assert grade_math("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", judge).status == "correct"


def test_the_judge_process_has_no_credentials_and_no_network(monkeypatch):
    # The judge evaluates model text with sympy: it must not see secrets nor reach the network.
    import socket
    import subprocess

    monkeypatch.setenv("WANDB_API_KEY", "do-not-leak")
    judge = MathJudge(timeout_s=3.0)
    judge.equal("1", "1")  # starts the process
    try:
        pid = judge._process.pid
        environ = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
        assert "do-not-leak" not in environ and "WANDB_API_KEY" not in environ
        if hasattr(socket, "AF_INET"):
            own = subprocess.run(["readlink", f"/proc/{pid}/ns/net"], capture_output=True, text=True).stdout
            mine = subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True).stdout
            import os

            if os.geteuid() == 0:
                assert own.strip() and own != mine, "judge shares the host network namespace"
    finally:
        judge.close()
