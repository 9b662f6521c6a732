"""Incremental data: what a rerun of crawl, filter and embed reuses from the output it replaces.

New pairs arrive as *parts*: part 0 is the first crawl, part k the k-th addition. Every data
stage writes part k's shards under the name prefix :func:`part_prefix` (``00000.tar`` for part
0, ``part001-00000.tar`` for part 1, ...), so a part's shards sort after the earlier ones and an
earlier shard is never rewritten. Beside the shards, ``incremental.json`` records

    recipe    a hash of what made the output: the stage's config sections, the source files of
              its code (its module's import closure, pipeline/codedeps.py) and, for embed, the
              CLIP's weights. Another recipe means the old shards
              are not what this configuration would make: the stage redoes everything.
    inputs    the upstream shards consumed so far, name -> sha256 (crawl: none; it diffs URLs)
    parts     per part: its output shards and its own figures

A rerun (DVC reruns the stage when its input grew) with the same recipe and unchanged earlier
inputs links the previous shards into the new output (hard links: nothing is copied or edited
in place), processes only the new upstream shards into a new part, and replaces the output
atomically. ``retrain.incremental_data: false`` always redoes everything.

DVC keeps these outputs in place while the stage runs (``persist: true`` in dvc.yaml): without
it DVC deletes an output before rerunning its stage, and there would be nothing to reuse.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from .. import storage
from ..codedeps import ROOT, closure
from .shards import shard_names
from ..workspace import atomic_write_json, file_sha256

STATE = "incremental.json"
PACKAGE = Path(__file__).resolve().parent.parent        # pipeline/: recipes hash paths relative to it


def part_prefix(part: int) -> str:
    """The shard-name prefix of part ``part`` (part 0 keeps the plain ``00000.tar`` names)."""
    return "" if part == 0 else f"part{part:03d}-"


def recipe(sections: dict, module: str, extra: Optional[dict] = None) -> str:
    """Hash of config ``sections``, the source files of ``module``'s import closure (the stage's
    code: :func:`pipeline.codedeps.closure`) and ``extra`` (e.g. a model's sha256)."""
    h = hashlib.sha256(json.dumps({"config": sections, "extra": extra or {}}, sort_keys=True,
                                  default=str).encode())
    for rel in closure(module):
        f = ROOT / rel
        h.update(str(f.relative_to(PACKAGE)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:20]


def read_state(directory: Path) -> Optional[dict]:
    path = Path(directory) / STATE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_state(directory: Path, state: dict) -> None:
    atomic_write_json(Path(directory) / STATE, state)


def shard_digests(directory: Path) -> dict[str, str]:
    """name -> sha256 of ``directory``'s shards (a stored shard's from its manifest, unread)."""
    return storage.digests(directory, shard_names(directory))


def previous(directory: Path, current_recipe: str, enabled: bool,
             required: Iterable[str] = ()) -> tuple[Optional[dict], str]:
    """The state of the output in ``directory`` if a rerun may build on it, and why (not).
    ``required``: the stage's own files beside the shards that a rerun reads (its log, ...)."""
    if not enabled:
        return None, "retrain.incremental_data is false: everything is redone"
    state = read_state(directory)
    if state is None:
        return None, "no earlier output to build on"
    if state.get("recipe") != current_recipe:
        return None, "the stage's config or code changed since the earlier output: everything is redone"
    changed = storage.changed_since(directory)
    if changed:
        return None, f"the earlier output cannot be built on: {changed}; everything is redone"
    names = [name for part in state["parts"] for name in part["outputs"]] + list(required)
    stored = storage.stored_names(directory)
    missing = [name for name in names if not (Path(directory) / name).exists() and name not in stored]
    if missing:
        return None, f"the earlier output lacks {len(missing)} of its files (e.g. {missing[0]}): everything is redone"
    return state, f"{len(state['parts'])} earlier part(s) kept"


def new_inputs(state: Optional[dict], upstream: Path) -> tuple[Optional[list[Path]], dict[str, str], str]:
    """(new upstream shards or None when everything must be redone, all input digests, why).

    Earlier inputs must be unchanged: a shard that changed or vanished upstream means the earlier
    output no longer describes the upstream data.
    """
    current = shard_digests(upstream)
    if state is None:
        return None, current, ""
    before = state.get("inputs", {})
    changed = [n for n, d in before.items() if current.get(n) != d]
    if changed:
        return None, current, (f"{len(changed)} earlier input shard(s) changed upstream "
                               f"(e.g. {changed[0]}): everything is redone")
    return storage.local_shards(upstream, [n for n in current if n not in before]), current, ""


def link_outputs(state: dict, src: Path, dst: Path, extra: Iterable[str] = ()) -> None:
    """Hard-link (copy where links fail) the earlier parts' shards and ``extra`` files into ``dst``;
    those held in ``cluster.storage`` go into ``dst``'s manifest instead (storage.carry)."""
    names = [n for part in state["parts"] for n in part["outputs"]] + list(extra)
    for name in storage.carry(src, dst, names):
        target = Path(dst) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(Path(src) / name, target)
        except OSError:
            shutil.copy2(Path(src) / name, target)


def part_outputs(directory: Path, part: int) -> list[str]:
    """The names of part ``part``'s shards in ``directory`` (part 0's have no prefix)."""
    prefix = part_prefix(part)
    return [n for n in shard_names(directory) if n.startswith(prefix) and (part or "-" not in n)]


def next_part(state: Optional[dict]) -> int:
    return 0 if state is None else max(p["part"] for p in state["parts"]) + 1
