"""The `prior` stage: train the prior of ``prior.kind`` (diffusion, the default, or
autoregressive: ``pipeline.prior.kinds``) on the embedding shards, measure it on val
(``pipeline.prior.figures``: the cosines the field reports)."""
from __future__ import annotations

import time

import torch

from .. import bundle, retrain, tracking
from ..data.shards import shard_paths
from ..diffusion import noise_schedule
from ..data.embedding_shards import load_split, train_batches
from ..progress import say
from ..errors import StageError
from ..device import autocast
from ..training import clear_checkpoints, train_diffusion_model
from ..workspace import atomic_dir
from . import diffusion, kinds
from .figures import evaluate
from .kinds import arch_of  # noqa: F401  (the benches build the stage's network from it)


def make_loss(p, schedule):
    """The training step's loss: ``loss_fn(net, batch)`` for batches of ``train_batches``
    (z_i, z_t [B, D], tokens [B, L, W], mask [B, L]), under the stage's precision."""
    def loss_fn(net, batch):
        dev = next(net.parameters()).device
        with autocast(p.precision, dev):
            return kinds.training_loss(net, batch["z_i"].to(dev), batch["z_t"].to(dev), batch["tokens"].to(dev),
                                       batch["mask"].to(dev), schedule, p_uncond=p.p_uncond)
    return loss_fn


def fit_codebook(model, paths: list, val: dict) -> dict:
    """The autoregressive prior's PCA and buckets, fit once on the train split's embeddings; its
    figures (variance kept, the round trip's cosines) on val."""
    train = load_split(paths, "train")
    if not train["n"]:
        raise StageError("the train split of the embeddings is empty")
    fit = model.codebook.fit(train["z_i"], train["z_t"])
    say("prior", f"codebook: {fit['components']} PCA components keep {100 * fit['explained_variance']:.1f}% of "
                 f"the variance; {fit['buckets']} buckets each; train round trip cos {fit['cos_quantized']}")
    return {"train": fit, "val": model.codebook.round_trip(val["z_i"])}


def train(cfg, ws, out_dir, checkpoint_dir) -> dict:
    """Train ``cfg.prior`` on the workspace's embeddings into the model directory ``out_dir`` (the stage's
    ``models/prior``; ``bench/prior_comparison.py`` trains the other kind beside it)."""
    p = cfg.prior
    if p.kind == kinds.AUTOREGRESSIVE:              # its own learning rate (the training loop reads p.lr)
        p = p.model_copy(update={"lr": p.autoregressive.lr})
    paths = shard_paths(ws.embeddings)
    if not paths:
        raise StageError(f"no shards in {ws.embeddings}: run the embed stage first")
    val = load_split(paths, "val")
    if not val["n"]:
        raise StageError("the val split of the embeddings is empty")
    _, d = val["z_i"].shape
    _, length, width = val["tokens"].shape
    arch = arch_of(p, d, width, length)
    if p.kind == kinds.AUTOREGRESSIVE and p.autoregressive.components > d:
        raise StageError(f"prior.autoregressive.components is {p.autoregressive.components}, more than the "
                         f"CLIP embedding's {d} dimensions")
    torch.manual_seed(p.seed)
    model = kinds.build(**arch)
    t0 = time.perf_counter()
    codebook = fit_codebook(model, paths, val) if kinds.is_autoregressive(model) else None
    schedule = noise_schedule(diffusion.PREDICTION)

    def make_batches(rank, world):
        # each sample's caption or one of its embedded rewrites (embed.rewrites): z_t and tokens alike
        return train_batches(paths, p.batch_size, seed=p.seed, rank=rank, world=world, variants=1 + cfg.embed.rewrites)

    def on_log(step, figures):
        tracking.log_metrics({"train_loss": figures["loss"], "lr": figures["lr"]}, step=step)

    clip_sha = bundle.clip_identity(ws.clip)["sha256"]
    # (a warm start loads the last model's codebook with its weights: its codes keep their meaning)
    warm, scratch_why = retrain.warm_start(cfg, out_dir, ws.embeddings, "prior", p, arch, clip_sha=clip_sha)
    # a checkpoint is resumed only by the same config, on the same embeddings, of the same CLIP
    key = {"prior": p.model_dump(mode="json"), "arch": arch, "data": retrain.lineage(ws.embeddings)["shards"],
           "clip": clip_sha}
    summary, acc = train_diffusion_model(model, p, make_batches, make_loss(p, schedule), checkpoint_dir=checkpoint_dir,
                                         key=key, desc="prior: train", on_log=on_log, warm=warm)
    train_seconds = round(time.perf_counter() - t0, 1)
    if not acc.is_main_process:
        return {"train": summary}
    val_figs = evaluate(model, val, p)
    with atomic_dir(out_dir) as out:
        bundle.save_model(out, model, kind="prior", arch=arch, run_config=bundle.run_config(cfg),
                          info=kinds.sampling_info(p) | {"train_seconds": train_seconds},
                          clip=bundle.clip_identity(ws.clip))
        retrain.write_lineage(out, ws.embeddings)
    clear_checkpoints(checkpoint_dir)         # only now: a kill before this resumes at the end
    tracking.log_metrics({f"val_{k}": v for k, v in val_figs.items() if k.startswith("cos")})
    say("prior", f"{p.kind} prior, val: cos(pred, image) {val_figs['cos_pred_image']} vs baseline cos(text, image) "
                 f"{val_figs['cos_image_text_baseline']} and unrelated {val_figs['cos_unrelated_image']} "
                 f"-> {out_dir}/ (model.safetensors)")
    return {"kind": p.kind, "train": summary, "train_seconds": train_seconds, "val": val_figs,
            "retrain": retrain.describe(warm, scratch_why)} | ({"codebook": codebook} if codebook else {})


def run(cfg, ws) -> dict:
    return train(cfg, ws, ws.prior, ws.checkpoints / "prior")
