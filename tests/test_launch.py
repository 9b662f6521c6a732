"""cluster.train.launcher torchrun: two torchrun processes as two nodes (--nnodes 2, c10d on
127.0.0.1, gloo) train a smoke stage to the same weights on both ranks, one writer, and a killed
node's rerun resumes from the shared checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.deploy import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedded(data_ws, smoke_cfg, tmp_path_factory):
    """A smoke workspace with CLIP and embeddings, copied for each launch."""
    from pipeline.stages import run_stage
    from pipeline.workspace import Workspace
    ws = Workspace.at(tmp_path_factory.mktemp("embedded"))
    (ws.root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for name in ("corpus", "filtered"):
        shutil.copytree(getattr(data_ws, name), getattr(ws, name))
    run_stage("clip", smoke_cfg, ws)
    run_stage("embed", smoke_cfg, ws)
    return ws


def two_nodes(root: Path, stage: str, kill_at: str | None = None) -> list[subprocess.CompletedProcess]:
    """``unclip stage <stage>`` as node 0 and node 1 of a torchrun job; node 1 SIGKILLed at ``kill_at``."""
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "UNCLIP_NODE_RANK": str(rank)}
        env.pop("UNCLIP_KILL_AT", None)
        if kill_at and rank == 1:
            env["UNCLIP_KILL_AT"] = kill_at
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--workspace", str(root), "--profile",
                                       "smoke", "stage", stage], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), p.stdout.read()) for p in procs]


@pytest.mark.slow       # four 2-node torchrun jobs per stage: ~1-2 min each on 2 cores
@pytest.mark.parametrize("stage, kill_at, checkpoint", [("prior", "step:7", 5), ("decoder", "step:4", 3)])
def test_two_nodes_train_one_model_and_resume_after_a_killed_node(embedded, tmp_path, stage, kill_at, checkpoint):
    ws = tmp_path / "ws"
    shutil.copytree(embedded.root, ws)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["cluster"]["train"].update(launcher="torchrun", nnodes=2, nproc_per_node=1, backend="gloo",
                                      rdzv_endpoint=f"127.0.0.1:{free_port()}", timeout_s=60)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    steps = params["profiles"]["smoke"][stage]["steps"]

    # node 1 dies after step `kill_at`: the job fails on both nodes, rank 0's checkpoint stays
    killed = two_nodes(ws, stage, kill_at)
    assert all(p.returncode != 0 for p in killed), [p.stdout[-2000:] for p in killed]
    assert not (ws / "models" / stage / "model.safetensors").exists()
    assert list((ws / ".unclip" / "checkpoints" / stage).glob("*.pt")), [p.stdout[-3000:] for p in killed]

    # the same command on both nodes again: resumes from the shared checkpoint, ends at `steps`
    done = two_nodes(ws, stage)
    assert all(p.returncode == 0 for p in done), [p.stdout[-3000:] for p in done]
    ranks = [json.loads((ws / ".unclip" / "launch" / f"{stage}-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]           # one model on both ranks
    assert [(r["resumed_from"], r["steps"]) for r in ranks] == [(checkpoint, steps)] * 2
    metrics = json.loads((ws / "metrics" / f"{stage}.json").read_text())      # rank 0's, written once
    assert metrics["train"]["processes"] == 2 and metrics["train"]["weights_sha256"] == ranks[0]["weights_sha256"]
    assert (ws / "models" / stage / "model.safetensors").exists()
    # one writer: global rank 0 (on whichever node the rendezvous put it) ran the stage's bookkeeping
    assert sum("done in" in p.stdout for p in done) == 1
    assert sum("ranks ended with the same weights" in p.stdout for p in done) == 1
