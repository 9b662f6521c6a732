"""Diffusion for the decoder: the training loss with the two condition drops, and sampling
with classifier-free guidance. The network is passed in.

DALL-E 2 (section 2.1, after GLIDE): the CLIP embedding is zeroed 10 % of the time and the
caption dropped 50 % of the time, independently, so the model learns p(x | z_i, caption),
p(x | z_i), p(x | caption) and p(x). Guidance contrasts the full condition with the empty one:
out = out(empty) + s (out(z_i, caption) - out(empty)).

Learned variance (``learned_variance``, Nichol & Dhariwal 2021, as GLIDE and DALL-E 2's decoder
do): the network outputs 3 more channels that set the reverse step's variance between the
posterior's and beta_t; they are trained by the variational bound alone (the mean's part of it
is detached: the "hybrid" loss L_simple + lambda L_vlb with lambda = 0.001 over 1000 steps).
The network bounds those channels with tanh, so the variance can never leave its range, and
``training.fit`` refuses a non-finite loss: a learned-variance run cannot save a NaN model.
Guidance applies to the mean channels; the variance comes from the conditional pass. DDPM
samples with the learned variance; DDIM and DPM-Solver++ are deterministic and use the mean only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import diffusion
from ..diffusion import Denoiser, make_sampler, sample_loop

VLB_WEIGHT = 0.001 * diffusion.TRAIN_STEPS       # improved-diffusion's hybrid loss: lambda = 0.001 on sum_t L_t


def drop(z_i: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, drop_image: torch.Tensor,
         drop_caption: torch.Tensor):
    """Zero z_i where ``drop_image`` [B]; mask out (and zero) the caption where ``drop_caption`` [B]."""
    keep_i = (~drop_image).to(z_i.dtype)[:, None]
    keep_c = ~drop_caption
    return z_i * keep_i, tokens * keep_c.to(tokens.dtype)[:, None, None], mask & keep_c[:, None]


def training_loss(model, x0: torch.Tensor, z_i: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                  schedule, p_drop_image: float = 0.1, p_drop_caption: float = 0.5,
                  snr_gamma: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x0 [B, 3, S, S] in [-1, 1]; MSE on the schedule's target (noise or v), per example
    weighted by Min-SNR-gamma when ``snr_gamma`` is set."""
    b, dev = x0.shape[0], x0.device
    t = torch.randint(0, schedule.config.num_train_timesteps, (b,), device=dev, generator=generator)
    noise = torch.randn(x0.shape, device=dev, generator=generator)
    x_t = schedule.add_noise(x0, noise, t)
    cond = drop(z_i, tokens, mask, torch.rand(b, device=dev, generator=generator) < p_drop_image,
                torch.rand(b, device=dev, generator=generator) < p_drop_caption)
    out = model(x_t, t, *cond)
    mean_out, var_out = out[:, :3], out[:, 3:]
    per_example = F.mse_loss(mean_out.float(), diffusion.training_target(schedule, x0, noise, t),
                             reduction="none").mean(dim=(1, 2, 3))
    loss = (per_example * diffusion.min_snr_weight(schedule, t, snr_gamma)).mean()
    if var_out.shape[1]:            # learned variance: + lambda * L_vlb, lambda * T = 1 (T = 1000)
        x0_pred = diffusion.predicted_x0(schedule, x_t, mean_out.detach().float(), t)
        loss = loss + VLB_WEIGHT * diffusion.vlb_term(schedule, x0, x_t, t, x0_pred, var_out).mean()
    return loss


@torch.no_grad()
def sample(model, z_i: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, *, image_size: int,
           prediction_type: str, sampler: str = "ddim", steps: int = 25, guidance_scale: float = 3.0,
           generator: Optional[torch.Generator] = None, x_T: Optional[torch.Tensor] = None,
           stats: Optional[dict] = None) -> torch.Tensor:
    """Images [B, 3, S, S] in [-1, 1] for image embeddings z_i [B, D] (zeros: none) and captions
    (tokens [B, L, W], mask [B, L]; an all-False mask: none). ``x_T``: the starting noise
    (fixed noise for interpolations); drawn from ``generator`` otherwise."""
    b = z_i.shape[0]
    no = torch.ones(b, dtype=torch.bool, device=z_i.device)
    empty = drop(z_i, tokens, mask, no, no)
    denoiser = Denoiser.guided(model, (z_i, tokens, mask), empty, guidance_scale, guided_channels=3)
    learned = getattr(model, "learned_variance", False)
    step_fn = denoiser
    if learned and sampler != "ddpm":
        step_fn = lambda x, t: denoiser(x, t)[:, :3]            # noqa: E731  deterministic: mean only
    if x_T is None:
        x_T = diffusion.randn((b, 3, image_size, image_size), generator, z_i.device)
    x = sample_loop(step_fn, x_T, make_sampler(sampler, steps, prediction_type, clip_range=1.0,
                                               learned_variance=learned), generator)
    if stats is not None:
        stats["nfe"] = denoiser.nfe
    return x.clamp(-1, 1)
