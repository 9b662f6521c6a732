"""Large outputs on shared storage (``cluster.storage``): objects under an fsspec root, a manifest
in the workspace that DVC versions in their place.

DVC 3 no longer caches outputs outside the workspace, so a stage cannot list ``s3://...`` as an
out. With ``cluster.storage`` set (``s3://bucket/unclip``, ``gs://``, ``hdfs://``, ``file:///mnt/x``
or a plain path), the data stages still build their output folder in the workspace as always
(``data/raw``, ``data/filtered``, ``data/embeddings``, replaced in one rename), but just before
that rename :func:`publish` moves the folder's large files (the ones ``incremental.json`` lists
as its parts' outputs: the shards, embed's clip-retrieval triples) to the root and writes
``MANIFEST.json`` in their place::

    {"format": "unclip-manifest/1", "root": "s3://bucket/unclip",
     "objects": {"00000.tar": {"path": "data/raw/9f86d081884c7d65/00000.tar",
                               "size": 1234, "sha256": "9f86..."}}}

``path`` is relative to ``root``; its folder is the first 16 hex digits of the content's sha256,
so an object's path names its bytes: a rerun that makes the same bytes makes the same manifest
(DVC then finds nothing changed downstream), objects are never rewritten with other bytes, and an
older manifest that ``dvc checkout`` restores still names objects that exist. ``stamp`` is what
the store itself says identifies the version (its ETag or md5, else the mtime). The renamed
folder is the commit point: a stage killed before it leaves objects no manifest names.

dvc.yaml is the same whatever ``cluster.storage`` says: its out is the folder, which holds the
shards (no storage) or the manifest and the small files (log, drops, state). DVC hashes the
manifest, so a changed manifest reruns the stages downstream. What DVC cannot see is an object
changed or deleted in the store behind a manifest: :func:`check_workspace` (run by ``unclip
config --write``, the first stage of every ``dvc repro``, by ``unclip run`` and by ``unclip
storage check``) lists each manifest's objects and, where one is missing or differs, writes
``STORE_CHANGED.json`` into that folder: DVC then sees the stage's output modified and reruns it,
and the stage, finding the marker, redoes its output instead of building on it.

Readers go through the manifest: :func:`local_shards` fetches each named object once (an fsspec
read, its sha256 checked against the manifest) into the workspace's content-addressed
``.unclip/store-cache/`` and returns local paths, so every reader (webdataset, DataLoader workers)
works unchanged. Without a manifest a folder is read as it is: the default is today's layout.

Training checkpoints go to ``<storage>/checkpoints`` (:func:`checkpoint_root`); on an object
store they are read and written through fsspec (:class:`Url`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Union

from .errors import StageError
# Url, location, root_url: what a storage root is (in workspace.py, which Workspace.checkpoints needs)
from .workspace import (Location, Url, atomic_dir, atomic_write_bytes, atomic_write_json,  # noqa: F401
                        dir_size, file_sha256, location, root_url)

MANIFEST = "MANIFEST.json"
CHANGED = "STORE_CHANGED.json"
FORMAT = "unclip-manifest/1"
CACHE = Path(".unclip") / "store-cache"         # relative to the workspace
STAMPS = Path(".unclip") / "store-stamps.json"  # object URL -> the stamp its sha256 last matched at
STAMP_KEYS = ("ETag", "etag", "md5Hash", "md5", "mtime", "created")
# Object stores publish a PUT whole or not at all; elsewhere (file://, hdfs://) an object is
# written beside its name and moved onto it.
ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "abfs", "az", "memory"}
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "az": "adlfs",
            "hdfs": "pyarrow with libhdfs (a Hadoop client: JAVA_HOME, HADOOP_HOME, "
                    "CLASSPATH=$(hadoop classpath --glob))"}


def filesystem(url: str):
    """(fsspec filesystem, path within it) of ``url``; a protocol whose implementation is not
    installed is a StageError naming the package."""
    import fsspec
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise StageError(f"cluster.storage {url!r}: the {protocol}:// filesystem is not installed: "
                         f"pip install {PACKAGES.get(protocol, 'its fsspec implementation')} ({err})") from None
    except ValueError as err:
        raise StageError(f"cluster.storage {url!r}: {err} (fsspec knows no such protocol)") from None
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageError(f"cluster.storage {url!r}: the {protocol}:// filesystem does not start ({first}); it "
                         f"needs {PACKAGES.get(protocol, 'its client libraries')}") from None


def protocol_of(fs) -> str:
    p = fs.protocol
    return p if isinstance(p, str) else p[0]


def join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stamp(info: dict) -> Optional[str]:
    for key in STAMP_KEYS:
        if info.get(key) is not None:
            return f"{key}:{info[key]}"
    return None


def write_object(fs, path: str, data_or_file: Union[bytes, Path]) -> None:
    """``path`` holds the bytes (or the local file) whole, or is left as it was."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    target = path if protocol_of(fs) in ATOMIC_PUT else f"{path}.tmp-{os.getpid()}"
    try:
        if isinstance(data_or_file, Path):
            fs.put_file(str(data_or_file), target)
        else:
            fs.pipe_file(target, data_or_file)
        if target != path:
            fs.mv(target, path)
    except BaseException:
        if target != path and fs.exists(target):
            fs.rm_file(target)
        raise


# ---- the manifest ---------------------------------------------------------------------------------
def read_manifest(directory: Path) -> Optional[dict]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise StageError(f"{path}: not a manifest this version reads (format {manifest.get('format')!r})")
    return manifest


def write_manifest(directory: Path, root: str, objects: dict) -> None:
    atomic_write_json(Path(directory) / MANIFEST, {"format": FORMAT, "root": root, "objects": objects})


def stored_names(directory: Path) -> dict[str, dict]:
    """The manifest's objects of ``directory`` (name -> entry); {} without a manifest."""
    manifest = read_manifest(directory)
    return manifest["objects"] if manifest else {}


def output_bytes(directory: Path) -> int:
    """The size of an output: its files plus the objects its manifest names in the store."""
    local = {str(p.relative_to(directory)) for p in Path(directory).rglob("*") if p.is_file()}
    return dir_size(directory) + sum(e["size"] for n, e in stored_names(directory).items() if n not in local)


def upload(fs, base: str, rel_dir: str, local: Path, name: str) -> dict:
    """``local`` (the output's file ``name``) as ``<root>/<rel_dir>/<sha256[:16]>/<name>``; its
    manifest entry."""
    digest = file_sha256(local)
    rel = f"{rel_dir}/{digest[:16]}/{name}"
    write_object(fs, join(base, rel), local)
    info = fs.info(join(base, rel))
    if info["size"] != local.stat().st_size:
        raise StageError(f"{join(base, rel)}: the store holds {info['size']} bytes after the upload of "
                         f"{local.stat().st_size}")
    return {"path": rel, "size": int(info["size"]), "sha256": digest}


def object_names(out: Path) -> list[str]:
    """What a data stage's output calls its large files: its parts' outputs in ``incremental.json``
    (pipeline/data/incremental.py; read here as a file, so that storage imports no stage code)."""
    path = Path(out) / "incremental.json"
    if not path.exists():
        return []
    return [n for part in json.loads(path.read_text())["parts"] for n in part["outputs"]]


def publish(out: Path, rel_dir: str, storage: Optional[str]) -> Optional[dict]:
    """Before ``out`` (the stage's finished temp folder) is renamed into place: its large files to
    ``storage`` and ``MANIFEST.json`` in their place (None: objects an earlier manifest named are
    fetched back, and the folder is as it always was). Returns the manifest's objects, or None."""
    root = root_url(storage)
    carried = read_manifest(out)
    if root is None and carried is None:
        return None
    names = object_names(out)
    for name in names:                 # carried from another root (or none now): the bytes come here
        if (not (out / name).exists() and carried and name in carried["objects"]
                and (root is None or carried["root"] != root)):
            fetch(carried["root"], carried["objects"][name], out / name)
    if root is None:
        (out / MANIFEST).unlink()
        return None
    fs, base = filesystem(root)
    objects = {}
    for name in names:
        local = out / name
        if local.exists():
            objects[name] = upload(fs, base, rel_dir, local, name)
        elif carried and name in carried["objects"]:
            objects[name] = carried["objects"][name]
        else:
            raise StageError(f"{rel_dir}: {name} is one of the output's files but neither written nor in the "
                             f"earlier {MANIFEST}")
    for name in names:
        (out / name).unlink(missing_ok=True)
    for sub in sorted({(out / n).parent for n in names} - {out}, reverse=True):
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    write_manifest(out, root, objects)
    return objects


@contextlib.contextmanager
def stage_output(storage: Optional[str], ws, final: Path) -> Iterator[Path]:
    """:func:`pipeline.workspace.atomic_dir` of a data stage's output folder, :func:`publish` ed
    to ``storage`` before the rename. A root whose filesystem is not installed fails here, before
    the stage's work."""
    if storage is not None:
        filesystem(root_url(storage))
    with atomic_dir(final) as out:
        yield out
        publish(out, str(Path(final).relative_to(ws.root)), storage)


def carry(src: Path, dst: Path, names: list[str]) -> list[str]:
    """The entries of ``names`` in ``src``'s manifest into ``dst``'s (partial) manifest, for
    :func:`publish` to keep; returns the names that were not in it."""
    manifest = read_manifest(src)
    if manifest is None:
        return list(names)
    have = {n: manifest["objects"][n] for n in names if n in manifest["objects"]}
    if have:
        mine = read_manifest(dst)
        write_manifest(dst, manifest["root"], {**(mine["objects"] if mine else {}), **have})
    return [n for n in names if n not in have]


# ---- reading through the manifest ------------------------------------------------------------------
def fetch(root: str, entry: dict, target: Path) -> Path:
    """The object of a manifest entry into ``target`` (atomically), its sha256 checked."""
    fs, base = filesystem(root)
    url = join(base, entry["path"])
    try:
        data = fs.cat_file(url)
    except FileNotFoundError:
        raise StageError(f"{root}/{entry['path']} is gone from the store ({MANIFEST} names it): rerun the "
                         f"stage that wrote it (`unclip storage check` marks it stale for DVC)") from None
    if sha256_bytes(data) != entry["sha256"]:
        raise StageError(f"{root}/{entry['path']} changed in the store since {MANIFEST} recorded it (sha256 "
                         f"{sha256_bytes(data)[:16]}, not {entry['sha256'][:16]}): rerun the stage that wrote it")
    atomic_write_bytes(target, data)
    return target


def cache_dir(directory: Path) -> Path:
    """The workspace's store cache, for an output folder ``<workspace>/data/<name>``."""
    return Path(directory).resolve().parent.parent / CACHE


def local_shards(directory: Path, names: list[str]) -> list[Path]:
    """Local paths of shards ``names`` of ``directory``: the folder's own files, else the manifest's
    objects fetched (once) into the store cache, ``<cache>/<sha256>/<name>``."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    paths = []
    for name in names:
        entry = manifest["objects"].get(name) if manifest else None
        if entry is None or (directory / name).exists():
            paths.append(directory / name)
            continue
        cached = cache_dir(directory) / entry["sha256"] / Path(name).name
        if not (cached.exists() and cached.stat().st_size == entry["size"]):
            fetch(manifest["root"], entry, cached)
        paths.append(cached)
    return paths


def digests(directory: Path, names: list[str]) -> dict[str, str]:
    """name -> sha256 of shards ``names``: the manifest's record, else the local file's."""
    stored = stored_names(directory)
    return {n: stored[n]["sha256"] if n in stored and not (Path(directory) / n).exists()
            else file_sha256(Path(directory) / n) for n in names}


# ---- what DVC cannot see: the store behind a manifest ------------------------------------------------
def check(directory: Path) -> list[str]:
    """What no longer matches ``directory``'s manifest in the store, one line per object: missing,
    another size, or other bytes (read only when its stamp is not the one last seen to match)."""
    manifest = read_manifest(directory)
    if manifest is None:
        return []
    fs, base = filesystem(manifest["root"])
    listed: dict[str, dict] = {}
    for top in {e["path"].split("/", 1)[0] for e in manifest["objects"].values()}:
        if fs.exists(join(base, top)):          # one listing per folder, not a request per object
            listed.update({fs._strip_protocol(p): i for p, i in fs.find(join(base, top), detail=True).items()})
    stamps_path = Path(directory).resolve().parent.parent / STAMPS
    stamps = json.loads(stamps_path.read_text()) if stamps_path.exists() else {}
    problems, seen = [], dict(stamps)
    for name, entry in sorted(manifest["objects"].items()):
        url = join(base, entry["path"])
        info = listed.get(fs._strip_protocol(url))
        if info is None:
            problems.append(f"{name}: {entry['path']} is missing")
        elif int(info["size"]) != entry["size"]:
            problems.append(f"{name}: {entry['path']} holds {info['size']} bytes, not {entry['size']}")
        elif stamp(info) is None or stamps.get(url) != stamp(info):
            if sha256_bytes(fs.cat_file(url)) != entry["sha256"]:
                problems.append(f"{name}: {entry['path']} holds other bytes")
            elif stamp(info) is not None:
                seen[url] = stamp(info)
    if seen != stamps:
            atomic_write_json(stamps_path, seen)
    return problems


def check_workspace(ws) -> dict[str, list[str]]:
    """:func:`check` of every data output with a manifest; a folder with problems gets
    ``STORE_CHANGED.json`` (so DVC reruns its stage), written only when the problems differ from
    the last check's. Returns {folder: problems} for the folders with any."""
    found = {}
    for directory in (ws.raw, ws.filtered, ws.embeddings):
        problems = check(directory)
        if not problems:
            continue
        found[str(directory.relative_to(ws.root))] = problems
        marker = directory / CHANGED
        if not marker.exists() or json.loads(marker.read_text()).get("problems") != problems:
            atomic_write_json(marker, {"problems": problems, "why": "objects under cluster.storage no longer match "
                                       f"{MANIFEST}: the stage that wrote them reruns"})
    return found


def changed_since(directory: Path) -> Optional[str]:
    """Why the output in ``directory`` cannot be built on (its objects changed in the store), or None."""
    marker = Path(directory) / CHANGED
    if not marker.exists():
        return None
    problems = json.loads(marker.read_text()).get("problems", [])
    return f"{len(problems)} of its objects changed in the store (e.g. {problems[0] if problems else '?'})"


# ---- checkpoints ---------------------------------------------------------------------------------------
def checkpoint_root(storage: Optional[str], ws) -> Location:
    """``<storage>/checkpoints`` (a Path on a local root, else a :class:`Url`), else the workspace's."""
    if storage is None:
        return ws.root / ".unclip" / "checkpoints"
    url = root_url(storage)
    filesystem(url)                              # a missing implementation fails here, before training
    return location(url) / "checkpoints"


def read_url(url: str) -> Optional[bytes]:
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def write_url(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    write_object(fs, path, data)


def remove_urls(directory: str, suffixes: tuple[str, ...]) -> None:
    """Remove the files directly under ``directory`` whose name ends with one of ``suffixes``."""
    fs, path = filesystem(directory)
    if not fs.exists(path):
        return
    for p in fs.ls(path, detail=False):
        if p.rsplit("/", 1)[-1].endswith(suffixes):
            fs.rm_file(p)


def move_url(src: str, dst: str) -> None:
    fs, path = filesystem(src)
    fs.mv(path, filesystem(dst)[1])

