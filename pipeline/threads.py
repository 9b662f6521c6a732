"""The machine's cores, shared between stages that run side by side.

The flow (flows/train.py) runs independent stages at once (``cluster.parallel_stages``). It gives
each running stage a share of the cores: a one-line file per stage, named to the stage by
:data:`SHARE_ENV`. A stage reads its share when it starts, and a training loop reads it again
between steps, so a stage left alone takes the cores back at its next step
(``torch.set_num_threads`` on the loop's own thread: OpenMP's thread count belongs to the thread
that sets it).

Why (docs/MEASURED.md, 2026-12-04 sixth session; 2 cores, AVX512-BF16): at 16-64 px a step is made of many
small ops whose dispatch does not parallelize. A step at 2 threads takes only 1/1.27 (CLIP) to
1/1.57 (the prior) of its time at 1 thread, and two 1-thread stages side by side each ran at
their 1-thread speed (the decoder 0.271 s/step beside an upsampler, 0.282 s alone). So two stages
at one thread each do 1.3-1.6 times the work of one stage at two.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from .workspace import atomic_write_bytes

SHARE_ENV = "UNCLIP_THREAD_SHARE"       # the file that holds this stage's thread count


def machine_cores() -> int:
    """The threads this process may use: OMP_NUM_THREADS where set (a test worker's share, a
    scheduler's slot), else the CPUs this process may run on."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                                  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _read_share(path: str) -> Optional[int]:
    """The thread count in a share file, or None where it is gone or unreadable."""
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def share() -> int:
    """The cores this stage may use now: its share from the flow (:data:`SHARE_ENV`), else
    :func:`machine_cores`."""
    path = os.environ.get(SHARE_ENV)
    n = _read_share(path) if path else None
    return max(1, n) if n is not None else machine_cores()


def shares(running: Sequence[str], cores: int) -> dict[str, int]:
    """Each running stage's threads: the cores split evenly, the remainder to the stages started
    first (``running`` is in start order); at least one each."""
    if not running:
        return {}
    base, extra = divmod(cores, len(running))
    return {stage: max(1, base + (i < extra)) for i, stage in enumerate(running)}


class ThreadShares:
    """The flow's side: one file per running stage under ``folder``, rewritten (atomically) when
    a stage starts or ends."""

    def __init__(self, folder: Path, cores: int):
        self.folder, self.cores = Path(folder), cores
        self.running: list[str] = []

    def path(self, stage: str) -> Path:
        return self.folder / f"{stage}.threads"

    def start(self, stage: str, publish: bool = True) -> Path:
        """``stage`` runs: it and the others get their shares (written now, or by :meth:`publish`).
        Returns its file."""
        self.running.append(stage)
        if publish:
            self._write()
        return self.path(stage)

    def end(self, stage: str, publish: bool = True) -> None:
        """``stage`` is done: its file goes, and the others' shares grow (written now, or by
        :meth:`publish`)."""
        if stage in self.running:
            self.running.remove(stage)
        self.path(stage).unlink(missing_ok=True)
        if publish:
            self._write()

    def publish(self) -> None:
        """Write every running stage's share. The flow ends a stage and starts the next with
        ``publish=False``, then publishes once: a stage reading its file between two writes would
        take a core for one step and give it back, and a step's sums depend on its thread count
        (:class:`History`), so CLIP would train another CLIP."""
        self._write()

    def _write(self) -> None:
        for stage, n in shares(self.running, self.cores).items():
            path = self.path(stage)
            if not (path.exists() and path.read_text().strip() == str(n)):     # unchanged: no new mtime
                atomic_write_bytes(path, f"{n}\n".encode())


_seen: dict[str, Optional[tuple]] = {"file": None}


def follow() -> Optional[int]:
    """The stage's side: set torch's threads to this stage's share if the flow changed it since the
    last call (one ``os.stat`` otherwise). Returns the threads set, else None. Does nothing
    outside the flow, and in a process of a multi-process launch (each rank has its own threads)."""
    path = os.environ.get(SHARE_ENV)
    if not path or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    try:
        st = os.stat(path)
    except OSError:                                 # the flow ended this share: keep what we have
        return None
    key = (st.st_ino, st.st_mtime_ns)
    if key == _seen["file"]:
        return None
    _seen["file"] = key
    n = _read_share(path)
    if n is None:
        return None
    import torch
    if n >= 1 and n != torch.get_num_threads():
        torch.set_num_threads(n)
        return n
    return None


class History:
    """A training loop's thread counts: ``steps`` is ``[[step, threads], ...]``, at the start and
    at every change :func:`follow` made. A step's sums (oneDNN's convolutions, the reductions) depend
    on the thread count, so two runs of one config train the same weights only when they switch at
    the same steps (docs/MEASURED.md, eighteenth session: about 4 points of the decoder's judged figures)."""

    def __init__(self, start: int):
        import torch
        follow()
        self.steps = [[start, torch.get_num_threads()]]

    def follow(self, step: int) -> None:
        """:func:`follow` before ``step``, noting a change."""
        n = follow()
        if n is not None:
            self.steps.append([step, n])
