"""Gaussian diffusion shared by the prior, the decoder and the upsamplers: schedule, training
target, samplers, classifier-free guidance. The networks are passed in (improved-diffusion's
split: the diffusion object knows nothing of the network, the network nothing of diffusion).

Every model diffuses over 1000 training steps with the cosine schedule ("squaredcos_cap_v2",
Nichol & Dhariwal 2021), as DALL-E 2 does. What the network predicts is per model: the prior
predicts x0 ("sample"), the image models predict the noise ("epsilon") or v. Samplers are
diffusers' schedulers behind one name each and one loop::

    ddpm   ancestral DDPM (as trained; many steps)
    ddim   DDIM, eta = 0 (deterministic; "trailing" spacing, so the first step starts at t = 999)
    dpm++  DPM-Solver++ (2M), the fast one at 10-25 steps
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

TRAIN_STEPS = 1000
SCHEDULE = "squaredcos_cap_v2"
SAMPLERS = ("ddpm", "ddim", "dpm++")


def noise_schedule(prediction_type: str) -> DDPMScheduler:
    """The training-time forward process: ``add_noise`` and the alphas."""
    return DDPMScheduler(num_train_timesteps=TRAIN_STEPS, beta_schedule=SCHEDULE,
                         prediction_type=prediction_type, clip_sample=False)


def training_target(schedule: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network regresses onto at x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    kind = schedule.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return schedule.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind!r}")


def min_snr_weight(schedule: DDPMScheduler, t: torch.Tensor, gamma: Optional[float]) -> torch.Tensor:
    """Per-example loss weights [B] of Min-SNR-gamma (Hang et al. 2023): the easy low-noise steps
    are down-weighted so they stop dominating the gradient, which speeds up convergence ~3x.
    Expressed for the schedule's target (epsilon: min(SNR, g)/SNR; v: min(SNR, g)/(SNR + 1);
    x0: min(SNR, g)). ``gamma`` None: uniform weights."""
    if gamma is None:
        return torch.ones(t.shape, device=t.device)
    a = schedule.alphas_cumprod.to(t.device)[t]
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    kind = schedule.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def make_sampler(name: str, steps: int, prediction_type: str, clip_range: Optional[float] = None):
    """A diffusers scheduler set to ``steps`` sampling steps.

    ``clip_range``: clamp the predicted x0 to [-r, r] at every step (images live in [-1, 1];
    embeddings are not clipped). DPM-Solver++ does this through its thresholding option.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    common = dict(num_train_timesteps=TRAIN_STEPS, beta_schedule=SCHEDULE, prediction_type=prediction_type)
    clip = clip_range is not None
    if name == "ddpm":
        sched = DDPMScheduler(**common, clip_sample=clip, clip_sample_range=clip_range or 1.0,
                              timestep_spacing="trailing")
    elif name == "ddim":
        sched = DDIMScheduler(**common, clip_sample=clip, clip_sample_range=clip_range or 1.0,
                              set_alpha_to_one=True, timestep_spacing="trailing")
    elif name == "dpm++":
        sched = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                            thresholding=clip, sample_max_value=clip_range or 1.0,
                                            timestep_spacing="trailing", final_sigmas_type="zero")
    else:
        raise ValueError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
    sched.set_timesteps(steps)
    return sched


class Denoiser:
    """``fn(x_t, t [B]) -> network output`` with classifier-free guidance folded in.

    ``cond_fn`` and ``uncond_fn`` map (x_t, t) to the network's output with and without the
    condition; at ``scale`` != 1 both run (one batch, counted as two network evaluations) and
    out = uncond + scale (cond - uncond) (Ho & Salimans 2021). ``nfe`` counts evaluations per
    sample, the cost figure that sampler comparisons use.
    """

    def __init__(self, cond_fn: Callable, uncond_fn: Optional[Callable] = None, scale: float = 1.0):
        if scale != 1.0 and uncond_fn is None:
            raise ValueError("guidance needs an unconditional branch")
        self.cond_fn, self.uncond_fn, self.scale, self.nfe = cond_fn, uncond_fn, scale, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.cond_fn(x, t)
        self.nfe += 1
        if self.scale == 1.0:
            return out
        out_u = self.uncond_fn(x, t)
        self.nfe += 1
        return out_u + self.scale * (out - out_u)


@torch.no_grad()
def sample_loop(denoiser: Callable, x_T: torch.Tensor, sampler, generator: Optional[torch.Generator] = None,
                on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Run ``sampler`` from pure noise ``x_T`` to x_0; the same loop for every model and sampler."""
    x = x_T
    for i, t in enumerate(sampler.timesteps):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = denoiser(sampler.scale_model_input(x, t), tt)
        x = sampler.step(out, t, x, generator=generator).prev_sample
        if on_step:
            on_step(i, x)
    return x


def randn(shape, generator: Optional[torch.Generator], device="cpu") -> torch.Tensor:
    """Noise drawn on CPU from a seeded generator, so a seed gives the same sample on any device."""
    return torch.randn(shape, generator=generator).to(device)
