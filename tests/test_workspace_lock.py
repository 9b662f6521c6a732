"""One pipeline command per workspace (issue 19, M4): the flow, `unclip stage`, `unclip promote`
and `unclip init` hold `.unclip/run.lock`; a second one fails at once, permanently, naming the
holder; the flow's own stage children run under its lock; a cancelled task kills its `dvc repro`."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.lock import LOCK_ENV, WorkspaceBusy, lock_path, workspace_lock

REPO = Path(__file__).resolve().parent.parent
HOLD = ("import sys, time; from pipeline.lock import workspace_lock\n"
        "with workspace_lock(sys.argv[1], 'test holder'):\n"
        "    print('held', flush=True); time.sleep(120)\n")


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/ws's lock; yields (workspace root, its pid)."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    yield root, proc.pid
    proc.kill()
    proc.wait()


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300)


def test_a_busy_workspace_fails_at_once_naming_the_holder(holder):
    root, pid = holder
    t0 = time.monotonic()
    with pytest.raises(WorkspaceBusy, match=rf"pid {pid}: test holder"):
        with workspace_lock(root, "second"):
            pass
    assert time.monotonic() - t0 < 5
    # `unclip stage`: exit 2 (permanent), the holder named, the outcome recorded for the flow
    proc = cli("--profile", "smoke", "--workspace", str(root), "stage", "corpus", env={"UNCLIP_EXIT_TOKEN": "t1"})
    assert proc.returncode == 2 and f"pid {pid}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (root / "data").exists()                     # nothing ran
    import json
    record = json.loads((root / ".unclip" / "exit" / "corpus.json").read_text())
    assert record["stage"] == "corpus" and record["exit_code"] == 2 and record["permanent"] and record["token"] == "t1"
    # `unclip promote`: the same (registry.py copies models/ while a stage may be renaming it)
    proc = cli("--profile", "smoke", "--workspace", str(root), "promote")
    assert proc.returncode == 2 and f"pid {pid}" in proc.stderr, proc.stderr
    # `unclip init` into a workspace in use
    from pipeline.workspace import init_workspace
    with pytest.raises(WorkspaceBusy):
        init_workspace(root)
    assert not (root / ".git").exists()


def test_second_run_on_locked_workspace_fails_fast_and_clearly(holder, monkeypatch):
    """The flow (what `unclip run` and the deployment call): a permanent StageFailed naming the
    holder, before any stage subprocess or MLflow run."""
    from flows import train
    root, pid = holder
    monkeypatch.setattr(train.subprocess, "Popen", lambda *a, **k: pytest.fail("a subprocess was started"))
    monkeypatch.setattr(train.tracking, "start_run", lambda *a, **k: pytest.fail("an MLflow run was started"))
    with pytest.raises(train.StageFailed) as err:
        train.train_flow.fn(workspace=str(root), profile="smoke")
    assert err.value.permanent and f"pid {pid}" in str(err.value)
    assert not train._retry_transient(None, None, _Failed(err.value))      # never retried


class _Failed:
    def __init__(self, err):
        self.err = err

    def result(self):
        raise self.err


def test_children_of_the_holder_run_under_its_lock_and_others_do_not(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    probe = ("import sys; from pipeline.lock import workspace_lock\n"
             "with workspace_lock(sys.argv[1], 'child'): print('ran')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with workspace_lock(root, "parent"):
        assert os.environ[LOCK_ENV] == f"{lock_path(root)}:{os.getpid()}"
        with workspace_lock(root, "nested in the same process"):          # re-entrant
            pass
        # `dvc repro` -> `unclip stage X`: a child inherits the lock through the environment
        child = subprocess.run([sys.executable, "-c", probe, str(root)], env={**env, LOCK_ENV: os.environ[LOCK_ENV]},
                               capture_output=True, text=True)
        assert child.returncode == 0 and "ran" in child.stdout, child.stderr
        # a process that only claims to be the holder's child (another pid in the variable) is refused
        forged = subprocess.run([sys.executable, "-c", probe, str(root)],
                                env={**env, LOCK_ENV: f"{lock_path(root)}:{os.getppid()}"},
                                capture_output=True, text=True)
        assert forged.returncode != 0 and "WorkspaceBusy" in forged.stderr
    assert LOCK_ENV not in os.environ
    # released: a stale variable naming a holder that has let go takes the lock normally
    again = subprocess.run([sys.executable, "-c", probe, str(root)],
                           env={**env, LOCK_ENV: f"{lock_path(root)}:{os.getpid()}"}, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr


def test_a_killed_holder_releases_the_lock(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    proc.kill()                                              # SIGKILL: no cleanup ran
    proc.wait()
    with workspace_lock(root, "after the kill"):
        assert lock_path(root).read_text().startswith(f"{os.getpid()} ")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state                          # a zombie waiting for its reaper: dead


def test_an_interrupted_task_kills_its_dvc_repro_and_the_stage_under_it():
    """run_logged (repro_stage's subprocess): when the task is cancelled or interrupted while the
    command runs, the command and its children are stopped before the exception goes on."""
    from flows.train import run_logged
    seen = []

    def log(line):
        seen.append(int(line))
        raise KeyboardInterrupt                               # what a cancel / Ctrl-C looks like here

    # `sh` stands for dvc, the backgrounded sleep for the `unclip stage` it runs
    with pytest.raises(KeyboardInterrupt):
        run_logged(["sh", "-c", "sleep 300 & echo $!; wait"], ".", dict(os.environ), log)
    (grandchild,) = seen
    deadline = time.monotonic() + 30
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(grandchild)
