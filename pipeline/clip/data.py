"""CLIP's training batches: (uint8 images, tokens) from the train split of the filtered shards.

Each shard's train samples are decoded (OpenCV, ``image_shards.decode_images``), tokenized and
given their hard negatives once per pass over the data, into a rolling buffer of whole shards
(:mod:`pipeline.data.shard_buffer`); a step draws random indices from it. With ``rewrites`` k > 0
each caption comes with k language rewrites (:mod:`.rewrites`), tokenized beside it, and a step
takes one of the 1 + k at random per sample (LaCLIP), with that text's hard negatives. CLIP sees
each image about 13 times on the default profile, and streaming decoded, parsed and tokenized every sample
again in a DataLoader worker, which on 2 cores takes its CPU from the training step.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..data.image_shards import decode_images, require_train_samples
from ..data.shard_buffer import buffered_batches, one_variant_per_sample
from ..data.shards import count_samples, iter_shard, sample_meta, split_of
from .negatives import hard_negatives
from .rewrites import rewrites as rewrite_caption

BUFFER_BYTES = 512 * 2**20     # decoded images held at most (16 shards of 2,500 at 64 px; 1 shard at 224 px)


def caption_variants(captions: list[str], rewrites: int, seed: int, pronoun_first: bool = False) -> list[str]:
    """Each caption then its ``rewrites`` language rewrites: [n * (1 + rewrites)] texts, caption-major."""
    return [t for c in captions for t in (c, *rewrite_caption(c, rewrites, seed, pronoun_first))]


def read_part(path: Path, tokenize: Callable[[list[str]], torch.Tensor], image_size: int,
              negatives: tuple[str, ...] = (), rewrites: int = 0, seed: int = 0,
              stats: Optional[dict] = None, pronoun_first: bool = False) -> dict:
    """One shard's train samples: ``images`` uint8 [n, 3, S, S], ``tokens`` [n, V, L] (V = 1 +
    ``rewrites``: the caption, then its rewrites); with ``negatives`` also ``negatives`` [n, V, K, L] and
    ``negative_mask`` [n, V, K] bool. A rewrite that fills the whole context (it might be cut) is
    replaced by its caption. ``stats`` counts ``captions`` and ``rewritten`` (read by the rewrites)."""
    blobs, captions = [], []
    for s in iter_shard(path):
        if split_of(sample_meta(s)) == "train":
            blobs.append(s["jpg"])
            captions.append(s["txt"].decode("utf-8"))
    if not blobs:
        return {"n": 0}
    n, v = len(blobs), 1 + rewrites
    texts = caption_variants(captions, rewrites, seed, pronoun_first)
    tokens = tokenize(texts).view(n, v, -1)                          # [n, V, L]
    # a variant that fills the context may be cut: its caption's row instead (every field alike)
    variant = (torch.where(tokens[:, :, -1] != 0, 0, torch.arange(v)) + v * torch.arange(n)[:, None]).view(-1)
    part = {"images": decode_images(blobs, image_size), "n": n,
            "tokens": tokens.view(n * v, -1)[variant].view(n, v, -1)}
    if negatives:
        found, mask = hard_negatives(texts, negatives)
        k = len(negatives)
        part |= {"negatives": tokenize(found).view(n * v, k, -1)[variant].view(n, v, k, -1),
                 "negative_mask": mask[variant].view(n, v, k)}
    if stats is not None:
        stats["captions"] = stats.get("captions", 0) + n
        stats["rewritten"] = stats.get("rewritten", 0) + sum(
            any(t != c for t in texts[i * v + 1:(i + 1) * v]) for i, c in enumerate(captions))
    return part


def train_batches(paths: list[Path], tokenize: Callable[[list[str]], torch.Tensor], batch_size: int,
                  seed: int, image_size: int, negatives: tuple[str, ...] = (), rewrites: int = 0,
                  buffer_bytes: int = BUFFER_BYTES, stats: Optional[dict] = None,
                  pronoun_first: bool = False, with_captions: bool = False) -> Iterator[tuple]:
    """Endless (uint8 images [B, 3, S, S], tokens [B, L]) from the train split; with
    ``negatives`` (kinds of :mod:`.negatives`) also (negative tokens [B, K, L], mask [B, K] bool).
    Each sample's text is its caption or one of its ``rewrites``, drawn uniformly per sample and
    step (``pronoun_first``: :func:`.rewrites.rewrite`'s). At most ``buffer_bytes`` of decoded images
    are resident (at least one shard). ``with_captions``: each batch also ends with the captions' own tokens
    [B, L] (the text each sample's variant was drawn for: ``clip.rewrites_align``)."""
    require_train_samples(paths)         # a StageError naming the splits found, before any decoding
    per_shard = max(1, count_samples(paths[0])) * 3 * image_size ** 2
    fields = ("images", "tokens", "negatives", "negative_mask") if negatives else ("images", "tokens")
    batches = buffered_batches(paths, lambda p: read_part(p, tokenize, image_size, negatives, rewrites, seed, stats,
                                                          pronoun_first),
                               set(fields), batch_size, seed=seed, buffer_shards=max(1, buffer_bytes // per_shard))
    # its own stream: a generator seeded like the buffer's would draw each sample's variant from its index
    pick = torch.Generator().manual_seed(zlib.crc32(f"clip rewrites {seed}".encode()))
    if with_captions:                     # variant 0 is the caption (caption_variants)
        batches = ({**b, "captions": b["tokens"][:, 0]} for b in batches)
        fields = (*fields, "captions")
    texts = one_variant_per_sample(batches, set(fields) - {"images", "captions"}, 1 + rewrites, pick)
    return (tuple(b[k] for k in fields) for b in texts)


def switching_batches(batches: Callable[[bool], Iterator[tuple]], switch_at: int,
                      steps_done: Callable[[], int]) -> Iterator[tuple]:
    """``batches(False)``'s batches while ``steps_done()`` is below ``switch_at``, then ``batches(True)``'s
    (``clip.rewrites_pronoun_first_after``: the rewrites without, then with the pronoun's phrase before its
    object). Each stream is opened when first drawn from, and the first is closed (its buffer of decoded images
    freed) at the switch. A run resumed past ``switch_at`` draws one batch from the first (``training.fit``
    takes it before it reads the checkpoint, to time the precision), then the second's."""
    first: Optional[Iterator[tuple]] = None
    while steps_done() < switch_at:
        first = first or batches(False)
        yield next(first)
    if first is not None:
        first.close()
    yield from batches(True)
