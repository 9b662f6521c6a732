"""A request to the served model -> the prompts ``seeded.generate_each`` samples.

A request is a table with one row per caption: ``caption`` (required), and optionally ``seed``,
``n``, ``steps`` (the decoder's sampling steps) and ``guidance`` (the decoder's guidance scale)
per row. The same four may come as params, the default of every row that leaves them out; a
row's own value wins. Unset: seed 0, one image, the bundle's saved steps and guidance. Other
columns and params are ignored, as the served model's signature drops them (MLflow logs a warning).

Anything else is a :class:`BadRequest` that names the row and the column, raised before any
image is sampled (the server answers it with a 400 and goes on serving).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

from ..seeded import Prompt

MAX_N = 16               # images per caption
MAX_IMAGES = 64          # images per request: each is sampled alone (about 0.3 s at the default bundle on
                         # 2 cores), so a full request stays well inside the scoring server's 60 s timeout
MAX_STEPS = 1000         # the length of the schedules the networks were trained on
MAX_GUIDANCE = 100.0
MAX_SEED = 2 ** 53 - 1   # every whole number up to here is exact in a double (the signature's column type)
OPTIONAL = ("seed", "n", "steps", "guidance")


class BadRequest(ValueError):
    """The request cannot be answered as asked; the message says what to change."""


def prompts(table: Any, params: Optional[dict] = None) -> list[Prompt]:
    """``table``: a pandas DataFrame (what the scoring server passes), or a list of captions, or a
    list of row dicts; ``params``: request-wide defaults for the optional columns."""
    rows = _rows(table)
    params = {k: v for k, v in (params or {}).items() if v is not None}
    default = {k: _value(k, params.get(k), "params") for k in OPTIONAL}
    out = []
    for i, row in enumerate(rows):
        caption = row.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise BadRequest(f"row {i}: caption must be a non-empty string, got {caption!r}")
        v = {k: _value(k, row.get(k), f"row {i}") for k in OPTIONAL}
        v = {k: default[k] if v[k] is None else v[k] for k in OPTIONAL}
        seed, n = (0 if v["seed"] is None else v["seed"]), (1 if v["n"] is None else v["n"])
        if seed + n - 1 > MAX_SEED:
            raise BadRequest(f"row {i}: seeds {seed}..{seed + n - 1} pass {MAX_SEED} (image k of a row uses seed + k)")
        settings = {k: v[k] for k in ("steps", "guidance") if v[k] is not None}
        out.append(Prompt(caption, seed=seed, n=n, settings=settings))
    total = sum(p.n for p in out)
    if total > MAX_IMAGES:
        raise BadRequest(f"the request asks for {total} images; at most {MAX_IMAGES} per request "
                         f"(split it, or lower n)")
    return out


def _rows(table: Any) -> list[dict]:
    import pandas as pd
    if isinstance(table, str):
        table = [table]
    if isinstance(table, dict):
        table = pd.DataFrame(table)
    if isinstance(table, pd.Series):
        table = table.to_frame("caption" if table.name is None else table.name)
    if isinstance(table, (list, tuple)):
        if all(isinstance(r, str) for r in table):
            table = [{"caption": r} for r in table]
        if not all(isinstance(r, dict) for r in table):
            raise BadRequest("a request is a table of captions: rows with a `caption` column")
        table = pd.DataFrame(list(table))
    if not isinstance(table, pd.DataFrame):
        raise BadRequest(f"a request is a table of captions, got {type(table).__name__}")
    if "caption" not in table.columns:
        raise BadRequest(f"the request has no `caption` column (columns: {[str(c) for c in table.columns]}); "
                         f"send one row per caption, e.g. {{\"dataframe_records\": [{{\"caption\": \"a red circle\"}}]}}")
    if len(table) == 0:
        raise BadRequest("the request has no rows: send at least one caption")
    return table.to_dict(orient="records")


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isnan(float(x)))


def _value(name: str, x: Any, where: str):
    """One optional setting, checked: None when missing (None or NaN: a row that leaves it out)."""
    if _missing(x):
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise BadRequest(f"{where}: {name} must be a number, got {x!r}")
    if name == "guidance":
        g = float(x)
        if not (math.isfinite(g) and 0.0 <= g <= MAX_GUIDANCE):
            raise BadRequest(f"{where}: guidance must be from 0 to {MAX_GUIDANCE:g}, got {x!r}")
        return g
    if not math.isfinite(float(x)) or float(x) != math.floor(float(x)):
        raise BadRequest(f"{where}: {name} must be a whole number, got {x!r}")
    v = int(x)
    low, high = {"seed": (0, MAX_SEED), "n": (1, MAX_N), "steps": (1, MAX_STEPS)}[name]
    if not low <= v <= high:
        raise BadRequest(f"{where}: {name} must be from {low} to {high}, got {v}")
    return v
