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
"""
from __future__ import annotations

import argparse
import os
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


def start_server(port: int, wait_s: float = 120.0, env: Optional[dict] = None) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on 127.0.0.1:port (its database under ``PREFECT_HOME``); returns
    (process, API URL) once it answers."""
    api = f"http://127.0.0.1:{port}/api"
    env = {**(os.environ if env is None else env), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
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
    server = None
    api = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{args.port}/api"
    if not healthy(api):
        if not args.start_server:
            sys.exit(f"no Prefect server answers at {api}: start one (`prefect server start`) or pass --start-server")
        server, api = start_server(args.port)
        print(f"Prefect server at {api.removesuffix('/api')} (UI), API {api}", flush=True)
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
