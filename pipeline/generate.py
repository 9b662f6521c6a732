"""Text to image with a trained unCLIP system, from Python and from `unclip generate`.

    from pipeline.generate import Unclip
    unclip = Unclip.load("models")                       # a workspace's models/ or a bundle dir
    out = unclip.generate(["a small red circle in the top left"], n=4, seed=0)
    out["images"]                                        # uint8 [4, 3, 64, 64]

    each = generate_each(unclip, [Prompt("a small red circle in the top left", seed=0, n=4)])
    each["png"]                                          # 4 PNG files' bytes, from seeds 0, 1, 2, 3

The cascade (DALL-E 2 figure 2): caption -CLIP text encoder-> z_t, tokens -prior-> z_i
-decoder-> base image -upsampler 1-> -upsampler 2-> final image. Every sampling setting
defaults to what the model was saved with and can be overridden per call.

Two ways to seed. ``Unclip.generate`` samples a whole batch from one generator (fast; what
evaluate and the grid of `unclip generate` use): an image depends on everything else in the
batch. ``generate_each`` samples every image alone from its own seed (image k of a prompt: seed
+ k): an image depends on its caption, its seed and the settings only. It is the one path from
seeds to PNG bytes for `unclip generate --out-dir` and the served MLflow Model
(``pipeline.serving``), so the two give the same files byte for byte.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import bundle
from .clip import model as clip_model
from .decoder import diffusion as decoder_diffusion
from .decoder.network import UnclipDecoder
from .images import grid, png_bytes, save_png, to_uint8
from .prior import diffusion as prior_diffusion
from .prior.network import UnclipPrior
from .training import autocast, use_bf16
from .upsampler import diffusion as up_diffusion
from .workspace import atomic_write_bytes, atomic_write_json, file_sha256


@dataclass
class Unclip:
    clip: clip_model.ClipBundle
    prior: UnclipPrior
    prior_meta: dict
    decoder: UnclipDecoder
    decoder_meta: dict
    upsamplers: list = field(default_factory=list)        # [(model, meta)], in chain order
    device: torch.device = torch.device("cpu")
    precision: str = "auto"

    @classmethod
    def load(cls, models: str | Path, device: Optional[str] = None, precision: str = "auto") -> "Unclip":
        """Load ``clip/ prior/ decoder/ upsampler_*/`` from ``models``; the prior and the decoder
        must have been trained against the CLIP found beside them."""
        models = Path(models)
        if not models.is_dir():
            raise FileNotFoundError(f"{models}: no such directory (expected a workspace's models/ with "
                                    f"clip/, prior/, decoder/, upsampler_*/)")
        dev = torch.device(device or clip_model.device_of())
        clip = clip_model.load(models / "clip", dev)
        prior, prior_meta = bundle.load_model(models / "prior", "prior", UnclipPrior, dev)
        decoder, decoder_meta = bundle.load_model(models / "decoder", "decoder", UnclipDecoder, dev)
        sha = file_sha256(models / "clip" / "model.safetensors")
        for name, meta in (("prior", prior_meta), ("decoder", decoder_meta)):
            trained = (meta.get("clip") or {}).get("sha256")
            if trained and trained != sha:
                raise ValueError(f"{models / name} was trained against another CLIP than {models / 'clip'} "
                                 f"(sha256 {trained[:12]} vs {sha[:12]}): retrain it (`unclip stage {name}`)")
        ups = sorted(models.glob("upsampler_*"), key=lambda p: p.name)
        bf16 = use_bf16(precision, dev)
        upsamplers = [(up_diffusion.for_sampling(m, bf16), meta) for m, meta in (up_diffusion.load(p, dev) for p in ups)]
        return cls(clip, prior, prior_meta, decoder, decoder_meta, upsamplers, dev, precision)

    def sampling(self, *, prior_sampler: Optional[str] = None, prior_steps: Optional[int] = None,
                 prior_guidance: Optional[float] = None, n_candidates: Optional[int] = None,
                 sampler: Optional[str] = None, steps: Optional[int] = None, guidance: Optional[float] = None,
                 upsampler_sampler: Optional[str] = None, upsampler_steps: Optional[int | Sequence[int]] = None,
                 upsampler_strength: Optional[float] = None) -> dict:
        """The settings ``generate`` samples with under these overrides, the bundle's saved defaults
        filled in as ``generate`` fills them (what a manifest records)."""
        ps, ds = self.prior_meta["info"]["sampling"], self.decoder_meta["info"]["sampling"]
        ups = []
        for j, (_, meta) in enumerate(self.upsamplers):
            us = meta["info"]["sampling"]
            k = upsampler_steps[j] if isinstance(upsampler_steps, (list, tuple)) else upsampler_steps
            ups.append({"sampler": upsampler_sampler or us["sampler"], "steps": k or us["steps"],
                        "strength": us.get("strength", 1.0) if upsampler_strength is None else upsampler_strength})
        return {"prior": {"sampler": prior_sampler or ps["sampler"], "steps": prior_steps or ps["steps"],
                          "guidance": ps["guidance_scale"] if prior_guidance is None else prior_guidance,
                          "n_candidates": n_candidates or self.prior_meta["info"].get("n_candidates", 2)},
                "decoder": {"sampler": sampler or ds["sampler"], "steps": steps or ds["steps"],
                            "guidance": ds["guidance_scale"] if guidance is None else guidance},
                "upsamplers": ups}

    @property
    def sizes(self) -> list[int]:
        """Resolution after each stage: [decoder, upsampler 1, ...]."""
        return [self.decoder_meta["arch"]["image_size"]] + [m["info"]["out_size"] for _, m in self.upsamplers]

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]):
        tokens = self.clip.tokenize(list(captions)).to(self.device)
        z_t, enc, mask = self.clip.encode_text(tokens)
        return z_t.float(), enc.float(), mask

    @torch.no_grad()
    def prior_sample(self, z_t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, *,
                     sampler: Optional[str] = None, steps: Optional[int] = None, guidance: Optional[float] = None,
                     n_candidates: Optional[int] = None, batch_size: int = 64,
                     stats: Optional[dict] = None) -> torch.Tensor:
        """Image embeddings z_i [B, D] for text embeddings z_t [B, D] and their tokens, at the
        prior's saved sampling defaults unless overridden."""
        ps = self.prior_meta["info"]["sampling"]
        k = n_candidates or self.prior_meta["info"].get("n_candidates", 2)
        stats = {} if stats is None else stats
        return torch.cat([prior_diffusion.sample(
            self.prior, z_t[i:i + batch_size], tokens[i:i + batch_size], mask[i:i + batch_size],
            steps=steps or ps["steps"], sampler=sampler or ps["sampler"],
            guidance_scale=ps["guidance_scale"] if guidance is None else guidance,
            n_candidates=k, generator=gen, stats=stats).float() for i in range(0, len(z_t), batch_size)])

    @torch.no_grad()
    def generate(self, captions: Sequence[str], n: int = 1, seed: int = 0, *,
                 prior_sampler: Optional[str] = None, prior_steps: Optional[int] = None,
                 prior_guidance: Optional[float] = None, n_candidates: Optional[int] = None,
                 sampler: Optional[str] = None, steps: Optional[int] = None, guidance: Optional[float] = None,
                 upsampler_sampler: Optional[str] = None, upsampler_steps: Optional[int | Sequence[int]] = None,
                 upsampler_strength: Optional[float] = None,
                 z_i: Optional[torch.Tensor] = None, batch_size: int = 64) -> dict:
        """``n`` images per caption (caption-major order). Returns ``images`` (final, uint8
        [len(captions) * n, 3, H, W]), ``stages`` (uint8 images after each stage), ``z_i``, ``z_t`` and
        ``nfe`` (network evaluations per image, per stage). ``z_i``: skip the prior and decode
        these image embeddings [len(captions) * n, D] instead. ``upsampler_steps``: one count for
        every upsampler, or a list with one per upsampler in chain order."""
        captions = [c for c in captions for _ in range(n)]
        ds = self.decoder_meta["info"]["sampling"]
        gen = torch.Generator().manual_seed(seed)
        z_t, tokens, mask = self.encode_text(captions)
        stats: dict = {}
        t0 = time.perf_counter()
        with autocast(self.precision, self.device):
            if z_i is None:
                k = n_candidates or self.prior_meta["info"].get("n_candidates", 2)
                z_i = self.prior_sample(z_t, tokens, mask, gen, sampler=prior_sampler, steps=prior_steps,
                                        guidance=prior_guidance, n_candidates=k, batch_size=batch_size, stats=stats)
                nfe = {"prior": stats["nfe"] * k}
            else:
                z_i, nfe = z_i.to(self.device).float(), {"prior": 0}
            x = torch.cat([decoder_diffusion.sample(
                self.decoder, z_i[i:i + batch_size], tokens[i:i + batch_size], mask[i:i + batch_size],
                image_size=self.sizes[0], prediction_type=self.decoder_meta["info"]["prediction_type"],
                sampler=sampler or ds["sampler"], steps=steps or ds["steps"],
                guidance_scale=ds["guidance_scale"] if guidance is None else guidance, generator=gen,
                stats=stats).float() for i in range(0, len(captions), batch_size)])
            nfe["decoder"] = stats["nfe"]
            stages = [to_uint8(x.cpu())]
            for j, (model, meta) in enumerate(self.upsamplers, start=1):
                up_steps = upsampler_steps[j - 1] if isinstance(upsampler_steps, (list, tuple)) else upsampler_steps
                x = torch.cat([up_diffusion.upsample(model, meta["info"], x[i:i + batch_size],
                                                     sampler=upsampler_sampler, steps=up_steps,
                                                     strength=upsampler_strength,
                                                     generator=gen, z_i=z_i[i:i + batch_size]).float()
                               for i in range(0, len(captions), batch_size)])
                stages.append(to_uint8(x.cpu()))
                nfe[f"upsampler_{j}"] = (up_steps or meta["info"]["sampling"]["steps"])
        return {"images": stages[-1], "stages": stages, "z_i": z_i.cpu(), "z_t": z_t.cpu(), "captions": captions, "nfe": nfe,
                "seconds": round(time.perf_counter() - t0, 2)}


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
                "seeding": "image k of a prompt: seed + k, each image sampled alone (generate_each)"}
    atomic_write_json(out_dir / "manifest.json", manifest)
    return out_dir / "manifest.json"


def save_grid(result: dict, n: int, out: Path, stage: int = -1, labels: bool = True) -> Path:
    """One row per caption (``n`` samples each), nearest-upscaled to at least 64 px tiles."""
    images = result["stages"][stage]
    scale = max(1, 64 // images.shape[-1])
    rows = result["captions"][::n] if labels else None
    save_png(grid(images, n, scale=scale, row_labels=rows), out)
    return Path(out)
