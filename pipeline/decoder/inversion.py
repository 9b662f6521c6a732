"""DDIM in both directions for the decoder: inversion of an image to its noise, and generalized
DDIM sampling (eta) with an optional known region (inpainting).

DALL-E 2 (section 3) describes an image by the bipartite latent (z_i, x_T): z_i from CLIP, x_T
from DDIM inversion of the decoder conditioned on z_i (Song et al. 2021, eta = 0). Decoding
(z_i, x_T) with eta = 0 reconstructs the image; with eta > 0 the sampler adds fresh noise at
every step, and the samples depart from the image as eta grows: variations.

Timesteps use "leading" spacing ``tau_i = i * 1000 / steps``, i = 0..steps-1. Inversion walks up
from the image, taken as x at tau_0 (alpha_bar(0) = 0.99996: clean to 1/255), and reuses the
network's output at tau_i for the step to tau_{i+1} (the standard approximation, exact as the
steps shrink); sampling walks the same timesteps down. No x0 clipping in either direction, so
the two are inverses up to that approximation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import diffusion
from ..diffusion import Denoiser
from .diffusion import drop


def timesteps(steps: int) -> list[int]:
    if not 1 <= steps <= diffusion.TRAIN_STEPS:
        raise ValueError(f"steps must be in 1..{diffusion.TRAIN_STEPS}, got {steps}")
    return [round(i * diffusion.TRAIN_STEPS / steps) for i in range(steps)]


def x0_and_eps(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction_type: str):
    """(x0, eps) implied by the network output at x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    s, r = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "v_prediction":
        return s * x - r * out, r * x + s * out
    if prediction_type == "epsilon":
        return (x - r * out) / s, out
    if prediction_type == "sample":
        return out, (x - s * out) / r
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def _denoiser(model, z_i, tokens, mask, guidance_scale: float) -> Denoiser:
    """The decoder's mean channels, with classifier-free guidance against the empty condition."""
    b = z_i.shape[0]
    no = torch.ones(b, dtype=torch.bool, device=z_i.device)
    empty = drop(z_i, tokens, mask, no, no)
    return Denoiser.guided(lambda *a: model(*a)[:, :3], (z_i, tokens, mask), empty, guidance_scale)


def _alpha(t: int, device) -> torch.Tensor:
    return diffusion.noise_schedule("epsilon").alphas_cumprod[t].to(device)


@torch.no_grad()
def invert(model, x0: torch.Tensor, z_i: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, *,
           prediction_type: str, steps: int = 100, guidance_scale: float = 1.0,
           stats: Optional[dict] = None) -> torch.Tensor:
    """Images x0 [B, 3, S, S] in [-1, 1] at the decoder's resolution -> their noise x_T (at
    tau_{steps-1}) under the condition (z_i [B, D]; tokens/mask, all-False mask for no caption)."""
    den = _denoiser(model, z_i, tokens, mask, guidance_scale)
    ts = timesteps(steps)
    x = x0.float()
    for t, t_next in zip(ts[:-1], ts[1:]):
        a, a_next = _alpha(t, x.device), _alpha(t_next, x.device)
        out = den(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0_hat, eps = x0_and_eps(out, x, a, prediction_type)
        x = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
    if stats is not None:
        stats["nfe"] = den.nfe
    return x


@torch.no_grad()
def sample(model, x_T: torch.Tensor, z_i: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, *,
           prediction_type: str, steps: int = 100, guidance_scale: float = 1.0, eta: float = 0.0,
           generator: Optional[torch.Generator] = None, known: Optional[torch.Tensor] = None,
           known_mask: Optional[torch.Tensor] = None, stats: Optional[dict] = None) -> torch.Tensor:
    """Generalized DDIM from x_T (at tau_{steps-1}) down to x0 [B, 3, S, S] in [-1, 1].

    ``eta`` scales the fresh noise of every step (0: deterministic, the inverse of ``invert``;
    1: DDPM-like). With ``known`` (images in [-1, 1]) and ``known_mask`` ([B, 1, S, S], 1 where
    the pixel is kept), the kept region of every intermediate x is replaced by ``known`` noised
    to that step (GLIDE/RePaint-style inpainting), and of the output by ``known`` itself.
    """
    den = _denoiser(model, z_i, tokens, mask, guidance_scale)
    ts = timesteps(steps)
    x = x_T.float()
    x0_hat = x
    for i in range(len(ts) - 1, -1, -1):
        t = ts[i]
        a = _alpha(t, x.device)
        out = den(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0_hat, eps = x0_and_eps(out, x, a, prediction_type)
        if i == 0:
            break
        a_prev = _alpha(ts[i - 1], x.device)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0).sqrt()
        x = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps
        if eta > 0:
            x = x + sigma * diffusion.randn(x.shape, generator, x.device)
        if known is not None:
            noised = a_prev.sqrt() * known + (1 - a_prev).sqrt() * diffusion.randn(x.shape, generator, x.device)
            x = known_mask * noised + (1 - known_mask) * x
    # the last step lands on tau_0 (alpha_bar 0.99996): x0_hat there is the image
    out_img = x0_hat.clamp(-1, 1)
    if known is not None:
        out_img = known_mask * known + (1 - known_mask) * out_img
    if stats is not None:
        stats["nfe"] = den.nfe
    return out_img
