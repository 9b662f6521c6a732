"""Random training batches from a rolling buffer of whole shards read into tensors.

A stage that trains for many epochs over a data set (CLIP sees each image about 13 times, the
prior and the decoder more) would otherwise parse, decode and tokenize every sample again each
time it is drawn. Here each shard is read once per pass (``read(path)`` -> a dict of tensors with
the sample first, plus ``n``), ``buffer_shards`` shards stay resident, batches are random indices
into them, and the buffer rolls (the oldest shard out, the next one in) once as many samples as
it holds have been drawn: memory stays flat however large the data set, and a step costs a
tensor index. Shards are read in a seeded random order, each process its own share.

Used by ``embedding_shards.train_batches`` (the prior, the decoder) and ``clip.data.train_batches``.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Iterator

import torch

LISTS = ("captions", "gt", "keys")      # per-sample Python lists a part may carry beside its tensors


class EmptyBuffer(ValueError):
    """The first buffer holds no sample (its message: ``buffered_batches``'s ``empty``)."""


def concat(parts: list[dict]) -> dict:
    """Parts (dicts of tensors [n_i, ...], lists of :data:`LISTS`, and ``n``) -> one part."""
    parts = [p for p in parts if p["n"]]
    if not parts:
        return {"n": 0, "captions": [], "gt": [], "keys": []}
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if isinstance(parts[0][k], torch.Tensor)}
    for k in LISTS:
        if k in parts[0]:
            out[k] = [x for p in parts for x in p[k]]
    return out | {"n": sum(p["n"] for p in parts)}


def buffered_batches(paths: list[Path], read: Callable[[Path], dict], fields: set[str], batch_size: int, *,
                     seed: int, rank: int = 0, world: int = 1, buffer_shards: int = 16,
                     empty: str = "the shards hold no train-split samples") -> Iterator[dict]:
    """Endless random batches (dicts of the tensors ``fields``) from ``read``'s parts of ``paths``.

    Process ``rank`` of ``world`` reads its own shards when there are enough to go round, else
    all of them with its own seed. With ``buffer_shards`` >= the shard count everything is read
    once and stays in memory. ``empty``: the :class:`EmptyBuffer`'s message when the first buffer holds
    no sample.
    """
    mine = paths[rank::world] if len(paths) >= world else list(paths)
    rng = random.Random(seed * 1000 + rank)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)

    def shard_order() -> Iterator[Path]:
        while True:
            order = list(mine)
            rng.shuffle(order)
            yield from order

    order = shard_order()
    resident = min(buffer_shards, len(mine))
    buffer = [read(next(order)) for _ in range(resident)]
    if not sum(p["n"] for p in buffer):
        raise EmptyBuffer(empty)
    pool = concat(buffer)
    drawn = 0
    while True:
        idx = torch.randint(0, pool["n"], (batch_size,), generator=gen)
        yield {k: pool[k][idx] for k in fields}
        drawn += batch_size
        if resident < len(mine) and drawn >= pool["n"]:
            # roll the buffer: drop the oldest shard, read the next one
            buffer = buffer[1:] + [read(next(order))]
            pool, drawn = concat(buffer), 0


def one_variant_per_sample(batches: Iterator[dict], fields: set[str], variants: int,
                           pick: torch.Generator) -> Iterator[dict]:
    """The batches, each of ``fields`` [B, V, ...] cut to one variant per sample [B, ...], drawn
    uniformly from ``pick`` (a caption or one of its language rewrites: CLIP's batches, the prior's
    and the decoder's). With one variant nothing is drawn: the batches are those of no rewrites."""
    for b in batches:
        rows = torch.arange(b[next(iter(fields))].shape[0])
        variant = torch.randint(0, variants, (len(rows),), generator=pick) if variants > 1 else torch.zeros_like(rows)
        yield {k: b[k][rows, variant] if k in fields else b[k] for k in b}
