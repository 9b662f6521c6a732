"""DDIM inversion of the decoder: an image to its noise, the x_T of DALL-E 2's bipartite latent.

DALL-E 2 (section 3) describes an image by the bipartite latent (z_i, x_T): z_i from CLIP, x_T
from DDIM inversion of the decoder conditioned on z_i (Song et al. 2021, eta = 0). Decoding
(z_i, x_T) with the decoder's ``invertible-ddim`` sampler at eta = 0 reconstructs the image; with
eta > 0 the sampler adds fresh noise at every step, and the samples depart from the image as eta
grows: variations. Both directions are :class:`pipeline.diffusion.InvertibleDDIM` run by the one
sampling loop (its docstring: the timesteps, the approximation, why not diffusers' schedulers).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..diffusion import InvertibleDDIM, sample_loop
from .diffusion import Condition, DecoderSampling, guided


@torch.no_grad()
def invert(model, x0: torch.Tensor, condition: Condition, sampling: DecoderSampling, *,
           stats: Optional[dict] = None) -> torch.Tensor:
    """Images x0 [B, 3, S, S] in [-1, 1] at the decoder's resolution -> their noise x_T (at
    tau_{steps-1}) under ``condition``, ``sampling``'s steps and guidance (the decoder's mean
    channels), to be decoded by ``sample`` with the same steps and the ``invertible-ddim`` sampler."""
    denoiser = guided(model, condition, sampling.guidance_scale, mean_only=True)
    x_T = sample_loop(denoiser, x0.float(), InvertibleDDIM(sampling.steps, sampling.prediction_type, inverse=True))
    if stats is not None:
        stats["nfe"] = denoiser.nfe
    return x_T
