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

With ``variants`` V > 1 (1 + ``embed.rewrites``) a train sample's text fields are its caption's
and its language rewrites' (``rw_*.npy``, written by the embed stage): ``z_t`` [n, V, D],
``tokens`` [n, V, L, W], ``mask`` [n, V, L]; a sample with fewer rewrites (a caption the rewrites
could not read) repeats its caption's. Training batches take one of them per sample.
"""
from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .image_shards import decode_images
from .shard_buffer import buffered_batches, concat, one_variant_per_sample
from .shards import iter_shard, sample_meta, split_of
from ..images import resize, to_uint8, to_model

ARRAYS = {"z_i": "img_emb.npy", "z_t": "txt_emb.npy", "tokens": "txt_tokens.npy", "mask": "txt_mask.npy"}
REWRITES = {"z_t": "rw_emb.npy", "tokens": "rw_tokens.npy", "mask": "rw_mask.npy"}   # [k, ...] each


def _npy_stack(blobs: list[bytes]) -> np.ndarray:
    """Same-shape .npy payloads -> one array [n, ...]; the header is parsed once."""
    first = np.load(io.BytesIO(blobs[0]))
    nbytes = first.nbytes
    buf = b"".join(b[len(b) - nbytes:] for b in blobs)
    return np.frombuffer(buf, dtype=first.dtype).reshape(len(blobs), *first.shape)


def _with_rewrites(caption: np.ndarray, rewrites: list[Optional[bytes]], variants: int) -> np.ndarray:
    """[n, ...] caption rows and each sample's rewrite rows (.npy [k, ...], or None) -> [n, V, ...]."""
    out = np.repeat(caption[:, None], variants, axis=1)
    have = [i for i, b in enumerate(rewrites) if b is not None]
    if have:
        rw = _npy_stack([rewrites[i] for i in have])                       # [m, k, ...]
        k = min(rw.shape[1], variants - 1)
        out[have, 1:1 + k] = rw[:, :k]
    return out


def read_shard(path: Path, split: Optional[str] = "train", image_size: Optional[int] = None,
               limit: Optional[int] = None, variants: int = 1, float_tokens: bool = True) -> dict:
    """One embedding shard's samples of ``split`` (None = all) as tensors; with ``variants`` > 1
    the text fields of the caption and its rewrites (see the module's doc). ``float_tokens=False``
    keeps ``tokens`` in the dtype they were stored in (float16 by default: half the memory)."""
    rows: dict[str, list] = {k: [] for k in (*ARRAYS, "jpg", "captions", "gt", "keys")}
    rewrite_rows: dict[str, list] = {k: [] for k in REWRITES} if variants > 1 else {}
    for s in iter_shard(path):
        meta = sample_meta(s)
        if split is not None and split_of(meta) != split:
            continue
        for field, ext in ARRAYS.items():
            if ext not in s:
                raise ValueError(f"{path}: sample {s['__key__']} has no {ext}; is this an embed-stage shard?")
            rows[field].append(s[ext])
        for field in rewrite_rows:
            rewrite_rows[field].append(s.get(REWRITES[field]))
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
        arr = _npy_stack(rows[field])
        if field in rewrite_rows:
            arr = _with_rewrites(arr, rewrite_rows[field], variants)
        arr = torch.from_numpy(arr.copy())
        out[field] = arr if field == "mask" or (field == "tokens" and not float_tokens) else arr.float()
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
                  fields: tuple[str, ...] = ("z_i", "z_t", "tokens", "mask"), variants: int = 1) -> Iterator[dict]:
    """Endless random batches of the train split (dicts of ``fields`` tensors, + ``images`` with
    an ``image_size``) from a rolling buffer of ``buffer_shards`` shards (:mod:`.shard_buffer`).

    Process ``rank`` of ``world`` reads its own shards when there are enough to go round, else
    all of them with its own seed. With ``buffer_shards`` >= the shard count everything is
    read once and stays in memory. With ``variants`` V > 1 (1 + ``embed.rewrites``) each sample's
    text fields (z_t, tokens, mask) are its caption's or one of its rewrites', drawn uniformly
    per sample and step; with 1 the batches are those of captions alone. The buffer holds the
    tokens as stored (float16 by default); batches give them in float32.
    """
    if not paths:
        raise ValueError("no embedding shards: run the embed stage first")
    want = set(fields) | ({"images"} if image_size else set())

    def read(path: Path) -> dict:
        part = read_shard(path, "train", image_size, variants=variants, float_tokens=False)
        return {k: v for k, v in part.items() if k in want} | {"n": part["n"]}

    batches = buffered_batches(paths, read, want, batch_size, seed=seed, rank=rank, world=world,
                               buffer_shards=buffer_shards, empty="the embedding shards hold no train-split samples")
    if variants > 1:
        # its own stream: a generator seeded like the buffer's would tie each sample's variant to its index
        pick = torch.Generator().manual_seed(zlib.crc32(f"embedding rewrites {seed} {rank}".encode()))
        batches = one_variant_per_sample(batches, want & set(REWRITES), variants, pick)
    return (b | {"tokens": b["tokens"].float()} if "tokens" in b else b for b in batches)
