"""Progress bars with rate and ETA for long work (tqdm), written to stderr.

DVC and Prefect capture stderr line by line; a bar that redraws with carriage returns is hard to
read in their logs, so off a terminal we print a fresh line at most every ``mininterval`` s.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Optional[Iterable[T]] = None, *, total: Optional[int] = None, desc: str = "",
             unit: str = "it", disable: bool = False) -> "tqdm[T]":
    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                mininterval=0.5 if tty else 10.0, dynamic_ncols=tty, ascii=not tty,
                smoothing=0.1)


def say(stage: str, message: str) -> None:
    """One line of stage feedback (what was produced and where)."""
    print(f"[{stage}] {message}", flush=True)
