"""WebDataset shard helpers shared by crawl, filter and embed.

A shard is a POSIX tar of samples; files of one sample share a key (``000123.jpg``,
``000123.txt``, ``000123.json``, ...). Readers stream, so memory stays flat as data grows.
Writers go into a directory the caller made atomic (see ``workspace.atomic_dir``).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Callable, Iterator

import orjson

from .. import storage


class ShardError(RuntimeError):
    """A shard that cannot be read (truncated, not a tar, ...), named by path."""


def shard_names(directory: Path) -> list[str]:
    """The shards of an output folder by name, sorted: its ``*.tar`` files and, where
    ``cluster.storage`` holds them, the shards its manifest names (pipeline/storage.py)."""
    stored = [n for n in storage.stored_names(directory) if n.endswith(".tar") and "/" not in n]
    return sorted({p.name for p in Path(directory).glob("*.tar")} | set(stored))


def shard_paths(directory: Path) -> list[Path]:
    """Local paths of the shards of :func:`shard_names`: a stored one is fetched through its
    manifest (once, into the workspace's store cache, its sha256 checked)."""
    return storage.local_shards(directory, shard_names(directory))


ZERO_BLOCK = bytes(512)
# The longest member name a stage writes is <key>.txt_tokens.npy (the embed stage): ustar holds
# 100 bytes of name, so a sample key may have 100 - 15 bytes of UTF-8.
LONGEST_EXTENSION = ".txt_tokens.npy"
MAX_KEY_BYTES = 100 - len(LONGEST_EXTENSION)


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a sample key (the stem of its tar members in every stage), or None.
    A '.' would end the key early (WebDataset splits a member name at its first dot), a '/' or
    '\\' makes a path, NUL ends a tar name (the sample would vanish on reading) and other
    control characters break logs and file names."""
    if not key:
        return "it is empty"
    if any(c in key for c in "./\\"):
        return "it holds '.', '/' or '\\'"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "it holds a control character (NUL, newline, ...)"
    n = len(key.encode("utf-8", "surrogatepass"))
    if n > MAX_KEY_BYTES:
        return f"it is {n} bytes of UTF-8, over {MAX_KEY_BYTES} (tar member names hold 100, the longest extension is {LONGEST_EXTENSION})"
    return None


def tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar, in order; a damaged tar raises ShardError.

    One sequential pass over a shard read whole (shards are tens of MB): for many small
    members this is ~5x faster than tarfile, which dominated the filter and embed passes after
    the model. Handles ustar and GNU headers, pax ``path`` records and GNU long names; header
    checksums are verified, so corruption is reported, not silently mis-parsed.
    """
    path = Path(path)

    def bad(why: str) -> ShardError:
        return ShardError(f"{path}: corrupt or unreadable shard ({why})")

    try:
        data = path.read_bytes()
    except OSError as err:
        raise bad(f"{type(err).__name__}: {err}") from err
    pos, end, long_name = 0, len(data), None
    while True:
        if pos + 512 > end:
            # No end-of-archive: a shard cut off, here at a member boundary, would otherwise read
            # back as its first samples without a word (ShardSink, tarfile and tar all write it).
            raise bad(f"truncated: no end-of-archive after {pos} bytes" if pos else "empty file")
        header = data[pos:pos + 512]
        if header == ZERO_BLOCK:
            if data[pos + 512:pos + 1024] != ZERO_BLOCK:
                raise bad(f"truncated: one end-of-archive block of two at byte {pos}")
            return
        size = member_size(header, pos, bad)
        body_start = pos + 512
        pos = body_start + size + (-size % 512)
        if body_start + size > end:
            raise bad(f"truncated member at byte {body_start}")
        body = data[body_start:body_start + size]
        kind = header[156:157]
        try:
            if kind == b"x":                             # pax extended header for the next member
                for record in body.decode("utf-8").splitlines():
                    _, _, kv = record.partition(" ")
                    if kv.startswith("path="):
                        long_name = kv[5:]
                continue
            if kind == b"L":                             # GNU long name for the next member
                long_name = body.rstrip(b"\0").decode("utf-8")
                continue
            if kind not in (b"0", b"\0"):                 # directories, links, global headers
                long_name = None
                continue
            name = long_name or header[0:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix and not long_name:
                name = prefix.decode("utf-8") + "/" + name
        except UnicodeDecodeError as err:
            raise bad(f"member name at byte {body_start - 512} is not UTF-8 ({err.reason})") from None
        long_name = None
        yield name, body


def member_size(header: bytes, pos: int, bad: Callable[[str], ShardError]) -> int:
    """The body size of the tar member whose header (at byte ``pos``) is ``header``, after its
    checksum is verified; ``bad(why)`` makes the error."""
    try:
        stored = int(header[148:156].rstrip(b" \0") or b"0", 8)
        size = int(header[124:136].rstrip(b" \0") or b"0", 8)
    except ValueError:
        raise bad(f"not a tar header at byte {pos}") from None
    if not checksum_ok(header, stored):
        raise bad(f"header checksum mismatch at byte {pos}")
    return size


def checksum_ok(header: bytes, stored: int) -> bool:
    """A tar header's checksum (the sum of its 512 bytes, its own 8-byte field counted as spaces),
    compared modulo 65521 through ``zlib.adler32``, whose low half is 1 + that sum mod 65521: 5x
    faster than ``sum(header)`` (2.4 us, three times per sample on every shard read). Changing up
    to 256 of the other bytes moves the sum by at most 65280 < 65521, so that is still caught."""
    total = (zlib.adler32(header) & 0xFFFF) - 1 - sum(header[148:156]) + 8 * 32
    return (total - stored) % 65521 == 0


def iter_shard(path: Path) -> Iterator[dict]:
    """Samples of one shard as dicts of raw bytes plus ``__key__`` and ``__shard__``.

    WebDataset's grouping: a sample is the run of consecutive files sharing a key, the key
    being the path up to the first dot of the file name (``a/000123.img_emb.npy`` -> key
    ``a/000123``, extension ``img_emb.npy``).
    """
    path = Path(path)
    sample: dict = {}
    for name, body in tar_members(path):
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot < 0:
            continue                                      # no extension: not part of a sample
        key, ext = name[:dot], name[dot + 1:].lower()
        if sample and (key != sample["__key__"] or ext in sample):
            yield sample
            sample = {}
        if not sample:
            sample = {"__key__": key, "__shard__": path.name, "__url__": str(path)}
        sample[ext] = body
    if sample:
        yield sample


def iter_samples(paths: list[Path]) -> Iterator[dict]:
    for p in paths:
        yield from iter_shard(p)


def count_samples(path: Path) -> int:
    """Number of samples in one shard, grouped exactly as :func:`iter_shard` groups them."""
    return sum(1 for _ in iter_shard(path))


_USTAR_MODE_IDS = b"0000444\0" + b"0000000\0" * 2          # mode, uid, gid
_USTAR_TAIL = (b"0" + bytes(100) + b"ustar\x0000").ljust(512 - 156, b"\0")   # type, linkname, magic...
_USTAR_MTIME = b"%011o\0" % 0
_USTAR_CONST_SUM = sum(_USTAR_MODE_IDS) + sum(_USTAR_MTIME) + 8 * 32 + sum(_USTAR_TAIL)
_EXT_BYTES: dict[str, tuple[bytes, int]] = {}             # extension -> (its bytes, their sum)


def ustar_header(name: str | bytes, size: int, name_sum: int | None = None) -> bytes:
    """A POSIX ustar header block (512 bytes) for a regular, read-only file.

    Assembled from constant pieces; the checksum (sum of the header's bytes, its own field
    counted as spaces) is the constant part's sum plus the name's (``name_sum`` when the caller
    knows it) and the size field's.
    """
    encoded = name.encode("utf-8") if isinstance(name, str) else name
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {encoded.decode('utf-8', 'replace')!r}")
    if size >= 8 ** 11:
        raise ValueError(f"tar member {encoded.decode('utf-8', 'replace')!r} too large for ustar ({size} bytes)")
    size_field = b"%011o\0" % size
    checksum = _USTAR_CONST_SUM + (sum(encoded) if name_sum is None else name_sum) + sum(size_field)
    return b"".join((encoded.ljust(100, b"\0"), _USTAR_MODE_IDS, size_field, _USTAR_MTIME,
                     b"%06o\0 " % checksum, _USTAR_TAIL))


class ShardSink:
    """Write samples into ``directory/{prefix}{index:05d}.tar``, ``shard_size`` per shard.

    A sample is a dict: ``__key__`` plus one ``bytes`` (or ``str``) value per extension; keys
    starting with ``__`` (webdataset's ``__url__``, ...) are not written. The tar is written
    directly (ustar headers built here, not by ``tarfile``): for shards of many small members,
    ``tarfile`` header creation was the embed stage's largest cost after the model itself
    (0.33 ms per 8-member sample, bench/embed.py). Files are read back by webdataset/tarfile.
    """

    def __init__(self, directory: Path, shard_size: int, prefix: str = ""):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size, self.prefix = shard_size, prefix
        self.count, self.shards, self._file, self._in_shard = 0, 0, None, 0

    def _next_shard(self) -> None:
        self._close_shard()
        # A 1 MiB buffer: a sample (~12 kB in the embed stage) is then not a system call of its own.
        self._file = open(self.directory / f"{self.prefix}{self.shards:05d}.tar", "wb", buffering=1 << 20)
        self.shards += 1
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.write(b"\0" * 1024)                   # end-of-archive: two zero blocks
            self._file.close()
            self._file = None

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        if self._file is None or self._in_shard >= self.shard_size:
            self._next_shard()
        # Per member only the extension and the size vary: the key's bytes and their checksum
        # share (the embed stage writes 7 members per sample, ~1.5 us saved on each).
        stem = key.encode("utf-8") + b"."
        stem_sum = sum(stem)
        parts = []
        for ext, value in sample.items():
            if ext[:2] == "__":
                continue
            data = value.encode("utf-8") if isinstance(value, str) else value
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"sample {key!r}: {ext} must be bytes or str, got {type(value).__name__}")
            suffix = _EXT_BYTES.get(ext)
            if suffix is None:
                suffix = _EXT_BYTES[ext] = (ext.encode("utf-8"), sum(ext.encode("utf-8")))
            parts += [ustar_header(stem + suffix[0], len(data), stem_sum + suffix[1]),
                      data, ZERO_BLOCK[:-len(data) % 512]]
        self._file.write(b"".join(parts))
        self._in_shard += 1
        self.count += 1

    def close(self) -> None:
        self._close_shard()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def loads_json(text: str | bytes):
    """orjson (3.5 vs 12 us for a sample's metadata here); the standard library for what orjson
    refuses but Python writes, e.g. the ``NaN`` of a missing value in a user's URL list."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def sample_meta(sample: dict) -> dict:
    """A sample's ``json`` as a dict, its ``gt`` (ground truth, stored as a JSON string) decoded."""
    raw = sample.get("json")
    meta = loads_json(raw) if raw else {}
    if isinstance(meta.get("gt"), str):
        meta["gt"] = loads_json(meta["gt"])
    return meta


def split_of(meta: dict) -> str:
    """The split a sample's metadata names; samples without one count as train."""
    return meta.get("split") or "train"
