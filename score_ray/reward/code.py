"""Code grader: run the model's program and the problem's tests in the sandbox.

A program passes only if the tests really ran to completion. The harness learns
a fresh random secret on stdin before any model code runs, runs program + tests,
and prints the secret only after they finished. ``sys.exit(0)``, ``os._exit(0)``,
an atexit hook that exits 0, or printing a fake "all passed" line cannot produce
it. (Code that deliberately scans the harness's memory for the secret could;
that is reward hacking of a kind model outputs are not seen to attempt, and the
sandbox still contains it.)
"""

from __future__ import annotations

import re
import secrets
from typing import Optional, Union

from score_ray.config import SandboxConfig
from score_ray.reward.sandbox import run_python
from score_ray.reward.types import GradeResult

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*)\Z", re.DOTALL | re.IGNORECASE)
# MBPP's few-shot answers are wrapped in [BEGIN] ... [DONE].
_BEGIN_DONE = re.compile(r"\[BEGIN\]\s*\n?(.*?)\[DONE\]", re.DOTALL)

# The harness: reads the secret, forgets the pipe, runs program + tests as __main__, then proves it got
# to the end. It catches nothing: SystemExit or any exception ends the run without the secret.
HARNESS = """\
import os, sys
_proof = sys.stdin.readline().strip()
sys.stdin.close()
os.close(0)
_code = open("/tmp/.sandbox/solution.py" if os.path.exists("/tmp/.sandbox") else "solution.py").read()
exec(compile(_code, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
sys.stdout.flush()
sys.stdout.write("\\n" + _proof + "\\n")
sys.stdout.flush()
os._exit(0)
"""


def extract_program(response: str) -> str:
    """The last complete ```python block; else [BEGIN]...[DONE]; else an unclosed final fence; else the text."""
    blocks = _FENCE.findall(response)
    if blocks:
        return blocks[-1]
    begin_done = _BEGIN_DONE.findall(response)
    if begin_done:
        return begin_done[-1]
    unclosed = _OPEN_FENCE.search(response)  # a response cut at the token budget mid-block
    if unclosed:
        return unclosed.group(1)
    return response


def build_test_source(tests: Union[str, list[str]], entry_point: Optional[str]) -> str:
    """Tests as Python source: a string as is, a list of asserts one per line; then check(entry_point)."""
    source = "\n".join(tests) if isinstance(tests, list) else tests
    if entry_point:
        source += f"\n\ncheck({entry_point})\n"
    return source


def grade_code(
    response: str,
    tests: Union[str, list[str]],
    entry_point: Optional[str] = None,
    limits: SandboxConfig = SandboxConfig(),
) -> GradeResult:
    program = extract_program(response)
    solution = program.rstrip() + "\n\n\n" + build_test_source(tests, entry_point)
    proof = secrets.token_hex(16)
    result = run_python({"solution.py": solution, "harness.py": HARNESS}, "harness.py", limits, stdin=proof + "\n")
    if result.timed_out:
        return GradeResult(0.0, "timeout", result.seconds, detail=f"killed after {limits.wall_seconds}s")
    if result.stderr.startswith(("bwrap:", "unshare:", "setpriv:")):
        return GradeResult(0.0, "error", result.seconds, detail="sandbox failed: " + result.stderr.strip()[:300])
    passed = result.exit_code == 0 and result.stdout.rstrip().endswith(proof)
    if passed:
        return GradeResult(1.0, "correct", result.seconds)
    last_error = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.exit_code}"]
    return GradeResult(0.0, "wrong", result.seconds, detail=last_error[0][:300])
