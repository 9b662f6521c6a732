"""MLflow: one parent run per pipeline run, one nested run per stage.

The store defaults to a SQLite file in the workspace (``mlflow.db``) with artifacts under
``mlartifacts/``; ``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri``) points it at a server.
A stage started by the flow finds its parent in ``UNCLIP_PARENT_RUN_ID``; started alone, its
run is top-level.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator, Optional

PARENT_ENV = "UNCLIP_PARENT_RUN_ID"


def tracking_uri(cfg, root: Path) -> str:
    return (os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
            or f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}")


def redact_uri(uri: Optional[str]) -> Optional[str]:
    """``uri`` fit to be written down: no user or password (``https://user:token@host``) and no
    query or fragment (``?token=...``, presigned signatures); what is left says where, not how to
    get in."""
    if not uri:
        return uri
    from urllib.parse import urlsplit, urlunsplit
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable URI redacted>"
    netloc = parts.netloc
    if "@" not in netloc and not parts.query and not parts.fragment:
        return uri
    if "@" in netloc:
        netloc = "***@" + (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    out = (f"{parts.scheme}://{netloc}{parts.path}" if uri.startswith(f"{parts.scheme}://")   # sqlite:////abs
           else urlunsplit((parts.scheme, netloc, parts.path, "", "")))
    return out + ("?<redacted>" if parts.query else "")


def redact_urls_in(text: Optional[str]) -> Optional[str]:
    """Every URL inside ``text`` (an error message that echoes one) through :func:`redact_uri`."""
    if not text:
        return text
    import re
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+", lambda m: redact_uri(m.group(0)), text)


def _setup(cfg, root: Path):
    import logging
    import mlflow
    # MLflow's alembic migrations log at INFO on every fresh sqlite store; keep stage output readable.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(cfg, root))
    name = cfg.tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        mlflow.create_experiment(name, artifact_location=(Path(root).resolve() / "mlartifacts").as_uri())
    mlflow.set_experiment(name)
    return mlflow


def git_revision(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def start_run(cfg, root: Path, name: str, *, stage: Optional[str] = None,
              parent_run_id: Optional[str] = None) -> Iterator[Any]:
    mlflow = _setup(cfg, root)
    tags = {"git_revision": git_revision(root), "profile": cfg.profile}
    if stage:
        tags["stage"] = stage
    with mlflow.start_run(run_name=name, parent_run_id=parent_run_id, nested=parent_run_id is not None,
                          tags=tags) as run:
        yield run


@contextlib.contextmanager
def stage_run(cfg, root: Path, stage: str) -> Iterator[Any]:
    """A nested run under the flow's parent (if any), with the stage's config as params."""
    section = stage.split("@", 1)[0]
    with start_run(cfg, root, stage, stage=stage, parent_run_id=os.environ.get(PARENT_ENV)) as run:
        import mlflow
        params = flatten(cfg.section(section)) if hasattr(cfg, section) else {}
        params["profile"] = cfg.profile
        mlflow.log_params({k: ("null" if v is None else v) for k, v in params.items()})
        yield run


def log_metrics(metrics: dict, step: Optional[int] = None) -> None:
    """Log the numeric leaves of a (nested) metrics dict to the active run, if there is one."""
    import mlflow
    if mlflow.active_run() is None:
        return
    flat = {k.replace("@", "_"): float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if flat:
        mlflow.log_metrics(flat, step=step)


def log_artifact(path: Path, artifact_path: Optional[str] = None) -> None:
    import mlflow
    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
