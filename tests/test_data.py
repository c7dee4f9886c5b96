"""Data sources: generators, HumanEval, and local files in the hub datasets' schemas."""

import json
from pathlib import Path

import pytest

from score_ray.config import ArithmeticSource, FileSource, GsmSymbolicSource, HumanEvalSource
from score_ray.data import DataError, load_problems

from conftest import run_module


def arithmetic(**kw):
    return ArithmeticSource(type="arithmetic", **kw)


def write_jsonl(path: Path, rows, raw_lines=()) -> Path:
    lines = [json.dumps(row) for row in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- generators


def test_arithmetic_is_deterministic_by_seed_and_answers_are_right():
    first, _ = load_problems(arithmetic(count=50, terms=3, operators=["+", "-", "*"], seed=7))
    again, _ = load_problems(arithmetic(count=50, terms=3, operators=["+", "-", "*"], seed=7))
    other, _ = load_problems(arithmetic(count=50, terms=3, operators=["+", "-", "*"], seed=8))
    assert [p.prompt for p in first] == [p.prompt for p in again]
    assert [p.prompt for p in first] != [p.prompt for p in other]
    for problem in first:
        expression = problem.prompt.removeprefix("What is ").removesuffix("?")
        assert int(problem.answer) == eval(expression)  # noqa: S307 - our own generated digits and + - *
        assert problem.kind == "math"
    assert len({p.id for p in first}) == 50


def test_arithmetic_difficulty_knobs_shape_the_problems():
    problems, _ = load_problems(arithmetic(count=30, terms=4, min_value=100, max_value=999, operators=["*"]))
    for problem in problems:
        numbers = problem.prompt.removeprefix("What is ").removesuffix("?").split(" * ")
        assert len(numbers) == 4 and all(100 <= int(n) <= 999 for n in numbers)


@pytest.mark.parametrize("seeds", [(0, 0), (0, 1)])
def test_generated_train_and_test_splits_are_disjoint(seeds):
    train, _ = load_problems(arithmetic(split="train", count=300, seed=seeds[0], max_value=40))
    test, _ = load_problems(arithmetic(split="test", count=100, seed=seeds[1], max_value=40))
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    gsm_train, _ = load_problems(GsmSymbolicSource(type="gsm_symbolic", split="train", count=200, seed=seeds[0]))
    gsm_test, _ = load_problems(GsmSymbolicSource(type="gsm_symbolic", split="test", count=60, seed=seeds[1]))
    assert not {p.prompt for p in gsm_train} & {p.prompt for p in gsm_test}


def test_a_generator_too_small_for_the_count_says_what_to_change():
    # 2 terms in 1..3 with + gives 9 distinct problems; 50 cannot exist.
    with pytest.raises(DataError, match="lower data.\\*.count or widen the generator"):
        load_problems(arithmetic(count=50, min_value=1, max_value=3))


def test_gsm_symbolic_is_deterministic_and_answers_are_numbers():
    cfg = GsmSymbolicSource(type="gsm_symbolic", count=40, seed=3)
    first, _ = load_problems(cfg)
    again, _ = load_problems(cfg)
    assert [(p.prompt, p.answer) for p in first] == [(p.prompt, p.answer) for p in again]
    assert len({p.prompt for p in first}) == 40
    for problem in first:
        float(problem.answer)
        assert len(problem.prompt) > 40


def test_gsm_symbolic_template_selection_and_unknown_template():
    problems, _ = load_problems(GsmSymbolicSource(type="gsm_symbolic", count=5, templates=[0]))
    assert all("minute" in p.prompt for p in problems)  # template 0: peeling and sauteing per minute
    with pytest.raises(DataError, match="unknown or broken GSM-Symbolic templates \\[32\\]"):
        load_problems(GsmSymbolicSource(type="gsm_symbolic", count=5, templates=[32]))


def test_gsm_symbolic_loading_leaves_no_fake_package_behind():
    import sys

    load_problems(GsmSymbolicSource(type="gsm_symbolic", count=2))
    assert "reasoning_gym" not in sys.modules


# ----------------------------------------------------------------------------- HumanEval


def test_humaneval_has_164_problems_with_tests_and_entry_points():
    problems, report = load_problems(HumanEvalSource(type="humaneval"))
    assert len(problems) == 164 and report.valid == 164 and report.skipped == 0
    assert len({p.id for p in problems}) == 164
    first = problems[0]
    assert first.id == "HumanEval/0" and first.kind == "code" and first.entry_point == "has_close_elements"
    assert "def check(candidate)" in first.tests
    assert "def has_close_elements" in first.prompt and first.solution


def test_humaneval_reference_solutions_pass_their_tests():
    # The loader's fields fit together: stub + canonical solution + tests + check(entry_point) runs clean.
    problems, _ = load_problems(HumanEvalSource(type="humaneval", limit=5))
    for problem in problems:
        stub = problem.prompt.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        namespace: dict = {}
        exec(stub + "\n" + problem.solution + "\n" + problem.tests + f"\ncheck({problem.entry_point})\n", namespace)


# ----------------------------------------------------------------------------- local files in hub schemas


def test_math500_jsonl(tmp_path):
    rows = [
        {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "answer": "2", "subject": "Prealgebra",
         "level": 1, "unique_id": "test/prealgebra/1.json"},
        {"problem": "Simplify $\\frac{4}{6}$.", "solution": "$\\boxed{\\frac{2}{3}}$", "answer": "\\frac{2}{3}",
         "subject": "Algebra", "level": 2, "unique_id": "test/algebra/7.json"},
    ]
    path = write_jsonl(tmp_path / "math500.jsonl", rows)
    problems, report = load_problems(FileSource(type="file", path=str(path), preset="math500"))
    assert report.valid == 2 and report.skipped == 0
    assert problems[1].id == "test/algebra/7.json" and problems[1].answer == "\\frac{2}{3}"


def test_math_parquet_takes_the_answer_from_the_last_box(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "problem": ["Find $x$ if $x+1=3$.", "Compute $2^{10}$.", "No box here."],
            "level": ["Level 1", "Level 2", "Level 1"],
            "type": ["Algebra", "Algebra", "Algebra"],
            "solution": ["First $\\boxed{1}$ is wrong; $x=\\boxed{2}$.", "$2^{10}=\\boxed{1024}$", "The answer is 5."],
        }
    )
    path = tmp_path / "math.parquet"
    pq.write_table(table, path)
    problems, report = load_problems(FileSource(type="file", path=str(path), preset="math"))
    assert [p.answer for p in problems] == ["2", "1024"]
    assert report.skipped == 1 and "no \\boxed{} answer" in report.examples[0]


def test_gsm8k_jsonl_reads_the_final_number(tmp_path):
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "A farm sells 1,200 eggs.", "answer": "So #### 1,200"},
        {"question": "No marker.", "answer": "It is 5."},
    ]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    problems, report = load_problems(FileSource(type="file", path=str(path), preset="gsm8k"))
    assert [p.answer for p in problems] == ["7", "1200"]
    assert report.skipped == 1 and "'####" in report.examples[0]


def mbpp_rows():
    return [
        {"task_id": 2, "text": "Write a function to find the shared elements of two lists.",
         "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
         "test_list": ["assert set(similar_elements((3, 4), (4, 5))) == {4}"], "test_setup_code": "",
         "challenge_test_list": []},
        {"task_id": 3, "text": "Write a python function to identify non-prime numbers.",
         "code": "def is_not_prime(n):\n    return n < 2 or any(n % i == 0 for i in range(2, n))",
         "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True"], "test_setup_code": "",
         "challenge_test_list": []},
        {"task_id": 11, "text": "Write a python function to double a number.", "code": "def double(x):\n    return 2 * x",
         "test_list": ["assert double(2) == 4"], "test_setup_code": "import math", "challenge_test_list": []},
    ]


def test_mbpp_jsonl_builds_the_standard_prompt_and_tests(tmp_path):
    path = write_jsonl(tmp_path / "mbpp.jsonl", mbpp_rows())
    problems, _ = load_problems(FileSource(type="file", path=str(path), preset="mbpp"))
    last = problems[2]
    assert last.id == "11" and last.kind == "code"
    assert last.prompt == "Write a python function to double a number. Your code should pass these tests:\n\nassert double(2) == 4"
    assert last.tests == "import math\nassert double(2) == 4"
    exec(last.solution + "\n" + last.tests, {})


def test_mbpp_fewshot_rows_become_examples(tmp_path):
    path = write_jsonl(tmp_path / "mbpp.jsonl", mbpp_rows())
    source = FileSource(type="file", path=str(path), preset="mbpp", fewshot_path=str(path), fewshot_ids=["3", "2"])
    problems, _ = load_problems(source)
    assert [shot[0].split(" Your code")[0] for shot in problems[0].fewshot] == [
        "Write a python function to identify non-prime numbers.",
        "Write a function to find the shared elements of two lists.",
    ]
    with pytest.raises(DataError, match="\\['99'\\] not found"):
        load_problems(FileSource(type="file", path=str(path), preset="mbpp", fewshot_path=str(path), fewshot_ids=["99"]))


def test_humaneval_schema_file_and_custom_field_mapping(tmp_path):
    rows = [{"name": "p1", "q": "What is 2+2?", "gold": 4}, {"name": "p2", "q": "What is 3+3?", "gold": 6}]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    source = FileSource(type="file", path=str(path), kind="math", fields={"id": "name", "prompt": "q", "answer": "gold"})
    problems, _ = load_problems(source)
    assert [(p.id, p.prompt, p.answer) for p in problems] == [("p1", "What is 2+2?", "4"), ("p2", "What is 3+3?", "6")]


def test_csv_through_datasets(tmp_path):
    path = tmp_path / "gsm8k.csv"
    path.write_text('question,answer\n"Add 2 and 2.","2+2=4\n#### 4"\n"Add 5 and 5.","#### 10"\n')
    problems, _ = load_problems(FileSource(type="file", path=str(path), preset="gsm8k"))
    assert [p.answer for p in problems] == ["4", "10"]


def test_malformed_rows_are_skipped_counted_and_explained(tmp_path):
    good = {"problem": "What is 1+1?", "answer": "2", "unique_id": "a", "solution": "s"}
    rows = [
        good,
        {"problem": "Missing answer", "unique_id": "b", "solution": "s"},
        {"problem": "", "answer": "3", "unique_id": "c", "solution": "s"},
        {"problem": "What is 2+2?", "answer": "4", "unique_id": "a", "solution": "s"},  # duplicate id
        {"problem": "What is 3+3?", "answer": "6", "unique_id": "d", "solution": "s"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows, raw_lines=["{not json", "[1, 2]"])
    problems, report = load_problems(FileSource(type="file", path=str(path), preset="math500"))
    assert [p.id for p in problems] == ["a", "d"]
    assert report.valid == 2 and report.skipped == 5
    reasons = " | ".join(report.reasons)
    assert "missing column 'answer'" in reasons
    assert "column 'problem' (field 'prompt') is empty" in reasons
    assert "duplicate id 'a'" in reasons
    assert "not valid JSON" in reasons
    assert "not an object" in reasons
    assert report.examples[0].startswith("row 2:")
    assert "5 skipped" in report.summary()


def test_zero_valid_rows_is_an_error_naming_the_file_and_field(tmp_path):
    path = write_jsonl(tmp_path / "wrong_schema.jsonl", [{"question": "q", "answer": "#### 1"}] * 3)
    with pytest.raises(DataError) as caught:
        load_problems(FileSource(type="file", path=str(path), preset="math500"))
    message = str(caught.value)
    assert "wrong_schema.jsonl" in message and "no valid rows" in message and "'problem'" in message


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_problems(FileSource(type="file", path=str(tmp_path / "nope.jsonl"), preset="gsm8k"))
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_problems(FileSource(type="file", path=str(odd), preset="gsm8k"))


def test_custom_source_without_kind_or_mapping_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"q": "x"}])
    with pytest.raises(DataError, match="set data.\\*.kind"):
        load_problems(FileSource(type="file", path=str(path)))
    with pytest.raises(DataError, match="must map \\['prompt', 'answer'\\]"):
        load_problems(FileSource(type="file", path=str(path), kind="math"))


def test_preview_counts_the_math_references_graded_as_text_only(tmp_path):
    """A reference the symbolic judge cannot read whole is graded by its text alone (never by a part of it):
    the preview says how many a data set has, so a user sees it is graded more strictly."""
    rows = [
        {"unique_id": "a", "problem": "p", "solution": "s", "answer": "\\frac{3}{4}"},
        {"unique_id": "b", "problem": "p", "solution": "s", "answer": "1 - \\frac{1}{\\mathrm{e}}"},
        {"unique_id": "c", "problem": "p", "solution": "s", "answer": "\\text{Evelyn}"},
        {"unique_id": "d", "problem": "p", "solution": "s", "answer": "(1,2)"},
    ]
    path = write_jsonl(tmp_path / "math500.jsonl", rows)
    result = run_module("score_ray.data", "preview", str(path), "--preset", "math500", "--n", "0", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "source: 1 of 4 math references are compared as text only" in result.stdout
    assert "text only: '1 - \\\\frac{1}{\\\\mathrm{e}}'" in result.stdout
