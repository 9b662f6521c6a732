"""The source files a stage's output depends on: its module's import closure, read statically.

One function, two users: the test that checks every stage's ``deps:`` in dvc.yaml covers its
closure (tests/test_codedeps.py), and the incremental recipes of crawl, filter and embed
(pipeline/data/incremental.py), which redo everything when one of these files changes.

The closure follows, with :mod:`ast` and without importing anything, every import statement of a
module (top level or inside a function, ``from .x import y``, ``from . import x``, ``import
pipeline.x``), the ``__init__.py`` of every package on the way, and ``"pipeline.x:function"``
strings (the stage registry's importlib targets in pipeline/stages.py). Only files of this
repository count; third-party packages are versioned by the environment, not by DVC.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent          # the repository: pipeline/ and flows/
PACKAGES = ("pipeline", "flows")
TARGET = re.compile(r"^((?:pipeline|flows)(?:\.\w+)+):\w+$")     # "pipeline.embed:run"


def module_path(name: str) -> Path | None:
    """The file of module ``name`` ("pipeline.clip.model"), or None if it is not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imported(name: str, path: Path) -> set[str]:
    """Module names that module ``name`` (at ``path``) imports or names as an importlib target."""
    package = _package_of(name, path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            # `from pkg import name`: name may be a submodule
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = TARGET.match(node.value)
            if match:
                found.add(match.group(1))
    return {m for m in found if module_path(m) is not None}


def _with_parents(name: str) -> list[str]:
    """``name`` and its packages ("pipeline", "pipeline.clip", "pipeline.clip.model"): importing a
    module runs every package's ``__init__.py`` above it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@functools.lru_cache(maxsize=None)
def closure(module: str) -> tuple[str, ...]:
    """Every source file (relative to the repository, sorted) that importing ``module`` can run."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        for m in _with_parents(name):
            if m in seen or module_path(m) is None:
                continue
            seen.add(m)
            todo.extend(_imported(m, module_path(m)))
    return tuple(sorted(str(module_path(m).relative_to(ROOT)) for m in seen))
