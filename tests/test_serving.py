"""The champion as an MLflow Model: a registered smoke bundle loads through mlflow.pyfunc in a fresh
process, `mlflow models serve` answers POST /invocations with the PNGs `unclip generate --out-dir`
writes for the same seeds (byte for byte), bad requests get a 400 with a message and the server
goes on serving; versions registered before the MLflow Model still load."""
from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from flows.deploy import free_port
from helpers.fake_eval import fake_evaluation
from helpers.smoke_models import smoke_models
from pipeline import registry
from pipeline.serving import request
from pipeline.workspace import Workspace

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center"]
SEED = 5
STEPS = 2                                    # decoder steps: the test's images need not be good, only the same


# ---- the request ------------------------------------------------------------------------------------
def test_a_request_becomes_prompts_with_row_values_over_params():
    ps = request.prompts(pd.DataFrame({"caption": CAPTIONS, "seed": [3, math.nan], "n": [2, math.nan]}),
                         {"seed": 9, "n": 1, "steps": 4, "guidance": None})
    assert [(p.caption, p.seed, p.n, p.settings) for p in ps] == [(CAPTIONS[0], 3, 2, {"steps": 4}),
                                                                  (CAPTIONS[1], 9, 1, {"steps": 4})]
    assert ps[0].seeds == [3, 4]
    assert [p.seed for p in request.prompts(["a", "b"])] == [0, 0]          # a list of captions; seed 0, n 1
    assert request.prompts([{"caption": "a", "guidance": 2}])[0].settings == {"guidance": 2.0}
    # what the served signature drops is ignored here too
    assert request.prompts(pd.DataFrame({"caption": ["a"], "colour": ["red"]}), {"sampler": "ddpm"})[0].settings == {}


@pytest.mark.parametrize("table, params, message", [
    (pd.DataFrame({"prompt": ["a"]}), None, "no `caption` column"),
    (pd.DataFrame({"caption": []}), None, "no rows"),
    (pd.DataFrame({"caption": ["a", "  "]}), None, "row 1: caption must be a non-empty string"),
    (pd.DataFrame({"caption": ["a", None]}), None, "row 1: caption"),
    (pd.DataFrame({"caption": ["a"], "n": [0]}), None, "row 0: n must be from 1 to 16, got 0"),
    (pd.DataFrame({"caption": ["a"]}), {"n": 10_000}, "params: n must be from 1 to 16, got 10000"),
    (pd.DataFrame({"caption": ["a"], "seed": ["seven"]}), None, "row 0: seed must be a number, got 'seven'"),
    (pd.DataFrame({"caption": ["a"], "seed": [1.5]}), None, "seed must be a whole number"),
    (pd.DataFrame({"caption": ["a"], "seed": [-1]}), None, "seed must be from 0"),
    (pd.DataFrame({"caption": ["a"], "steps": [math.inf]}), None, "steps must be a whole number"),
    (pd.DataFrame({"caption": ["a"], "guidance": [-1.0]}), None, "guidance must be from 0 to 100"),
    (pd.DataFrame({"caption": ["a"] * 5, "n": [16] * 5}), None, "80 images; at most 64"),
])
def test_bad_requests_are_refused_with_the_reason(table, params, message):
    with pytest.raises(request.BadRequest) as err:
        request.prompts(table, params)
    assert message in str(err.value)


# ---- registration: old and new versions -------------------------------------------------------------
def fake_bundle(ws: Workspace) -> None:
    for part in ("clip", "prior", "decoder", "upsampler_1"):
        d = ws.root / "models" / part
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").write_bytes(b"weights of " + part.encode())
        (d / "model.json").write_text("{}")


def register_the_old_way(cfg, ws: Workspace) -> str:
    """A version as `unclip promote` registered them before they were MLflow Models: the raw bundle
    folder (with evaluate.json) as run artifacts, source <artifact_uri>/bundle, alias champion."""
    import shutil
    import tempfile

    import mlflow
    from pipeline import tracking
    client = registry._client(cfg, ws)
    with tracking.start_run(cfg, ws.root, "promote", stage="promote") as run:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(ws.root / "models", Path(tmp) / "bundle")
            shutil.copy(ws.metrics_path("evaluate"), Path(tmp) / "bundle" / "evaluate.json")
            mlflow.log_artifacts(str(Path(tmp) / "bundle"), "bundle")
    source = client.get_run(run.info.run_id).info.artifact_uri.rstrip("/") + "/bundle"
    client.create_registered_model(cfg.promote.registered_model)
    v = client.create_model_version(cfg.promote.registered_model, source=source, run_id=run.info.run_id)
    client.set_registered_model_alias(cfg.promote.registered_model, cfg.promote.alias, v.version)
    return source


def test_versions_registered_before_the_mlflow_model_still_load_and_gate(tmp_path, monkeypatch, smoke_cfg):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ws = Workspace.at(tmp_path / "ws")
    fake_bundle(ws)
    fake_evaluation(ws, seed=0, color=90.0, fid=20.0, shape=60.0)
    register_the_old_way(smoke_cfg, ws)
    old = registry.champion(smoke_cfg, ws)
    assert old["version"] == 1 and old["alias"] == "champion"
    assert (old["path"] / "decoder" / "model.safetensors").read_bytes() == b"weights of decoder"
    # the gate reads the old version's figures: worse on shape is refused against it, as before
    fake_evaluation(ws, seed=0, color=90.0, fid=20.0, shape=40.0)
    verdict = registry.register_and_gate(smoke_cfg, ws)
    assert not verdict["promoted"] and verdict["champion"] == 1 and verdict["previous_champion"] == 1
    assert any("quality.single.shape" in r for r in verdict["reasons"])
    fake_evaluation(ws, seed=0, color=91.0, fid=19.0, shape=61.0)
    verdict = registry.register_and_gate(smoke_cfg, ws)
    assert verdict["promoted"] and verdict["champion"] == 3
    new = registry.champion(smoke_cfg, ws)
    assert new["version"] == 3 and (new["path"] / "decoder" / "model.safetensors").read_bytes() == b"weights of decoder"
    model = new["path"].parent.parent                       # <model>/artifacts/bundle
    assert (model / "MLmodel").exists() and json.loads((model / "evaluate.json").read_text())["quality"]["single"]["shape"] == 61.0
    mlmodel = (model / "MLmodel").read_text()
    assert "python_function" in mlmodel and "model_code_path" in mlmodel and "signature" in mlmodel
    assert not list(model.rglob("*.pkl")) and not list(model.rglob("*.pickle"))       # models from code


def test_a_saved_model_names_its_bundle_whatever_the_folder_was_called(tmp_path):
    from pipeline.serving import mlflow_model
    ws = Workspace.at(tmp_path / "ws")
    fake_bundle(ws)
    model = mlflow_model.save(ws.root / "models", tmp_path / "model")
    assert mlflow_model.bundle_in(model) == model / "artifacts" / "models"
    assert (mlflow_model.bundle_in(model) / "prior" / "model.safetensors").read_bytes() == b"weights of prior"
    assert mlflow_model.bundle_in(ws.root / "models") == ws.root / "models"          # a raw bundle: itself
    assert "unclip-pipeline==" in (model / "requirements.txt").read_text()


# ---- the served champion ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def champion_ws(data_ws, smoke_cfg, tmp_path_factory):
    """A trained smoke bundle registered as the champion in a store of its own."""
    mp = pytest.MonkeyPatch()
    store = tmp_path_factory.mktemp("serving-store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    ws = smoke_models(data_ws, smoke_cfg, tmp_path_factory.mktemp("serving") / "ws")
    fake_evaluation(ws, seed=0, color=90.0, fid=20.0)
    verdict = registry.register_and_gate(smoke_cfg, ws)
    assert verdict["promoted"] and verdict["version"] == 1
    yield ws, uri
    mp.undo()


def env_for(uri: str) -> dict:
    bin_dir = str(Path(sys.executable).parent)              # `uvicorn` for the scoring server
    return dict(os.environ, MLFLOW_TRACKING_URI=uri, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                UNCLIP_PROFILE="smoke")


def post(port: int, body) -> tuple[int, str]:
    import requests
    r = requests.post(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=120)
    return r.status_code, r.text


def test_the_champion_serves_the_pngs_unclip_generate_writes(champion_ws, smoke_cfg, tmp_path):
    from PIL import Image
    ws, uri = champion_ws
    env = env_for(uri)
    name = f"models:/{smoke_cfg.promote.registered_model}@{smoke_cfg.promote.alias}"

    # `unclip generate --out-dir`: one PNG per image and a manifest
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--workspace", str(ws.root), "generate", *CAPTIONS,
                           "--n", "1", "--seed", str(SEED), "--steps", str(STEPS), "--models", "champion",
                           "--out-dir", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(m["prompt"], m["caption"], m["seed"]) for m in manifest["images"]] == [(0, CAPTIONS[0], SEED),
                                                                                    (1, CAPTIONS[1], SEED)]
    assert manifest["model"]["version"] == 1 and manifest["model"]["alias"] == "champion"
    assert manifest["sampling"]["decoder"]["steps"] == STEPS and len(manifest["sampling"]["upsamplers"]) == 2
    expected = [(out / m["file"]).read_bytes() for m in manifest["images"]]
    assert [m["file"] for m in manifest["images"]] == [f"prompt000_seed{SEED}.png", f"prompt001_seed{SEED}.png"]

    # mlflow.pyfunc.load_model in a fresh process
    code = ("import sys, json, base64, mlflow, pandas as pd\n"
            f"m = mlflow.pyfunc.load_model({name!r})\n"
            f"out = m.predict(pd.DataFrame({{'caption': {CAPTIONS!r}}}), params={{'seed': {SEED}, 'steps': {STEPS}}})\n"
            "print(json.dumps([[int(r.prompt), r.caption, int(r.seed), base64.b64encode(r.image).decode()]"
            " for r in out.itertuples()]))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r[:3] for r in rows] == [[0, CAPTIONS[0], SEED], [1, CAPTIONS[1], SEED]]
    assert [base64.b64decode(r[3]) for r in rows] == expected

    # `mlflow models serve --env-manager local` on a loopback port
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", name, "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        import requests
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the scoring server did not start in 240 s"
            time.sleep(1)
        good = {"dataframe_split": {"columns": ["caption"], "data": [[c] for c in CAPTIONS]},
                "params": {"seed": SEED, "steps": STEPS}}
        status, text = post(port, good)
        assert status == 200, text[-2000:]
        predictions = json.loads(text)["predictions"]
        assert [(p["prompt"], p["caption"], p["seed"]) for p in predictions] == [(0, CAPTIONS[0], SEED),
                                                                                 (1, CAPTIONS[1], SEED)]
        pngs = [base64.b64decode(p["image"]) for p in predictions]
        assert pngs == expected                                       # byte-identical to unclip generate
        for png in pngs:
            with Image.open(io.BytesIO(png)) as im:
                assert im.format == "PNG" and im.size == (32, 32)

        bad = [({"dataframe_records": [{"prompt": "a red circle"}]}, "caption"),
               ({"dataframe_records": [{"caption": ""}]}, "caption must be a non-empty string"),
               ({"dataframe_records": [{"caption": "a red circle", "n": 0}]}, "n must be from 1 to 16"),
               ({"dataframe_records": [{"caption": "a red circle"}], "params": {"n": 10000}}, "n must be from 1 to 16"),
               ({"dataframe_records": [{"caption": "a red circle", "seed": "seven"}]}, "seed"),
               ({"dataframe_records": [{"caption": "a red circle", "seed": 1.5}]}, "seed must be a whole number"),
               ({"dataframe_records": [{"caption": "a red circle"}], "params": {"seed": "seven"}}, "seed")]
        for body, message in bad:
            status, text = post(port, body)
            assert 400 <= status < 500 and message in text, (body, status, text[-1000:])
        # still serving, and still the same images; a row may leave out a column the other sets
        status, text = post(port, {"dataframe_records": [{"caption": CAPTIONS[1], "seed": SEED}, {"caption": CAPTIONS[0]}],
                                   "params": {"steps": STEPS}})
        assert status == 200, text[-2000:]
        predictions = json.loads(text)["predictions"]
        assert [(p["prompt"], p["seed"]) for p in predictions] == [(0, SEED), (1, 0)]
        assert base64.b64decode(predictions[0]["image"]) == expected[1]
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
