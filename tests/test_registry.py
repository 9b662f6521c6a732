"""The promotion gate: MLflow's model registry, the champion alias, refusals with reasons and a
comparison page, and `unclip generate`'s default of loading the champion."""
from __future__ import annotations

import json

import pytest

from helpers.fake_eval import fake_evaluation
from pipeline import registry
from pipeline.workspace import Workspace


@pytest.fixture
def gate_ws(tmp_path, monkeypatch, smoke_cfg):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ws = Workspace.at(tmp_path / "ws")
    for part in ("clip", "prior", "decoder", "upsampler_1", "upsampler_2"):
        d = ws.root / "models" / part
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"weights of " + part.encode())
        (d / "model.json").write_text("{}")
    return ws


def test_decide_applies_each_rule_with_its_tolerance(smoke_cfg):
    rules = smoke_cfg.promote.rules
    champ = {"quality": {"single": {"color": 90, "shape": 60}, "pair": {"colors": 70, "relation": 50},
                         "frechet_distance": 700}}
    same = json.loads(json.dumps(champ))
    assert registry.decide(same, None, rules)[0] and registry.decide(same, champ, rules)[0]
    slightly = json.loads(json.dumps(champ))
    slightly["quality"]["single"]["shape"] = 58.5                     # -1.5 <= tolerance 2
    slightly["quality"]["frechet_distance"] = 720                     # +20 <= tolerance 25
    assert registry.decide(slightly, champ, rules)[0]
    worse = json.loads(json.dumps(champ))
    worse["quality"]["pair"]["relation"] = 45
    ok, reasons, rows = registry.decide(worse, champ, rules)
    assert not ok and len(reasons) == 1 and "quality.pair.relation" in reasons[0] and "45" in reasons[0]
    assert [r["ok"] for r in rows].count(False) == 1
    far = json.loads(json.dumps(champ))
    far["quality"]["frechet_distance"] = 760
    assert not registry.decide(far, champ, rules)[0]
    del far["quality"]["pair"]
    assert any("missing" in r for r in registry.decide(far, champ, rules)[1])


def test_gate_promotes_better_bundles_and_refuses_a_worse_one(gate_ws, smoke_cfg):
    from pipeline.report.snapshot import snapshot
    ws, cfg = gate_ws, smoke_cfg
    fake_evaluation(ws, seed=0, color=90.0, fid=20.0, shape=60.0)
    snapshot(cfg, ws, evaluate_run_id="a" * 32)
    first = registry.register_and_gate(cfg, ws)
    assert first["promoted"] and first["version"] == 1 and first["reasons"] == ["no champion yet"]

    fake_evaluation(ws, seed=0, color=92.0, fid=18.0, shape=61.0)           # better: promoted
    snapshot(cfg, ws, evaluate_run_id="b" * 32)
    second = registry.register_and_gate(cfg, ws)
    assert second["promoted"] and second["champion"] == 2 and second["previous_champion"] == 1

    fake_evaluation(ws, seed=0, color=92.0, fid=18.0, shape=40.0)           # shape lost 21 points
    snapshot(cfg, ws, evaluate_run_id="c" * 32)
    third = registry.register_and_gate(cfg, ws)
    assert not third["promoted"] and third["champion"] == 2
    assert any("quality.single.shape" in r for r in third["reasons"])
    page = third["compare_report"]
    assert page and page.endswith(".html") and "quality.single.shape" in open(page).read()
    assert "stays a candidate" in registry.describe(third) and "comparison" in registry.describe(third)

    import mlflow
    client = mlflow.MlflowClient()
    v3 = client.get_model_version(cfg.promote.registered_model, "3")
    assert v3.tags["gate"] == "candidate" and "quality.single.shape" in v3.tags["gate_reasons"]
    assert str(client.get_model_version_by_alias(cfg.promote.registered_model, "champion").version) == "2"
    champ = registry.champion_models(cfg, ws)
    assert (champ / "decoder" / "model.safetensors").read_bytes() == b"weights of decoder"
    assert json.loads((champ / "evaluate.json").read_text())["quality"]["single"]["shape"] == 61.0


def test_nothing_to_register_is_a_clear_error(tmp_path, smoke_cfg, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ws = Workspace.at(tmp_path)
    with pytest.raises(registry.GateError, match="models/clip"):
        registry.register_and_gate(smoke_cfg, ws)
    assert registry.champion_models(smoke_cfg, ws) is None
