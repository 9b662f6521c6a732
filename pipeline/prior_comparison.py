"""DALL-E 2's comparison of its two priors (section 5.2: the diffusion prior is as good or better
for less compute), on the held-out captions of `evaluate`.

Every prior (the cascade's own ``models/prior`` and each prior directory named in ``evaluate.compare_priors``)
feeds the same decoder and upsamplers on the same captions, and each draws its z_i from a generator
seeded with ``evaluate.seed``; the cascade then decodes every prior's z_i from the same seed, so the
decoder's and upsamplers' noise is the same for all of them: what differs is the prior alone.

Per prior: its kind, training time (from its model.json), cos(predicted z_i, true z_i) and
cos(predicted z_i, z_t) on these captions (``prior.stage.evaluate``), the judged figures and the
Frechet distance in the judge's features (judged data only), network evaluations and seconds per
image of the prior alone and of the whole cascade.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from . import bundle
from .config import PriorConfig
from .prior import kinds
from .prior.figures import evaluate as prior_figures
from .quality import score
from .errors import StageError
from .workspace import file_sha256

OWN = "cascade"                 # the name of the cascade's own prior (models/prior) in the comparison


def load_priors(root: Path, models: Path, named: dict[str, str], device) -> dict[str, tuple]:
    """{name: (prior network, its model.json)}: ``models/prior`` as :data:`OWN`, then each of
    ``named`` (a prior's model directory, relative to the workspace ``root`` unless absolute), each checked
    to have been trained against the CLIP of ``models/clip``."""
    if OWN in named:
        raise StageError(f"evaluate.compare_priors: {OWN!r} names the cascade's own prior; choose another name")
    sha = file_sha256(Path(models) / "clip" / "model.safetensors")
    priors = {}
    for name, path in {OWN: Path(models) / "prior", **{k: Path(root) / v for k, v in named.items()}}.items():
        try:
            model, meta = bundle.load_model(path, "prior", kinds.build, device)
        except (FileNotFoundError, ValueError) as err:
            raise StageError(f"evaluate.compare_priors[{name!r}]: {err}") from None
        if (meta.get("clip") or {}).get("sha256") not in (None, sha):
            raise StageError(f"evaluate.compare_priors[{name!r}]: {path} was trained against another CLIP than "
                             f"{Path(models) / 'clip'}: retrain it on this workspace's embeddings")
        priors[name] = (model, meta)
    return priors


def compare(e, unclip, priors: dict[str, tuple], captions: list[str], test_sub: dict, judge=None,
            gts=None, real_feats=None) -> dict:
    """The comparison's figures per prior (see the module docstring). ``test_sub``: the captions'
    rows of the test split (z_i, z_t, tokens, mask); ``judge``, ``gts``, ``real_feats``: the judge,
    the captions' truth and the real images' judge features, on data with ground truth."""
    z_t, tokens, mask = unclip.encode_text(captions)
    out = {}
    for name, (model, meta) in priors.items():
        view = dataclasses.replace(unclip, prior=model, prior_meta=meta)
        stats: dict = {}
        t0 = time.perf_counter()
        z_i = view.prior_sample(z_t, tokens, mask, torch.Generator().manual_seed(e.seed),
                                batch_size=e.batch_size, stats=stats)
        prior_seconds = time.perf_counter() - t0
        k = meta["info"].get("n_candidates", 2)
        gen = view.generate(captions, n=1, seed=e.seed, batch_size=e.batch_size, z_i=z_i)
        p = PriorConfig.model_validate(meta["config"]["prior"])
        cos = {key: v for key, v in prior_figures(model, test_sub, p).items() if key.startswith("cos")}
        figs = {"kind": meta["info"].get("prior_kind", "diffusion"), "train_seconds": meta["info"].get("train_seconds"),
                "params": sum(t.numel() for t in model.parameters()), "prior": cos,
                "sampling": meta["info"]["sampling"], "n_candidates": k,
                "nfe_prior": stats["nfe"] * k, "nfe_total": stats["nfe"] * k + sum(gen["nfe"].values()),
                "prior_seconds_per_image": round(prior_seconds / len(captions), 4),
                "seconds_per_image": round((prior_seconds + gen["seconds"]) / len(captions), 3)}
        if judge is not None:
            figs["quality"] = score(judge, gen["images"], gts, real_feats)
        out[name] = figs
    return out


def table(comparison: dict) -> list[str]:
    """The comparison as markdown rows (docs/MEASURED.md's and the bench's)."""
    rows = ["| prior | kind | train s | cos(z_i pred, true) | cos(z_i pred, z_t) | shape | both colors | relation "
            "| Fréchet | NFE (prior) | s / image (prior) |", "|" + " --- |" * 11]
    for name, f in comparison.items():
        q = f.get("quality") or {}
        single, pair = q.get("single", {}), q.get("pair", {})
        rows.append(f"| {name} | {f['kind']} | {f['train_seconds']} | {f['prior']['cos_pred_image']} | "
                    f"{f['prior']['cos_pred_text']} | {single.get('shape')} | {pair.get('colors')} | "
                    f"{pair.get('relation')} | {q.get('frechet_distance')} | {f['nfe_prior']} | "
                    f"{f['seconds_per_image']} ({f['prior_seconds_per_image']}) |")
    return rows
