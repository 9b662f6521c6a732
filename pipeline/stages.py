"""The stage registry and the one way a stage is run.

A stage is ``run(config, workspace) -> dict`` (its figures). ``run_stage`` wraps it the same way
for the CLI, DVC and the Prefect flow: an MLflow nested run, timing, ``metrics/<stage>.json``
written atomically, and a closing line that says where the figures went.
"""
from __future__ import annotations

import functools
import importlib
import resource
import sys
import time
from typing import Callable

from . import threads, tracking
from .config import Config
from .errors import SavedModelError, StageError  # noqa: F401  (re-exported: `from pipeline.stages import StageError`)
from .progress import say
from .workspace import Workspace, atomic_write_json

# Order is the pipeline's order; values are "module:function". The upsamplers sit between the
# decoder and evaluate: one stage upsample@<key> per key of params.yaml's upsample.stages
# (:func:`registry`; dvc.yaml's foreach reads the same section).
BEFORE_UPSAMPLERS: dict[str, str] = {
    "corpus": "pipeline.data.corpus:run",
    "crawl": "pipeline.data.crawl:run",
    "filter": "pipeline.data.filter:run",
    "judge": "pipeline.judge.stage:run",
    "clip": "pipeline.clip.stage:run",
    "embed": "pipeline.embed:run",
    "prior": "pipeline.prior.stage:run",
    "decoder": "pipeline.decoder.stage:run",
}
UPSAMPLER = "pipeline.upsampler.stage:run"
AFTER_UPSAMPLERS: dict[str, str] = {"evaluate": "pipeline.evaluate:run"}


def registry(cfg: Config) -> dict[str, str]:
    """Every stage of ``cfg``'s pipeline, in order: name -> "module:function"."""
    upsamplers = {f"upsample@{key}": UPSAMPLER for key in cfg.upsample.stages}
    return {**BEFORE_UPSAMPLERS, **upsamplers, **AFTER_UPSAMPLERS}


# The stages of params.yaml as it is (config.py's defaults are its values: tests/test_config.py).
STAGES: dict[str, str] = registry(Config())


# How `unclip stage` tells whoever ran it (the flow, through `dvc repro`) how it ended, instead
# of that caller reading its log: {"stage", "exit_code", "permanent", "error", "token", "pid"}, in
# one file per stage (the flow runs independent stages side by side: one shared file would let
# one stage's record overwrite another's). ``token`` is the caller's UNCLIP_EXIT_TOKEN, so a
# record left by an earlier run never counts.
EXIT_DIR = ".unclip/exit"
EXIT_TOKEN_ENV = "UNCLIP_EXIT_TOKEN"
EXIT_BAD_INPUT = 2


def permanent_errors() -> tuple[type[BaseException], ...]:
    """Failures that the same run would meet again: bad input, config, data or model, a loss that
    went non-finite (deterministic: a retry resumes the same checkpoint into the same NaN), files
    the user cannot read or write, a workspace another command holds. `unclip stage` exits 2 on
    them with the message (no traceback) and the flow does not retry them."""
    from PIL import Image

    from .config import ConfigError
    from .data.shards import ShardError
    from .lock import WorkspaceBusy
    from .training import NonFiniteLoss
    return (StageError, ConfigError, FileNotFoundError, NotADirectoryError, PermissionError, UnicodeDecodeError,
            NonFiniteLoss, ShardError, Image.DecompressionBombError, WorkspaceBusy)


def exit_path(root, stage: str):
    """Where ``stage`` records how it ended (see :data:`EXIT_DIR`)."""
    from pathlib import Path
    return Path(root) / EXIT_DIR / f"{stage}.json"


def write_exit(ws: Workspace, stage: str, code: int, error: str = "") -> None:
    """Record how ``unclip stage`` ended (see :data:`EXIT_DIR`); never fails the stage itself."""
    import os
    if not ws.root.is_dir():                 # a mistyped --workspace: create nothing
        return
    if os.environ.get(EXIT_TOKEN_ENV) is None:   # not under the flow: nobody reads it, so write nothing
        return
    try:
        atomic_write_json(exit_path(ws.root, stage), {
            "stage": stage, "exit_code": code, "permanent": code == EXIT_BAD_INPUT, "error": error[-4000:],
            "token": os.environ.get(EXIT_TOKEN_ENV), "pid": os.getpid()})
    except OSError:
        pass


def read_exit(root, stage: str, token: str) -> dict | None:
    """The record of ``stage`` written under ``token``, or None (the stage never got to write it:
    DVC itself failed, or the process was killed)."""
    import json
    try:
        record = json.loads(exit_path(root, stage).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("token") != token or record.get("stage") != stage:
        return None
    return record


def stage_function(name: str, cfg: Config) -> Callable[[Config, Workspace], dict]:
    stages = registry(cfg)
    if name not in stages:
        raise StageError(f"unknown stage {name!r} (known: {', '.join(stages)})")
    module, func = stages[name].split(":")
    fn = getattr(importlib.import_module(module), func)
    if "@" in name:                     # a foreach member: the key goes to the stage function
        return functools.partial(fn, key=name.split("@", 1)[1])
    return fn


def peak_rss_mb() -> dict:
    """Peak resident memory in MiB of this process (so far: a CLI or DVC stage is one process) and
    of the largest of its finished children (DataLoader workers, img2dataset's processes)."""
    kib = 1 if sys.platform != "darwin" else 1 / 1024          # ru_maxrss: KiB on Linux, bytes on macOS
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib
    return {"process": round(own / 1024, 1), "largest_child": round(children / 1024, 1)}


def run_stage(name: str, cfg: Config, ws: Workspace) -> dict:
    fn = stage_function(name, cfg)
    threads.follow()                     # the flow's share of the cores, when it runs stages side by side
    with tracking.stage_run(cfg, ws.root, name) as run:
        t0 = time.perf_counter()
        metrics = fn(cfg, ws)
        metrics = {"stage": name, "profile": cfg.profile, **metrics,
                   "duration_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": peak_rss_mb()}
        path = ws.metrics_path(name)
        atomic_write_json(path, metrics)
        tracking.log_metrics(metrics)
        tracking.log_artifact(path)
        if name == "evaluate":           # the run's report, from the metrics just written
            from .report import after_evaluate
            after_evaluate(cfg, ws, run)
    say(name, f"done in {metrics['duration_s']:.1f} s; figures in {path.relative_to(ws.root)}")
    return metrics
