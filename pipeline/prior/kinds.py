"""DALL-E 2's two priors behind one interface (``prior.kind``): build, train loss, sample.

    diffusion        pipeline/prior/network.py + diffusion.py: x0-predicting diffusion over z_i
    autoregressive   pipeline/prior/autoregressive.py + codebook.py: a causal transformer over
                     quantized PCA codes of z_i

A saved prior's ``arch`` says which (``kind``; priors saved before the autoregressive prior have
no ``kind`` and are diffusion priors), so :func:`build` rebuilds either from ``model.json``.
:func:`sample` is the prior's sampling contract (pipeline/diffusion.py) for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from . import autoregressive, diffusion
from .autoregressive import AutoregressivePrior
from ..diffusion import Sampling
from .network import UnclipPrior

AUTOREGRESSIVE = "autoregressive"


class Caption(NamedTuple):
    """What a prior samples under, batched: the text embeddings z_t [B, D] (unit norm), the
    caption's token encodings [B, L, W] and mask [B, L] (what ``Unclip.encode_text`` returns)."""
    z_t: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class PriorSampling(Sampling):
    prediction_type: str = diffusion.PREDICTION
    n_candidates: int = 2             # DALL-E 2's rerank: draws per caption, the larger z_i . z_t kept
    temperature: float = 1.0          # the autoregressive prior's (its ``steps`` are its codes)


def arch_of(p, embed_dim: int, text_width: int, context_length: int) -> dict:
    """The constructor arguments of ``prior.kind``'s network (what ``model.json`` keeps)."""
    arch = {"embed_dim": embed_dim, "text_width": text_width, "context_length": context_length,
            "layers": p.layers, "heads": p.heads, "head_dim": p.head_dim, "dropout": p.dropout}
    if p.kind == AUTOREGRESSIVE:
        a = p.autoregressive
        arch |= {"kind": AUTOREGRESSIVE, "components": a.components, "buckets": a.buckets,
                 "dot_buckets": a.dot_buckets}
    return arch


def build(kind: str = "diffusion", **arch) -> torch.nn.Module:
    """The prior network of ``kind`` from its ``arch`` (for ``bundle.load_model``)."""
    return AutoregressivePrior(**arch) if kind == AUTOREGRESSIVE else UnclipPrior(**arch)


def is_autoregressive(model) -> bool:
    return isinstance(model, AutoregressivePrior)


def sampling_info(p) -> dict:
    """The sampling defaults a saved prior records (``model.json``'s ``info``)."""
    if p.kind == AUTOREGRESSIVE:
        a = p.autoregressive
        return {"sampling": {"sampler": AUTOREGRESSIVE, "steps": a.components, "guidance_scale": a.guidance_scale,
                             "temperature": a.temperature},
                "n_candidates": p.n_candidates, "prior_kind": AUTOREGRESSIVE}
    return {"prediction_type": diffusion.PREDICTION, "sampling": p.sampling.model_dump(),
            "n_candidates": p.n_candidates, "prior_kind": "diffusion"}


def training_loss(model, z_i, z_t, tokens, mask, schedule, p_uncond: float) -> torch.Tensor:
    """The training step's loss of either prior (``schedule``: the diffusion prior's noise schedule)."""
    if is_autoregressive(model):
        return autoregressive.training_loss(model, z_i, z_t, tokens, mask, p_uncond=p_uncond)
    return diffusion.training_loss(model, z_i, z_t, tokens, mask, schedule, p_uncond=p_uncond)


@torch.no_grad()
def sample(model, condition: Caption, sampling: PriorSampling, *, generator: Optional[torch.Generator] = None,
           x_T: Optional[torch.Tensor] = None, stats: Optional[dict] = None) -> torch.Tensor:
    """Unit image embeddings [B, D] from either prior. DALL-E 2's rerank for both:
    ``sampling.n_candidates`` draws per caption (``x_T`` [B * n_candidates, D], caption-major, for
    the diffusion prior), the one with the larger z_i . z_t kept. ``stats["nfe"]``: network
    evaluations per candidate."""
    k = sampling.n_candidates
    candidates = Caption(*(c.repeat_interleave(k, dim=0) for c in condition))
    kind = autoregressive if is_autoregressive(model) else diffusion
    z = kind.sample(model, candidates, sampling, generator=generator, x_T=x_T, stats=stats)
    return diffusion.rerank(z.view(len(condition.z_t), k, -1), condition.z_t)
