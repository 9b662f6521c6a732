"""CLIP's token table trained on the rows its training captions use.

open_clip's text tower embeds token ids through a table of the whole BPE vocabulary:
[49,408, W], 6.3 M of the default CLIP's 7.7 M parameters. The embedded corpus, hard
negatives included, uses 50 of its rows. Trained whole, every step still pays for all of them:
the embedding's backward fills a dense [49,408, W] gradient, AdamW updates every row, and the
gradient's norm reads them all: about 50 ms of a 0.6 s CLIP step at one thread on AMX, and a
step 1.09x faster without them (``python bench/paired_steps.py clip-full-table clip``).

While CLIP trains, :class:`UsedRows` stands in for the table: the used rows as one parameter
[V', W], and a map from token id to row. The rows no training caption uses get a zero gradient
on every step, so AdamW's moments stay zero and its step on them is the decoupled weight decay
alone, p <- p (1 - lr_t wd). :meth:`UsedRows.restore` puts the trained rows back into the full
table and multiplies the others by that decay over the schedule: the weights training the whole
table gives, up to rounding (tests/test_clip_vocab.py). The model saved, and everything
downstream, keeps open_clip's table and ids; a caption with words the training never saw reads
the rows it always read.

Finding the rows costs one read of the shards (their captions; the embedded corpus: 1.4 s with
tokenizing). That pays where the table is a large part of a small model's step, on small data
(CPU budgets). On shards larger than ``PREPASS_BYTES`` (a web-scale set, whose captions use much
of the vocabulary anyway) the read would be a whole extra pass over the images' bytes, and the
whole table trains as before.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..data.image_shards import iter_split
from .data import caption_variants
from .negatives import hard_negatives


PREPASS_BYTES = 4 * 2**30     # shards larger than this in all: no pre-pass, the whole table trains (95 MB here)


def used_token_ids(paths: list[Path], tokenize: Callable[[list[str]], torch.Tensor],
                   negatives: tuple[str, ...] = (), max_bytes: Optional[int] = None,
                   rewrites: int = 0, seed: int = 0,
                   pronoun_first: Union[bool, tuple[bool, ...]] = False) -> Optional[torch.Tensor]:
    """The sorted token ids [V'] of the train split's captions, of their ``rewrites`` (the same
    ones training reads: clip/data.py ``caption_variants``; ``pronoun_first`` a tuple: the rewrite
    sets of each, in one read of the shards) and of their hard negatives (a negative may hold a
    word no caption has: a relation reversed), padding (0) included.
    Decodes the shards' captions only (the embedded corpus: 0.6 s, and 0.8 s to tokenize).
    None when the shards add up to more than ``max_bytes`` (default ``PREPASS_BYTES``): no rows
    picked, train the whole table."""
    if sum(Path(p).stat().st_size for p in paths) > (PREPASS_BYTES if max_bytes is None else max_bytes):
        return None
    texts = sorted({sample["txt"].decode("utf-8") for sample in iter_split(paths, "train")})
    if rewrites:
        sets = pronoun_first if isinstance(pronoun_first, tuple) else (pronoun_first,)
        texts = sorted({t for p in sets for t in caption_variants(texts, rewrites, seed, p)})
    if negatives and texts:
        found, mask = hard_negatives(texts, negatives)
        texts += sorted({t for t, keep in zip(found, mask.flatten().tolist()) if keep})
    ids = [torch.zeros(1, dtype=torch.long)] + ([tokenize(texts).flatten()] if texts else [])
    return torch.unique(torch.cat(ids))


class UsedRows(torch.nn.Module):
    """``nn.Embedding``'s forward on a subset of its rows: ``weight`` [V', W] holds the rows of
    ``ids`` (sorted), ``row`` [V] maps a token id to its row (ids outside ``ids``: an error at
    lookup, since the training data was read to make ``ids``)."""

    def __init__(self, table: torch.nn.Embedding, ids: torch.Tensor):
        super().__init__()
        ids = ids.to(table.weight.device)
        self.weight = torch.nn.Parameter(table.weight.detach()[ids].clone())
        row = torch.full((table.num_embeddings,), -1, dtype=torch.long, device=ids.device)
        row[ids] = torch.arange(len(ids), device=ids.device)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("row", row, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.row[tokens]
        if bool((rows < 0).any()):
            missing = sorted(set(tokens[rows < 0].tolist()))[:8]
            raise ValueError(f"token ids {missing} are outside the rows CLIP trains (read from its training captions)")
        return torch.nn.functional.embedding(rows, self.weight)

    def restore(self, table: torch.nn.Embedding, decay: float) -> torch.nn.Embedding:
        """``table`` (the one these rows came from) with the trained rows written back and every
        other row times ``decay``."""
        with torch.no_grad():
            table.weight.mul_(decay)
            table.weight[self.ids] = self.weight.detach().to(table.weight.dtype)
        return table


def decay_over(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
               param: torch.nn.Parameter, steps: int) -> float:
    """prod over the steps t < ``steps`` of (1 - lr_t * wd): what AdamW's decoupled weight decay
    makes of a weight of ``param``'s group that never gets a gradient (lr_t that group's lr at
    step t under ``scheduler``, wd its weight decay)."""
    g = next(i for i, group in enumerate(optimizer.param_groups) if any(p is param for p in group["params"]))
    wd, base, factor = optimizer.param_groups[g]["weight_decay"], scheduler.base_lrs[g], scheduler.lr_lambdas[g]
    return math.prod(1.0 - base * factor(t) * wd for t in range(steps))
