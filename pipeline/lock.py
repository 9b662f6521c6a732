"""One writer per workspace: an exclusive ``flock`` on ``.unclip/run.lock``.

``unclip run`` (the training flow), ``unclip stage``, ``unclip promote`` and ``unclip init`` hold
it while they work, so two of them never interleave on one workspace (DVC's own lock covers only
the time inside ``dvc repro``; a promote copies ``models/`` while a stage may be renaming it).
A second one does not wait: it fails at once, naming the process that holds the lock
(:class:`WorkspaceBusy`, a permanent failure: retrying in 5 s would meet the same holder).

The flow runs its stages as ``dvc repro`` -> ``unclip stage X``: children of the holder. The
holder exports :data:`LOCK_ENV` (``<lock file>:<its pid>``); a process that inherits it and
finds that same process still holding that same lock runs under it instead of deadlocking on it.
A stale or forged value (the pid gone, or not the one recorded in the lock file) is ignored and
the lock is taken normally. The lock is advisory: it orders the pipeline's own commands, and
the kernel drops it when its holder dies (SIGKILL included), so there is no stale lock to clean.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

LOCK_ENV = "UNCLIP_WORKSPACE_LOCK"
_held: dict[str, int] = {}          # lock path -> nesting depth, in this process


class WorkspaceBusy(RuntimeError):
    """Another pipeline command holds the workspace."""


def lock_path(root: str | os.PathLike) -> Path:
    return Path(root).resolve() / ".unclip" / "run.lock"


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _inherited(path: Path) -> bool:
    """Whether an ancestor holds ``path`` for us (see the module's doc)."""
    value = os.environ.get(LOCK_ENV, "")
    where, _, pid = value.rpartition(":")
    if where != str(path) or not pid.isdigit():
        return False
    if _holder(path).split(" ", 1)[0] != pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # the holder must really hold it: a non-blocking shared probe fails while it does
    with open(path, "a+") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            return err.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False


@contextlib.contextmanager
def workspace_lock(root: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the workspace's lock for ``what`` (a command, shown to whoever is refused)."""
    path = lock_path(root)
    key = str(path)
    if key in _held or _inherited(path):
        _held[key] = _held.get(key, 0) + 1
        try:
            yield path
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")             # never truncated before the lock is ours: the holder's pid stays readable
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = _holder(path)
            pid, _, cmd = holder.partition(" ")
            raise WorkspaceBusy(f"another pipeline command (pid {pid}{': ' + cmd if cmd else ''}) holds the "
                                f"workspace {Path(root).resolve()} ({path}); wait for it to finish, or stop it"
                                ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {what}\n")
        f.flush()
        before = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = f"{path}:{os.getpid()}"
        _held[key] = 1
        try:
            yield path
        finally:
            del _held[key]
            if before is None:
                os.environ.pop(LOCK_ENV, None)
            else:
                os.environ[LOCK_ENV] = before
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()
