"""The `upsample@<key>` stages: train one upsampler of the chain, evaluate it on val, save models/upsampler_<key>/.

The chain starts at the decoder's resolution; each stage multiplies it by its ``scale``
(default 16 -> 32 -> 64 px). Training pairs come from the filtered shards: the image resized
to the stage's output size (the target x0) and to its input size (the low-res condition, then
corrupted by the stage's ``degradation``, upsampled bicubically to the output size). As in
DALL-E 2, the network trains on random crops (``crop_fraction`` of the side) cut at the same
place from both, and is applied to whole images at sampling.

A conditioned upsampler (``condition: image_embed``, a declared deviation) also sees each image's
CLIP embedding z_i, so it reads its images and embeddings from the embed stage's shards (which
carry both) instead of the filtered ones.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import webdataset as wds

from .. import bundle, diffusion, retrain, tracking
from ..data.image_shards import decode_image, iter_split, train_stream
from ..data.shards import shard_paths
from ..images import grid, psnr, resize, save_png, to_model, to_uint8
from ..progress import say
from ..errors import StageError
from ..device import autocast
from ..training import clear_checkpoints, train_diffusion_model
from ..workspace import atomic_dir
from .degrade import BLUR_SIGMA, augment_levels, degrade, noise_augment, smooth_augment
from .diffusion import Condition, UpsamplerSampling, sample, training_loss
from .network import Upsampler

VAL_IMAGES = 64          # val images for the PSNR figures
GRID_IMAGES = 8          # columns of samples.png


def chain_sizes(cfg) -> dict[str, tuple[int, int]]:
    """(input, output) side in px of every upsampler, in chain order, from the decoder's size."""
    sizes, size = {}, cfg.decoder.image_size
    for key, stage in cfg.upsample.stages.items():
        sizes[key] = (size, size * stage.scale)
        size *= stage.scale
    return sizes


def crop_size(out_size: int, fraction: float, multiple: int) -> int:
    """The training crop's side: ``fraction`` of the output side, rounded to a multiple of the
    network's ``multiple`` (its down-sampling factor), at least one multiple."""
    return max(multiple, round(out_size * fraction / multiple) * multiple)


def high_low(images: list[torch.Tensor], in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [3, H, W] of any size -> (high-res [B, 3, out, out], low-res [B, 3, in, in]),
    float in [-1, 1], both resized from the original (as the decoder's training images are)."""
    x = [to_model(img)[None] for img in images]
    return torch.cat([resize(i, out_size) for i in x]), torch.cat([resize(i, in_size) for i in x])


class TrainingPairs:
    """Collation of decoded images into a training batch (runs in the loader's workers):
    (x0 crops, conditioning crops), both uint8 [B, 3, crop, crop]; the conditioning image is
    the corrupted low-res image upsampled bicubically to the output size. With ``noise_aug`` > 0
    (8-bit levels) the corrupted low-res image is also noised, at a level drawn per image from
    [0, noise_aug], and the batch ends with those levels [B] (float).

    The corruptions and crop places come from a generator seeded by (``seed``, worker id), made
    in the worker on first use."""

    def __init__(self, kind: str, in_size: int, out_size: int, crop: int, seed: int, noise_aug: float = 0.0,
                 smooth_aug: float = 0.0, blur_sigma: tuple[float, float] = BLUR_SIGMA):
        self.kind, self.in_size, self.out_size, self.crop, self.seed = kind, in_size, out_size, crop, seed
        self.noise_aug, self.smooth_aug, self.blur_sigma = noise_aug, smooth_aug, tuple(blur_sigma)
        self.generator: Optional[torch.Generator] = None

    def __call__(self, items: list) -> tuple[torch.Tensor, ...]:
        """items: uint8 images [3, H, W], or (image, z_i [D]) pairs for a conditioned upsampler,
        whose batch then also carries the embeddings [B, D] (before the aug levels)."""
        if isinstance(items[0], tuple):
            images, z_i = zip(*items)
            x0, cond, *levels = self.pairs(list(images))
            return (x0, cond, torch.stack(z_i), *levels)
        return self.pairs(items)

    def pairs(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.generator is None:
            worker = torch.utils.data.get_worker_info()
            self.generator = torch.Generator().manual_seed((self.seed << 8) + (worker.id if worker else 0))
        x0, low = high_low(images, self.in_size, self.out_size)
        low = degrade(self.kind, low, self.generator, self.blur_sigma).clamp(-1, 1)
        if self.smooth_aug > 0:
            low = smooth_augment(low, self.smooth_aug, self.generator)
        levels = ()
        if self.noise_aug > 0:
            levels = (augment_levels(self.noise_aug, len(low), self.generator),)
            low = noise_augment(low, levels[0], self.generator)
        cond = resize(low, self.out_size)
        corners = torch.randint(0, self.out_size - self.crop + 1, (len(x0), 2), generator=self.generator).tolist()
        window = lambda x, i, j: x[:, i:i + self.crop, j:j + self.crop]       # noqa: E731
        return (to_uint8(torch.stack([window(x, i, j) for x, (i, j) in zip(x0, corners)])),
                to_uint8(torch.stack([window(c, i, j) for c, (i, j) in zip(cond, corners)])), *levels)


def image_embedding(sample: dict) -> torch.Tensor:
    """An embed-stage sample's CLIP image embedding z_i [D] (float32)."""
    return torch.from_numpy(np.load(io.BytesIO(sample["img_emb.npy"])).astype(np.float32))


def _image(sample: dict) -> torch.Tensor:
    return decode_image(sample["jpg"])


def _image_and_embedding(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return decode_image(sample["jpg"]), image_embedding(sample)


def train_loader(paths: list[Path], pairs: TrainingPairs, batch_size: int, num_workers: int,
                 seed: int, conditioned: bool = False) -> wds.WebLoader:
    """Endless stream of :class:`TrainingPairs` batches from the train split (the CLIP stage's
    streaming loader: shards resampled, seeded shuffle buffer); ``conditioned``: embed-stage
    shards, each batch with its z_i."""
    return train_stream(paths, _image_and_embedding if conditioned else _image, pairs, batch_size,
                        num_workers, seed)


def conditioned(u) -> bool:
    return u.condition == "image_embed"


def architecture(u, embed_dim: int = 0) -> dict:
    """The :class:`Upsampler` arguments (model.json's ``arch``) of upsampler config ``u``;
    ``embed_dim``: z_i's size, used when it is conditioned on z_i."""
    arch = {"block_out_channels": list(u.block_out_channels), "layers_per_block": u.layers_per_block}
    if conditioned(u):
        arch["embed_dim"] = embed_dim
    if u.noise_aug > 0:
        arch["noise_aug"] = True
    return arch


def source_dir(ws, u) -> Path:
    """Where an upsampler's training images come from (``images_from``, its data dependency in
    dvc.yaml): the embed stage's shards, which carry image and z_i (a conditioned upsampler needs
    them), or the filter stage's, which exist before CLIP is trained."""
    return ws.embeddings if u.images_from == "embeddings" else ws.filtered


def make_loss(u, schedule):
    """The training step's loss: ``loss_fn(net, batch)`` for batches of ``TrainingPairs`` (uint8
    x0 crops and conditioning crops [B, 3, c, c], + z_i [B, D] when conditioned, + the aug levels
    [B] with noise augmentation), under the stage's precision."""
    def loss_fn(net, batch):
        dev = next(net.parameters()).device
        x0, cond = (to_model(x.to(dev)) for x in batch[:2])
        extra = list(batch[2:])
        z_i = extra.pop(0).to(dev) if conditioned(u) else None
        aug_level = extra.pop(0).to(dev) if u.noise_aug > 0 else None
        with autocast(u.precision, dev):
            return training_loss(net, x0, cond, schedule, z_i=z_i, p_drop_image=u.p_drop_image_embed,
                                 residual=u.target == "residual", residual_scale=u.residual_scale,
                                 aug_level=aug_level, sobolev_weight=u.sobolev_weight)
    return loss_fn


def train(u, key: str, paths: list[Path], in_size: int, out_size: int, checkpoint_dir: Path, warm_from=None,
          embed_dim: int = 0, depends: Optional[dict] = None):
    """Train upsampler ``key`` (config ``u``) with the shared recipe -> (model holding the EMA
    weights, arch, fit summary, accelerator, how it started). ``warm_from(arch)``: the
    :func:`pipeline.retrain.warm_start` decision for this architecture. ``embed_dim``: z_i's
    size for a conditioned upsampler (its ``paths`` are then embed-stage shards). ``depends``:
    what a checkpoint must have been trained on to be resumed (data digests, the CLIP's sha256)."""
    arch = architecture(u, embed_dim)
    torch.manual_seed(u.seed)                             # the same initial weights on every process
    model = Upsampler(**arch)
    if out_size % model.multiple:
        raise StageError(f"upsample.stages.{key}: output size {out_size} px must be a multiple of "
                         f"{model.multiple} (2^(levels - 1) for {len(u.block_out_channels)} levels)")
    crop = crop_size(out_size, u.crop_fraction, model.multiple)
    schedule = diffusion.noise_schedule(u.prediction_type)

    def make_batches(rank: int, world: int):
        seed = u.seed + rank                              # each process its own data and noise
        torch.manual_seed(seed)
        pairs = TrainingPairs(u.degradation, in_size, out_size, crop, seed, u.noise_aug, u.smooth_aug, u.blur_sigma)
        return train_loader(paths, pairs,
                            u.batch_size, u.num_workers, seed, conditioned=conditioned(u))

    loss_fn = make_loss(u, schedule)

    def on_log(step, figures):
        tracking.log_metrics({"train_loss": figures["loss"], "lr": figures["lr"]}, step=step)

    key_obj = {"stage": u.model_dump(mode="json"), "in_size": in_size, "out_size": out_size, **(depends or {})}
    warm, scratch_why = warm_from(arch) if warm_from else (None, "")
    summary, accelerator = train_diffusion_model(model, u, make_batches, loss_fn, checkpoint_dir=checkpoint_dir,
                                                 key=key_obj, desc=f"upsample@{key}: train", on_log=on_log,
                                                 warm=warm)
    summary["crop_size"] = crop
    return model, arch, summary, accelerator, retrain.describe(warm, scratch_why)


def model_info(u, key: str, in_size: int, out_size: int, crop_size: int) -> dict:
    """A saved upsampler's ``meta["info"]`` (what ``UpsamplerSampling.of`` reads) for
    upsampler ``key`` trained with config ``u``."""
    return {"key": key, "in_size": in_size, "out_size": out_size, "prediction_type": u.prediction_type,
            "condition": u.condition, "target": u.target, "residual_scale": u.residual_scale,
            "sampling": u.sampling.model_dump(), "degradation": u.degradation, "noise_aug": u.noise_aug,
            "smooth_aug": u.smooth_aug,
            "crop_size": crop_size}


def evaluate(model, info: dict, paths: list[Path], seed: int) -> tuple[dict, torch.Tensor]:
    """PSNR against the true high-res image on up to VAL_IMAGES val images, of the upsampler's
    output and of plain bicubic upsampling of the same (uncorrupted) low-res image.
    Returns (figures, uint8 [3 * GRID_IMAGES, 3, out, out] rows for the sample grid)."""
    samples = [s for _, s in zip(range(VAL_IMAGES), iter_split(paths, "val"))]
    if not samples:
        raise StageError("the val split is empty: no sample's json carries split='val'")
    images = [decode_image(s["jpg"]) for s in samples]
    z_i = torch.stack([image_embedding(s) for s in samples]) if getattr(model, "embed_dim", 0) else None
    truth, low = high_low(images, info["in_size"], info["out_size"])
    bicubic = resize(low, info["out_size"])
    out = sample(model, Condition(low, z_i), UpsamplerSampling.of(info), generator=torch.Generator().manual_seed(seed)).cpu()
    ours, base = psnr(to_uint8(out), to_uint8(truth)), psnr(to_uint8(bicubic), to_uint8(truth))
    figures = {"images": len(images), "psnr_db": round(ours.mean().item(), 2),
               "bicubic_psnr_db": round(base.mean().item(), 2),
               "psnr_gain_db": round((ours - base).mean().item(), 2),
               "sampler": info["sampling"]["sampler"], "sampling_steps": info["sampling"]["steps"]}
    n = min(GRID_IMAGES, len(images))
    rows = torch.cat([to_uint8(bicubic[:n]), to_uint8(out[:n]), to_uint8(truth[:n])])
    return figures, rows


def run(cfg, ws, key: str) -> dict:
    """Stage ``upsample@<key>``: train, evaluate on val, save models/upsampler_<key>/; returns its figures."""
    if key not in cfg.upsample.stages:
        raise StageError(f"no upsampler {key!r} in upsample.stages (known: {', '.join(cfg.upsample.stages)})")
    u = cfg.upsample.stages[key]
    in_size, out_size = chain_sizes(cfg)[key]
    source = source_dir(ws, u)
    paths = shard_paths(source)
    if not paths:
        stage = "embed" if source == ws.embeddings else "filter"
        raise StageError(f"no shards in {source}: run the {stage} stage first")
    embed_dim = image_embedding(next(iter_split(paths[:1], None))).shape[0] if conditioned(u) else 0

    def warm_from(arch):
        clip_sha = bundle.clip_identity(ws.clip)["sha256"] if conditioned(u) else None
        return retrain.warm_start(cfg, ws.upsampler(key), source, f"upsample.stages.{key}", u, arch, clip_sha)

    depends = {"data": retrain.lineage(source)["shards"],
               "clip": bundle.clip_identity(ws.clip)["sha256"] if conditioned(u) else None}
    model, arch, summary, accelerator, how = train(u, key, paths, in_size, out_size,
                                                   ws.checkpoints / f"upsampler_{key}", warm_from, embed_dim, depends)
    if not accelerator.is_main_process:                   # under several processes the main one saves
        return {"train": summary}
    info = model_info(u, key, in_size, out_size, summary["crop_size"])
    with atomic_dir(ws.upsampler(key)) as out:
        with torch.no_grad():
            val, rows = evaluate(model, info, paths, u.seed)
        bundle.save_model(out, model, kind="upsampler", arch=arch, run_config=bundle.run_config(cfg), info=info)
        retrain.write_lineage(out, source)
        save_png(grid(rows, nrow=len(rows) // 3, scale=max(1, math.ceil(128 / out_size)),
                      row_labels=["bicubic", "upsampler", "truth"]), out / "samples.png")
    clear_checkpoints(ws.checkpoints / f"upsampler_{key}")   # only now: a kill before this resumes at the end
    tracking.log_artifact(ws.upsampler(key) / "samples.png", f"upsample_{key}")
    where = ws.upsampler(key).relative_to(ws.root)
    say(f"upsample@{key}", f"{in_size} -> {out_size} px ({u.degradation} corruption in training); val PSNR "
                           f"{val['psnr_db']} dB vs bicubic {val['bicubic_psnr_db']} dB on {val['images']} images "
                           f"-> {where}/ (model.safetensors, samples.png)")
    return {"in_size": in_size, "out_size": out_size, "train": summary, "val": val, "retrain": how}
