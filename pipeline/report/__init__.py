"""Evaluation reports that reviewers compare (``unclip report``).

- ``snapshot``: after every ``evaluate``, the run's identity, params, metrics, training curves
  and grids are frozen into ``reports/<run>/``;
- ``render``: ``reports/<run>/report.html``, one self-contained page per run;
- ``compare``: ``reports/compare/<A>_vs_<B>.html``, two runs side by side.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from ..progress import say
from ..workspace import Workspace, atomic_write_bytes
from .compare import compare_html
from .render import report_html
from .snapshot import ReportError, find, runs, snapshot

__all__ = ["ReportError", "after_evaluate", "build", "compare", "find", "runs"]


def build(ws: Workspace, run: str | Path) -> Path:
    """(Re)build ``reports/<run>/report.html`` from the run's snapshot."""
    run_dir = Path(run) if Path(run).is_dir() else find(ws, str(run))
    t0 = time.perf_counter()
    path = run_dir / "report.html"
    atomic_write_bytes(path, report_html(run_dir).encode("utf-8"))
    say("report", f"{path.relative_to(ws.root) if path.is_relative_to(ws.root) else path} "
                  f"({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return path


def compare(ws: Workspace, a: str, b: str, out: Optional[Path] = None) -> Path:
    """Write the comparison page of runs ``a`` (reference) and ``b`` (candidate)."""
    da, db = find(ws, a), find(ws, b)
    t0 = time.perf_counter()
    path = Path(out) if out else ws.reports / "compare" / f"{da.name}_vs_{db.name}.html"
    atomic_write_bytes(path, compare_html(da, db).encode("utf-8"))
    say("report", f"{da.name} vs {db.name} -> {path} in {time.perf_counter() - t0:.1f} s")
    return path


def after_evaluate(cfg, ws: Workspace, run) -> Path:
    """The evaluate stage's epilogue: snapshot, build the report, log it to the stage's MLflow run."""
    from .. import tracking
    run_id = run.info.run_id if run is not None else None
    run_dir = snapshot(cfg, ws, evaluate_run_id=run_id, parent_run_id=os.environ.get(tracking.PARENT_ENV))
    path = build(ws, run_dir)
    tracking.log_artifact(path, "report")
    return path
