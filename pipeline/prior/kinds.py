"""DALL-E 2's two priors behind one interface (``prior.kind``): build, train loss, sample.

    diffusion        pipeline/prior/network.py + diffusion.py: x0-predicting diffusion over z_i
    autoregressive   pipeline/prior/autoregressive.py + codebook.py: a causal transformer over
                     quantized PCA codes of z_i

A bundle's ``arch`` says which (``kind``; bundles from before the autoregressive prior have no
``kind`` and are diffusion priors), so :func:`build` rebuilds either from ``model.json``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import autoregressive, diffusion
from .autoregressive import AutoregressivePrior
from .network import UnclipPrior

AUTOREGRESSIVE = "autoregressive"


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
    """The sampling defaults a prior bundle records (``model.json``'s ``info``)."""
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
def sample(model, z_t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, sampling: dict, *,
           n_candidates: int = 1, generator: Optional[torch.Generator] = None,
           stats: Optional[dict] = None) -> torch.Tensor:
    """Unit image embeddings [B, D] for text conditions z_t [B, D], tokens [B, L, W], mask [B, L]
    from either prior, ``sampling`` as its bundle records it (``sampler``, ``steps``,
    ``guidance_scale``; ``temperature`` for the autoregressive one). DALL-E 2's rerank for both:
    ``n_candidates`` draws per caption, the one with the larger z_i . z_t kept. ``stats["nfe"]``:
    network evaluations per candidate."""
    if not is_autoregressive(model):
        return diffusion.sample(model, z_t, tokens, mask, steps=sampling["steps"], sampler=sampling["sampler"],
                                guidance_scale=sampling["guidance_scale"], n_candidates=n_candidates,
                                generator=generator, stats=stats)
    rep = lambda x: x.repeat_interleave(n_candidates, dim=0)          # noqa: E731
    z = autoregressive.sample(model, rep(z_t), rep(tokens), rep(mask), guidance_scale=sampling["guidance_scale"],
                              temperature=sampling.get("temperature", 1.0), generator=generator, stats=stats)
    return diffusion.rerank(z.view(len(z_t), n_candidates, -1), z_t)
