"""CLIP's training batches: (uint8 images, tokens) from the train split of the filtered shards.

Each shard's train samples are decoded (OpenCV, ``image_shards.decode_images``), tokenized and
given their hard negatives once per pass over the data, into a rolling buffer of whole shards
(:mod:`pipeline.data.shard_buffer`); a step draws random indices from it. CLIP sees each image
about 13 times on the default profile, and streaming decoded, parsed and tokenized every sample
again in a DataLoader worker, which on 2 cores takes its CPU from the training step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from ..data.image_shards import decode_images, require_train_samples
from ..data.shard_buffer import buffered_batches
from ..data.shards import count_samples, iter_shard, sample_meta, split_of
from .negatives import hard_negatives

BUFFER_BYTES = 512 * 2**20     # decoded images held at most (16 shards of 2,500 at 64 px; 1 shard at 224 px)


def read_part(path: Path, tokenize: Callable[[list[str]], torch.Tensor], image_size: int,
              negatives: tuple[str, ...] = ()) -> dict:
    """One shard's train samples: ``images`` uint8 [n, 3, S, S], ``tokens`` [n, L]; with
    ``negatives`` also ``negatives`` [n, K, L] and ``negative_mask`` [n, K] bool."""
    blobs, captions = [], []
    for s in iter_shard(path):
        if split_of(sample_meta(s)) == "train":
            blobs.append(s["jpg"])
            captions.append(s["txt"].decode("utf-8"))
    if not blobs:
        return {"n": 0}
    part = {"images": decode_images(blobs, image_size), "tokens": tokenize(captions), "n": len(blobs)}
    if negatives:
        texts, mask = hard_negatives(captions, negatives)
        part |= {"negatives": tokenize(texts).view(len(captions), len(negatives), -1), "negative_mask": mask}
    return part


def train_batches(paths: list[Path], tokenize: Callable[[list[str]], torch.Tensor], batch_size: int,
                  seed: int, image_size: int, negatives: tuple[str, ...] = (),
                  buffer_bytes: int = BUFFER_BYTES) -> Iterator[tuple]:
    """Endless (uint8 images [B, 3, S, S], tokens [B, L]) from the train split; with
    ``negatives`` (kinds of :mod:`.negatives`) also (negative tokens [B, K, L], mask [B, K] bool).
    At most ``buffer_bytes`` of decoded images are resident (at least one shard)."""
    require_train_samples(paths)         # a StageError naming the splits found, before any decoding
    per_shard = max(1, count_samples(paths[0])) * 3 * image_size ** 2
    fields = ("images", "tokens", "negatives", "negative_mask") if negatives else ("images", "tokens")
    batches = buffered_batches(paths, lambda p: read_part(p, tokenize, image_size, negatives), set(fields),
                               batch_size, seed=seed, buffer_shards=max(1, buffer_bytes // per_shard))
    return (tuple(b[k] for k in fields) for b in batches)
