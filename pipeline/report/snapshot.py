"""A run's snapshot: everything its report and any later comparison need, frozen at evaluate time.

``reports/<run>/`` holds::

    run.json      identity (git revision, profile, MLflow run ids, the dvc.lock hashes of data
                  and models), the resolved params, every stage's metrics, the training curves
                  (from MLflow) and the worst-judged samples
    images/       the evaluate stage's grids (prompts x seeds after every stage, real vs
                  generated test captions, the worst-judged samples)
    report.html   the self-contained page (``render.report_html``)

The workspace's ``reports/evaluate`` and ``metrics/`` are replaced by the next run; a snapshot is
not, so two runs can be compared long after both finished. ``<run>`` is
``<UTC time>-<first 8 hex of the evaluate stage's MLflow run id>``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import yaml

from ..workspace import Workspace, atomic_dir, atomic_write_json

TRAINED = ("judge", "clip", "prior", "decoder")     # stages with a loss curve, and upsample@<key> per upsampler
MAX_CURVE_POINTS = 400


class ReportError(RuntimeError):
    """No such run, or a workspace without an evaluation to report."""


def runs(ws: Workspace) -> list[Path]:
    """Snapshot directories, oldest first."""
    if not ws.reports.exists():
        return []
    return sorted(p for p in ws.reports.iterdir() if not p.name.startswith(".") and (p / "run.json").is_file())


def find(ws: Workspace, name: str) -> Path:
    """A run by name, unique prefix, ``latest`` or ``previous``."""
    all_runs = runs(ws)
    if name in ("latest", "previous"):
        k = -1 if name == "latest" else -2
        if len(all_runs) < -k:
            raise ReportError(f"no {name} run in {ws.reports} ({len(all_runs)} snapshot(s))")
        return all_runs[k]
    hits = [p for p in all_runs if p.name == name] or [p for p in all_runs if p.name.startswith(name)]
    if len(hits) != 1:
        known = ", ".join(p.name for p in all_runs) or "none"
        raise ReportError(f"run {name!r}: {'ambiguous' if hits else 'not found'} in {ws.reports} (runs: {known})")
    return hits[0]


def load(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def lock_hashes(root: Path) -> dict[str, dict[str, str]]:
    """dvc.lock's output hashes per stage: {stage: {path: md5}} (data, models, reports)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {name: {o["path"]: o.get("md5", "") for o in st.get("outs", [])} for name, st in stages.items()
            if st.get("outs")}


def _downsample(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(points) <= MAX_CURVE_POINTS:
        return points
    step = len(points) / MAX_CURVE_POINTS
    return [points[int(i * step)] for i in range(MAX_CURVE_POINTS)] + [points[-1]]


def trained_stages(cfg) -> list[str]:
    """The stages with a loss curve: :data:`TRAINED` and the upsamplers of ``cfg``'s chain."""
    return [*TRAINED, *(f"upsample@{key}" for key in cfg.upsample.stages)]


def training_curves(tracking_uri: str, experiment: str, stages: tuple[str, ...] = TRAINED) -> dict[str, list]:
    """The train-loss history of the latest MLflow run of each of ``stages`` that logged one:
    {stage: [[step, loss], ...]} (at most ``MAX_CURVE_POINTS`` points). A stage DVC skipped keeps
    the curve of the run that trained the model in the workspace."""
    try:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
    except Exception:          # no store yet, or an unreachable server: the report says so
        return {}
    if exp is None:
        return {}
    curves = {}
    for stage in stages:
        for run in client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'",
                                      order_by=["attributes.start_time DESC"], max_results=10):
            if "train_loss" in run.data.metrics:
                hist = client.get_metric_history(run.info.run_id, "train_loss")
                curves[stage] = _downsample(sorted((m.step, m.value) for m in hist))
                break
    return curves


def _params(cfg) -> dict:
    """The resolved config as the report shows it, its tracking URI redacted."""
    from .. import tracking
    params = cfg.model_dump(mode="json")
    if params.get("tracking", {}).get("tracking_uri"):
        params["tracking"]["tracking_uri"] = tracking.redact_uri(params["tracking"]["tracking_uri"])
    return params


def snapshot(cfg, ws: Workspace, *, evaluate_run_id: Optional[str] = None,
             parent_run_id: Optional[str] = None, tracking_uri: Optional[str] = None) -> Path:
    """Freeze the workspace's current evaluation into ``reports/<run>/`` (atomically) and return it."""
    from .. import tracking
    metrics_path = ws.metrics_path("evaluate")
    if not metrics_path.exists() or not (ws.reports / "evaluate").is_dir():
        raise ReportError(f"{ws.root}: no evaluation to report (run `unclip stage evaluate` first)")
    tracking_uri = tracking_uri or tracking.tracking_uri(cfg, ws.root)
    name = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{(evaluate_run_id or 'local')[:8]}"
    metrics = {p.stem: json.loads(p.read_text()) for p in sorted(ws.metrics_dir.glob("*.json"))}
    worst_json = ws.reports / "evaluate" / "worst.json"
    run = {
        "run": name,
        "created_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "identity": {
            "git_revision": tracking.git_revision(ws.root),
            "git_dirty": bool(_git(ws.root, "status", "--porcelain", "--untracked-files=no")),
            "profile": cfg.profile,
            # where, never how to get in: a tracking URI may carry a user, a token or a signed query
            "mlflow": {"tracking_uri": tracking.redact_uri(tracking_uri), "experiment": cfg.tracking.experiment,
                       "evaluate_run_id": evaluate_run_id, "parent_run_id": parent_run_id},
            "dvc_lock": lock_hashes(ws.root),
        },
        "params": _params(cfg),
        "metrics": metrics,
        "curves": training_curves(tracking_uri, cfg.tracking.experiment, tuple(trained_stages(cfg))),
        "worst": json.loads(worst_json.read_text()) if worst_json.exists() else [],
    }
    with atomic_dir(ws.reports / name) as out:
        shutil.copytree(ws.reports / "evaluate", out / "images")
        atomic_write_json(out / "run.json", run)
    return ws.reports / name
