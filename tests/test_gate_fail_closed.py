"""The promotion gate fails closed (issue 19, H3 and M5 of ../shared/reviews/reliability-review.md):
an unreadable champion evaluation or a registry error never promotes; a candidate with a NaN or
missing rule figure is never promoted, not even as the first version; and the gate registers only
the weights that evaluate measured."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers.fake_eval import fake_evaluation
from pipeline import registry
from pipeline.workspace import Workspace


@pytest.fixture
def gate_ws(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ws = Workspace.at(tmp_path / "ws")
    for part in ("clip", "prior", "decoder", "upsampler_1"):
        d = ws.root / "models" / part
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"weights of " + part.encode())
    return ws


def champion_number(cfg):
    import mlflow
    return int(mlflow.MlflowClient().get_model_version_by_alias(cfg.promote.registered_model, "champion").version)


def test_gate_refuses_when_champion_evaluation_unreadable(gate_ws, smoke_cfg):
    import mlflow
    ws, cfg = gate_ws, smoke_cfg
    fake_evaluation(ws, seed=0, color=90.0, fid=20.0, shape=60.0)
    assert registry.register_and_gate(cfg, ws)["promoted"]
    v1 = mlflow.MlflowClient().get_model_version(cfg.promote.registered_model, "1")
    evaluation = Path(v1.source.removeprefix("file://")) / "evaluate.json"   # in the local artifact store
    assert evaluation.exists()
    evaluation.unlink()
    fake_evaluation(ws, seed=0, color=10.0, fid=90.0, shape=5.0)             # far worse
    verdict = registry.register_and_gate(cfg, ws)
    assert not verdict["promoted"] and "no readable evaluation" in verdict["reasons"][0]
    assert champion_number(cfg) == 1
    # replace_unreadable: true lets a candidate with finite figures take over
    from pipeline.config import Config
    loose = Config.model_validate(cfg.model_dump() | {"promote": cfg.promote.model_dump() | {"replace_unreadable": True}})
    assert registry.register_and_gate(loose, ws)["promoted"] and champion_number(cfg) == 3


def test_gate_refuses_on_registry_error(gate_ws, smoke_cfg, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException
    ws, cfg = gate_ws, smoke_cfg
    fake_evaluation(ws, seed=0, color=90.0, fid=20.0, shape=60.0)
    assert registry.register_and_gate(cfg, ws)["promoted"]

    def broken(self, name, alias):
        raise MlflowException("the registry is down", error_code="INTERNAL_ERROR")
    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version_by_alias", broken)
    fake_evaluation(ws, seed=0, color=95.0, fid=10.0, shape=70.0)
    with pytest.raises(registry.GateRegistryError, match="INTERNAL_ERROR"):
        registry.register_and_gate(cfg, ws)
    monkeypatch.undo()
    assert champion_number(cfg) == 1


@pytest.mark.parametrize("value", [math.nan, None])
def test_first_candidate_with_nan_metric_is_not_promoted(gate_ws, smoke_cfg, value):
    ws, cfg = gate_ws, smoke_cfg
    ev = fake_evaluation(ws, seed=0, color=90.0, fid=20.0, shape=60.0)
    ev["quality"]["single"]["shape"] = value
    ws.metrics_path("evaluate").write_text(json.dumps(ev))
    if value is None:                     # a missing figure: a configuration error before registering
        with pytest.raises(registry.GateConfigError):
            registry.register_and_gate(cfg, ws)
        return
    verdict = registry.register_and_gate(cfg, ws)
    assert not verdict["promoted"] and "quality.single.shape" in verdict["reasons"][0]
    assert registry.champion_models(cfg, ws) is None
    fake_evaluation(ws, seed=0, color=50.0, fid=50.0, shape=30.0)        # finite: it becomes the champion
    assert registry.register_and_gate(cfg, ws)["promoted"] and champion_number(cfg) == 2


def test_promote_refuses_models_changed_since_evaluate(gate_ws, smoke_cfg):
    ws, cfg = gate_ws, smoke_cfg
    fake_evaluation(ws, seed=0, color=90.0, fid=20.0, shape=60.0)
    (ws.root / "models" / "prior" / "model.safetensors").write_bytes(b"a prior trained after evaluate")
    with pytest.raises(registry.GateError, match="models changed since evaluate.*prior"):
        registry.register_and_gate(cfg, ws)
    assert registry.champion_models(cfg, ws) is None
    ev = json.loads(ws.metrics_path("evaluate").read_text())
    del ev["bundle"]                                                     # an evaluation from before the check
    ws.metrics_path("evaluate").write_text(json.dumps(ev))
    with pytest.raises(registry.GateError, match="does not say which weights"):
        registry.register_and_gate(cfg, ws)
    fake_evaluation(ws, seed=0, color=90.0, fid=20.0, shape=60.0)       # evaluated again: registered
    assert registry.register_and_gate(cfg, ws)["promoted"]


def test_gate_alias_compare_and_set(gate_ws, smoke_cfg, monkeypatch):
    """Two gates at once: the alias moves between this gate's read and its set; it must not
    overwrite the other gate's champion (M4)."""
    import mlflow
    ws, cfg = gate_ws, smoke_cfg
    fake_evaluation(ws, seed=0, color=90.0, fid=20.0, shape=60.0)
    assert registry.register_and_gate(cfg, ws)["promoted"]
    real = registry.champion_version
    calls = []

    def racing(client, name, alias):
        calls.append(alias)
        if len(calls) == 2:         # the other gate promotes its own version in between
            other = client.create_model_version(name, source=client.get_model_version(name, "1").source)
            client.set_registered_model_alias(name, alias, other.version)
        return real(client, name, alias)
    monkeypatch.setattr(registry, "champion_version", racing)
    fake_evaluation(ws, seed=0, color=95.0, fid=10.0, shape=70.0)              # better: would be promoted
    with pytest.raises(registry.GateRegistryError, match="moved from version 1 to 3"):
        registry.register_and_gate(cfg, ws)
    assert champion_number(cfg) == 3                                          # the other gate's, kept
    v2 = mlflow.MlflowClient().get_model_version(cfg.promote.registered_model, "2")   # this gate's
    assert v2.tags["gate"] == "candidate"
