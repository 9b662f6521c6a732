"""The workspace: where a pipeline's params, data, models and metrics live, and how stages write.

Every stage output is written atomically: into a sibling temp path first, then renamed over the
final path, so an interrupted stage never leaves a half-written artifact that looks complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union


RESOLVED = "params.resolved.json"


def _under(*parts: str) -> property:
    """A read-only attribute: the path ``parts`` below the workspace's root."""
    return property(lambda self: self.root.joinpath(*parts))


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike | None = None) -> "Workspace":
        return cls(Path(root or os.environ.get("UNCLIP_WORKSPACE") or ".").resolve())

    # The stage outputs of DESIGN.md's table: each a path under the root.
    params = _under("params.yaml")
    resolved = _under(RESOLVED)            # what DVC sees: pipeline.config.write_resolved
    corpus = _under("data", "corpus")
    raw = _under("data", "raw")
    filtered = _under("data", "filtered")
    embeddings = _under("data", "embeddings")
    clip = _under("models", "clip")
    prior = _under("models", "prior")
    decoder = _under("models", "decoder")
    judge = _under("models", "judge")
    reports = _under("reports")
    metrics_dir = _under("metrics")

    def upsampler(self, key: str) -> Path: return self.root / "models" / f"upsampler_{key}"

    @property
    def checkpoints(self):
        # a torchrun launch (pipeline/launch.py) points every rank at storage all nodes share: a
        # path, or an fsspec URL (a pipeline.storage.Url, which joins with / like a Path)
        shared = os.environ.get("UNCLIP_CHECKPOINTS")
        if not shared:
            return self.root / ".unclip" / "checkpoints"
        return location(shared)
    def metrics_path(self, stage: str) -> Path:
        return self.metrics_dir / f"{stage.replace('@', '_')}.json"


# ---- roots outside the workspace (``cluster.storage``: pipeline/storage.py) -----------------------
class Url(str):
    """A location under a non-local fsspec root (``memory://ck/prior``): ``/`` joins like a Path."""

    def __truediv__(self, other) -> "Url":
        return Url(self.rstrip("/") + "/" + str(other))

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]


Location = Union[Path, Url]


def root_url(storage: Optional[str]) -> Optional[str]:
    """``cluster.storage`` as an fsspec URL: None stays None, a plain path or ``file://`` becomes
    ``file://<absolute path>``, another URL is kept (without a trailing slash)."""
    if storage is None:
        return None
    if "://" not in storage or storage.startswith("file://"):
        return "file://" + str(Path(storage.removeprefix("file://")).expanduser().resolve())
    return storage.rstrip("/")


def location(url: str) -> Location:
    """A Path for a local root, else a :class:`Url`."""
    url = root_url(url)
    return Path(url.removeprefix("file://")) if url.startswith("file://") else Url(url)


KILL_ENV = "UNCLIP_KILL_AT"


def kill_point(phase: str, step: Optional[int] = None) -> None:
    """Fault injection for the kill campaign (tests/test_kill_campaign.py): SIGKILL this process
    when ``$UNCLIP_KILL_AT`` names ``phase`` -- ``step:N`` (after optimizer step N), ``checkpoint``
    (a checkpoint written, not yet renamed), ``validation`` (training done, before the stage
    validates), ``saving`` (an output written into its temp dir, not yet renamed) or ``renaming``
    (between :func:`atomic_dir`'s two renames). Unset, it does nothing."""
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    name, _, n = want.partition(":")
    if name != phase or (phase == "step" and (step is None or not n.isdigit() or step < int(n))):
        return
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``final``; on success it replaces ``final`` in one rename.

    On error the temp dir is removed and ``final`` (the previous good output, if any) is kept.
    The files are fsynced before the rename and the rename after it, so a crash or power loss
    leaves the old output or the new one, never a new one of empty files. A process killed
    outright (SIGKILL, OOM) runs no cleanup: its ``.<name>.tmp-<pid>-*`` dir, or the previous
    output it had moved to ``.<name>.old-<pid>-*``, is dealt with by the next call
    (:func:`sweep_stale`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        kill_point("saving")
        sync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
    if final.exists():
        os.replace(final, old)
    kill_point("renaming")
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def sweep_stale(final: Path) -> list[str]:
    """Clean up after an :func:`atomic_dir` of ``final`` whose process died: remove its temp
    dirs, and its moved-aside previous output, unless ``final`` itself is missing (killed
    between the two renames): that one is put back. Dirs of a live process are left alone;
    one whose name carries no pid (written before names did) counts as stale. Returns what
    was done, one line each."""
    final = Path(final)
    done = []
    for kind in ("old", "tmp"):                  # an .old first: it may be the output to restore
        for p in sorted(final.parent.glob(f".{final.name}.{kind}-*")):
            pid = p.name[len(f".{final.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and pid_alive(int(pid)):
                continue
            if kind == "old" and not final.exists():
                os.replace(p, final)
                done.append(f"restored {final.name}/ from {p.name} (its stage was killed between two renames)")
            else:
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p.name} (left by a killed stage)")
    for line in done:
        print(f"[workspace] {line}", flush=True)
    return done


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                              # another user's process
    return True


def sync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before it is renamed into place)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o):
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


# ---- creating a workspace -----------------------------------------------------------------------
SOURCE_ROOT = Path(__file__).resolve().parent.parent      # the checkout holding dvc.yaml
DVCIGNORE = "__pycache__/\n*.pyc\n.unclip/\n"
# .<name>.tmp-* / .<name>.old-*: atomic_dir's work in progress (gigabytes for a crawl), never for git
GITIGNORE = "/pipeline\n/params.resolved.json\n/mlflow.db\n/mlartifacts/\n/.unclip/\n/reports/\n.*.tmp-*\n.*.old-*\n"


def init_workspace(directory: str | os.PathLike, params: Optional[Path] = None) -> Path:
    """A git + DVC repo holding dvc.yaml and params.yaml, ready for `dvc repro` / `unclip run`.

    The stages' code dependencies (``pipeline/...`` in dvc.yaml) resolve through a symlink to
    this checkout, so editing the code marks the stages it touches stale here too.
    """
    from .lock import workspace_lock
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with workspace_lock(root, "unclip init"):      # not while a run or stage works in it
        return _init_workspace(root, params)


def _init_workspace(root: Path, params: Optional[Path]) -> Path:
    import subprocess
    for name in ("dvc.yaml", "params.yaml"):
        if not (SOURCE_ROOT / name).exists():
            raise FileNotFoundError(f"{SOURCE_ROOT / name} not found: `unclip init` needs the project checkout")
    shutil.copyfile(SOURCE_ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copyfile(params or SOURCE_ROOT / "params.yaml", root / "params.yaml")
    if not (root / "pipeline").exists():
        (root / "pipeline").symlink_to(SOURCE_ROOT / "pipeline", target_is_directory=True)
    (root / ".dvcignore").write_text(DVCIGNORE)
    (root / ".gitignore").write_text(GITIGNORE)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def sh(*cmd):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True, env=env)

    if not (root / ".git").exists():
        sh("git", "init", "-q")
        sh("git", "config", "user.email", "unclip@localhost")
        sh("git", "config", "user.name", "unclip")
    if not (root / ".dvc").exists():
        dvc = (sys.executable, "-m", "dvc")
        sh(*dvc, "init", "-q")
        sh(*dvc, "config", "core.analytics", "false")
        # Stages replace their outputs by rename and never edit them in place, so linking
        # cached files is safe and saves copying every image into the cache.
        sh(*dvc, "config", "cache.type", "reflink,hardlink,copy")
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "-m", "unclip workspace")
    return root
