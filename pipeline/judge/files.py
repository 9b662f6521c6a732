"""`unclip judge`: what the judge sees in image files, and how they score against captions.

Input: a directory of images (one image per file), or one image file: a single image, or a
grid written by ``images.grid`` (what `unclip generate` and the evaluate stage save) when
``tile`` and ``cols`` are given; the grid's caption column on the left is skipped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .labels import accuracy, check, parse_caption, readable
from .model import Judge

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def load_images(path: Path, tile: Optional[int] = None, cols: Optional[int] = None,
                pad: int = 2) -> tuple[list[str], list[torch.Tensor]]:
    """(names, uint8 [3, H, W] images) from a directory or a (grid) image file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return [p.name for p in files], [_tensor(Image.open(p)) for p in files]
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    try:
        img = _tensor(Image.open(path))
    except OSError as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None
    if tile is None:
        return [path.name], [img]
    if not cols:
        raise ValueError("--tile needs --cols (images per grid row)")
    _, h, w = img.shape
    label_w = w - cols * (tile + pad) - pad
    rows = (h - pad) // (tile + pad)
    if label_w < 0 or rows < 1:
        raise ValueError(f"{path} ({w}x{h}) is not a grid of {cols} columns of {tile} px tiles with {pad} px padding")
    names, tiles = [], []
    for r in range(rows):
        for c in range(cols):
            x, y = label_w + pad + c * (tile + pad), pad + r * (tile + pad)
            t = img[:, y:y + tile, x:x + tile]
            if int(t.float().std()) == 0 and int(t.float().mean()) == 255:
                continue                                 # an empty slot of the last row
            names.append(f"{path.name}[{r},{c}]")
            tiles.append(t)
    return names, tiles


def judge_files(judge: Judge, path: Path, captions: Sequence[str] = (), tile: Optional[int] = None,
                cols: Optional[int] = None, pad: int = 2) -> dict:
    """What the judge reads in every image; with captions (one for all, one per grid row, or one
    per image), the verdict of each check and the accuracy over all of them."""
    names, images = load_images(path, tile, cols, pad)
    size = images[0].shape[-1]
    if any(im.shape[-2:] != images[0].shape[-2:] for im in images):   # mixed sizes: to the judge's
        from ..images import resize, to_model, to_uint8
        images = [to_uint8(resize(to_model(im[None]), judge.image_size))[0] for im in images]
        size = judge.image_size
    preds, _ = judge.predict(torch.stack(images))
    out = {"images": [{"name": n, "sees": readable(p)} for n, p in zip(names, preds)], "size": size}
    if not captions:
        return out
    per_image = _expand(list(captions), len(names), cols)
    gts = []
    for entry, cap, pred in zip(out["images"], per_image, preds):
        gt = parse_caption(cap)
        if gt is None:
            raise ValueError(f"caption {cap!r} is not in the corpus's grammar: the judge cannot score it")
        entry |= {"caption": cap, "checks": check(pred, gt)}
        gts.append(gt)
    out["accuracy"] = accuracy(preds, gts)
    return out


def _expand(captions: list[str], n: int, cols: Optional[int]) -> list[str]:
    if len(captions) == 1:
        return captions * n
    if len(captions) == n:
        return captions
    if cols and len(captions) * cols >= n:
        return [c for c in captions for _ in range(cols)][:n]
    raise ValueError(f"{len(captions)} captions for {n} images: give one, one per grid row, or one per image")
