"""Gaussian diffusion shared by the prior, the decoder and the upsamplers: schedule, training
target and the image models' loss (the MSE, or with ``sobolev_weight`` an H1 loss), samplers,
classifier-free guidance. The networks are passed in (improved-diffusion's
split: the diffusion object knows nothing of the network, the network nothing of diffusion).

Every model diffuses over 1000 training steps with the cosine schedule ("squaredcos_cap_v2",
Nichol & Dhariwal 2021), as DALL-E 2 does. What the network predicts is per model: the prior
predicts x0 ("sample"), the image models predict the noise ("epsilon") or v. Samplers are
diffusers' schedulers behind one name each and one loop::

    ddpm             ancestral DDPM (as trained; many steps)
    ddim             DDIM, eta = 0 (deterministic; "trailing" spacing, so the first step starts at t = 999)
    dpm++            DPM-Solver++ (2M), the fast one at 10-25 steps
    invertible-ddim  generalized DDIM (eta) on "leading" timesteps without x0 clipping, and its
                     inverse (:class:`InvertibleDDIM`): the decoder's inversion and what it inverts

The sampling contract, one per model (k-diffusion's habit: every model samples through one
signature, so callers batch, seed and count the same way)::

    sample(model, condition, sampling, *, generator=None, x_T=None, stats=None) -> samples [B, ...]

    condition  a NamedTuple of batched tensors, the model's own: prior.kinds.Caption (z_t, tokens,
               mask), decoder.diffusion.Condition (z_i, tokens, mask; known pixels for inpainting),
               upsampler.diffusion.Condition (low_res, z_i)
    sampling   a :class:`Sampling` (the model's subclass): sampler, steps, guidance and what the
               network's output means, as the model's ``model.json`` recorded them (``Sampling.of(info)``)
               with a call's overrides
    generator  every draw (starting noise, ancestral noise, categorical codes) comes from it
    x_T        the starting noise instead of a draw (fixed noise for interpolations)
    stats      a dict that receives ``nfe``, the network evaluations per sample

:func:`in_batches` runs any of them over rows of a condition in batches, one generator throughout.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, NamedTuple, Optional

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

TRAIN_STEPS = 1000
SCHEDULE = "squaredcos_cap_v2"
SAMPLERS = ("ddpm", "ddim", "dpm++")
INVERTIBLE_DDIM = "invertible-ddim"


def noise_schedule(prediction_type: str) -> DDPMScheduler:
    """The training-time forward process: ``add_noise`` and the alphas."""
    return DDPMScheduler(num_train_timesteps=TRAIN_STEPS, beta_schedule=SCHEDULE,
                         prediction_type=prediction_type, clip_sample=False)


@dataclass(frozen=True)
class Sampling:
    """How to sample a model: the sampler and its steps, the guidance scale, and what the
    network's output is (``prediction_type``, fixed by training). Each model's module subclasses
    it with the settings only it has (the prior's candidates, the decoder's eta, the upsamplers'
    strength and target)."""
    sampler: str = "ddim"
    steps: int = 25
    guidance_scale: float = 1.0
    prediction_type: str = "epsilon"

    @classmethod
    def of(cls, info: dict, **overrides) -> "Sampling":
        """From a saved model's ``meta["info"]`` (its ``sampling`` section and the keys beside it, such as
        ``prediction_type``), with the ``overrides`` that are not None over it."""
        names = {f.name for f in fields(cls)}
        recorded = {k: v for k, v in (info | info.get("sampling", {})).items() if k in names}
        return cls(**recorded | {k: v for k, v in overrides.items() if v is not None})

    def but(self, **overrides) -> "Sampling":
        """This sampling with the ``overrides`` that are not None."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


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


def sobolev_error(err: torch.Tensor, weight: float = 0.0) -> torch.Tensor:
    """Per example [B] of an error [B, C, S, S]: mean(err^2) + weight * (mean(dx err^2) + mean(dy err^2)),
    the squared H1 (Sobolev) norm with forward differences; ``weight`` 0 is the plain MSE.

    A fixed positive-definite quadratic form of the error, so its minimiser is still the
    conditional mean E[target | x_t, condition], as the MSE's: the sampler's target is unchanged.
    What changes is the emphasis while learning: in Fourier terms the error at frequency (u, v)
    weighs 1 + weight * (4 sin^2(pi u / S) + 4 sin^2(pi v / S)), up to 1 + 8 * weight at the
    Nyquist frequency. At the decoder's 16 px a small square and a small circle (3.8 px across)
    differ in a few corner pixels, an error the plain MSE hardly sees beside the layout's and colors'."""
    mse = err.square().mean(dim=(1, 2, 3))
    if not weight:
        return mse
    dx = (err[..., :, 1:] - err[..., :, :-1]).square().mean(dim=(1, 2, 3))
    dy = (err[..., 1:, :] - err[..., :-1, :]).square().mean(dim=(1, 2, 3))
    return mse + weight * (dx + dy)


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


# ---- learned variance (Nichol & Dhariwal 2021, "improved DDPM"): the hybrid loss -----------------
def predicted_x0(schedule: DDPMScheduler, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 implied by the network output ``out`` (the schedule's prediction type) at x_t."""
    a = schedule.alphas_cumprod.to(x_t.device)[t].view(-1, *[1] * (x_t.ndim - 1))
    kind = schedule.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - a).sqrt() * out) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * out
    return out


def _posterior(schedule: DDPMScheduler, t: torch.Tensor, shape_like: torch.Tensor):
    """Coefficients of q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, var) and the clipped log
    variances at both ends of the learned range: (c0, ct, log_posterior_var, log_beta), each [B, 1, ...]."""
    dev = shape_like.device
    ac = schedule.alphas_cumprod.to(dev, torch.float64)
    ac_prev = torch.cat([torch.ones(1, device=dev, dtype=ac.dtype), ac[:-1]])
    betas = schedule.betas.to(dev, torch.float64)
    var = betas * (1 - ac_prev) / (1 - ac)
    log_var = torch.log(torch.cat([var[1:2], var[1:]]))       # var[0] = 0: clipped as improved-diffusion does
    view = lambda v: v[t].float().view(-1, *[1] * (shape_like.ndim - 1))     # noqa: E731
    c0 = betas * ac_prev.sqrt() / (1 - ac)
    ct = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)
    return view(c0), view(ct), view(log_var), view(torch.log(betas))


def learned_log_variance(schedule: DDPMScheduler, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The model's log variance from its variance channels ``v`` in [-1, 1] ("learned_range"):
    an interpolation between log(posterior variance) (v = -1) and log(beta_t) (v = +1)."""
    _, _, lo, hi = _posterior(schedule, t, v)
    frac = (v.float() + 1) / 2
    return frac * hi + (1 - frac) * lo


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x.pow(3))))


def vlb_term(schedule: DDPMScheduler, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             x0_pred: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """L_t of the variational bound per example [B], in bits per dimension: KL(q(x_{t-1}|x_t, x0)
    || p(x_{t-1}|x_t)) for t > 0, the discretized Gaussian decoder's NLL of x0 (8-bit data) for
    t = 0. ``x0_pred`` should be detached: the bound trains only the variance (hybrid loss)."""
    x0, x_t, x0_pred = x0.float(), x_t.float(), x0_pred.float()
    c0, ct, true_log_var, _ = _posterior(schedule, t, x0)
    true_mean = c0 * x0 + ct * x_t
    mean = c0 * x0_pred + ct * x_t
    log_var = learned_log_variance(schedule, t, v)
    kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                + (true_mean - mean).pow(2) * torch.exp(-log_var))
    # t = 0: -log of the probability mass of x0's 8-bit bin under N(mean, var)
    inv_std = torch.exp(-0.5 * log_var)
    upper = _approx_std_normal_cdf(inv_std * (x0 - mean + 1 / 255))
    lower = _approx_std_normal_cdf(inv_std * (x0 - mean - 1 / 255))
    mass = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1 - lower, upper - lower))
    nll = -torch.log(mass.clamp(min=1e-12))
    per_dim = torch.where((t == 0).view(-1, *[1] * (x0.ndim - 1)), nll, kl)
    return per_dim.mean(dim=tuple(range(1, x0.ndim))) / 0.6931471805599453


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


class Step(NamedTuple):
    prev_sample: torch.Tensor             # the name diffusers' schedulers give the step's result
    pred_original_sample: torch.Tensor


class InvertibleDDIM:
    """Generalized DDIM (Song et al. 2021, eq. 12) in either direction, with diffusers' scheduler
    interface (``timesteps``, ``scale_model_input``, ``step``), so :func:`sample_loop` runs it.

    Timesteps are "leading", tau_i = round(i T / steps), i = 0..steps-1. Down (sampling) from
    tau_{steps-1}: x_{tau_i-1} = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z, sigma = eta
    sqrt((1 - a') / (1 - a) (1 - a / a')); the last step, at tau_0 (alpha_bar 0.99996), returns x0.
    Up (``inverse``, eta = 0, DDIM inversion): from the image taken as x at tau_0, the same step
    from tau_i to tau_i+1, reusing the network's output at tau_i (the standard approximation,
    exact as the steps shrink). No x0 clipping in either direction, so the two are inverses up to
    that approximation.

    Why not diffusers' DDIMScheduler: it steps down only, to t - T // steps (so the round(i T /
    steps) timesteps of a step count that does not divide T are out of its reach), and its last
    step draws noise it then scales by zero, which moves the generator the upsamplers draw from
    next; its DDIMInverseScheduler evaluates the network at the upper timestep with x still at the
    lower one, another approximation than the one inverted here.
    """

    def __init__(self, steps: int, prediction_type: str, eta: float = 0.0, inverse: bool = False):
        if not 1 <= steps <= TRAIN_STEPS:
            raise ValueError(f"steps must be in 1..{TRAIN_STEPS}, got {steps}")
        if inverse and eta:
            raise ValueError("DDIM inversion is deterministic: eta must be 0")
        tau = [round(i * TRAIN_STEPS / steps) for i in range(steps)]
        self.timesteps = torch.tensor(tau[:-1] if inverse else tau[::-1])
        self.to = dict(zip(tau[:-1], tau[1:])) if inverse else dict(zip(tau[1:], tau[:-1]))
        self.prediction_type, self.eta = prediction_type, eta
        self.alphas_cumprod = noise_schedule(prediction_type).alphas_cumprod

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        return x

    def step(self, out: torch.Tensor, t, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> Step:
        a = self.alphas_cumprod[int(t)].to(x.device)
        x0, eps = x0_and_eps(out, x, a, self.prediction_type)
        if int(t) not in self.to:                     # down at tau_0: off the schedule, the image itself
            return Step(x0, x0)
        a_to = self.alphas_cumprod[self.to[int(t)]].to(x.device)
        sigma = self.eta * ((1 - a_to) / (1 - a) * (1 - a / a_to)).clamp_min(0).sqrt()
        x = a_to.sqrt() * x0 + (1 - a_to - sigma ** 2).clamp_min(0).sqrt() * eps
        if self.eta > 0:
            x = x + sigma * randn(x.shape, generator, x.device)
        return Step(x, x0)


def make_sampler(name: str, steps: int, prediction_type: str, clip_range: Optional[float] = None,
                 learned_variance: bool = False, strength: float = 1.0, eta: float = 0.0):
    """A diffusers scheduler set to ``steps`` sampling steps (``invertible-ddim``: an
    :class:`InvertibleDDIM` with ``eta``; it never clips and always starts from t ~ T, so that
    inversion can invert it: ``clip_range`` and ``strength`` are not for it).

    ``strength`` < 1: only the last ``steps`` of a ``steps / strength``-step schedule (the
    sampler starts at t ~ strength * T; the caller noises its starting image to
    ``run_timesteps(sampler)[0]``), as diffusers' image-to-image pipelines truncate theirs.

    ``clip_range``: clamp the predicted x0 to [-r, r] at every step (images live in [-1, 1];
    embeddings are not clipped). DPM-Solver++ does this through its thresholding option.
    ``learned_variance``: the network also outputs variance channels ("learned_range"); DDPM
    samples with them, the deterministic samplers ignore them (the caller passes the mean
    channels only).
    """
    if name == INVERTIBLE_DDIM:
        if clip_range is not None or strength != 1:
            raise ValueError(f"{INVERTIBLE_DDIM} neither clips nor starts late (inversion inverts it)")
        return InvertibleDDIM(steps, prediction_type, eta)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    common = dict(num_train_timesteps=TRAIN_STEPS, beta_schedule=SCHEDULE, prediction_type=prediction_type)
    clip = clip_range is not None
    if name == "ddpm":
        sched = DDPMScheduler(**common, clip_sample=clip, clip_sample_range=clip_range or 1.0,
                              timestep_spacing="trailing",
                              variance_type="learned_range" if learned_variance else "fixed_small")
    elif name == "ddim":
        sched = DDIMScheduler(**common, clip_sample=clip, clip_sample_range=clip_range or 1.0,
                              set_alpha_to_one=True, timestep_spacing="trailing")
    elif name == "dpm++":
        sched = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                            thresholding=clip, sample_max_value=clip_range or 1.0,
                                            timestep_spacing="trailing", final_sigmas_type="zero")
    else:
        raise ValueError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS + (INVERTIBLE_DDIM,))})")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    total = max(steps, round(steps / strength))
    sched.set_timesteps(total)
    if total > steps:
        skip = total - steps
        if hasattr(sched, "set_begin_index"):
            # multistep solvers index their sigmas by step and must see the whole schedule (their
            # last step is first order because it is the schedule's last): start at step ``skip``
            sched.set_begin_index(skip)
        else:                                            # DDPM, DDIM: a step is known by its t alone
            sched.timesteps = sched.timesteps[skip:]
    return sched


def run_timesteps(sampler) -> torch.Tensor:
    """The timesteps a sampling loop visits: the schedule's, from its begin index when truncated."""
    return sampler.timesteps[getattr(sampler, "begin_index", None) or 0:]


class Denoiser:
    """``fn(x_t, t [B]) -> network output`` with classifier-free guidance folded in.

    ``cond_fn`` and ``uncond_fn`` map (x_t, t) to the network's output with and without the
    condition; at ``scale`` != 1 both run and out = uncond + scale (cond - uncond) (Ho & Salimans
    2021). ``joint_fn`` (x_t, t) -> (cond, uncond), when given, runs both in one call on a doubled
    batch (:meth:`guided` builds it): one network call per step instead of two, which halves the
    per-call fixed cost that dominates small-batch sampling on CPU. ``nfe`` counts evaluations per
    sample (guidance's second pass counted either way), the cost figure sampler comparisons use.
    """

    def __init__(self, cond_fn: Callable, uncond_fn: Optional[Callable] = None, scale: float = 1.0,
                 guided_channels: Optional[int] = None, joint_fn: Optional[Callable] = None):
        if scale != 1.0 and uncond_fn is None and joint_fn is None:
            raise ValueError("guidance needs an unconditional branch")
        self.cond_fn, self.uncond_fn, self.scale, self.nfe = cond_fn, uncond_fn, scale, 0
        self.joint_fn = joint_fn
        self.k = guided_channels       # guide only these leading channels (the rest: learned variance, from cond)

    @classmethod
    def guided(cls, net: Callable, cond: tuple, uncond: tuple, scale: float,
               guided_channels: Optional[int] = None) -> "Denoiser":
        """Guidance of ``net(x_t, t, *condition)`` between the ``cond`` and ``uncond`` argument
        tuples (tensors with the batch first), the two passes as one doubled batch."""
        both = tuple(torch.cat([c, u]) for c, u in zip(cond, uncond))

        def joint(x, t):
            return net(torch.cat([x, x]), torch.cat([t, t]), *both).float().chunk(2)

        return cls(lambda x, t: net(x, t, *cond).float(), lambda x, t: net(x, t, *uncond).float(), scale,
                   guided_channels, joint_fn=joint)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            self.nfe += 1
            return self.cond_fn(x, t)
        self.nfe += 2
        if self.joint_fn is not None:
            out, out_u = self.joint_fn(x, t)
        else:
            out, out_u = self.cond_fn(x, t), self.uncond_fn(x, t)
        if self.k is not None and out.shape[1] > self.k:
            guided = out_u[:, :self.k] + self.scale * (out[:, :self.k] - out_u[:, :self.k])
            return torch.cat([guided, out[:, self.k:]], dim=1)
        return out_u + self.scale * (out - out_u)


@torch.no_grad()
def sample_loop(denoiser: Callable, x_T: torch.Tensor, sampler, generator: Optional[torch.Generator] = None,
                after_step: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Run ``sampler`` from ``x_T`` to the end of its timesteps; the same loop for every model and
    sampler (and for DDIM inversion, whose timesteps go up). ``after_step(i, x)`` returns x after
    step i (inpainting puts the known region back there)."""
    x = x_T
    for i, t in enumerate(run_timesteps(sampler)):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = denoiser(sampler.scale_model_input(x, t), tt)
        x = sampler.step(out, t, x, generator=generator).prev_sample
        if after_step:
            x = after_step(i, x)
    return x


def rows(condition: tuple, i: int, j: int) -> tuple:
    """Rows i..j-1 of every tensor of a condition (a NamedTuple; None fields stay None)."""
    return type(condition)(*(None if v is None else v[i:j] for v in condition))


def in_batches(sample: Callable, model, condition: tuple, sampling: Sampling, batch_size: int, *,
               generator: Optional[torch.Generator] = None, x_T: Optional[torch.Tensor] = None,
               stats: Optional[dict] = None) -> torch.Tensor:
    """``sample`` (a model's sampling function, the contract above) over the rows of ``condition``
    in batches of ``batch_size``, one ``generator`` throughout: float32 samples in row order."""
    n = len(condition[0])
    return torch.cat([sample(model, rows(condition, i, i + batch_size), sampling, generator=generator,
                             x_T=None if x_T is None else x_T[i:i + batch_size], stats=stats).float()
                      for i in range(0, n, batch_size)])


def randn(shape, generator: Optional[torch.Generator], device="cpu") -> torch.Tensor:
    """Noise drawn on CPU from a seeded generator, so a seed gives the same sample on any device."""
    return torch.randn(shape, generator=generator).to(device)
