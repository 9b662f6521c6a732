"""``cluster.train.launcher: torchrun``: a training stage as N nodes x P processes.

``unclip stage prior`` (or decoder, upsample@N) on each node, with the node's rank in
``cluster.train.node_rank`` or ``$UNCLIP_NODE_RANK``, starts torchrun on that node::

    python -m torch.distributed.run --nnodes N --nproc_per_node P --node_rank R \
        --rdzv_backend c10d --rdzv_endpoint HOST:PORT --rdzv_id ID  -m pipeline.launch <stage> <workspace>

torchrun's c10d rendezvous gathers the N x P workers; each runs the stage in-process under
accelerate (pipeline/training.py: DDP, every rank its own slice of the shards, gradients
all-reduced), so every rank ends with the same weights. One writer: the global rank 0 alone saves
the model directory (the stages' ``is_main_process``), writes ``metrics/<stage>.json`` and the MLflow run.
Checkpoints are written by rank 0 and read by every rank, so they sit on storage all nodes
share: the workspace itself (a shared mount) or ``cluster.storage`` (a mount or an fsspec URL). A node that dies fails the
whole job (torchrun stops the others); running the same command again on every node resumes
from the last checkpoint. Each rank leaves ``.unclip/launch/<stage>-rank<R>.json`` (its
world size and the sha256 of its final weights), and rank 0 checks the ranks agree. Which node
hosts global rank 0 is the rendezvous' choice (c10d assigns ranks in order of arrival), not
necessarily the node with ``node_rank`` 0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from . import storage
from .errors import StageError

TRAINING_STAGES = ("prior", "decoder", "upsample")
NODE_RANK_ENV = "UNCLIP_NODE_RANK"
CHECKPOINTS_ENV = "UNCLIP_CHECKPOINTS"        # read by Workspace.checkpoints (pipeline/workspace.py)
BACKEND_ENV, TIMEOUT_ENV = "UNCLIP_DIST_BACKEND", "UNCLIP_DIST_TIMEOUT_S"    # read by training.make_accelerator


def relaunches(cfg, stage: str) -> bool:
    """Whether ``unclip stage <stage>`` starts torchrun rather than training in this process:
    launcher torchrun, a training stage, and not already a torchrun worker."""
    return (cfg.cluster.train.launcher == "torchrun" and stage.split("@", 1)[0] in TRAINING_STAGES
            and "TORCHELASTIC_RUN_ID" not in os.environ)


def node_rank(cfg) -> int:
    t = cfg.cluster.train
    rank = int(os.environ.get(NODE_RANK_ENV, t.node_rank))
    if not 0 <= rank < t.nnodes:
        raise StageError(f"node rank {rank} (${NODE_RANK_ENV} or cluster.train.node_rank) must be in 0..{t.nnodes - 1}")
    return rank


def checkpoint_root(cfg, ws):
    """Where training checkpoints go: ``cluster.storage``/checkpoints (a path every node mounts, or
    an fsspec URL: pipeline/storage.py), else the workspace's ``.unclip/checkpoints``."""
    return storage.checkpoint_root(cfg.cluster.storage, ws)


def torchrun_command(cfg, stage: str, ws) -> list[str]:
    t = cfg.cluster.train
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(t.nnodes),
           "--nproc_per_node", str(t.nproc_per_node)]
    if t.nnodes == 1 and not t.rdzv_endpoint:
        cmd += ["--standalone"]
    else:
        cmd += ["--node_rank", str(node_rank(cfg)), "--rdzv_backend", "c10d", "--rdzv_endpoint", t.rdzv_endpoint,
                "--rdzv_id", t.rdzv_id]
    return cmd + ["-m", "pipeline.launch", stage, str(ws.root), cfg.profile]


def records_dir(ws) -> Path:
    return ws.root / ".unclip" / "launch"


def launch(cfg, ws, stage: str) -> dict:
    """Run ``stage`` under torchrun on this node (its workers check that every rank ended with the
    same weights, :func:`worker`); returns what this node ran."""
    records = records_dir(ws)
    records.mkdir(parents=True, exist_ok=True)
    for old in records.glob(f"{stage}-rank*.json"):
        old.unlink(missing_ok=True)
    env = {**os.environ, CHECKPOINTS_ENV: str(checkpoint_root(cfg, ws)), BACKEND_ENV: cfg.cluster.train.backend,
           TIMEOUT_ENV: str(cfg.cluster.train.timeout_s),
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parent.parent),
                                                     os.environ.get("PYTHONPATH")) if p)}
    cmd = torchrun_command(cfg, stage, ws)
    print(f"[{stage}] launching: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ws.root)
    if proc.returncode:
        raise StageError(f"torchrun exited {proc.returncode} (a process or a node failed; run the same command "
                         f"on every node again: training resumes from the last checkpoint)")
    return {"launcher": "torchrun", "node_rank": node_rank(cfg)}


def worker(stage: str, root: str, profile: str) -> None:
    """One torchrun worker: the stage in-process; rank 0 as ``run_stage`` (metrics, MLflow), the
    other ranks the stage function alone. Each rank records its weights' digest."""
    from . import config
    from .stages import run_stage, stage_function
    from .workspace import Workspace
    ws = Workspace.at(root)
    cfg = config.load(ws.root / "params.yaml", profile)
    rank = int(os.environ.get("RANK", "0"))
    result = run_stage(stage, cfg, ws) if rank == 0 else stage_function(stage, cfg)(cfg, ws)
    train = result.get("train", {})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    records_dir(ws).mkdir(parents=True, exist_ok=True)
    (records_dir(ws) / f"{stage}-rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "weights_sha256": train.get("weights_sha256"),
        "steps": train.get("steps"), "resumed_from": train.get("resumed_from")}))
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()                           # every rank's record is written (shared storage)
    if rank == 0:
        digests = {json.loads(p.read_text())["weights_sha256"] for p in records_dir(ws).glob(f"{stage}-rank*.json")}
        if len(digests) != 1:
            raise StageError(f"[{stage}] the {world} ranks ended with different weights: {sorted(digests)}")
        print(f"[{stage}] {world} ranks ended with the same weights (sha256 {next(iter(digests))[:16]})", flush=True)


if __name__ == "__main__":
    worker(*sys.argv[1:4])
