"""A training stage killed at any moment (SIGKILL, no cleanup) resumes from its last checkpoint
and ends at the same step count."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.stages import run_stage
from pipeline.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent


def test_killed_prior_stage_resumes(data_ws, smoke_cfg, tmp_path):
    if not (data_ws.embeddings.exists() and data_ws.clip.exists()):
        run_stage("clip", smoke_cfg, data_ws)
        run_stage("embed", smoke_cfg, data_ws)
    ws = Workspace.at(tmp_path / "ws")
    (ws.root / "data").mkdir(parents=True)
    (ws.root / "models").mkdir()
    os.symlink(data_ws.embeddings, ws.embeddings)
    os.symlink(data_ws.clip, ws.clip)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["smoke"]["prior"].update(steps=400, checkpoint_every=10)
    ws.params.write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "pipeline.cli", "--profile", "smoke", "--workspace", str(ws.root), "stage", "prior"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = ws.checkpoints / "prior"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(ckpt_dir.glob("*.pt")):
        time.sleep(0.05)
    assert proc.poll() is None, "the stage finished before it could be killed"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not ws.prior.exists()                      # nothing half-written where the model goes
    saved = list(ckpt_dir.glob("*.pt"))
    assert len(saved) == 1
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    train = json.loads(ws.metrics_path("prior").read_text())["train"]
    assert train["steps"] == 400 and train["resumed_from"] >= 10 and train["resumed_from"] % 10 == 0
    assert "resuming from checkpoint" in done.stdout + done.stderr
    assert (ws.prior / "model.safetensors").exists() and not list(ckpt_dir.glob("*.pt"))   # cleared when done
