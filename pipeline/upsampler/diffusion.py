"""Diffusion for the upsamplers: training loss, sampling and loading, the network passed in.

The shared glue (pipeline/diffusion.py) does the rest: cosine schedule over 1000 steps, the
target for the model's prediction type (noise or v), the samplers. An upsampler is
conditioned only on the low-res image, upsampled bicubically to the output size; there is no
guidance. The low-res image is corrupted in training (``degrade``) but not at sampling, where
it is the previous model's output.

Prediction type: on a CPU budget of a few hundred steps v works and epsilon does not. At high
noise an epsilon model recovers x0 as (x_t - sqrt(1 - a) eps) / sqrt(a), which magnifies its
errors 1/sqrt(a) times (6x at t = 900, 20000x at t = 999, where every sampler starts), and its
loss there hardly asks for the conditioning image; a v model predicts x0 from it directly.
Measured on upsampler 1 (400 steps): val PSNR 13.8 dB with epsilon, 29.0 dB with v.

Target (the defaults: ``target: residual``, ``residual_scale: 8`` for the first, 32 for the second): what is diffused is the
high-res image minus the bicubic upsample of the low-res one (SRDiff), multiplied by 8. That
residual is zero on flat regions and small elsewhere (std 0.04-0.09 on the embedded corpus,
against 0.7 for the images the cosine schedule was made for). Unscaled, the schedule's noise
drowns it at every step, and whatever noise the network fails to remove at its last step lands on
the image as it is; scaled to the images' spread (as latent diffusion scales its latents), the
network's error lands divided by 8. Measured on a clean (real) input at 400/300 training steps,
the noise an upsampler adds to a flat background fell from 5.1 and 8.4 levels (image target) to
1.0 and 1.2, and val PSNR rose from 29.1 and 27.1 dB to 33.4 and 35.7 (docs/MEASURED.md "the upsamplers'
residual"). The second upsampler's error is all speckle on a flat residual, so it gains from a
larger scale still: at 32, 0.78 levels on clean input and +0.9 dB (docs/MEASURED.md, 2026-12-05); the first,
trained with noise augmentation calibrated at 8, loses at 32 (FD 221 -> 264).

Sampling follows the contract of pipeline/diffusion.py: ``sample(model, Condition(low_res, z_i),
UpsamplerSampling.of(meta["info"]), ...)``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from .. import bundle, diffusion
from ..diffusion import Denoiser, Sampling, make_sampler, sample_loop
from ..images import resize
from .degrade import noise_augment
from .network import Upsampler


class Condition(NamedTuple):
    """What an upsampler samples under: the low-res images [B, 3, h, h] in [-1, 1] and, for an
    upsampler conditioned on it, the image embeddings z_i [B, D] they were decoded from."""
    low_res: torch.Tensor
    z_i: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class UpsamplerSampling(Sampling):
    strength: float = 1.0          # < 1: start from the bicubic upsample noised to t = strength T (SDEdit)
    scale: int = 2                 # output side / input side
    residual_scale: Optional[float] = None   # target residual: k (x_0 - bicubic) is diffused; None: the image
    aug_level: float = 0.0         # a noise_aug network: the low-res input is noised to this (8-bit levels) first

    @classmethod
    def of(cls, info: dict, **overrides) -> "UpsamplerSampling":
        """From a saved upsampler's ``meta["info"]``: its sampling, prediction type, scale and
        target (one saved before the residual target diffuses the image)."""
        residual = info.get("residual_scale", 1.0) if info.get("target", "image") == "residual" else None
        return replace(super().of(info, **overrides), scale=info["out_size"] // info["in_size"], residual_scale=residual)


def training_loss(model, x0: torch.Tensor, low_res_up: torch.Tensor, schedule,
                  generator: Optional[torch.Generator] = None, z_i: Optional[torch.Tensor] = None,
                  p_drop_image: float = 0.0, residual: bool = False, residual_scale: float = 1.0,
                  aug_level: Optional[torch.Tensor] = None, sobolev_weight: float = 0.0) -> torch.Tensor:
    """MSE between the network's output and the target of ``schedule``'s prediction type; with
    ``sobolev_weight`` > 0 the error's finite differences join it (:func:`pipeline.diffusion.sobolev_error`).

    x0: high-res (crops) [B, 3, H, W] in [-1, 1]; low_res_up: the (corrupted) low-res image
    upsampled to the same size and cropped at the same place. Timesteps are uniform over the
    training steps. z_i [B, D]: the image embeddings of a conditioned upsampler, zeroed with
    probability ``p_drop_image`` (as the decoder's), so it also upsamples without one.
    ``residual``: diffuse x0 - low_res_up instead of x0 (SRDiff), so that a network that has
    learnt nothing yet returns the bicubic upsample rather than noise; ``residual_scale`` k: the
    residual diffused is k (x0 - low_res_up), so that its spread matches the noise schedule's.
    ``aug_level`` [B]: the noise levels ``low_res_up`` was augmented with (a ``noise_aug`` network)."""
    if residual:
        x0 = (x0 - low_res_up) * residual_scale              # [-2k, 2k]; zero on flat regions
    t = torch.randint(0, schedule.config.num_train_timesteps, (len(x0),), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    if z_i is not None and p_drop_image > 0:
        keep = torch.rand(len(x0), device=x0.device, generator=generator) >= p_drop_image
        z_i = z_i * keep.to(z_i.dtype)[:, None]
    extra = {} if aug_level is None else {"aug_level": aug_level}
    out = model(schedule.add_noise(x0, noise, t), t, low_res_up, z_i, **extra)
    return diffusion.sobolev_error(out.float() - diffusion.training_target(schedule, x0, noise, t),
                                   sobolev_weight).mean()


@torch.no_grad()
def sample(model, condition: Condition, sampling: UpsamplerSampling, *, generator: Optional[torch.Generator] = None,
           x_T: Optional[torch.Tensor] = None, stats: Optional[dict] = None) -> torch.Tensor:
    """Low-res images [B, 3, h, h] -> high-res [B, 3, h*s, h*s] in [-1, 1], s = ``sampling.scale``.
    ``condition.z_i`` is used by a conditioned upsampler only. ``sampling.strength`` < 1 starts
    from the bicubic upsample noised to t = strength T instead of pure noise (SDEdit; ``x_T`` is
    then the noise added), the same number of steps. A network trained with noise conditioning
    augmentation gets its low-res input noised to ``sampling.aug_level`` (drawn from ``generator``
    before ``x_T``) and is told that level."""
    b, _, h, w = condition.low_res.shape
    size = h * sampling.scale
    if h != w or size % model.multiple:
        raise ValueError(f"need square images whose upsampled side is a multiple of {model.multiple}, "
                         f"got {h}x{w} -> {size}")
    device = next(model.parameters()).device
    augmented = getattr(model, "noise_aug", False)
    if sampling.aug_level and not augmented:
        raise ValueError(f"aug_level {sampling.aug_level}: this upsampler was trained without noise conditioning "
                         "augmentation (upsample.stages.<k>.noise_aug), so it cannot be told a level")
    low = condition.low_res.float()
    aug_level = None
    if augmented:
        aug_level = torch.full((b,), float(sampling.aug_level), device=device)
        if sampling.aug_level:
            low = noise_augment(low, aug_level, generator)
    cond = resize(low, size).to(device)
    k = sampling.residual_scale or 1.0                  # the residual is diffused k times its size
    clip = 2.0 * k if sampling.residual_scale else 1.0
    scheduler = make_sampler(sampling.sampler, sampling.steps, sampling.prediction_type, clip_range=clip,
                             strength=sampling.strength)
    denoiser = _denoiser(model, cond, condition.z_i, device, aug_level)
    x_T = diffusion.randn((b, 3, size, size), generator, device) if x_T is None else x_T.to(device)
    if sampling.strength < 1:              # q(x_t | bicubic) at the first timestep: the image, noised
        t0 = torch.full((b,), int(diffusion.run_timesteps(scheduler)[0]), dtype=torch.long, device=device)
        start = torch.zeros_like(cond) if sampling.residual_scale else cond    # the bicubic's residual: 0
        x_T = diffusion.noise_schedule(sampling.prediction_type).add_noise(start, x_T, t0)
    x0 = sample_loop(denoiser, x_T, scheduler, generator)
    if stats is not None:
        stats["nfe"] = denoiser.nfe
    return (x0 / k + cond if sampling.residual_scale else x0).clamp(-1, 1)


def _denoiser(model: Upsampler, cond: torch.Tensor, z_i: Optional[torch.Tensor], device,
              aug_level: Optional[torch.Tensor] = None) -> Denoiser:
    """The network on [x_t, bicubic upsample] (and z_i if it is conditioned on it, the aug level
    if it was trained with noise augmentation), in its own
    layout and dtype (see for_sampling); the sampler's arithmetic stays fp32."""
    if getattr(model, "embed_dim", 0):
        if z_i is None:
            raise ValueError("this upsampler is conditioned on the image embedding: pass z_i")
        z_i = z_i.to(device)
    else:
        z_i = None
    conv = next((p for p in model.parameters() if p.dim() == 4), None)          # a convolution's weight
    dtype = conv.dtype if conv is not None else torch.float32
    fmt = torch.channels_last if conv is not None and conv.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    cond_in = cond.to(dtype).contiguous(memory_format=fmt)
    z_in = None if z_i is None else z_i.to(dtype)
    extra = {} if aug_level is None else {"aug_level": aug_level}
    return Denoiser(lambda x, t: model(x.to(dtype).contiguous(memory_format=fmt), t, cond_in, z_in,
                                       **extra).float().contiguous())


def for_sampling(model: Upsampler, bf16: bool) -> Upsampler:
    """The upsampler laid out as it samples fastest: channels_last activations and weights (a
    fully convolutional UNet: oneDNN's convolutions skip their NCHW reorders), and bf16 weights
    where sampling runs in bf16 anyway (autocast would cast them on every call). Measured per
    network evaluation, batch 32, 2 cores with AVX512-BF16 (bench/sampling_throughput.py):
    upsampler 2 (64 px) 483 -> 210 ms, upsampler 1 (32 px) 63 -> 56 ms. The decoder (16 px, with
    attention) is 0.86x in channels_last and stays as it is."""
    model = model.to(memory_format=torch.channels_last)
    return model.to(torch.bfloat16) if bf16 else model


def load(path: Path, device: str | torch.device = "cpu") -> tuple[Upsampler, dict]:
    """A trained upsampler's directory -> (model in eval mode, meta); ``UpsamplerSampling.of(meta["info"])``
    is how it samples."""
    return bundle.load_model(path, "upsampler", Upsampler, device)
