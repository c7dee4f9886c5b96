"""Math grader: find the final answer in a response and judge it against the reference.

Extraction, in order: the paper's ``Final Answer: The final answer is $X$. I hope it
is correct.``, then the last ``\\boxed{X}``, then (only when the reference itself is
a plain number, as in GSM-style and arithmetic data) the last number in the text.
No answer found is wrong, not an error.

Judging fails closed: an answer is right only when all of it was understood and found
equal. Normalised strings and plain numbers are compared here (fast, safe); text answers
(names, days, "even") compare by their text alone; anything else goes to math-verify /
sympy in a separate worker process with a hard timeout, and counts as equal only when
math-verify read the WHOLE reference and the WHOLE prediction (its parser otherwise
falls back to a part, e.g. the last number of a matrix). Both answer forms (the paper's
``$X$`` and ``\\boxed{X}``) reach the judge as the same bare ``X``. That process runs in its own main thread (math-verify's signal-based
timeout raises off the main thread, which elsewhere silently turned every reward
into 0), without network, with a memory rlimit and a scrubbed environment, and is
killed and replaced when an expression hangs it (``9^{9^{9^9}}``).
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from fractions import Fraction
from typing import Optional

from score_ray.answer_text import last_boxed
from score_ray.reward.types import GradeResult

_FINAL = re.compile(r"final answer is\s*(.+?)\s*(?:\.\s*)?I hope it is correct", re.IGNORECASE | re.DOTALL)
_FINAL_LOOSE = re.compile(r"final answer(?: is)?\s*[:=]?\s*(.+?)\s*(?:\n|$)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_PLAIN_NUMBER = re.compile(r"^-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?$")


_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def strip_math_delimiters(answer: str) -> str:
    """``$X$``, ``$$X$$``, ``\\(X\\)`` or ``\\[X\\]`` -> ``X`` (the paper's final-answer form writes ``$X$``)."""
    text = answer.strip()
    for left, right in _DELIMITERS:
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            return text[len(left) : -len(right)].strip()
    return text


def extract_answer(text: str) -> Optional[str]:
    """The answer the response commits to (without math delimiters), or None."""
    matches = _FINAL.findall(text)
    if matches:
        return strip_math_delimiters(matches[-1])
    boxed = last_boxed(text)
    if boxed:
        return boxed
    loose = _FINAL_LOOSE.findall(text)
    if loose:
        return strip_math_delimiters(loose[-1])
    return None


def last_number(text: str) -> Optional[str]:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize(answer: str) -> str:
    """Surface normalisation that never changes a value: dollars, spaces, \\text{units}, \\left/\\right, ..."""
    text = answer.strip()
    boxed = last_boxed(text)
    if boxed:
        text = boxed
    text = text.replace("$", "").strip().rstrip(".").strip()
    # units in words after a value: 5 \text{ cm} -> 5 (a \text{...} that is the whole answer is its text)
    text = re.sub(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z ]*\}\s*$", "", text)
    text = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\(?:left|right|!|,|;|:)", "", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    text = re.sub(r"^[a-zA-Z]\s*=\s*", "", text)  # "x = 5"
    text = re.sub(r"\s+", "", text)
    return text.rstrip(".")


def as_number(answer: str) -> Optional[Fraction]:
    """A plain decimal, integer, a/b, or \\frac{a}{b} of integers as an exact Fraction; else None."""
    text = normalize(answer).replace(",", "")
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", text) or re.fullmatch(r"(-?)\\frac(\d)(\d)", text)
    try:
        if frac:
            value = Fraction(int(frac.group(2)), int(frac.group(3)))
            return -value if frac.group(1) else value
        if re.fullmatch(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:/-?\d+)?", text):
            return Fraction(text)
        if re.fullmatch(r"-?\d+(?:\.\d+)?%", text):
            return Fraction(text[:-1])
    except (ValueError, ZeroDivisionError):
        return None
    return None


_WORDS = re.compile(r"[A-Za-z][A-Za-z' -]*[A-Za-z]")


def is_text_answer(answer: str) -> bool:
    """A reference of words (a name, a day, "even"): its text is the answer, not a product of symbols."""
    text = normalize(answer) if answer else ""
    spaced = re.sub(r"\s+", " ", re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", answer)).strip(" .$")
    return bool(text) and bool(_WORDS.fullmatch(spaced)) and len(spaced) >= 2


def quick_equal(prediction: str, reference: str, rel_tol: float = 1e-6) -> Optional[bool]:
    """True/False when decidable without sympy; None when it needs the symbolic judge."""
    left_text, right_text = normalize(prediction), normalize(reference)
    if not left_text or not right_text:
        return False  # nothing left to compare is never equal
    if is_text_answer(reference):
        return left_text.lower() == right_text.lower()
    if left_text == right_text:
        return True
    left, right = as_number(prediction), as_number(reference)
    if left is not None and right is not None:
        return abs(left - right) <= rel_tol * max(1, abs(right))
    return None  # an expression on either side (2^3 may equal 8): the symbolic judge decides


def is_plain_number(text: str) -> bool:
    return bool(_PLAIN_NUMBER.match(normalize(text)))


# ----------------------------------------------------------------------------- the symbolic judge process


def _worker_setup(memory_mb: int) -> None:
    """In the judge process before exec: bounded memory, and no network when we may make a namespace."""
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 1024 * 1024, memory_mb * 1024 * 1024))
    if os.geteuid() == 0:
        # sympy's parse_expr evaluates text: keep the process that parses model output off the network.
        ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET


_UNIT_WORDS = re.compile(r"\\(?:text|textbf|textit|mbox)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[a-zA-Z]+")
_TRAILING_UNIT = re.compile(r"(?<=\d)(?:\s+[a-zA-Z]{2,})+\s*$")  # "28 percent", "64 square feet"


def _content(text: str) -> Counter:
    """The digits and letters of a LaTeX answer that carry its value: not command names, not words in
    \\text{...} (units), not a leading ``x =``."""
    text = re.sub(r"^\s*[a-zA-Z]\s*=(?!=)", "", _UNIT_WORDS.sub(" ", text))
    text = _TRAILING_UNIT.sub("", text)
    return Counter(char for char in _COMMAND.sub(" ", text) if char.isalnum())


def read_whole(parsed: list, text: str) -> bool:
    """Whether math-verify's parse of ``text`` covers all of it. Its last element is the LaTeX it extracted
    (normalised: ``\\frac3{3}`` comes back as ``\\frac{3}{3}``); every digit and letter of the input must be
    in it, so a parse of a part (``1 - \\frac{1}{`` of ``1 - \\frac{1}{\\mathrm{e}}``, or the last number of
    a matrix it could not read) never stands for the whole."""
    if not parsed or not isinstance(parsed[-1], str):
        return False
    return not (_content(text) - _content(parsed[-1]))


def _worker_loop() -> None:
    """``python -m score_ray.reward.math``: answers JSON lines [prediction, reference] with [status, value]."""
    import json
    import sys

    from math_verify import parse, verify

    sys.stdout.write("ready\n")  # imports done: from here on every question gets the plain timeout
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if isinstance(request, dict):  # {"reads_whole": text}: would a reference be read whole?
            text = " ".join(request["reads_whole"].split("\n"))
            try:
                reply = ["ok", read_whole(parse(f"${text}$", parsing_timeout=None), text)]
            except Exception as err:  # noqa: BLE001 - unreadable is not whole
                reply = ["ok", False] if not isinstance(err, MemoryError) else ["error", "out of memory"]
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
            continue
        # One line each: math-verify reads inline math line by line and falls back to a part otherwise.
        prediction, reference = (" ".join(text.split("\n")) for text in request)
        try:
            gold = parse(f"${reference}$", parsing_timeout=None)
            guess = parse(f"${prediction}$", parsing_timeout=None)
            if not read_whole(gold, reference):
                reply = ["partial", "math-verify could not read the whole reference"]
            elif not read_whole(guess, prediction):
                reply = ["partial", "math-verify could not read the whole answer"]
            else:
                reply = ["ok", bool(verify(gold, guess, timeout_seconds=None))]
        except MemoryError:
            reply = ["error", "out of memory"]
        except Exception as err:  # noqa: BLE001 - any parser failure makes the answer ungradable
            reply = ["error", f"{type(err).__name__}: {err}"[:200]]
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "AWS_", "WANDB", "CREDENTIAL")


class MathJudge:
    """One long-lived symbolic-equivalence process with a hard per-question timeout.

    It runs its own main thread (math-verify's signal timeouts work there), has no
    credentials in its environment, no network and bounded memory; when a question
    takes longer than ``timeout_s`` the process is killed and replaced.
    """

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 2048):
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._process = None
        self.restarts = 0

    def _start(self) -> None:
        import select
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if not any(word in k.upper() for word in _SECRET_WORDS)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "score_ray.reward.math"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
            preexec_fn=lambda: _worker_setup(self.memory_mb),
            start_new_session=True,
        )
        ready, _, _ = select.select([self._process.stdout], [], [], 120.0)
        if not ready or self._process.stdout.readline().strip() != "ready":
            self._kill()
            raise RuntimeError("the math judge process did not start (is math-verify installed?)")

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None
        self.restarts += 1

    def reads_whole(self, reference: str) -> bool:
        """Whether the symbolic judge reads all of ``reference`` (else it is compared as text only)."""
        status, whole, _ = self._ask({"reads_whole": reference})
        return status == "ok" and whole

    def equal(self, prediction: str, reference: str) -> tuple[str, bool, str]:
        """(status, equal, detail) with status ok | timeout | error."""
        return self._ask([prediction, reference])

    def _ask(self, request) -> tuple[str, bool, str]:
        import json
        import select

        if self._process is None or self._process.poll() is not None:
            self._start()
        try:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
            ready, _, _ = select.select([self._process.stdout], [], [], self.timeout_s)
            if ready:
                line = self._process.stdout.readline()
                if not line:
                    raise EOFError("no answer")
                status, value = json.loads(line)
                if status == "partial":  # fail closed: compared as text only, and that already differed
                    return "ok", False, f"{value}; compared as text: not equal"
                return ("ok", bool(value), "") if status == "ok" else ("error", False, str(value))
        except (EOFError, BrokenPipeError, OSError, ValueError) as err:
            self._kill()
            return "error", False, f"judge process died: {err}"
        self._kill()
        return "timeout", False, f"symbolic check exceeded {self.timeout_s}s"

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None


def needs_symbolic_reading(reference: str) -> bool:
    """A reference the fast path cannot settle alone (not a plain number, not a text answer)."""
    return as_number(reference) is None and not is_text_answer(reference)


def graded_answer(response: str, reference: str) -> Optional[str]:
    """The answer the grader reads from ``response``: the final-answer phrase or ``\\boxed``; for a numeric
    reference (GSM-style, arithmetic, two-sum data) without a usable phrase ("The final answer is
    correct."), the last number in the text."""
    answer = extract_answer(response)
    if is_plain_number(reference) and (answer is None or not re.search(r"\d", answer)):
        answer = last_number(response)
    return answer


def grade_math(response: str, reference: str, judge: Optional[MathJudge] = None) -> GradeResult:
    start = time.monotonic()
    answer = graded_answer(response, reference)
    if answer is None:
        return GradeResult(0.0, "wrong", time.monotonic() - start, detail="no final answer found")
    decided = quick_equal(answer, reference)
    if decided is None:
        if judge is None:
            return GradeResult(0.0, "wrong", time.monotonic() - start, detail=f"answer {answer!r}: not equal as text")
        status, decided, detail = judge.equal(answer, reference)
        if status != "ok":
            return GradeResult(0.0, status, time.monotonic() - start, detail=f"answer {answer!r}: {detail}")
    reward = 1.0 if decided else 0.0
    return GradeResult(reward, "correct" if decided else "wrong", time.monotonic() - start, detail=f"answer {answer!r}")


if __name__ == "__main__":
    _worker_loop()
