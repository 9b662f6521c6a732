"""The code's shape (issue 20): no function over 60 lines in pipeline/ and flows/."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60


def long_functions(max_lines: int = MAX_LINES) -> dict[str, int]:
    """``path:function`` -> lines, for every function of pipeline/ and flows/ longer than ``max_lines``."""
    out = {}
    for package in ("pipeline", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > max_lines:
                        out[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    return out


def test_no_function_over_60_lines():
    assert not long_functions(), long_functions()


if __name__ == "__main__":            # python tests/test_structure.py: the list, longest first
    for name, lines in sorted(long_functions().items(), key=lambda kv: -kv[1]):
        print(f"{lines:4d}  {name}")
