"""Image tensors between the data (uint8 [B, 3, H, W]) and the diffusion models (float in
[-1, 1]), resizing done one way everywhere, and sample grids."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, H, W] in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 (clamped)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def psnr(a_uint8: torch.Tensor, b_uint8: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of two uint8 batches [B, 3, H, W] (images as they are saved)."""
    mse = (a_uint8.float() - b_uint8.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float images [B, C, H, W] -> [B, C, size, size]: antialiased bicubic down, bicubic up.
    The resize of the generative half (training targets, low-res conditions, evaluation); the
    CLIP data path uses the same interpolation on uint8 (``data.image_shards.resize_uint8``)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=size < x.shape[-1], align_corners=False)


def grid(images: torch.Tensor, nrow: int, pad: int = 2, scale: int = 1,
         row_labels: Optional[Sequence[str]] = None) -> Image.Image:
    """uint8 [N, 3, H, W] -> one PIL image, ``nrow`` images per row, optionally upscaled
    (nearest) ``scale`` times and with a caption left of each row."""
    n, _, h, w = images.shape
    h, w = h * scale, w * scale
    rows = (n + nrow - 1) // nrow
    label_w = 0 if not row_labels else 7 * max(len(s) for s in row_labels) + 8
    canvas = Image.new("RGB", (label_w + nrow * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, nrow)
        tile = Image.fromarray(images[i].permute(1, 2, 0).cpu().numpy().astype(np.uint8))
        if scale != 1:
            tile = tile.resize((w, h), Image.NEAREST)
        canvas.paste(tile, (label_w + pad + c * (w + pad), pad + r * (h + pad)))
    for r, label in enumerate(row_labels or []):
        draw.text((4, pad + r * (h + pad) + h // 2 - 5), label, fill=(0, 0, 0))
    return canvas


def png_bytes(image: torch.Tensor) -> bytes:
    """uint8 [3, H, W] -> the PNG file's bytes. PIL's encoder with its defaults and no metadata:
    the same pixels always give the same bytes (what makes the server's images and
    `unclip generate --out-dir`'s files comparable byte for byte)."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(img: Image.Image, path: Path) -> None:
    """Write atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
