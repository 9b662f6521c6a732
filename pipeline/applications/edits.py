"""What the unCLIP latent makes possible (DALL-E 2, section 3): variations, interpolation, text
diffs and inpainting, on a trained bundle (``generate.Unclip``).

Every function takes uint8 images [B, 3, H, W] (any size: resized to each stage's resolution by
``images.resize``) and a seed, and returns uint8 images at the cascade's final resolution (the
decoder's output through the upsamplers), plus what the figures need. An image is described by
its bipartite latent (z_i, x_T): z_i = CLIP(image), x_T = DDIM inversion of the decoder
conditioned on z_i alone (no caption, as the paper's variations), ``decoder.inversion``; the
decoder decodes it with its ``invertible-ddim`` sampler (``decoder.diffusion.sample``).

    from pipeline.generate import Unclip
    from pipeline import applications as apps
    unclip = Unclip.load("models")
    out = apps.vary(unclip, image, seed=0, etas=(0.0, 0.5, 1.0))
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..decoder import inversion
from ..decoder.diffusion import Condition, DecoderSampling, sample
from ..diffusion import INVERTIBLE_DDIM, randn
from ..generate import Unclip
from ..images import psnr, resize, to_model, to_uint8

INVERSION_STEPS = 100     # DDIM steps of inversion and reconstruction (the decoder is small: cheap)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between a and b [B, ...] (flattened per row): t = 0 -> a, 1 -> b."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = F.cosine_similarity(fa, fb, dim=1).clamp(-1 + 1e-7, 1 - 1e-7)
    omega = torch.acos(cos)[:, None]
    t = torch.as_tensor(t, dtype=fa.dtype, device=fa.device).reshape(-1, 1)
    if float(omega.abs().max()) < 1e-4:
        return ((1 - t) * fa + t * fb).reshape(a.shape)
    out = (torch.sin((1 - t) * omega) * fa + torch.sin(t * omega) * fb) / torch.sin(omega)
    return out.reshape(a.shape)


class Latent:
    """The decoder's view of an image: its CLIP embedding and, inverted, its noise."""

    def __init__(self, unclip: Unclip, images_uint8: torch.Tensor, steps: int = INVERSION_STEPS,
                 captions: Optional[Sequence[str]] = None):
        """``captions``: invert under these (the decoder's text condition); default none."""
        self.unclip, self.steps = unclip, steps
        dev = unclip.device
        self.size = unclip.sizes[0]
        self.images = images_uint8
        self.x0 = resize(to_model(images_uint8), self.size).to(dev)           # [B, 3, S, S] in [-1, 1]
        with torch.no_grad():
            self.z_i = unclip.clip.encode_image(images_uint8.to(dev)).float()   # [B, D], unit norm
        if captions is None:
            self.tokens, self.mask = no_caption(unclip, len(images_uint8))
        else:
            _, tokens, mask = unclip.encode_text(list(captions))
            self.tokens, self.mask = tokens.to(dev), mask.to(dev)
        self._x_T: Optional[torch.Tensor] = None

    def sampling(self, eta: float = 0.0, guidance: float = 1.0) -> DecoderSampling:
        """The decoder's generalized DDIM at this latent's steps (what :attr:`x_T` inverts at eta 0)."""
        return ddim(self.unclip, self.steps, eta=eta, guidance=guidance)

    @property
    def x_T(self) -> torch.Tensor:
        """DDIM (eta = 0) inversion of the decoder conditioned on z_i: [B, 3, S, S]."""
        if self._x_T is None:
            self._x_T = inversion.invert(self.unclip.decoder, self.x0, Condition(self.z_i, self.tokens, self.mask),
                                         self.sampling())
        return self._x_T

    def decode(self, z_i: torch.Tensor, x_T: torch.Tensor, *, eta: float = 0.0,
               generator: Optional[torch.Generator] = None, guidance: float = 1.0,
               caption: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """(z_i, x_T) -> images [B, 3, S, S] in [-1, 1] at the decoder's resolution. ``caption``:
        (tokens, mask) of a caption for the decoder's text condition (default: none, as inverted)."""
        tokens, mask = caption if caption is not None else no_caption(self.unclip, len(z_i))
        return sample(self.unclip.decoder, Condition(z_i, tokens, mask), self.sampling(eta, guidance),
                      generator=generator, x_T=x_T)


def ddim(unclip: Unclip, steps: int, eta: float = 0.0, guidance: float = 1.0) -> DecoderSampling:
    """The decoder's ``invertible-ddim`` sampling (and inversion) at ``steps``, ``eta`` and ``guidance``."""
    return unclip.decoder_sampling(sampler=INVERTIBLE_DDIM, steps=steps, guidance=guidance).but(eta=eta)


def no_caption(unclip: Unclip, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty caption tokens/mask for b images (the decoder's caption-dropped condition)."""
    _, tokens, mask = unclip.encode_text([""])
    return torch.zeros_like(tokens).expand(b, -1, -1), torch.zeros_like(mask).expand(b, -1)


def upsample_chain(unclip: Unclip, x: torch.Tensor, generator: torch.Generator, z_i: torch.Tensor,
                   keep: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> list[torch.Tensor]:
    """Decoder output [B, 3, S, S] in [-1, 1], decoded from z_i [B, D], through every upsampler
    (a conditioned one also sees z_i) -> uint8 images after each stage. ``keep`` = (original float images, mask with 1 where kept): after every stage the kept
    region is the original at that resolution, so nothing outside an inpainting mask changes."""
    def composite(img: torch.Tensor) -> torch.Tensor:
        if keep is None:
            return img
        orig, m = keep
        s = img.shape[-1]
        return resize(m, s).clamp(0, 1).round() * resize(orig, s) + (1 - resize(m, s).clamp(0, 1).round()) * img

    # one batch: the edits' figures were measured so (a batch's noise is drawn in one go)
    return unclip.upsample(x, z_i, generator, batch_size=max(1, len(x)), composite=composite)[0]


# ---- 1. variations --------------------------------------------------------------------------------
@torch.no_grad()
def vary(unclip: Unclip, images: torch.Tensor, *, seed: int = 0, etas: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
         n: int = 1, steps: int = INVERSION_STEPS) -> dict:
    """Variations of each image: the bipartite latent (z_i, inverted x_T) decoded with DDIM at every
    eta (eta = 0: the reconstruction), and z_i decoded from fresh noise. Returns ``reconstruction``
    (uint8 at the decoder's resolution) with its ``psnr`` [B] against the input resized there,
    ``by_eta`` {eta: uint8 final images [B * n]}, ``fresh`` (uint8 final [B * n]) and ``z_i``."""
    lat = Latent(unclip, images, steps)
    gen = torch.Generator().manual_seed(seed)
    recon = lat.decode(lat.z_i, lat.x_T)
    target = to_uint8(lat.x0.cpu())
    out = {"z_i": lat.z_i.cpu(), "reconstruction": to_uint8(recon.cpu()),
           "psnr": psnr(to_uint8(recon.cpu()), target), "input_at_decoder": target, "by_eta": {}}
    rep = lambda t: t.repeat_interleave(n, 0)          # noqa: E731  n per image, image-major
    for eta in etas:
        x = lat.decode(rep(lat.z_i), rep(lat.x_T), eta=eta, generator=gen)
        out["by_eta"][float(eta)] = upsample_chain(unclip, x, gen, rep(lat.z_i))[-1]
    fresh = lat.decode(rep(lat.z_i), randn(rep(lat.x_T).shape, gen, unclip.device), generator=gen)
    out["fresh"] = upsample_chain(unclip, fresh, gen, rep(lat.z_i))[-1]
    return out


# ---- 2. interpolation -----------------------------------------------------------------------------
@torch.no_grad()
def interpolate(unclip: Unclip, image_a: torch.Tensor, image_b: torch.Tensor, *, frames: int = 8, seed: int = 0,
                noise: str = "inverted", steps: int = INVERSION_STEPS) -> dict:
    """``frames`` images from a to b (uint8 [1, 3, H, W] each): z_i slerped from z_a to z_b, the
    decoder noise held fixed (``noise="inverted"``: the two inverted noises, slerped along;
    ``"shared"``: one fresh noise for every frame). Returns ``frames`` (uint8 final [frames]) and
    ``z_i`` [frames, D]."""
    if noise not in ("inverted", "shared"):
        raise ValueError(f"noise must be 'inverted' or 'shared', got {noise!r}")
    lat = Latent(unclip, torch.cat([image_a, image_b]), steps)
    gen = torch.Generator().manual_seed(seed)
    ts = torch.linspace(0, 1, frames)
    z = torch.cat([slerp(lat.z_i[:1], lat.z_i[1:], float(t)) for t in ts])
    z = F.normalize(z, dim=-1)
    if noise == "inverted":
        x_T = torch.cat([slerp(lat.x_T[:1], lat.x_T[1:], float(t)) for t in ts])
    else:
        x_T = randn(lat.x_T[:1].shape, gen, unclip.device).expand(frames, -1, -1, -1)
    tokens, mask = no_caption(unclip, frames)
    x = sample(unclip.decoder, Condition(z, tokens, mask), lat.sampling(), x_T=x_T)
    return {"frames": upsample_chain(unclip, x, gen, z)[-1], "z_i": z.cpu(), "t": ts}


# ---- 3. text diffs ----------------------------------------------------------------------------------
@torch.no_grad()
def textdiff(unclip: Unclip, images: torch.Tensor, before: Sequence[str], after: Sequence[str], *,
             thetas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), seed: int = 0,
             steps: int = INVERSION_STEPS, caption: str = "none", guidance: float = 1.0) -> dict:
    """Edit each image toward ``after[k]`` away from ``before[k]`` (its current description):
    z_d = normalize(z_t(after) - z_t(before)); z_theta = slerp(z_i, z_d, theta), decoded from the
    image's inverted noise (so what the edit does not touch stays). ``caption``: "none" decodes
    from z_theta alone (the paper's text diff); "after" also gives the decoder, whose text
    condition is GLIDE's, the target caption (with ``guidance`` > 1: classifier-free guidance
    toward both); "before_after" inverts the image under ``before`` and decodes under ``after``.
    Returns ``by_theta`` {theta: uint8 final images [B]} and ``z_d``."""
    if caption not in ("none", "after", "before_after"):
        raise ValueError(f"caption must be 'none', 'after' or 'before_after', got {caption!r}")
    if not (len(images) == len(before) == len(after)):
        raise ValueError("one 'before' and one 'after' caption per image")
    lat = Latent(unclip, images, steps, captions=list(before) if caption == "before_after" else None)
    gen = torch.Generator().manual_seed(seed)
    z_before, _, _ = unclip.encode_text(list(before))
    z_after, tok_after, mask_after = unclip.encode_text(list(after))
    z_d = F.normalize(z_after - z_before, dim=-1).to(lat.z_i.device)
    cond = (tok_after.to(lat.z_i.device), mask_after.to(lat.z_i.device)) if caption != "none" else None
    out = {"by_theta": {}, "z_d": z_d.cpu()}
    for theta in thetas:
        z = F.normalize(slerp(lat.z_i, z_d, float(theta)), dim=-1)
        x = lat.decode(z, lat.x_T, caption=cond, guidance=guidance)
        out["by_theta"][float(theta)] = upsample_chain(unclip, x, gen, z)[-1]
    return out


# ---- 4. inpainting ------------------------------------------------------------------------------------
@torch.no_grad()
def inpaint(unclip: Unclip, images: torch.Tensor, masks: torch.Tensor, captions: Sequence[str], *, seed: int = 0,
            steps: int = INVERSION_STEPS, guidance: Optional[float] = None) -> dict:
    """Fill the masked region of each image (``masks`` [B, 1, H, W], 1 = repaint, 0 = keep) so that
    the image shows its caption: z_i from the prior for the caption, the decoder's generalized
    DDIM with the kept region replaced by the original noised to every step, then the upsamplers
    with the kept region restored at every resolution. Outside the mask the output is the input,
    exactly. Returns ``images`` (uint8 final) and ``stages``."""
    if masks.shape[0] != images.shape[0] or masks.shape[1] != 1:
        raise ValueError(f"masks must be [B, 1, H, W] for {images.shape[0]} images, got {tuple(masks.shape)}")
    dev, size = unclip.device, unclip.sizes[0]
    gen = torch.Generator().manual_seed(seed)
    z_t, tokens, mask_t = unclip.encode_text(list(captions))
    z_i = unclip.prior_sample(z_t, tokens, mask_t, gen)
    keep = 1 - masks.float()
    orig = to_model(images).to(dev)
    known_mask = (resize(keep, size).clamp(0, 1) > 0.5).float().to(dev)
    saved = unclip.decoder_sampling().guidance_scale
    x = sample(unclip.decoder, Condition(z_i, tokens, mask_t, known=resize(orig, size), known_mask=known_mask),
               ddim(unclip, steps, eta=1.0, guidance=saved if guidance is None else guidance), generator=gen,
               x_T=randn((len(images), 3, size, size), gen, dev))
    stages = upsample_chain(unclip, x, gen, z_i, keep=(orig, keep.to(dev)))
    final = stages[-1]
    if final.shape[-1] == images.shape[-1]:
        # exactly the input outside the mask (the resampled masks above are for the lower stages)
        k = keep.bool().expand_as(images)
        final = torch.where(k, images, final)
        stages[-1] = final
    return {"images": final, "stages": stages, "z_i": z_i.cpu()}
