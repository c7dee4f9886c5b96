"""Small text helpers for reference answers: ``\\boxed{...}`` and GSM8K's ``#### 42``.

Pure string functions (no sympy, no torch): the data loaders use them to read
reference answers; the math grader uses them to read the model's answers.
"""

from __future__ import annotations

import re
from typing import Optional


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces matched; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        # "\boxed 5" form: the token after a space.
        match = re.match(r"\\boxed\s+([^\s$]+)", text[start:])
        return match.group(1) if match else None
    depth = 0
    for index in range(brace, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : index].strip()
    return None  # unbalanced braces: no well-formed box


def gsm8k_final(answer: str) -> Optional[str]:
    """The number after GSM8K's ``####`` marker, thousands separators removed; None if absent."""
    _, marker, tail = answer.rpartition("####")
    if not marker:
        return None
    value = tail.strip().replace(",", "").rstrip(".")
    return value or None
