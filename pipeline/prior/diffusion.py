"""Gaussian diffusion for the prior: training loss and sampling, the network passed in.

Embeddings are diffused at unit per-dimension scale: z_i (unit norm in D dims) times sqrt(D).
The network predicts x0 (DALL-E 2: the prior predicts the unnoised z_i directly, MSE loss);
cosine ("squaredcos_cap_v2") schedule, 1000 training steps. Classifier-free guidance: the text
condition (z_t and token encodings) is dropped for ``p_uncond`` of the training examples; at
sampling, x0 = x0_uncond + s (x0_cond - x0_uncond). DALL-E 2's rerank: draw ``n_candidates``
per caption and keep the one with the larger dot product with z_t.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import diffusion
from ..diffusion import Denoiser, make_sampler, sample_loop

PREDICTION = "sample"          # the prior predicts x0 (DALL-E 2, section 2.2)


def drop_condition(z_t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor):
    """Zero the text condition where ``drop`` [B] is True (the 'unconditional' input)."""
    keep = (~drop).to(z_t.dtype)
    return z_t * keep[:, None], tokens * keep[:, None, None], mask & ~drop[:, None]


def training_loss(model, z_i: torch.Tensor, z_t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                  scheduler, p_uncond: float = 0.1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """MSE between the network's x0 and the true (scaled) image embedding. Shapes as in the network."""
    b, d = z_i.shape
    x_start = z_i * math.sqrt(d)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=z_i.device, generator=generator)
    noise = torch.randn(x_start.shape, device=z_i.device, generator=generator)
    x_t = scheduler.add_noise(x_start, noise, t)
    drop = torch.rand(b, device=z_i.device, generator=generator) < p_uncond
    x0 = model(x_t, t, *drop_condition(z_t * math.sqrt(d), tokens, mask, drop))
    return F.mse_loss(x0.float(), diffusion.training_target(scheduler, x_start, noise, t))


@torch.no_grad()
def sample(model, condition, sampling, *, generator: Optional[torch.Generator] = None,
           x_T: Optional[torch.Tensor] = None, stats: Optional[dict] = None) -> torch.Tensor:
    """One unit-norm image embedding [B, D] per row of ``condition`` (a ``kinds.Caption``), by
    ``sampling``'s sampler (``kinds.sample`` draws the candidates and reranks)."""
    z_t, tokens, mask = condition
    b, d = z_t.shape
    cz = z_t * math.sqrt(d)
    uz, ut, um = drop_condition(cz, tokens, mask, torch.ones(b, dtype=torch.bool, device=cz.device))
    denoiser = Denoiser.guided(model, (cz, tokens, mask), (uz, ut, um), sampling.guidance_scale)
    x_T = diffusion.randn((b, d), generator, z_t.device) if x_T is None else x_T
    x = sample_loop(denoiser, x_T, make_sampler(sampling.sampler, sampling.steps, PREDICTION), generator)
    if stats is not None:
        stats["nfe"] = denoiser.nfe
    return F.normalize(x, dim=-1)


def rerank(candidates: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """DALL-E 2's rerank: of candidates [B, k, D] per caption, the one most aligned with the
    caption's text embedding z_t [B, D] (largest z_i . z_t) -> [B, D]. Either prior uses it."""
    best = (candidates * F.normalize(z_t, dim=-1)[:, None, :]).sum(-1).argmax(dim=1)
    return candidates[torch.arange(len(candidates)), best]
