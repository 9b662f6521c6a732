"""Reading the embed stage's shards for the prior and the decoder.

Training draws random batches from a buffer of whole shards decoded into tensors
(:mod:`.shard_buffer`, shared with CLIP's training batches): shards are
read in a seeded random order (each process its own share), ``buffer_shards`` at a time, and
the buffer rolls over as samples are drawn, so memory stays flat however large the data set,
and a step costs a tensor index instead of per-sample tar parsing and npy decoding (which
would cost more than the prior's whole training step on CPU). Evaluation splits load whole.

Fields (tensor shapes for n samples): ``z_i`` [n, D] and ``z_t`` [n, D] float32 (unit norm),
``tokens`` [n, L, W] float32, ``mask`` [n, L] bool, ``images`` uint8 [n, 3, S, S] (when an
``image_size`` is asked for), plus the lists ``captions`` and ``gt``.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .image_shards import decode_images
from .shard_buffer import buffered_batches, concat
from .shards import iter_shard, sample_meta, split_of
from ..images import resize, to_uint8, to_model

ARRAYS = {"z_i": "img_emb.npy", "z_t": "txt_emb.npy", "tokens": "txt_tokens.npy", "mask": "txt_mask.npy"}


def _npy_stack(blobs: list[bytes]) -> np.ndarray:
    """Same-shape .npy payloads -> one array [n, ...]; the header is parsed once."""
    first = np.load(io.BytesIO(blobs[0]))
    nbytes = first.nbytes
    buf = b"".join(b[len(b) - nbytes:] for b in blobs)
    return np.frombuffer(buf, dtype=first.dtype).reshape(len(blobs), *first.shape)


def read_shard(path: Path, split: Optional[str] = "train", image_size: Optional[int] = None,
               limit: Optional[int] = None) -> dict:
    """One embedding shard's samples of ``split`` (None = all) as tensors."""
    rows: dict[str, list] = {k: [] for k in (*ARRAYS, "jpg", "captions", "gt", "keys")}
    for s in iter_shard(path):
        meta = sample_meta(s)
        if split is not None and split_of(meta) != split:
            continue
        for field, ext in ARRAYS.items():
            if ext not in s:
                raise ValueError(f"{path}: sample {s['__key__']} has no {ext}; is this an embed-stage shard?")
            rows[field].append(s[ext])
        rows["jpg"].append(s["jpg"])
        rows["captions"].append(s["txt"].decode("utf-8"))
        rows["gt"].append(meta.get("gt"))
        rows["keys"].append(s["__key__"])
        if limit and len(rows["keys"]) >= limit:
            break
    out: dict = {"captions": rows["captions"], "gt": rows["gt"], "keys": rows["keys"]}
    if not rows["keys"]:
        return out | {"n": 0}
    for field in ARRAYS:
        arr = torch.from_numpy(_npy_stack(rows[field]).copy())
        out[field] = arr if field == "mask" else arr.float()
    if image_size:
        images = decode_images(rows["jpg"], max(image_size, 1))
        out["images"] = images if images.shape[-1] == image_size else to_uint8(resize(to_model(images), image_size))
    return out | {"n": len(rows["keys"])}


def load_split(paths: list[Path], split: str, image_size: Optional[int] = None, limit: Optional[int] = None) -> dict:
    """A held-out split in memory (val/test are small)."""
    parts, n = [], 0
    for p in paths:
        part = read_shard(p, split, image_size, None if limit is None else limit - n)
        parts.append(part)
        n += part["n"]
        if limit and n >= limit:
            break
    return concat(parts)


def train_batches(paths: list[Path], batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                  image_size: Optional[int] = None, buffer_shards: int = 16,
                  fields: tuple[str, ...] = ("z_i", "z_t", "tokens", "mask")) -> Iterator[dict]:
    """Endless random batches of the train split (dicts of ``fields`` tensors, + ``images`` with
    an ``image_size``) from a rolling buffer of ``buffer_shards`` shards (:mod:`.shard_buffer`).

    Process ``rank`` of ``world`` reads its own shards when there are enough to go round, else
    all of them with its own seed. With ``buffer_shards`` >= the shard count everything is
    read once and stays in memory.
    """
    if not paths:
        raise ValueError("no embedding shards: run the embed stage first")
    want = set(fields) | ({"images"} if image_size else set())

    def read(path: Path) -> dict:
        part = read_shard(path, "train", image_size)
        return {k: v for k, v in part.items() if k in want} | {"n": part["n"]}

    return buffered_batches(paths, read, want, batch_size, seed=seed, rank=rank, world=world,
                            buffer_shards=buffer_shards, empty="the embedding shards hold no train-split samples")
