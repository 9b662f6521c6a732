"""A trained smoke bundle (clip/ prior/ decoder/ upsampler_1/ upsampler_2/) in a workspace of its own,
built from the session's smoke shards by the stages themselves (about a minute on 2 cores)."""
from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.stages import run_stage
from pipeline.workspace import Workspace

MODEL_STAGES = ("clip", "embed", "prior", "decoder", "upsample@1", "upsample@2")


def smoke_models(data_ws: Workspace, cfg, root: Path) -> Workspace:
    """``root``: a new workspace holding a copy of ``data_ws``'s filtered shards and params.yaml, and
    the models the smoke profile trains on them (``data_ws`` is left as it was)."""
    ws = Workspace.at(root)
    ws.root.mkdir(parents=True, exist_ok=True)
    shutil.copy(data_ws.params, ws.params)
    shutil.copytree(data_ws.filtered, ws.filtered)
    for stage in MODEL_STAGES:
        run_stage(stage, cfg, ws)
    return ws
