"""Math grader: extraction, equivalence both ways, and a judge that cannot be hung."""

import re
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
    # the paper's form gives the bare answer, as the boxed form does: both reach the judge the same way
    assert extract_answer("x \\boxed{1} ... " + PAPER_FORM.format("\\frac{1}{2}")) == "\\frac{1}{2}"
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


MATRIX_19 = "\\begin{pmatrix} 1 & 2 & 3 \\\\\n 4 & 5 & 6 \\\\\n 7 & 8 & 19 \\end{pmatrix}"


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("\\text{Bob}", "\\text{Evelyn}"),  # any text used to equal any other (both normalised to "")
        ("\\text{odd}", "\\text{even}"),
        ("dyanoM", "\\text{Monday}"),  # as symbols, a product of letters equals its anagram
        ("19", MATRIX_19),  # a multi-line matrix reference used to be read as its last number
        ("1", "1 - \\frac{1}{\\mathrm{e}}"),  # read as "1 - \\frac{1}{", i.e. 1
        ("1 + \\frac{1}{\\mathrm{e}}", "1 - \\frac{1}{\\mathrm{e}}"),  # a sign flipped, once equal by the same cut
        ("", "\\text{Evelyn}"),
    ],
)
def test_answers_earlier_graded_right_by_a_partial_reading_are_wrong(judge, answer, reference):
    for response in (f"so it is \\boxed{{{answer}}}.", PAPER_FORM.format(answer)):
        result = grade_math(response, reference, judge)
        assert result.reward == 0.0, (response, result)


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("\\text{Evelyn}", "\\text{Evelyn}"),
        ("Evelyn", "\\text{Evelyn}"),
        ("\\text{even}", "even"),
        (MATRIX_19.replace("pmatrix", "bmatrix"), MATRIX_19),  # read whole once on one line
        ("1-\\frac{1}{e}", "1 - \\frac{1}{\\mathrm{e}}"),
        ("28 percent", "28\\%"),
        ("90 degrees", "90"),
    ],
)
def test_whole_answers_still_earn_their_reward_in_both_forms(judge, answer, reference):
    for response in (f"so it is \\boxed{{{answer}}}.", PAPER_FORM.format(answer)):
        result = grade_math(response, reference, judge)
        assert result.reward == 1.0, (response, result)


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


# ----------------------------------------------------------------------------- property: wrong variants earn 0

# MATH-style references of every shape the tests' data holds (numbers, fractions, radicals, expressions,
# tuples, intervals, matrices, constants, text), no two equal.
MATH_REFERENCES = [
    "\\frac{3}{4}", "2\\sqrt{2}", "-\\frac{7}{2}", "(1,2)", "x^2+2x+1", "3\\sqrt{5}+2", "\\frac{\\pi}{3}",
    "[-2, 3)", "10^{6}", "1 - \\frac{1}{\\mathrm{e}}", "\\text{Evelyn}", "\\text{even}", MATRIX_19,
    "\\begin{pmatrix} 2 \\\\ -5 \\end{pmatrix}", "4\\pi - 3", "\\sqrt{13}", "0.25", "1200",
]


def _top_level_terms(reference: str) -> list[str]:
    """Split at + and - outside braces and brackets (a leading sign stays with its term)."""
    terms, depth, current = [], 0, ""
    for index, char in enumerate(reference):
        depth += char in "{([" and 1 or 0
        depth -= char in "})]" and 1 or 0
        if char in "+-" and depth == 0 and current.strip() and reference[index - 1] not in "^_{(":
            terms.append(current)
            current = ""
        current += char
    return terms + [current]


def wrong_variants(reference: str, others: list[str]) -> list[str]:
    """Plausible wrong answers built from a reference: its last number alone, a term dropped, its sign
    flipped, and another reference of the data set."""
    from score_ray.reward.math import as_number, is_text_answer

    variants = []
    numbers = re.findall(r"\d+(?:\.\d+)?", reference.replace(",", ""))
    if numbers and normalize(reference).replace(",", "") != numbers[-1]:
        variants.append(numbers[-1])
    terms = _top_level_terms(reference)
    if len(terms) > 1:
        for dropped in range(len(terms)):
            variants.append("".join(t for i, t in enumerate(terms) if i != dropped).strip().lstrip("+"))
    if not is_text_answer(reference) and as_number(reference) != 0:
        variants.append(reference[1:] if reference.startswith("-") else f"-({reference})")
    value = as_number(reference)
    for other in others:
        if normalize(other) != normalize(reference) and (value is None or as_number(other) != value):
            variants.append(other)
            break
    return variants


def shipped_references() -> list[str]:
    from score_ray.config import ArithmeticSource, GsmSymbolicSource
    from score_ray.data import load_problems

    found = []
    for source in (ArithmeticSource(type="arithmetic", split="test", count=200, terms=3, operators=["+", "-", "*"]),
                   GsmSymbolicSource(type="gsm_symbolic", split="train", count=60)):
        problems, _ = load_problems(source)
        found += [p.answer for p in problems]
    return found


def test_plausible_wrong_answers_built_from_every_reference_earn_nothing(judge):
    references = MATH_REFERENCES + shipped_references()
    checked = 0
    for index, reference in enumerate(references):
        others = references[index + 1 :] + references[:index]
        for wrong in wrong_variants(reference, others):
            for response in (f"so \\boxed{{{wrong}}}.", PAPER_FORM.format(wrong)):
                result = grade_math(response, reference, judge)
                assert result.reward == 0.0, (reference, response, result)
                checked += 1
        # ... while the reference itself, re-formatted, earns 1 in both forms
        spaced = reference.replace("\\frac", "\\dfrac").replace(",", ", ")
        for response in (f"so \\boxed{{ {spaced} }}.", PAPER_FORM.format(spaced)):
            result = grade_math(response, reference, judge)
            assert result.reward == 1.0, (reference, response, result)
    assert checked > 4 * len(references)  # every reference produced wrong variants
