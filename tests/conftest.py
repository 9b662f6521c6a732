"""Shared fixtures: offline environment, the smoke configuration, and one smoke workspace whose
data stages (corpus -> crawl -> filter) run once per session for the tests that need shards."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Nothing may wait on the network, phone home, or write outside temp dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DVC_SITE_CACHE_DIR", tempfile.mkdtemp(prefix="dvc-site-"))
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + str(Path(tempfile.mkdtemp(prefix="mlflow-")) / "mlflow.db"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.pop("UNCLIP_PROFILE", None)
# Under pytest-xdist each worker gets its share of the cores for torch (and the stage subprocesses
# it starts), set before anything imports torch: two workers of two threads each on 2 cores would
# oversubscribe them, which slows torch 10-20 times.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // _workers)))


@pytest.fixture(scope="session")
def params_path() -> Path:
    return REPO / "params.yaml"


@pytest.fixture(scope="session")
def smoke_cfg(params_path):
    from pipeline import config
    return config.load(params_path, "smoke")


@pytest.fixture(scope="session")
def data_ws(tmp_path_factory, smoke_cfg):
    """A workspace with corpus, raw and filtered shards of the smoke profile (built once)."""
    from pipeline.stages import run_stage
    from pipeline.workspace import Workspace
    ws = Workspace.at(tmp_path_factory.mktemp("data_ws"))
    (ws.root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for stage in ("corpus", "crawl", "filter"):
        run_stage(stage, smoke_cfg, ws)
    return ws
