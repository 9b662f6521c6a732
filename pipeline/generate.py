"""Text to image with a trained unCLIP system, from Python and from `unclip generate`.

    from pipeline.generate import Unclip
    unclip = Unclip.load("models")                       # a workspace's models/ or a bundle dir
    out = unclip.generate(["a small red circle in the top left"], n=4, seed=0)
    out["images"]                                        # uint8 [4, 3, 64, 64]

The cascade (DALL-E 2 figure 2): caption -CLIP text encoder-> z_t, tokens -prior-> z_i
-decoder-> base image -upsampler 1-> -upsampler 2-> final image. Every sampling setting
defaults to what the model was saved with and can be overridden per call
(:meth:`Unclip.prior_sampling`, :meth:`Unclip.decoder_sampling`, :meth:`Unclip.upsampler_sampling`);
each model samples through its module's ``sample`` (the contract of pipeline/diffusion.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import bundle
from .clip import model as clip_model
from .decoder import diffusion as decoder_diffusion
from .decoder.network import UnclipDecoder
from .device import autocast, device_of, use_bf16
from .diffusion import in_batches
from .images import grid, save_png, to_uint8
from .prior import kinds as prior_kinds
from .upsampler import diffusion as up_diffusion
from .workspace import file_sha256


@dataclass
class Unclip:
    clip: clip_model.Clip
    prior: torch.nn.Module                                  # either kind (pipeline.prior.kinds)
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
        dev = torch.device(device or device_of())
        clip = clip_model.load(models / "clip", dev)
        prior, prior_meta = bundle.load_model(models / "prior", "prior", prior_kinds.build, dev)
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

    @property
    def sizes(self) -> list[int]:
        """Resolution after each stage: [decoder, upsampler 1, ...]."""
        return [self.decoder_meta["arch"]["image_size"]] + [m["info"]["out_size"] for _, m in self.upsamplers]

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]):
        tokens = self.clip.tokenize(list(captions)).to(self.device)
        z_t, enc, mask = self.clip.encode_text(tokens)
        return z_t.float(), enc.float(), mask

    def prior_sampling(self, *, sampler: Optional[str] = None, steps: Optional[int] = None,
                       guidance: Optional[float] = None, n_candidates: Optional[int] = None) -> prior_kinds.PriorSampling:
        """The prior's saved sampling with these overrides (``sampler`` and ``steps`` mean nothing
        to the autoregressive prior, whose steps are its codes; a prior saved without
        ``n_candidates`` draws 2)."""
        if prior_kinds.is_autoregressive(self.prior):
            sampler = steps = None
        return prior_kinds.PriorSampling.of({"n_candidates": 2} | self.prior_meta["info"], sampler=sampler,
                                            steps=steps, guidance_scale=guidance, n_candidates=n_candidates)

    def decoder_sampling(self, *, sampler: Optional[str] = None, steps: Optional[int] = None,
                         guidance: Optional[float] = None) -> decoder_diffusion.DecoderSampling:
        """The decoder's saved sampling with these overrides."""
        return decoder_diffusion.DecoderSampling.of(self.decoder_meta["info"], sampler=sampler, steps=steps,
                                                    guidance_scale=guidance)

    def upsampler_sampling(self, j: int, *, sampler: Optional[str] = None,
                           steps: Optional[int | Sequence[int]] = None,
                           strength: Optional[float] = None,
                           aug_level: Optional[float | Sequence[float]] = None) -> up_diffusion.UpsamplerSampling:
        """Upsampler ``j``'s (0: the first) saved sampling with these overrides; ``steps`` and
        ``aug_level``: one value for every upsampler or one per upsampler in chain order."""
        steps = steps[j] if isinstance(steps, (list, tuple)) else steps
        aug_level = aug_level[j] if isinstance(aug_level, (list, tuple)) else aug_level
        return up_diffusion.UpsamplerSampling.of(self.upsamplers[j][1]["info"], sampler=sampler, steps=steps,
                                                 strength=strength, aug_level=aug_level)

    @torch.no_grad()
    def prior_sample(self, z_t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, *,
                     sampler: Optional[str] = None, steps: Optional[int] = None, guidance: Optional[float] = None,
                     n_candidates: Optional[int] = None, batch_size: int = 64,
                     stats: Optional[dict] = None) -> torch.Tensor:
        """Image embeddings z_i [B, D] for text embeddings z_t [B, D] and their tokens, at the
        prior's saved sampling defaults unless overridden."""
        sampling = self.prior_sampling(sampler=sampler, steps=steps, guidance=guidance, n_candidates=n_candidates)
        return in_batches(prior_kinds.sample, self.prior, prior_kinds.Caption(z_t, tokens, mask), sampling,
                          batch_size, generator=gen, stats={} if stats is None else stats)

    @torch.no_grad()
    def generate(self, captions: Sequence[str], n: int = 1, seed: int = 0, *,
                 prior_sampler: Optional[str] = None, prior_steps: Optional[int] = None,
                 prior_guidance: Optional[float] = None, n_candidates: Optional[int] = None,
                 sampler: Optional[str] = None, steps: Optional[int] = None, guidance: Optional[float] = None,
                 upsampler_sampler: Optional[str] = None, upsampler_steps: Optional[int | Sequence[int]] = None,
                 upsampler_strength: Optional[float] = None,
                 upsampler_aug: Optional[float | Sequence[float]] = None,
                 z_i: Optional[torch.Tensor] = None, batch_size: int = 64) -> dict:
        """``n`` images per caption (caption-major order). Returns ``images`` (final, uint8
        [len(captions) * n, 3, H, W]), ``stages`` (uint8 images after each stage), ``z_i``, ``z_t`` and
        ``nfe`` (network evaluations per image, per stage). ``z_i``: skip the prior and decode
        these image embeddings [len(captions) * n, D] instead. ``upsampler_steps``, ``upsampler_aug``
        (the noise level of a noise-augmented upsampler's input): one value for every upsampler, or a
        list with one per upsampler in chain order."""
        captions = [c for c in captions for _ in range(n)]
        gen = torch.Generator().manual_seed(seed)
        z_t, tokens, mask = self.encode_text(captions)
        stats: dict = {}
        t0 = time.perf_counter()
        with autocast(self.precision, self.device):
            if z_i is None:
                z_i = self.prior_sample(z_t, tokens, mask, gen, sampler=prior_sampler, steps=prior_steps,
                                        guidance=prior_guidance, n_candidates=n_candidates, batch_size=batch_size,
                                        stats=stats)
                nfe = {"prior": stats["nfe"] * self.prior_sampling(n_candidates=n_candidates).n_candidates}
            else:
                z_i, nfe = z_i.to(self.device).float(), {"prior": 0}
            x = in_batches(decoder_diffusion.sample, self.decoder, decoder_diffusion.Condition(z_i, tokens, mask),
                           self.decoder_sampling(sampler=sampler, steps=steps, guidance=guidance), batch_size,
                           generator=gen, stats=stats)
            nfe["decoder"] = stats["nfe"]
            stages, up_nfe = self.upsample(x, z_i, gen, sampler=upsampler_sampler, steps=upsampler_steps,
                                           strength=upsampler_strength, aug_level=upsampler_aug,
                                           batch_size=batch_size)
        nfe |= up_nfe
        return {"images": stages[-1], "stages": stages, "z_i": z_i.cpu(), "z_t": z_t.cpu(), "captions": captions, "nfe": nfe,
                "seconds": round(time.perf_counter() - t0, 2)}

    @torch.no_grad()
    def upsample(self, x: torch.Tensor, z_i: torch.Tensor, generator: torch.Generator, *,
                 sampler: Optional[str] = None, steps: Optional[int | Sequence[int]] = None,
                 strength: Optional[float] = None, aug_level: Optional[float | Sequence[float]] = None,
                 batch_size: int = 64, composite: Callable[[torch.Tensor], torch.Tensor] = lambda img: img) -> tuple[list, dict]:
        """The upsampler chain, the one way every caller runs it: the decoder's output ``x``
        [B, 3, S, S] in [-1, 1], decoded from ``z_i`` [B, D] (a conditioned upsampler sees it),
        through every upsampler in ``batch_size`` batches. Returns the uint8 images after each
        stage (the decoder's first) and the network evaluations per image of each upsampler.
        ``steps``: one count for every upsampler or one per upsampler; ``composite``: applied to
        every stage's input and output (inpainting keeps the region outside its mask)."""
        stages, nfe = [to_uint8(composite(x).cpu())], {}
        for j, (model, _) in enumerate(self.upsamplers):
            sampling = self.upsampler_sampling(j, sampler=sampler, steps=steps, strength=strength, aug_level=aug_level)
            x = in_batches(up_diffusion.sample, model, up_diffusion.Condition(composite(x), z_i), sampling,
                           batch_size, generator=generator)
            stages.append(to_uint8(composite(x).cpu()))
            nfe[f"upsampler_{j + 1}"] = sampling.steps           # a truncated schedule (strength) keeps the count
        return stages, nfe


def save_grid(result: dict, n: int, out: Path, stage: int = -1, labels: bool = True) -> Path:
    """One row per caption (``n`` samples each), nearest-upscaled to at least 64 px tiles."""
    images = result["stages"][stage]
    scale = max(1, 64 // images.shape[-1])
    rows = result["captions"][::n] if labels else None
    save_png(grid(images, n, scale=scale, row_labels=rows), out)
    return Path(out)
