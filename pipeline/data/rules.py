"""The filter's per-sample rules and fingerprints: which rule a sample fails first (``check``), and
the fingerprints duplicates are found by (pixel sha256, 64-bit pHash, an 8x8 thumbnail). The
filter stage (pipeline/data/filter.py) and its dedup jobs (dedup.py, dedup_spark.py: per-shard
maps, locally or as Spark tasks) read them from here.
"""
from __future__ import annotations

import hashlib
import io
from typing import Optional

import imagehash
import numpy as np
from PIL import Image

# Reasons in the order they are checked; a sample is counted under the first it fails.
REASONS = ("unreadable", "too_small", "aspect_ratio", "caption_empty", "caption_too_short", "caption_too_long",
           "exact_duplicate", "near_duplicate")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")   # the first present is the sample's image
THUMB_GRID = 8        # thumbnail cells per side; 8x8 averages out re-encoding noise per cell


# ---- per-sample rules and fingerprints ----------------------------------------------------------
def check(sample: dict, f) -> tuple[Optional[str], Optional[Image.Image]]:
    """The first per-sample rule ``sample`` fails (None if none) and its decoded RGB image.

    ``f`` is the ``filter`` section of the config.
    """
    data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    if data is None:
        return "unreadable", None
    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("RGB")          # forces a full decode: a truncated JPEG fails here
        caption = sample.get("txt", b"").decode("utf-8")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        # OSError covers PIL's UnidentifiedImageError; UnicodeDecodeError is a ValueError.
        return "unreadable", None
    w, h = img.size
    if min(w, h) < f.min_size:
        return "too_small", img
    if max(w, h) / min(w, h) > f.max_aspect_ratio:
        return "aspect_ratio", img
    words = len(caption.split())
    if not words:
        return "caption_empty", img
    if words < f.min_caption_words:
        return "caption_too_short", img
    if words > f.max_caption_words:
        return "caption_too_long", img
    return None, img


def pixel_sha256(img: Image.Image) -> bytes:
    """Hash of the decoded pixels (and size): equal for byte-different encodings of one image."""
    return hashlib.sha256(f"{img.width}x{img.height}:".encode() + img.tobytes()).digest()


def phash64(img: Image.Image) -> int:
    """imagehash's 64-bit pHash as an integer (bit 63 = first DCT coefficient)."""
    return int(np.packbits(imagehash.phash(img).hash.ravel()).view(">u8")[0])


def thumbnail(img: Image.Image) -> np.ndarray:
    """(THUMB_GRID, THUMB_GRID, 3) uint8 cell means; BOX averages, so it hardly depends on input size."""
    return np.asarray(img.resize((THUMB_GRID, THUMB_GRID), Image.BOX), dtype=np.uint8)
