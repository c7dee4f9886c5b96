"""Print the longest functions of a package: ``python scripts/function_lengths.py [PACKAGE_DIR] [--top N]``.

Length counts the source lines from ``def`` to the function's last line, docstring and comments included.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def function_lengths(root: Path) -> list[tuple[int, str]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default="score_ray", type=Path)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    for length, where in function_lengths(args.root)[: args.top]:
        print(f"{length:5d}  {where}")


if __name__ == "__main__":
    main()
