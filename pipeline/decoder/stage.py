"""The `decoder` stage: train the decoder on (image, z_i, caption) from the embedding shards.

Val figures (fixed seeds, the stage's sampling settings), on up to 256 val images decoded from
their own true z_i and caption:

    cos_reembed           cos(CLIP(decoded image), z_i): does the image carry the embedding's meaning?
    cos_reembed_real      the same for the real image at the decoder's resolution: the ceiling
    cos_reembed_shuffled  decoded images against other images' z_i: the floor
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import bundle, retrain, tracking
from ..clip import model as clip_model
from ..data.shards import shard_paths
from ..diffusion import in_batches, noise_schedule
from ..data.embedding_shards import load_split, train_batches
from ..images import grid, resize, save_png, to_model, to_uint8
from ..progress import say
from ..errors import StageError
from ..device import autocast
from ..training import clear_checkpoints, train_diffusion_model
from ..workspace import atomic_dir
from . import diffusion
from .network import UnclipDecoder

VAL_IMAGES = 256


def arch_of(d, embed_dim: int, text_width: int) -> dict:
    return {"image_size": d.image_size, "embed_dim": embed_dim, "text_width": text_width,
            "block_out_channels": list(d.block_out_channels), "attention": list(d.attention),
            "attention_block": d.attention_block,
            "layers_per_block": d.layers_per_block, "head_dim": d.head_dim,
            "cross_attention_dim": d.cross_attention_dim, "extra_tokens": d.extra_tokens,
            "layout_channels": d.layout_channels, "layout_hidden": d.layout_hidden,
            "learned_variance": d.learned_variance,
            "scale_shift_norm": d.scale_shift_norm, "text_layers": d.text_layers}


def sampling_info(d) -> dict:
    """How a decoder trained with config ``d`` samples (its ``model.json``'s ``info``; ``DecoderSampling.of`` reads it)."""
    return {"prediction_type": d.prediction_type, "sampling": d.sampling.model_dump()}


@torch.no_grad()
def decode(model, condition: diffusion.Condition, sampling: diffusion.DecoderSampling, *, seed: int,
           batch_size: int = 64, precision: str = "auto") -> torch.Tensor:
    """Images in [-1, 1] (on the CPU) for rows of conditions, in batches, from one seeded generator."""
    device = next(model.parameters()).device
    condition = diffusion.Condition(*(None if c is None else c.to(device) for c in condition))
    with autocast(precision, device):
        return in_batches(diffusion.sample, model, condition, sampling, batch_size,
                          generator=torch.Generator().manual_seed(seed)).cpu()


def reembed(clip, images: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings of float images in [-1, 1] at any resolution (resized to CLIP's)."""
    with torch.no_grad():
        return clip.encode_image(to_uint8(resize(images, clip.image_size))).float()


def evaluate(model, val: dict, d, clip) -> tuple[dict, torch.Tensor]:
    n = min(VAL_IMAGES, val["n"])
    z_i = val["z_i"][:n]
    images = decode(model, diffusion.Condition(z_i, val["tokens"][:n], val["mask"][:n]),
                    diffusion.DecoderSampling.of(sampling_info(d)), seed=d.seed, precision=d.precision)
    e_gen = reembed(clip, images)
    e_real = reembed(clip, to_model(val["images"][:n]))
    cos = lambda a, b: F.cosine_similarity(a, b, dim=-1).mean().item()       # noqa: E731
    figures = {"n": n, "sampler": d.sampling.sampler, "steps": d.sampling.steps,
               "guidance_scale": d.sampling.guidance_scale,
               "cos_reembed": round(cos(e_gen, z_i), 4),
               "cos_reembed_real": round(cos(e_real, z_i), 4),
               "cos_reembed_shuffled": round(cos(e_gen, torch.roll(z_i, 1, 0)), 4)}
    return figures, images


def training_fns(d, paths: list, variants: int = 1) -> tuple:
    """The decoder's recipe for ``train_diffusion_model`` from its config ``d`` and the embedding
    shards: ``make_batches(rank, world)`` (the train split's batches; ``variants``: 1 +
    ``embed.rewrites``, each sample's caption or one of its rewrites) and ``loss_fn(net, batch)``
    (the diffusion loss with both condition drops). The stage and bench/decoder_variant.py use it."""
    schedule = noise_schedule(d.prediction_type)

    def make_batches(rank, world):
        return train_batches(paths, d.batch_size, seed=d.seed, rank=rank, world=world, image_size=d.image_size,
                             variants=variants)

    def loss_fn(net, batch):
        dev = next(net.parameters()).device
        with autocast(d.precision, dev):
            return diffusion.training_loss(net, to_model(batch["images"]).to(dev), batch["z_i"].to(dev),
                                           batch["tokens"].to(dev), batch["mask"].to(dev), schedule,
                                           d.p_drop_image_embed, d.p_drop_caption, d.snr_gamma,
                                           sobolev_weight=d.sobolev_weight, layout_weight=d.layout_weight)

    return make_batches, loss_fn


def run(cfg, ws) -> dict:
    d = cfg.decoder
    paths = shard_paths(ws.embeddings)
    if not paths:
        raise StageError(f"no shards in {ws.embeddings}: run the embed stage first")
    val = load_split(paths, "val", image_size=d.image_size)
    if not val["n"]:
        raise StageError("the val split of the embeddings is empty")
    clip = clip_model.load(ws.clip)
    arch = arch_of(d, val["z_i"].shape[1], val["tokens"].shape[2])
    torch.manual_seed(d.seed)
    model = UnclipDecoder(**arch)
    make_batches, loss_fn = training_fns(d, paths, 1 + cfg.embed.rewrites)

    def on_log(step, figures):
        tracking.log_metrics({"train_loss": figures["loss"], "lr": figures["lr"]}, step=step)

    clip_sha = bundle.clip_identity(ws.clip)["sha256"]
    warm, scratch_why = retrain.warm_start(cfg, ws.decoder, ws.embeddings, "decoder", d, arch, clip_sha=clip_sha)
    # a checkpoint is resumed only by the same config, on the same embeddings, of the same CLIP
    key = {"decoder": d.model_dump(mode="json"), "arch": arch, "data": retrain.lineage(ws.embeddings)["shards"],
           "clip": clip_sha}
    summary, acc = train_diffusion_model(model, d, make_batches, loss_fn, checkpoint_dir=ws.checkpoints / "decoder",
                                         key=key, desc="decoder: train", on_log=on_log, warm=warm)
    if not acc.is_main_process:
        return {"train": summary}
    val_figs, images = evaluate(model, val, d, clip)
    with atomic_dir(ws.decoder) as out:
        bundle.save_model(out, model, kind="decoder", arch=arch, run_config=bundle.run_config(cfg),
                          info=sampling_info(d),
                          clip=bundle.clip_identity(ws.clip))
        retrain.write_lineage(out, ws.embeddings)
        # rows of 8: real (at the decoder's resolution) above decoded-from-z_i, 4 pairs of rows
        k = min(32, val_figs["n"])
        real = val["images"][:k]
        gen = to_uint8(images[:k])
        rows = [t for i in range(0, k, 8) for t in (real[i:i + 8], gen[i:i + 8])]
        save_png(grid(torch.cat(rows), 8, scale=max(1, 64 // d.image_size)), out / "val_decoded.png")
    clear_checkpoints(ws.checkpoints / "decoder")       # only now: a kill before this resumes at the end
    tracking.log_artifact(ws.decoder / "val_decoded.png", "decoder")
    tracking.log_metrics({f"val_{k}": v for k, v in val_figs.items() if k.startswith("cos")})
    say("decoder", f"val: cos(CLIP(decoded), z_i) {val_figs['cos_reembed']} (real images at "
                   f"{d.image_size} px: {val_figs['cos_reembed_real']}, shuffled: {val_figs['cos_reembed_shuffled']}) "
                   f"-> {ws.decoder.relative_to(ws.root)}/ (model.safetensors, val_decoded.png)")
    return {"train": summary, "val": val_figs, "retrain": retrain.describe(warm, scratch_why)}
