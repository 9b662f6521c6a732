"""Scheduled retraining: `train_flow` as a Prefect deployment on a cron schedule, served by a
long-running process against a real Prefect server.

    make serve                                   # server on 127.0.0.1:4200 + this process
    python -m flows.deploy --cron "0 3 * * *" --profile default --workspace .
    prefect deployment run unclip-train/unclip-retrain          # a run now, besides the schedule

The process registers (or updates) the deployment ``unclip-train/<name>`` with its schedule and
parameters, then executes its runs itself (Prefect's ``serve``: no work pool or worker to set up);
stopping it pauses the schedule. With ``--start-server`` it first starts ``prefect server start``
on loopback (when ``PREFECT_API_URL`` does not answer) and stops it on exit. Watch the runs in
Prefect's UI at the server's address; every run's record (stages ran and skipped, figures, the
gate's verdict) is the flow run's summary artifact and its MLflow parent run.

The API can start runs, so it is not left open (anyone who reaches loopback: other local users,
containers on the host network, a web page in the operator's browser):

- the server it starts requires an auth string (HTTP basic; ``PREFECT_SERVER_API_AUTH_STRING``,
  which clients send as ``PREFECT_API_AUTH_STRING``): the one in the environment, else the
  workspace's ``.unclip/prefect-auth`` (generated, mode 0600; the UI asks for it);
- CORS allows only the server's own origin, and CSRF protection is on;
- the served flow refuses any ``workspace`` but the pinned one and unknown stage names
  (``flows.train.SERVE_WORKSPACE_ENV``), and the deployment runs one flow at a time
  (``concurrency_limit=1``: a run still going when the next cron tick comes delays that one).
"""
from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

DEFAULT_NAME = "unclip-retrain"
DEFAULT_CRON = "0 3 * * *"        # every day at 03:00 (the server's timezone: UTC unless configured)


def deployment(name: str = DEFAULT_NAME, cron: str = DEFAULT_CRON, profile: str = "default",
               workspace: str = ".", force: bool = False):
    """The RunnerDeployment: ``train_flow`` with its schedule and parameters."""
    from flows.train import train_flow
    return train_flow.to_deployment(
        name=name, cron=cron, parameters={"workspace": str(Path(workspace).resolve()), "profile": profile,
                                          "force": force},
        concurrency_limit=1,
        description="unCLIP pipeline retraining: every stage through DVC (only what changed reruns), "
                    "then the promotion gate", tags=["unclip", profile])


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


AUTH_FILE = ".unclip/prefect-auth"


def auth_string(workspace: str | os.PathLike, environ: Optional[dict] = None) -> str:
    """The API's auth string: from the environment (``PREFECT_SERVER_API_AUTH_STRING`` or
    ``PREFECT_API_AUTH_STRING``), else the workspace's :data:`AUTH_FILE`, created (0600) when missing."""
    environ = os.environ if environ is None else environ
    given = environ.get("PREFECT_SERVER_API_AUTH_STRING") or environ.get("PREFECT_API_AUTH_STRING")
    if given:
        return given
    path = Path(workspace).resolve() / AUTH_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write("unclip:" + secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def server_env(port: int, auth: str, env: Optional[dict] = None) -> dict:
    """The environment `prefect server start` runs with: auth string, CORS for its own origin
    only, CSRF protection on, no telemetry."""
    env = {**(os.environ if env is None else env), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_AUTH_STRING": auth,
           "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{port}",
           "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true"}
    env.pop("PREFECT_API_URL", None)
    return env


def start_server(port: int, wait_s: float = 120.0, env: Optional[dict] = None,
                 auth: Optional[str] = None) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on 127.0.0.1:port (its database under ``PREFECT_HOME``), locked down
    by :func:`server_env` with ``auth`` (default: the environment's auth string; one is required);
    returns (process, API URL) once it answers."""
    api = f"http://127.0.0.1:{port}/api"
    base = os.environ if env is None else env
    auth = auth or base.get("PREFECT_SERVER_API_AUTH_STRING") or base.get("PREFECT_API_AUTH_STRING")
    if not auth:
        raise ValueError("start_server needs an auth string (auth=, or PREFECT_SERVER_API_AUTH_STRING)")
    env = server_env(port, auth, base)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        if healthy(api):
            return proc, api
        time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"prefect server did not answer on {api} within {wait_s:.0f} s")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default=DEFAULT_NAME)
    ap.add_argument("--cron", default=DEFAULT_CRON, help="the schedule (cron syntax)")
    ap.add_argument("--profile", default=os.environ.get("UNCLIP_PROFILE", "default"))
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--force", action="store_true", help="scheduled runs rerun every stage")
    ap.add_argument("--start-server", action="store_true",
                    help="start `prefect server start` on loopback first if PREFECT_API_URL does not answer")
    ap.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)))
    args = ap.parse_args(argv)
    from flows.train import SERVE_WORKSPACE_ENV
    server = None
    workspace = Path(args.workspace).resolve()
    auth = auth_string(workspace)
    os.environ["PREFECT_API_AUTH_STRING"] = auth                  # this process's client (and its flow runs)
    os.environ[SERVE_WORKSPACE_ENV] = str(workspace)              # the only workspace a run may use
    api = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{args.port}/api"
    if not healthy(api):
        if not args.start_server:
            sys.exit(f"no Prefect server answers at {api}: start one (`prefect server start`) or pass --start-server")
        server, api = start_server(args.port, auth=auth)
        where = "the environment" if os.environ.get("PREFECT_SERVER_API_AUTH_STRING") else workspace / AUTH_FILE
        print(f"Prefect server at {api.removesuffix('/api')} (UI), API {api}; auth string in {where}", flush=True)
    os.environ["PREFECT_API_URL"] = api
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        from prefect import serve
        serve(deployment(args.name, args.cron, args.profile, args.workspace, args.force))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
