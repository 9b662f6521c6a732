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

Target (the defaults: ``target: residual``, ``residual_scale: 8``): what is diffused is the
high-res image minus the bicubic upsample of the low-res one (SRDiff), multiplied by 8. That
residual is zero on flat regions and small elsewhere (std 0.04-0.09 on the embedded corpus,
against 0.7 for the images the cosine schedule was made for). Unscaled, the schedule's noise
drowns it at every step, and whatever noise the network fails to remove at its last step lands on
the image as it is; scaled to the images' spread (as latent diffusion scales its latents), the
network's error lands divided by 8. Measured on a clean (real) input at 400/300 training steps,
the noise an upsampler adds to a flat background fell from 5.1 and 8.4 levels (image target) to
1.0 and 1.2, and val PSNR rose from 29.1 and 27.1 dB to 33.4 and 35.7 (README "the upsamplers'
residual").
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .. import bundle, diffusion
from ..diffusion import Denoiser, make_sampler, sample_loop
from ..images import resize
from .network import Upsampler


def training_loss(model, x0: torch.Tensor, low_res_up: torch.Tensor, schedule,
                  generator: Optional[torch.Generator] = None, z_i: Optional[torch.Tensor] = None,
                  p_drop_image: float = 0.0, residual: bool = False, residual_scale: float = 1.0) -> torch.Tensor:
    """MSE between the network's output and the target of ``schedule``'s prediction type.

    x0: high-res (crops) [B, 3, H, W] in [-1, 1]; low_res_up: the (corrupted) low-res image
    upsampled to the same size and cropped at the same place. Timesteps are uniform over the
    training steps. z_i [B, D]: the image embeddings of a conditioned upsampler, zeroed with
    probability ``p_drop_image`` (as the decoder's), so it also upsamples without one.
    ``residual``: diffuse x0 - low_res_up instead of x0 (SRDiff), so that a network that has
    learnt nothing yet returns the bicubic upsample rather than noise; ``residual_scale`` k: the
    residual diffused is k (x0 - low_res_up), so that its spread matches the noise schedule's."""
    if residual:
        x0 = (x0 - low_res_up) * residual_scale              # [-2k, 2k]; zero on flat regions
    t = torch.randint(0, schedule.config.num_train_timesteps, (len(x0),), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    if z_i is not None and p_drop_image > 0:
        keep = torch.rand(len(x0), device=x0.device, generator=generator) >= p_drop_image
        z_i = z_i * keep.to(z_i.dtype)[:, None]
    out = model(schedule.add_noise(x0, noise, t), t, low_res_up, z_i)
    return F.mse_loss(out.float(), diffusion.training_target(schedule, x0, noise, t))


@torch.no_grad()
def upsample(model, info: dict, low_res: torch.Tensor, *, sampler: Optional[str] = None,
             steps: Optional[int] = None, generator: Optional[torch.Generator] = None,
             z_i: Optional[torch.Tensor] = None, strength: Optional[float] = None) -> torch.Tensor:
    """Low-res images [B, 3, h, h] in [-1, 1] -> high-res [B, 3, h*s, h*s] in [-1, 1], s the
    model's scale. ``info``: the bundle's ``meta["info"]`` (sizes, prediction type and the
    default ``sampling``); ``sampler``/``steps`` override its defaults. ``z_i`` [B, D]: the
    image embeddings the images were decoded from; used by a conditioned upsampler only.
    ``strength`` (default: the bundle's ``sampling.strength``, else 1): < 1 starts from the bicubic
    upsample noised to t = strength T instead of pure noise (SDEdit), the same number of steps."""
    b, _, h, w = low_res.shape
    size = h * (info["out_size"] // info["in_size"])
    if h != w or size % model.multiple:
        raise ValueError(f"need square images whose upsampled side is a multiple of {model.multiple}, "
                         f"got {h}x{w} -> {size}")
    device = next(model.parameters()).device
    cond = resize(low_res.float(), size).to(device)
    strength = info["sampling"].get("strength", 1.0) if strength is None else strength
    residual = info.get("target", "image") == "residual"
    k = info.get("residual_scale", 1.0) if residual else 1.0     # the residual is diffused k times its size
    scheduler = make_sampler(sampler or info["sampling"]["sampler"], steps or info["sampling"]["steps"],
                             info["prediction_type"], clip_range=2.0 * k if residual else 1.0, strength=strength)
    if getattr(model, "embed_dim", 0):
        if z_i is None:
            raise ValueError("this upsampler is conditioned on the image embedding: pass z_i")
        z_i = z_i.to(device)
    else:
        z_i = None
    # the network's own layout and dtype (see for_sampling); the sampler's arithmetic stays fp32
    conv = next((p for p in model.parameters() if p.dim() == 4), None)          # a convolution's weight
    dtype = conv.dtype if conv is not None else torch.float32
    fmt = torch.channels_last if conv is not None and conv.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    cond_in = cond.to(dtype).contiguous(memory_format=fmt)
    z_in = None if z_i is None else z_i.to(dtype)
    denoiser = Denoiser(lambda x, t: model(x.to(dtype).contiguous(memory_format=fmt), t, cond_in,
                                           z_in).float().contiguous())
    x_T = diffusion.randn((b, 3, size, size), generator, device)
    if strength < 1:                       # q(x_t | bicubic) at the first timestep: the image, noised
        t0 = torch.full((b,), int(diffusion.run_timesteps(scheduler)[0]), dtype=torch.long, device=device)
        start = torch.zeros_like(cond) if residual else cond          # the residual of the bicubic upsample: 0
        x_T = diffusion.noise_schedule(info["prediction_type"]).add_noise(start, x_T, t0)
    x0 = sample_loop(denoiser, x_T, scheduler, generator)
    return (x0 / k + cond if residual else x0).clamp(-1, 1)


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
    """A trained upsampler bundle -> (model in eval mode, meta); ``meta["info"]`` feeds :func:`upsample`."""
    return bundle.load_model(path, "upsampler", Upsampler, device)
