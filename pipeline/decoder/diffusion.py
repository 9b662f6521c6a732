"""Diffusion for the decoder: the training loss with the two condition drops, and sampling
with classifier-free guidance. The network is passed in.

DALL-E 2 (section 2.1, after GLIDE): the CLIP embedding is zeroed 10 % of the time and the
caption dropped 50 % of the time, independently, so the model learns p(x | z_i, caption),
p(x | z_i), p(x | caption) and p(x). Our default drops the caption 20 % of the time (``decoder.p_drop_caption``,
params.yaml says why). Guidance contrasts the full condition with the empty one:
out = out(empty) + s (out(z_i, caption) - out(empty)).

Learned variance (``learned_variance``, Nichol & Dhariwal 2021, as GLIDE and DALL-E 2's decoder
do): the network outputs 3 more channels that set the reverse step's variance between the
posterior's and beta_t; they are trained by the variational bound alone (the mean's part of it
is detached: the "hybrid" loss L_simple + lambda L_vlb with lambda = 0.001 over 1000 steps).
The network bounds those channels with tanh, so the variance can never leave its range, and
``training.fit`` refuses a non-finite loss: a learned-variance run cannot save a NaN model.
Guidance applies to the mean channels; the variance comes from the conditional pass. DDPM
samples with the learned variance; DDIM and DPM-Solver++ are deterministic and use the mean only.

Sampling follows the contract of pipeline/diffusion.py: ``sample(model, Condition(z_i, tokens,
mask), DecoderSampling.of(meta["info"]), ...)``. With the sampler ``invertible-ddim`` it is the
generalized DDIM that :func:`pipeline.decoder.inversion.invert` inverts (``eta``: fresh noise per
step, 0 reconstructs), and a condition with ``known`` pixels (``known_mask`` 1 where kept) has
them put back, noised to the step's level, after every step (GLIDE/RePaint-style inpainting) and
as they are in the output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .. import diffusion
from ..diffusion import Denoiser, Sampling, make_sampler, run_timesteps, sample_loop

VLB_WEIGHT = 0.001 * diffusion.TRAIN_STEPS       # improved-diffusion's hybrid loss: lambda = 0.001 on sum_t L_t


class Condition(NamedTuple):
    """What the decoder samples under, batched: image embeddings z_i [B, D] (zeros: none), the
    caption's tokens [B, L, W] and mask [B, L] (all False: none), and for inpainting the ``known``
    images [B, 3, S, S] in [-1, 1] with ``known_mask`` [B, 1, S, S] (1 where a pixel is kept)."""
    z_i: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    known: Optional[torch.Tensor] = None
    known_mask: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class DecoderSampling(Sampling):
    guidance_scale: float = 3.0
    eta: float = 0.0                  # invertible-ddim: the fresh noise of every step (0: deterministic)


def drop(z_i: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, drop_image: torch.Tensor,
         drop_caption: torch.Tensor):
    """Zero z_i where ``drop_image`` [B]; mask out (and zero) the caption where ``drop_caption`` [B]."""
    keep_i = (~drop_image).to(z_i.dtype)[:, None]
    keep_c = ~drop_caption
    return z_i * keep_i, tokens * keep_c.to(tokens.dtype)[:, None, None], mask & keep_c[:, None]


def training_loss(model, x0: torch.Tensor, z_i: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                  schedule, p_drop_image: float = 0.1, p_drop_caption: float = 0.5,
                  snr_gamma: Optional[float] = None, generator: Optional[torch.Generator] = None,
                  sobolev_weight: float = 0.0, layout_weight: float = 0.0) -> torch.Tensor:
    """x0 [B, 3, S, S] in [-1, 1]; MSE on the schedule's target (noise or v), per example
    weighted by Min-SNR-gamma when ``snr_gamma`` is set; with ``sobolev_weight`` > 0 the error's
    finite differences join it (:func:`pipeline.diffusion.sobolev_error`). With ``layout_weight`` > 0
    the layout map's first 3 channels regress x0 (under the same condition drops), + that weight x their MSE:
    the map becomes E[x0 | z_i, caption summary], a coarse picture of what goes where."""
    b, dev = x0.shape[0], x0.device
    t = torch.randint(0, schedule.config.num_train_timesteps, (b,), device=dev, generator=generator)
    noise = torch.randn(x0.shape, device=dev, generator=generator)
    x_t = schedule.add_noise(x0, noise, t)
    cond = drop(z_i, tokens, mask, torch.rand(b, device=dev, generator=generator) < p_drop_image,
                torch.rand(b, device=dev, generator=generator) < p_drop_caption)
    out = model(x_t, t, *cond, return_layout=True) if layout_weight else model(x_t, t, *cond)
    if layout_weight:
        out, layout = out
        if layout is None or layout.shape[1] < 3:
            raise ValueError("layout_weight > 0 needs a decoder with 3 or more layout channels")
        layout_loss = (layout[:, :3].float() - x0).square().mean()
    mean_out, var_out = out[:, :3], out[:, 3:]
    err = mean_out.float() - diffusion.training_target(schedule, x0, noise, t)
    per_example = diffusion.sobolev_error(err, sobolev_weight)                 # [B]
    loss = (per_example * diffusion.min_snr_weight(schedule, t, snr_gamma)).mean()
    if var_out.shape[1]:            # learned variance: + lambda * L_vlb, lambda * T = 1 (T = 1000)
        x0_pred = diffusion.predicted_x0(schedule, x_t, mean_out.detach().float(), t)
        loss = loss + VLB_WEIGHT * diffusion.vlb_term(schedule, x0, x_t, t, x0_pred, var_out).mean()
    if layout_weight:
        loss = loss + layout_weight * layout_loss
    return loss


def guided(model, condition: Condition, guidance_scale: float, mean_only: bool) -> Denoiser:
    """The decoder with classifier-free guidance against the empty condition, on the mean
    channels; a learned variance comes from the conditional pass, or with ``mean_only`` (what the
    deterministic samplers and inversion take) is left out."""
    z_i, tokens, mask = condition[:3]
    no = torch.ones(z_i.shape[0], dtype=torch.bool, device=z_i.device)
    net = (lambda *a: model(*a)[:, :3]) if mean_only else model
    return Denoiser.guided(net, (z_i, tokens, mask), drop(z_i, tokens, mask, no, no), guidance_scale,
                           guided_channels=3)


@torch.no_grad()
def sample(model, condition: Condition, sampling: DecoderSampling, *, generator: Optional[torch.Generator] = None,
           x_T: Optional[torch.Tensor] = None, stats: Optional[dict] = None) -> torch.Tensor:
    """Images [B, 3, S, S] in [-1, 1] (S: the model's ``image_size``) under ``condition``.
    ``x_T``: the starting noise (fixed noise for interpolations, an inverted image's noise);
    drawn from ``generator`` otherwise."""
    denoiser = guided(model, condition, sampling.guidance_scale, mean_only=sampling.sampler != "ddpm")
    learned = getattr(model, "learned_variance", False)
    if x_T is None:
        s = model.image_size
        x_T = diffusion.randn((len(condition.z_i), 3, s, s), generator, condition.z_i.device)
    invertible = sampling.sampler == diffusion.INVERTIBLE_DDIM
    scheduler = make_sampler(sampling.sampler, sampling.steps, sampling.prediction_type,
                             clip_range=None if invertible else 1.0, learned_variance=learned, eta=sampling.eta)
    after_step = None if condition.known is None else _put_back_known(condition, scheduler, generator)
    x = sample_loop(denoiser, x_T.float(), scheduler, generator, after_step).clamp(-1, 1)
    if stats is not None:
        stats["nfe"] = denoiser.nfe
    if condition.known is not None:
        x = condition.known_mask * condition.known + (1 - condition.known_mask) * x
    return x


def _put_back_known(condition: Condition, scheduler, generator: Optional[torch.Generator]):
    """``after_step`` of inpainting: the kept pixels replaced by ``known`` noised to the timestep
    the step landed on, q(x_t | known); after the last step the output's composite does it."""
    ts = run_timesteps(scheduler)
    alphas = diffusion.noise_schedule("epsilon").alphas_cumprod
    known, keep = condition.known, condition.known_mask

    def after_step(i: int, x: torch.Tensor) -> torch.Tensor:
        if i + 1 == len(ts):
            return x
        a = alphas[int(ts[i + 1])].to(x.device)
        noised = a.sqrt() * known + (1 - a).sqrt() * diffusion.randn(x.shape, generator, x.device)
        return keep * noised + (1 - keep) * x

    return after_step
