"""A prior's figures, as the field reports them (DALL-E 2 section 5; laion/DALLE2-pytorch's prior
evaluation), each a mean over the captions given (the val split in the prior stage, the held-out
test captions in evaluate and the comparison of priors):

    cos_pred_image            cos(predicted z_i, true z_i)     how close the prior gets
    cos_pred_text             cos(predicted z_i, z_t)
    cos_image_text_baseline   cos(true z_i, z_t)               what "just use the text" would give
    cos_unrelated_image       cos(z_i predicted from another caption, true z_i): the floor
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..device import autocast
from ..diffusion import in_batches
from . import kinds


@torch.no_grad()
def sample_in_batches(model, data: dict, sampling: kinds.PriorSampling, batch_size: int, seed: int,
                      precision: str = "auto", order=None) -> tuple[torch.Tensor, int]:
    """Predicted z_i [n, D] (on the CPU) for the captions of ``data`` (rows reordered by
    ``order``), and the network evaluations per sample (its candidates together)."""
    device = next(model.parameters()).device
    order = torch.arange(data["n"]) if order is None else order
    caption = kinds.Caption(*(data[k][order].to(device) for k in ("z_t", "tokens", "mask")))
    stats = {}
    with autocast(precision, device):
        z = in_batches(kinds.sample, model, caption, sampling, batch_size,
                       generator=torch.Generator().manual_seed(seed), stats=stats)
    return z.cpu(), stats.get("nfe", 0) * sampling.n_candidates


def evaluate(model, val: dict, p) -> dict:
    """The figures above for the rows of ``val`` (z_i, z_t, tokens, mask, n), sampled as ``p`` (a
    ``PriorConfig``) says, with its seed."""
    sampling = kinds.PriorSampling.of(kinds.sampling_info(p))
    pred, nfe = sample_in_batches(model, val, sampling, p.val_batch_size, p.seed, p.precision)
    # unrelated captions: every caption paired with another scene's image (a fixed derangement)
    shift = torch.roll(torch.arange(val["n"]), 1)
    unrelated, _ = sample_in_batches(model, val, sampling, p.val_batch_size, p.seed + 1, p.precision, order=shift)
    cos = lambda a, b: F.cosine_similarity(a, b, dim=-1).mean().item()        # noqa: E731
    return {"n": val["n"], "kind": p.kind, "sampler": sampling.sampler, "steps": sampling.steps,
            "guidance_scale": sampling.guidance_scale, "n_candidates": p.n_candidates,
            "nfe_per_sample": nfe,
            "cos_pred_image": round(cos(pred, val["z_i"]), 4),
            "cos_pred_text": round(cos(pred, val["z_t"]), 4),
            "cos_image_text_baseline": round(cos(val["z_i"], val["z_t"]), 4),
            "cos_unrelated_image": round(cos(unrelated, val["z_i"]), 4)}
