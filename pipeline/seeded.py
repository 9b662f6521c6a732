"""Images one by one, each from its own seed, to PNG bytes and files: the one path from seeds to
PNGs for `unclip generate --out-dir` and the served MLflow Model (``pipeline.serving``), so the
two give the same files byte for byte.

    from pipeline.generate import Unclip
    from pipeline.seeded import Prompt, generate_each
    each = generate_each(Unclip.load("models"), [Prompt("a small red circle in the top left", seed=0, n=4)])
    each["png"]                                          # 4 PNG files' bytes, from seeds 0, 1, 2, 3

Two ways to seed. ``Unclip.generate`` samples a whole batch from one generator (fast; what
evaluate and the grid of `unclip generate` use): an image depends on everything else in the
batch. ``generate_each`` samples every image alone from its own seed (image k of a prompt: seed
+ k): an image depends on its caption, its seed and the settings only.

(Kept out of ``generate.py``, which ``evaluate`` depends on in dvc.yaml: adding a way to use the
models does not make every workspace's evaluation stale.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .generate import Unclip
from .images import png_bytes
from .workspace import atomic_write_bytes, atomic_write_json


@dataclass(frozen=True)
class Prompt:
    """One caption's share of a request: ``n`` images from the seeds ``seed, seed + 1, ...``,
    sampled with ``settings`` (``Unclip.generate``'s keyword overrides; empty: the bundle's defaults)."""
    caption: str
    seed: int = 0
    n: int = 1
    settings: dict = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.n))


def generate_each(unclip: Unclip, prompts: Sequence[Prompt]) -> dict:
    """Every image sampled alone (a batch of one) from its own seed: image k of a prompt is
    ``unclip.generate([caption], n=1, seed=seed + k, **settings)``, whatever else is asked in the
    same call, so a (caption, seed, settings) gives the same bytes alone or in any request.
    About 2.4x the time per image of one batched ``generate`` on the default bundle (2 cores).
    Returns ``generate``'s keys over all images in prompt order (``images``, ``stages``,
    ``captions``, ``nfe`` of the last image, ``seconds``) with ``prompts`` (each image's prompt
    index), ``seeds`` (each image's seed) and ``png`` (each final image's PNG bytes)."""
    outs, index, seeds = [], [], []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        for seed in p.seeds:
            outs.append(unclip.generate([p.caption], n=1, seed=seed, **p.settings))
            index.append(i)
            seeds.append(seed)
    if not outs:
        raise ValueError("nothing to generate: no prompt asks for an image")
    images = torch.cat([o["images"] for o in outs])
    return {"images": images, "stages": [torch.cat(s) for s in zip(*(o["stages"] for o in outs))],
            "captions": [c for o in outs for c in o["captions"]], "prompts": index, "seeds": seeds,
            "png": [png_bytes(x) for x in images], "nfe": outs[-1]["nfe"],
            "seconds": round(time.perf_counter() - t0, 2)}


def sampling(unclip: Unclip, *, prior_sampler: Optional[str] = None, prior_steps: Optional[int] = None,
             prior_guidance: Optional[float] = None, n_candidates: Optional[int] = None,
             sampler: Optional[str] = None, steps: Optional[int] = None, guidance: Optional[float] = None,
             upsampler_sampler: Optional[str] = None, upsampler_steps: Optional[int | Sequence[int]] = None,
             upsampler_strength: Optional[float] = None,
             upsampler_aug: Optional[float | Sequence[float]] = None) -> dict:
    """The settings ``Unclip.generate`` samples with under these overrides, the bundle's saved
    defaults filled in as ``generate`` fills them (what a manifest records)."""
    ps = unclip.prior_sampling(sampler=prior_sampler, steps=prior_steps, guidance=prior_guidance,
                               n_candidates=n_candidates)
    ds = unclip.decoder_sampling(sampler=sampler, steps=steps, guidance=guidance)
    ups = [unclip.upsampler_sampling(j, sampler=upsampler_sampler, steps=upsampler_steps, strength=upsampler_strength,
                                     aug_level=upsampler_aug)
           for j in range(len(unclip.upsamplers))]
    return {"prior": {"sampler": ps.sampler, "steps": ps.steps, "guidance": ps.guidance_scale,
                      "n_candidates": ps.n_candidates},
            "decoder": {"sampler": ds.sampler, "steps": ds.steps, "guidance": ds.guidance_scale},
            "upsamplers": [{"sampler": u.sampler, "steps": u.steps, "strength": u.strength, "aug_level": u.aug_level}
                           for u in ups]}


def image_name(prompt: int, seed: int) -> str:
    return f"prompt{prompt:03d}_seed{seed}.png"


def save_images(result: dict, out_dir: Path, *, sampling: dict, model: dict) -> Path:
    """``generate_each``'s images as files: ``prompt<i>_seed<s>.png`` (exactly ``result["png"]``)
    and ``manifest.json`` (per image: file, prompt index, caption, seed; the sampling settings and
    the model they came from). Returns the manifest's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for i, caption, seed, png in zip(result["prompts"], result["captions"], result["seeds"], result["png"]):
        atomic_write_bytes(out_dir / image_name(i, seed), png)
        images.append({"file": image_name(i, seed), "prompt": i, "caption": caption, "seed": seed})
    manifest = {"images": images, "size": int(result["images"].shape[-1]), "sampling": sampling, "model": model,
                "seeding": "image k of a prompt: seed + k, each image sampled alone (pipeline.seeded.generate_each)"}
    atomic_write_json(out_dir / "manifest.json", manifest)
    return out_dir / "manifest.json"
