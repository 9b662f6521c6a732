"""The background of an image, read from its pixels against the scene's ground truth.

The corpus draws every scene on one of three flat backgrounds (``data.scenes.BACKGROUNDS``:
white, gray, black) and its ground truth says where the objects are, so the background's pixels
are known without a model: everything outside each object's box, widened by a margin.

- ``read``: the background's color, the per-channel median of those pixels, classified to the
  nearest of the three background colors (Euclidean in RGB). Some captions name the background
  ("... on a white background"; ``named``); on the corpus's real images this reading is right
  every time (a test renders all three), so on generated images it measures the generator.
- ``noise``: the background's pixel noise, per image the standard deviation of those pixels per
  channel, averaged over the channels, in 8-bit levels. Pixels further than ``STRAY_LEVELS``
  from the background's median in any channel are not noise but something drawn there (an
  object the generator put elsewhere than the caption says, a blob): they are left out of the
  standard deviation and counted apart (``stray``), so that a misplaced object reads as a stray
  fraction, not as noise. The nearest object color of the corpus is more than 60 levels from
  every background in some channel, and Gaussian noise of up to 16 levels loses under 2 % of
  its standard deviation to the cut. A stray object's anti-aliased edge is a rim of pixels
  between its color and the background's, most of them nearer than ``STRAY_LEVELS``: the pixels
  within ``STRAY_EDGE`` (1 px) of a stray pixel are its edge and are left out too. Without
  that, the rims of the objects a generator draws larger or further than the ground truth's boxes
  were most of the noise measured on two-object scenes (docs/MEASURED.md, 2026-12-05: 3.57 levels with them,
  2.42 without, on one-object scenes 1.28 and 1.26; real images 0.46 either way).
  ``noise_with_rims`` in ``figures`` keeps the earlier definition (no rim left out).

- ``speckle``: the high-frequency part of the noise, per image the standard deviation over the
  background pixels of each pixel minus the mean of its 3x3 neighbourhood (per channel, averaged
  over the channels; 0.94 sigma for white noise of sigma). It tells pixel speckle (what an
  upsampler adds) from a background that is smooth but not flat (a tint, a shading, a halo: what
  a 16 px base leaves), which ``noise`` counts alike.

``figures`` gives them for a set of images; ``evaluate`` reports them for the generated images
beside the real test images of the same captions, and the ratio of the noises with the real
noise floored at ``NOISE_FLOOR`` (a JPEG of a flat color is within a fraction of a level of
flat; the ratio against such a floor would measure the JPEG codec, not the generator).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .data.scenes import BACKGROUNDS, SIZES
from .judge.labels import parse_gt

NAMES = tuple(BACKGROUNDS)
RGB = torch.tensor([BACKGROUNDS[n] for n in NAMES], dtype=torch.float64)     # [3 backgrounds, 3 channels]
EXTENT = 1.2        # an object's box half-width per half-width of its size: rotated squares reach 1.16, triangles 1.155
MARGIN = 0.08       # of the canvas, around each box: anti-aliasing, JPEG ringing, a generated object a little off
STRAY_LEVELS = 48   # further than this from the background's median in some channel: drawn there, not noise
STRAY_EDGE = 1       # px: the rim around stray pixels that is their anti-aliased edge (the corpus draws at 4x
                     # and downsamples: a 1 px blend at any size)
NOISE_FLOOR = 1.0   # 8-bit levels: the real images' noise under this counts as this in the ratio
_NAMED = re.compile(r"\b(" + "|".join(NAMES) + r") background\b")


def named(caption: str) -> Optional[str]:
    """The background a caption names ("... on a gray background" -> "gray"), or None."""
    m = _NAMED.search(caption.lower())
    return m.group(1) if m else None


def mask(gt, size: int, margin: float = MARGIN) -> torch.Tensor:
    """bool [size, size]: True on the background, i.e. outside every object's box (its half-width
    ``EXTENT`` * the size's half-width, plus ``margin``, around its centre; fractions of the canvas)."""
    gt = parse_gt(gt)
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size       # pixel centres, fraction of the canvas
    keep = torch.ones(size, size, dtype=torch.bool)
    for o in gt["objects"]:
        r = EXTENT * SIZES[o["size"]] + margin
        inside_x = (c - o["x"]).abs() <= r
        inside_y = (c - o["y"]).abs() <= r
        keep &= ~(inside_y[:, None] & inside_x[None, :])
    return keep


def _background(image: torch.Tensor, gt) -> torch.Tensor:
    """bool [H, W]: one image's background pixels (``mask``); the outermost ring of pixels if the
    boxes leave fewer than 16 (they cannot on the corpus's grammar)."""
    m = mask(gt, image.shape[-1])
    if m.sum() < 16:
        m = torch.zeros_like(m)
        m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m


def _pixels(image: torch.Tensor, gt) -> torch.Tensor:
    """One image's background pixels, float64 [n, 3]."""
    return image.permute(1, 2, 0)[_background(image, gt)].double()


def read(images: torch.Tensor, gts: Sequence) -> tuple[list[str], torch.Tensor]:
    """uint8 [N, 3, H, W] and their ground truths -> (the background's name read per image,
    the background's median color [N, 3])."""
    medians = torch.stack([_pixels(img, g).median(0).values for img, g in zip(images, gts)]) if len(gts) else \
        torch.empty(0, 3, dtype=torch.float64)
    nearest = torch.cdist(medians, RGB).argmin(1) if len(gts) else torch.empty(0, dtype=torch.long)
    return [NAMES[i] for i in nearest.tolist()], medians


def noise(images: torch.Tensor, gts: Sequence, edge: int = STRAY_EDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise [N]: per image the background's standard deviation per channel, averaged over the
    channels, stray pixels and the pixels within ``edge`` px of one left out;
    stray [N]: the fraction of background pixels that are stray). ``edge=0``: only the stray
    pixels themselves are left out (``noise_with_rims``)."""
    sd, stray = zip(*(region_noise(img, _background(img, g), edge) for img, g in zip(images, gts))) \
        if len(gts) else ((), ())
    return torch.tensor(sd, dtype=torch.float64), torch.tensor(stray, dtype=torch.float64)


def region_noise(image: torch.Tensor, region: torch.Tensor, edge: int = STRAY_EDGE,
                 empty: float = 0.0) -> tuple[float, float]:
    """``noise`` of one image [3, H, W] over the pixels of ``region`` (bool [H, W]): (the standard
    deviation per channel, averaged over the channels, of the region's pixels that are neither
    stray nor within ``edge`` px of a stray one; the fraction of the region that is stray).
    ``empty`` is the figure when fewer than 2 pixels are left."""
    if region.sum() < 2:
        return empty, 0.0
    x = image.permute(1, 2, 0).double()                                  # [H, W, 3]
    far = ((x - x[region].median(0).values).abs().amax(-1) > STRAY_LEVELS) & region
    near = F.max_pool2d(far[None, None].double(), 2 * edge + 1, stride=1, padding=edge)[0, 0] > 0 if edge else far
    kept = x[region & ~near]
    return (kept.std(0, unbiased=False).mean().item() if len(kept) >= 2 else empty), far[region].double().mean().item()


def speckle(images: torch.Tensor, gts: Sequence) -> torch.Tensor:
    """[N]: per image the background's high-pass noise in 8-bit levels (see the module docstring);
    the 3x3 mean is taken over the whole image, so object edges next to the background's margin
    count a little."""
    x = images.double()
    local = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)       # [N, 3, H, W]
    out = []
    for detail, g in zip(x - local, gts):
        m = mask(g, detail.shape[-1])
        out.append(detail.permute(1, 2, 0)[m].std(0, unbiased=False).mean().item() if m.sum() >= 2 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def figures(images: torch.Tensor, gts: Sequence, captions: Sequence[str], *, real: bool = False,
            real_noise: Optional[float] = None) -> dict:
    """The background figures of a set of images (uint8 [N, 3, H, W]) of ``captions`` whose truth
    is ``gts``:

    - ``n_named``, ``named_right``: the captions that name a background, and the percent of their
      images whose background reads as the one named (None when no caption names one);
    - ``real`` images only: ``read_right``, the percent of all images whose background reads as the
      ground truth's (of a generated image only a caption that names one says what is asked for);
    - ``noise``: the mean background noise (8-bit levels), ``stray``: the mean percent of
      background pixels that are stray, ``speckle``: the mean high-pass noise;
      ``noise_with_rims``: the noise with the stray objects' edges counted (the earlier definition);
    - with ``real_noise`` (the real images' ``noise``): ``noise_ratio`` = noise / max(real_noise,
      ``NOISE_FLOOR``).
    """
    gts = [parse_gt(g) for g in gts]
    seen, _ = read(images, gts)
    asked = [(i, named(c)) for i, c in enumerate(captions) if named(c)]
    sd, stray = noise(images, gts)
    out = {"n_named": len(asked),
           "named_right": round(100 * sum(seen[i] == b for i, b in asked) / len(asked), 2) if asked else None,
           "noise": round(sd.mean().item(), 3) if len(gts) else None,
           "noise_with_rims": round(noise(images, gts, edge=0)[0].mean().item(), 3) if len(gts) else None,
           "speckle": round(speckle(images, gts).mean().item(), 3) if len(gts) else None,
           "stray": round(100 * stray.mean().item(), 2) if len(gts) else None}
    if real:
        out["read_right"] = round(100 * sum(s == g["background"] for s, g in zip(seen, gts)) / len(gts), 2) \
            if gts else None
    if real_noise is not None and out["noise"] is not None:
        out["noise_ratio"] = round(out["noise"] / max(real_noise, NOISE_FLOOR), 3)
    return out
