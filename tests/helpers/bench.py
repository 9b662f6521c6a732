"""A script of bench/ as a module (bench/ is no package), for tests of its functions."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent.parent / "bench"


def load_bench(name: str):
    """``bench/<name>.py`` imported once per session and registered in ``sys.modules`` before it runs (dataclasses
    look their module up there)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
