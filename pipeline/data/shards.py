"""WebDataset shard helpers shared by crawl, filter and embed.

A shard is a POSIX tar of samples; files of one sample share a key (``000123.jpg``,
``000123.txt``, ``000123.json``, ...). Readers stream, so memory stays flat as data grows.
Writers go into a directory the caller made atomic (see ``workspace.atomic_dir``).
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

import webdataset as wds


class ShardError(RuntimeError):
    """A shard that cannot be read (truncated, not a tar, ...), named by path."""


def shard_paths(directory: Path) -> list[Path]:
    paths = sorted(Path(directory).glob("*.tar"))
    return paths


def iter_shard(path: Path) -> Iterator[dict]:
    """Samples of one shard as dicts of raw bytes plus ``__key__`` (and ``__shard__``).

    A corrupt shard raises :class:`ShardError` naming it instead of a bare tarfile error.
    """
    path = Path(path)
    try:
        ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
        for sample in ds:
            sample["__shard__"] = path.name
            yield sample
    except (tarfile.TarError, OSError, ValueError, EOFError) as err:
        raise ShardError(f"{path}: corrupt or unreadable shard ({type(err).__name__}: {err})") from err


def iter_samples(paths: list[Path]) -> Iterator[dict]:
    for p in paths:
        yield from iter_shard(p)


def count_samples(path: Path) -> int:
    """Number of distinct keys in one shard (cheap: reads tar headers only)."""
    keys = set()
    try:
        with tarfile.open(path) as tf:
            for member in tf:
                if member.isfile():
                    keys.add(member.name.rsplit("/", 1)[-1].split(".", 1)[0])
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"{path}: corrupt or unreadable shard ({type(err).__name__}: {err})") from err
    return len(keys)


class ShardSink:
    """Write samples into ``directory/{prefix}{index:05d}.tar``, ``shard_size`` per shard."""

    def __init__(self, directory: Path, shard_size: int, prefix: str = ""):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.writer = wds.ShardWriter(str(self.directory / f"{prefix}%05d.tar"), maxcount=shard_size, verbose=0)
        self.count = 0

    def write(self, sample: dict) -> None:
        self.writer.write(sample)
        self.count += 1

    def close(self) -> None:
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def decode_json(sample: dict, key: str = "json") -> dict:
    value = sample.get(key)
    if value is None:
        return {}
    return json.loads(value.decode() if isinstance(value, bytes) else value)


def decode_text(sample: dict, key: str = "txt") -> str:
    value = sample.get(key, b"")
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
