"""Corruptions of the upsamplers' low-res conditioning image, applied in training only.

At sampling time an upsampler's input is the previous model's output, never a clean downsample
of a real image; corrupting the low-res input in training makes the upsampler robust to that
gap (Ho et al. 2021, "Cascaded Diffusion Models": conditioning augmentation). DALL-E 2
(section 2) uses Gaussian blur for the first upsampler and the more diverse BSR degradation
for the second:

blur  Gaussian blur with sigma ~ U[0.4, 0.6] low-res pixels (the range of the cascaded
      diffusion models' blur augmentation), a new sigma per image.
bsr   Zhang et al. 2021 ("Designing a Practical Degradation Model for Deep Blind Image
      Super-Resolution", BSRGAN): isotropic blur, anisotropic blur, a down-up resize with random
      interpolations, Gaussian noise (color, grayscale or channel-correlated) and, with
      probability 0.9, JPEG re-encoding, in a random order per image; then JPEG once more,
      always last, as in the paper.

BSRGAN degrades the high-res image down to the low-res one, with kernels sized for the high
resolution. Here the input is already the (bicubic) low-res image and is degraded in place, so
its random resize is a down-up round trip, and the blur, resize, noise and JPEG ranges are
milder than BSRGAN's (the values below): at BSRGAN's own ranges the shapes of a 32 px image
become blobs, and the upsampler would learn to ignore its input.

Noise conditioning augmentation (``noise_augment``, the stage's ``noise_aug``) comes after the
degradation and is not one of its kinds: its level is drawn per image and given to the network
(pipeline/upsampler/network.py), and sampling noises the previous model's output the same way
(``aug_level``).

Smooth-field augmentation (``smooth_field``, the stage's ``smooth_aug``) also comes after the
degradation and is not told to the network: a random field that varies over several low-res
pixels (white noise blurred by a Gaussian of ``SMOOTH_SIGMA`` px, scaled to unit spread), at an
amplitude drawn per image from [0, ``smooth_aug``] 8-bit levels, per channel. It imitates what a
small base decoder gets wrong in a flat background (a tint over part of the image, a darker half,
a halo: low-frequency errors, docs/MEASURED.md "where the background noise is"), which white noise does not:
trained on it, the upsampler learns that such a drift is never in the image it must draw.

Every random draw comes from the ``torch.Generator`` passed in: a seed gives the same corruption.
Images are float [B, 3, h, w] in [-1, 1] in and out.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision.io as tio

from ..images import to_model, to_uint8

KINDS = ("blur", "bsr")

BLUR_SIGMA = (0.4, 0.6)              # blur: px at the low resolution
ISO_SIGMA = (0.1, 0.6)               # bsr, isotropic blur: px
ANISO_SIGMA = (0.1, 0.8)             # bsr, anisotropic blur: px along each principal axis
RESIZE_FACTOR = (1.0, 1.5)           # bsr: shrink by this factor, then back to the input size
DOWN_MODES = ("bilinear", "bicubic", "area")     # BSRGAN's cv2 choices: linear, cubic, area
UP_MODES = ("bilinear", "bicubic")
NOISE_LEVEL = (1, 10)                # bsr: noise sigma in 0-255 steps (BSRGAN: 2-25)
JPEG_QUALITY = (60, 95)              # bsr (BSRGAN: 30-95)
SMOOTH_SIGMA = (1.0, 3.0)            # smooth_field: the blur of its white noise, low-res px
JPEG_PROB = 0.9                      # bsr: chance of the JPEG step inside the shuffled sequence


def degrade(kind: str, low_res: torch.Tensor, generator: torch.Generator,
            blur_sigma: tuple[float, float] = BLUR_SIGMA) -> torch.Tensor:
    """The training-time corruption ``kind`` of low-res images [B, 3, h, w] in [-1, 1] -> same shape
    (``blur_sigma``: blur's range of sigma, low-res px)."""
    if kind == "blur":
        return blur(low_res, generator, blur_sigma)
    if kind == "bsr":
        return torch.cat([bsr(img[None], generator) for img in low_res])
    raise ValueError(f"unknown degradation {kind!r} (known: {', '.join(KINDS)})")


def noise_augment(x: torch.Tensor, levels: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Low-res images [B, 3, h, w] in [-1, 1] + white Gaussian noise of standard deviation
    ``levels`` [B] (8-bit levels; [-1, 1] spans 2 x 255 of them), clamped to [-1, 1] as an
    image is. The same function noises the training inputs and the sampled ones."""
    sigma = (2 * levels.to(x.device, torch.float32) / 255)[:, None, None, None]
    noise = torch.randn(x.shape, generator=generator).to(x.device)     # on CPU: a seed, the same noise anywhere
    return (x + sigma * noise).clamp(-1, 1)


def smooth_field(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """A unit-spread random field [B, C, h, w] that varies smoothly over space: white noise blurred
    by a Gaussian of sigma ~ U[SMOOTH_SIGMA] low-res px (one sigma per image), each image's channel
    scaled to standard deviation 1 (so a level is the field's spread, as white noise's is)."""
    b, c, h, w = shape
    sigma = uniform(*SMOOTH_SIGMA, generator, b)
    field = gaussian_blur(torch.randn(shape, generator=generator), torch.diag_embed(torch.stack([sigma, sigma], -1) ** 2))
    field = field - field.mean((-2, -1), keepdim=True)
    return field / field.std((-2, -1), keepdim=True).clamp(min=1e-6)


def smooth_augment(x: torch.Tensor, max_level: float, generator: torch.Generator) -> torch.Tensor:
    """Low-res images [B, 3, h, w] in [-1, 1] + a smooth field (``smooth_field``) of standard
    deviation drawn per image from U[0, max_level] 8-bit levels, clamped to [-1, 1]."""
    levels = uniform(0.0, max_level, generator, len(x))
    sigma = (2 * levels / 255)[:, None, None, None]
    return (x + sigma * smooth_field(tuple(x.shape), generator).to(x.dtype)).clamp(-1, 1)


def augment_levels(max_level: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n] noise levels for training, uniform in [0, max_level] 8-bit levels (CDM draws the
    augmentation's level uniformly and conditions on it)."""
    return uniform(0.0, max_level, generator, n)


def blur(x: torch.Tensor, generator: torch.Generator, sigma_range: tuple[float, float] = BLUR_SIGMA) -> torch.Tensor:
    """Isotropic Gaussian blur, sigma ~ U[sigma_range] drawn per image. [B, 3, h, w] -> same."""
    sigma = uniform(*sigma_range, generator, len(x))
    return gaussian_blur(x, torch.diag_embed(torch.stack([sigma, sigma], -1) ** 2))


def bsr(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """BSRGAN's degradation sequence on one image [1, 3, h, w] -> same shape (see the module doc)."""
    steps = [iso_blur, aniso_blur, resize_round_trip, gaussian_noise, maybe_jpeg]
    for i in torch.randperm(len(steps), generator=generator).tolist():
        x = steps[i](x, generator).clamp(-1, 1)
    return jpeg(x, generator)


# ---- the steps of BSR --------------------------------------------------------------------------
def iso_blur(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    sigma = uniform(*ISO_SIGMA, generator, 1)
    return gaussian_blur(x, (sigma ** 2 * torch.eye(2))[None])


def aniso_blur(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian with covariance R diag(s1^2, s2^2) R^T, R a random rotation (BSRGAN's B_aniso)."""
    s = uniform(*ANISO_SIGMA, generator, 2)
    theta = float(uniform(0.0, math.pi, generator, 1))
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return gaussian_blur(x, (rot @ torch.diag(s ** 2) @ rot.T)[None])


def resize_round_trip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shrink by a random factor with a random interpolation, then back with another (no antialias:
    aliasing is part of the degradation, as with cv2.resize in BSRGAN)."""
    h, w = x.shape[-2:]
    factor = float(uniform(*RESIZE_FACTOR, generator, 1))
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    x = F.interpolate(x, size=small, **_mode(DOWN_MODES, generator))
    return F.interpolate(x, size=(h, w), **_mode(UP_MODES, generator))


def gaussian_noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise, sigma from NOISE_LEVEL / 255: independent per channel (p 0.4),
    one value for all channels (grayscale, p 0.4), or correlated across channels (p 0.2)."""
    level = int(torch.randint(NOISE_LEVEL[0], NOISE_LEVEL[1] + 1, (1,), generator=generator))
    sigma = 2 * level / 255                                  # [-1, 1] spans 2 x 255 steps
    b, c, h, w = x.shape
    kind = float(torch.rand(1, generator=generator))
    if kind > 0.6:
        noise = torch.randn(x.shape, generator=generator)
    elif kind < 0.4:
        noise = torch.randn((b, 1, h, w), generator=generator).expand_as(x)
    else:
        # covariance U^T D U, U a random orthogonal matrix, D ~ U[0, 1]^3 (BSRGAN)
        u, _ = torch.linalg.qr(torch.rand(c, c, generator=generator))
        mix = torch.diag(torch.rand(c, generator=generator).sqrt()) @ u
        noise = torch.einsum("bihw,ij->bjhw", torch.randn(x.shape, generator=generator), mix)
    return x + sigma * noise


def maybe_jpeg(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return jpeg(x, generator) if float(torch.rand(1, generator=generator)) < JPEG_PROB else x


def jpeg(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """JPEG re-encoding at a random quality in JPEG_QUALITY (through uint8, as a file would be)."""
    quality = int(torch.randint(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, (1,), generator=generator))
    out = [tio.decode_jpeg(tio.encode_jpeg(img, quality=quality)) for img in to_uint8(x)]
    return to_model(torch.stack(out))


# ---- helpers ----------------------------------------------------------------------------------
def gaussian_blur(x: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Blur each image of x [B, C, h, w] with the Gaussian of covariance cov [B, 2, 2] (px^2);
    the kernel spans 3 standard deviations, edges are replicated."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(torch.linalg.eigvalsh(cov).max().sqrt())))
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)      # [k*k, 2] (dy, dx)
    mahalanobis = torch.einsum("ni,bij,nj->bn", grid, torch.linalg.inv(cov.float()), grid)
    kernel = torch.softmax(-0.5 * mahalanobis, dim=-1).view(b, 1, 2 * radius + 1, 2 * radius + 1)
    padded = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel.repeat_interleave(c, dim=0).to(x.dtype), groups=b * c).view(b, c, h, w)


def uniform(low: float, high: float, generator: torch.Generator, n: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _mode(modes: tuple[str, ...], generator: torch.Generator) -> dict:
    mode = modes[int(torch.randint(len(modes), (1,), generator=generator))]
    return {"mode": mode} if mode == "area" else {"mode": mode, "align_corners": False}
