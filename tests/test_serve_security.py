"""`make serve` does not leave the Prefect API open (issue 19, H4).

Checked here without a server: the environment `prefect server start` gets (auth string, CORS for
its own origin only, CSRF on), the auth file (generated once, 0600), the deployment's concurrency
limit, and the flow's refusal of parameters the API may not set. That a real server then answers
401 to a request without the auth string, and serves one with it, is checked by
tests/test_flow.py::test_scheduled_deployment_runs_on_a_real_prefect_server (it starts one anyway).
"""
from __future__ import annotations

import stat

import pytest

from flows import deploy, train


def test_auth_string_is_generated_once_private_and_overridable(tmp_path):
    ws = tmp_path / "ws"
    first = deploy.auth_string(ws, environ={})
    path = ws / deploy.AUTH_FILE
    assert len(first) > 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert deploy.auth_string(ws, environ={}) == first                 # the UI's password does not change
    path.chmod(0o644)
    assert deploy.auth_string(ws, environ={}) == first and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert deploy.auth_string(ws, environ={"PREFECT_API_AUTH_STRING": "given"}) == "given"
    assert deploy.auth_string(ws, environ={"PREFECT_SERVER_API_AUTH_STRING": "server"}) == "server"


def test_serve_env_sets_auth_cors_and_csrf(monkeypatch):
    env = deploy.server_env(4321, "u:p", {"PATH": "/bin", "PREFECT_API_URL": "http://elsewhere/api"})
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == "u:p"
    assert env["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4321"     # not "*"
    assert env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    assert "PREFECT_API_URL" not in env and env["PATH"] == "/bin"
    # what Prefect's server makes of that environment (the names are right)
    from prefect.settings import Settings
    for k, v in env.items():
        if k.startswith("PREFECT_SERVER_"):
            monkeypatch.setenv(k, v)
    api = Settings().server.api
    assert api.auth_string.get_secret_value() == "u:p"
    assert api.cors_allowed_origins == "http://127.0.0.1:4321" and api.csrf_protection_enabled is True
    with pytest.raises(ValueError, match="auth string"):
        deploy.start_server(1, env={"PATH": "/bin"})                   # never an open server


def test_deployment_runs_one_flow_at_a_time(tmp_path):
    dep = deploy.deployment("t", "0 3 * * *", "smoke", str(tmp_path))
    limit = getattr(dep, "concurrency_limit", None)
    assert limit == 1, limit
    assert dep.parameters["workspace"] == str(tmp_path.resolve())


def test_flow_refuses_unlisted_workspace_and_unknown_stage(tmp_path, monkeypatch):
    pinned, other = tmp_path / "pinned", tmp_path / "other"
    for d in (pinned, other):
        d.mkdir()
        (d / "params.yaml").write_text((train.Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    monkeypatch.setenv(train.SERVE_WORKSPACE_ENV, str(pinned))
    monkeypatch.setattr(train.subprocess, "Popen", lambda *a, **k: pytest.fail("a subprocess was started"))
    monkeypatch.setattr(train.tracking, "start_run", lambda *a, **k: pytest.fail("an MLflow run was started"))
    with pytest.raises(train.StageFailed) as err:
        train.train_flow.fn(workspace=str(other), profile="smoke")
    assert err.value.permanent and "refused" in str(err.value) and str(pinned) in str(err.value)
    for stages in (["--help"], ["crawl", "../../x"], ["prior; rm -rf ~"]):
        with pytest.raises(train.StageFailed) as err:
            train.train_flow.fn(workspace=str(pinned), profile="smoke", stages=stages)
        assert err.value.permanent and "unknown stage" in str(err.value)
    assert not (other / ".unclip").exists() and not (pinned / ".unclip").exists()      # not even locked
