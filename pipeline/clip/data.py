"""CLIP's training batches: (uint8 images, tokens) from the train split of the filtered shards
(the generic reading is :mod:`pipeline.data.image_shards`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import webdataset as wds

from ..data.image_shards import decode_image, resize_uint8, train_stream
from .negatives import hard_negatives


def _to_pair(sample: dict) -> tuple[torch.Tensor, str]:
    return decode_image(sample["jpg"]), sample["txt"].decode("utf-8")


def train_loader(paths: list[Path], tokenize: Callable[[list[str]], torch.Tensor], batch_size: int,
                 num_workers: int, seed: int, image_size: int, negatives: tuple[str, ...] = ()) -> wds.WebLoader:
    """Endless stream of (uint8 images [B,3,S,S], tokens [B,L]) from the train split; with
    ``negatives`` (kinds of :mod:`.negatives`) also (negative tokens [B,K,L], mask [B,K] bool)."""
    def collate(batch):
        images = torch.stack([resize_uint8(img, image_size) for img, _ in batch])
        captions = [cap for _, cap in batch]
        if not negatives:
            return images, tokenize(captions)
        texts, mask = hard_negatives(captions, negatives)
        tokens = tokenize(captions)
        return images, tokens, tokenize(texts).view(len(captions), len(negatives), -1), mask

    return train_stream(paths, _to_pair, collate, batch_size, num_workers, seed)
