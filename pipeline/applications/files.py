"""Images, masks, grids and GIFs on disk for `unclip vary / interpolate / textdiff / inpaint`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..images import grid, save_png

MIN_TILE = 64       # small images are nearest-upscaled to at least this many pixels in grids


def load_image(path: str | Path) -> torch.Tensor:
    """An image file -> uint8 [1, 3, H, W] (RGB); a clear error for what is not an image."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]


def load_mask(path: Optional[str], box: Optional[str], height: int, width: int) -> torch.Tensor:
    """The region to repaint as [1, 1, H, W] float (1 = repaint): a mask image (white = repaint,
    resized to the image) or ``box`` = "x0,y0,x1,y1" in fractions of the image (0..1)."""
    if (path is None) == (box is None):
        raise ValueError("give exactly one of --mask (an image, white = repaint) and --box x0,y0,x1,y1")
    if path is not None:
        gray = load_image(path).float().mean(1, keepdim=True)                 # [1, 1, h, w]
        mask = (F.interpolate(gray, size=(height, width), mode="nearest") > 127).float()
    else:
        try:
            x0, y0, x1, y1 = (float(v) for v in box.split(","))
        except ValueError:
            raise ValueError(f"--box {box!r}: expected four numbers x0,y0,x1,y1 in 0..1") from None
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"--box {box!r}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        mask = torch.zeros(1, 1, height, width)
        mask[..., round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = 1
    if mask.sum() == 0:
        raise ValueError("the mask selects no pixel")
    return mask


def _fit(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images to ``size`` px by nearest neighbour (the pixels stay as they are)."""
    if images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(images.float(), size=(size, size), mode="nearest").round().to(torch.uint8)


def join(batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """uint8 batches of any sizes -> one batch at the largest size (nearest neighbour)."""
    size = max(t.shape[-1] for t in batches)
    return torch.cat([_fit(t, size) for t in batches])


def save_rows(rows: Sequence[tuple[str, torch.Tensor]], out: str | Path) -> Path:
    """Labelled rows of uint8 images (any sizes: brought to the largest, nearest) -> one PNG;
    short rows are padded with white tiles."""
    size = max(t.shape[-1] for _, t in rows)
    width = max(len(t) for _, t in rows)
    tiles = []
    for _, t in rows:
        t = _fit(t, size)
        pad = torch.full((width - len(t), 3, size, size), 255, dtype=torch.uint8)
        tiles.append(torch.cat([t, pad]))
    scale = max(1, MIN_TILE // size)
    save_png(grid(torch.cat(tiles), width, scale=scale, row_labels=[label for label, _ in rows]), Path(out))
    return Path(out)


def save_gif(frames: torch.Tensor, out: str | Path, ms_per_frame: int = 250) -> Path:
    """uint8 frames [N, 3, H, W] -> a looping GIF there and back, upscaled to >= 128 px."""
    size = frames.shape[-1] * max(1, 128 // frames.shape[-1])
    pics = [Image.fromarray(f.permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST) for f in frames]
    seq = pics + pics[-2:0:-1]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    seq[0].save(tmp, format="GIF", save_all=True, append_images=seq[1:], duration=ms_per_frame, loop=0)
    tmp.replace(out)
    return out
