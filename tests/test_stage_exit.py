"""Failures that retrying cannot fix (issue 19, M11): `unclip stage` exits 2 with the message, no
traceback, and records its outcome in `.unclip/exit/<stage>.json`, which the flow reads (never its
log) to decide whether a failure is permanent."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline import cli
from pipeline.stages import EXIT_TOKEN_ENV, exit_path, read_exit, run_stage
from pipeline.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent


def _raise(err):
    def fn(*a, **k):
        raise err
    return fn


def permanent_failures():
    from PIL import Image
    from pipeline.data.shards import ShardError
    from pipeline.stages import SavedModelError
    from pipeline.training import NonFiniteLoss
    return [NonFiniteLoss("[prior: train] loss is nan at step 3"), ShardError("x.tar: truncated member"),
            PermissionError(13, "Permission denied", "models/clip/x"),
            UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
            Image.DecompressionBombError("Image size (1 pixels) exceeds limit"),
            SavedModelError("CLIP model name '../x': expected letters")]


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                        # `unclip stage` changes into the workspace
    monkeypatch.setenv("UNCLIP_PROFILE", "smoke")      # `unclip --profile` exports it: undone after the test
    ws = Workspace.at(tmp_path / "ws")
    ws.root.mkdir()
    ws.params.write_text((REPO / "params.yaml").read_text())
    return ws


@pytest.mark.parametrize("err", permanent_failures(), ids=lambda e: type(e).__name__)
def test_failures_a_retry_cannot_fix_exit_2_with_the_message(ws, monkeypatch, err):
    monkeypatch.setattr(cli, "run_stage", _raise(err))
    monkeypatch.setenv(EXIT_TOKEN_ENV, "tok")
    result = CliRunner().invoke(cli.main, ["--profile", "smoke", "--workspace", str(ws.root), "stage", "prior"])
    assert result.exit_code == 2, result.output
    assert str(err)[:20] in result.output and "Traceback" not in result.output
    record = read_exit(ws.root, "prior", "tok")
    assert record["exit_code"] == 2 and record["permanent"] and str(err)[:20] in record["error"]


def test_other_failures_exit_1_and_are_recorded_as_transient(ws, monkeypatch):
    monkeypatch.setattr(cli, "run_stage", _raise(RuntimeError("connection reset")))
    monkeypatch.setenv(EXIT_TOKEN_ENV, "tok")
    result = CliRunner().invoke(cli.main, ["--profile", "smoke", "--workspace", str(ws.root), "stage", "prior"])
    assert result.exit_code == 1
    record = read_exit(ws.root, "prior", "tok")
    assert record["exit_code"] == 1 and not record["permanent"]
    # a record of another attempt (token) or stage never counts
    assert read_exit(ws.root, "prior", "another") is None and read_exit(ws.root, "decoder", "tok") is None
    # a bad params.yaml: exit 2, recorded too
    ws.params.write_text("prior: {steps: -1}\n")
    result = CliRunner().invoke(cli.main, ["--profile", "smoke", "--workspace", str(ws.root), "stage", "prior"])
    assert result.exit_code == 2 and read_exit(ws.root, "prior", "tok")["permanent"]


def test_the_flow_decides_by_the_record_not_the_log(ws, monkeypatch):
    """repro_stage: a log line saying 'exited with 2' no longer makes a failure permanent; the
    stage's record under this attempt's token does."""
    from flows import train
    seen = {}

    def fake_run(cmd, cwd, env, log, *, code=1, permanent=None, lines=("ERROR: failed to reproduce 'x': exited with 2",)):
        seen["token"] = env[EXIT_TOKEN_ENV]
        if permanent is not None:
            exit_path(cwd, "prior").parent.mkdir(parents=True, exist_ok=True)
            exit_path(cwd, "prior").write_text(json.dumps({"stage": "prior", "exit_code": 2, "permanent": permanent,
                                                            "error": "[prior] loss is nan", "token": env[EXIT_TOKEN_ENV]}))
        return code, list(lines)

    monkeypatch.setattr(train, "get_run_logger", lambda: type("L", (), {"info": staticmethod(print)})())
    monkeypatch.setattr(train, "run_logged", fake_run)
    with pytest.raises(train.StageFailed) as err:
        train.repro_stage.fn("prior", str(ws.root), {})
    assert not err.value.permanent                              # the log's words do not count
    monkeypatch.setattr(train, "run_logged", lambda *a: fake_run(*a, permanent=True))
    with pytest.raises(train.StageFailed) as err:
        train.repro_stage.fn("prior", str(ws.root), {})
    assert err.value.permanent and "loss is nan" in str(err.value)
    # a stale record (another attempt's token) is ignored
    exit_path(ws.root, "prior").write_text(json.dumps({"stage": "prior", "exit_code": 2, "permanent": True, "token": "old"}))
    monkeypatch.setattr(train, "run_logged", lambda *a: fake_run(*a))
    with pytest.raises(train.StageFailed) as err:
        train.repro_stage.fn("prior", str(ws.root), {})
    assert not err.value.permanent


@pytest.fixture(scope="module")
def embedded_ws(data_ws, smoke_cfg, tmp_path_factory):
    """data_ws's embeddings and CLIP (built once if no earlier test did), linked into a fresh workspace."""
    if not (data_ws.embeddings.exists() and data_ws.clip.exists()):
        run_stage("clip", smoke_cfg, data_ws)
        run_stage("embed", smoke_cfg, data_ws)
    ws = Workspace.at(tmp_path_factory.mktemp("exit_ws"))
    (ws.root / "data").mkdir()
    (ws.root / "models").mkdir()
    shutil.copytree(data_ws.embeddings, ws.embeddings)
    os.symlink(data_ws.clip, ws.clip)
    return ws


def test_nan_loss_is_a_stage_error_not_a_traceback(embedded_ws, monkeypatch, tmp_path):
    """prior.lr 1e30: the loss goes non-finite in a few steps; exit 2 with the message, no model."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNCLIP_PROFILE", "smoke")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["smoke"]["prior"]["lr"] = 1e30
    embedded_ws.params.write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(cli.main, ["--profile", "smoke", "--workspace", str(embedded_ws.root), "stage", "prior"])
    assert result.exit_code == 2, result.output
    assert "NonFiniteLoss" in result.output and "loss is" in result.output and "Traceback" not in result.output
    assert not embedded_ws.prior.exists()


def test_corrupt_embedding_shard_is_a_stage_error(embedded_ws, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNCLIP_PROFILE", "smoke")
    embedded_ws.params.write_text((REPO / "params.yaml").read_text())
    from pipeline.data.shards import shard_paths
    shard = shard_paths(embedded_ws.embeddings)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])                  # cut in the middle of a member
    try:
        result = CliRunner().invoke(cli.main, ["--profile", "smoke", "--workspace", str(embedded_ws.root),
                                               "stage", "decoder"])
    finally:
        shard.write_bytes(data)
    assert result.exit_code == 2, result.output
    assert shard.name in result.output and "Traceback" not in result.output
