"""DALLE2-pytorch's side of the comparison (run with bench/dalle2_pytorch/.venv/bin/python).

    theirs.py '{"mode": "count", "shapes": {...}, "decoder": [unet kwargs, ...], "prior": [net kwargs, ...]}'
        -> {"decoder": [params, ...], "prior": [params, ...]}        (compare.py picks the sizes)
    theirs.py '{"mode": "run", "shapes": {...}, "threads": 2, "precision": "bf16", "decoder": {...}, "prior": {...}}'
        -> per model: params, training items/s, sampling s/item and NFE

Built without CLIP, on precomputed embeddings, as the library allows: a ``Decoder`` around one
``Unet`` conditioned on the image embedding (added to the time embedding and as 4 tokens) and on
the caption's token encodings; a ``DiffusionPrior`` around a ``DiffusionPriorNetwork`` (text
encodings, text embedding, time, noised image embedding, query) predicting x0.

Training is the library's normal path: ``DecoderTrainer`` / ``DiffusionPriorTrainer`` (the
trainer's forward = the diffusion loss under ``accelerator.autocast()`` + backward; ``update()`` =
gradient clipping, AdamW (Adam when weight decay is 0), warmup/LR schedule and the ema_pytorch
EMA, which by its default updates every 10 steps). Timed: ``steps`` whole steps after ``warmup``.
Sampling (timed after one 1-row call): ``DecoderTrainer.sample`` (EMA U-Net, DDIM, guidance as
the second pass of ``forward_with_cond_scale``) and the prior's DDIM loop on the EMA prior with
``candidates`` draws per caption, reranked by the text embedding as ``DiffusionPrior.sample``
does. Both under the job's precision (``accelerator.autocast()``), as ours samples under its own.
"""
from __future__ import annotations

import contextlib
import sys
from importlib import metadata

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from dalle2_pytorch import Decoder, DecoderTrainer, DiffusionPrior, DiffusionPriorNetwork, DiffusionPriorTrainer, Unet
from einops import rearrange, repeat

from common import RowCounter, emit, job_from_argv, rows, set_threads, synthetic, timed_sampling, timed_steps


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_decoder(shapes: dict, unet_kw: dict, d: dict) -> Decoder:
    """A one-U-Net decoder at ``image_size``, v-prediction, fixed variance (as ours by default).
    ``cond_dim`` is left at its default (= dim): equal to the embedding width, the library skips
    the image-to-tokens projection and its null-token ``torch.where`` breaks by batch size."""
    kw = dict(image_embed_dim=shapes["embed_dim"], text_embed_dim=shapes["text_width"],
              cond_on_text_encodings=True, max_text_len=shapes["context_length"]) | unet_kw
    kw["dim_mults"] = tuple(kw["dim_mults"])
    kw["self_attn"] = tuple(kw.get("self_attn", (False,)))
    return Decoder(unet=Unet(**kw), image_size=shapes["image_size"], timesteps=1000,
                   sample_timesteps=d.get("sample", {}).get("steps"),
                   image_cond_drop_prob=d.get("p_drop_image", 0.1), text_cond_drop_prob=d.get("p_drop_caption", 0.5),
                   learned_variance=False, predict_v=d.get("prediction", "v") == "v")


def make_prior(shapes: dict, net_kw: dict, p: dict) -> DiffusionPrior:
    """The prior without CLIP: ``image_embed_dim`` given, x0 prediction, the text dropped for
    classifier-free guidance with probability ``p_uncond`` (as ours)."""
    net = DiffusionPriorNetwork(dim=shapes["embed_dim"], max_text_len=shapes["context_length"], **net_kw)
    return DiffusionPrior(net=net, image_embed_dim=shapes["embed_dim"], timesteps=1000,
                          text_cond_drop_prob=p.get("p_uncond", 0.1), image_cond_drop_prob=0.0,
                          condition_on_text_encodings=True, predict_x_start=True)


def run_decoder(job: dict, acc: Accelerator) -> dict:
    shapes, d = job["shapes"], job["decoder"]
    decoder = make_decoder(shapes, d["unet"], d)
    params = count(decoder.unets)
    trainer = DecoderTrainer(decoder, accelerator=acc, lr=d["lr"], wd=d["weight_decay"], max_grad_norm=d["grad_clip"],
                             warmup_steps=d["warmup_steps"], ema_beta=d["ema_decay"])
    b = d["batch"]
    data = synthetic(max(b, d["sample"]["batch"]) * 4, shapes)

    def step(i: int) -> None:
        r = rows(data, i * b, b)
        trainer(r["images"].float() / 255, image_embed=r["z_i"], text_encodings=r["tokens"])
        trainer.update()

    seconds = timed_steps(step, d["warmup"], d["steps"])
    counter = RowCounter(trainer.ema_unets[0].ema_model)        # sampling uses the EMA U-Net

    def sample(n: int) -> None:
        with acc.autocast():
            trainer.sample(image_embed=data["z_i"][:n], text_encodings=data["tokens"][:n],
                           cond_scale=d["sample"]["guidance"])

    return {"params": params, "batch": b, "steps": d["steps"], "train_items_per_s": b * d["steps"] / seconds,
            **timed_sampling(sample, d["sample"]["batch"], counter)}


def run_prior(job: dict, acc: Accelerator) -> dict:
    shapes, p = job["shapes"], job["prior"]
    prior = make_prior(shapes, p["net"], p)
    params = count(prior)
    trainer = DiffusionPriorTrainer(prior, accelerator=acc, lr=p["lr"], wd=p["weight_decay"],
                                    max_grad_norm=p["grad_clip"], warmup_steps=p["warmup_steps"],
                                    ema_beta=p["ema_decay"])
    b, s = p["batch"], p["sample"]
    data = synthetic(max(b, s["batch"]) * 4, shapes)

    def step(i: int) -> None:
        r = rows(data, i * b, b)          # image_embed is scaled in place by the prior: a fresh copy
        trainer(text_embed=r["z_t"], image_embed=r["z_i"].clone(), text_encodings=r["tokens"])
        trainer.update()

    seconds = timed_steps(step, p["warmup"], p["steps"])
    ema = trainer.ema_diffusion_prior.ema_model
    counter = RowCounter(ema.net)
    # Their DDIM over T steps evaluates the network T - 1 times (it starts from a linspace at -1);
    # T = steps + 1 matches our network evaluations per sample (checked: nfe_per_item).
    timesteps = s["steps"] + 1

    def sample(n: int) -> None:           # DiffusionPrior.sample after CLIP's text embedding
        k = s["candidates"]
        z_t = repeat(data["z_t"][:n], "b d -> (b r) d", r=k)
        cond = {"text_embed": z_t, "text_encodings": repeat(data["tokens"][:n], "b l w -> (b r) l w", r=k)}
        with torch.no_grad(), acc.autocast():
            z = ema.p_sample_loop((n * k, shapes["embed_dim"]), text_cond=cond, cond_scale=s["guidance"],
                                  timesteps=timesteps)
        z, z_t = rearrange(z.float(), "(b r) d -> b r d", r=k), rearrange(z_t, "(b r) d -> b r d", r=k)
        best = (F.normalize(z, dim=-1) * F.normalize(z_t, dim=-1)).sum(-1).argmax(dim=1)
        z[torch.arange(n), best]

    out = timed_sampling(sample, s["batch"], counter)
    out["nfe_per_item"] *= 1 / s["candidates"]              # per candidate, as ours reports it
    return {"params": params, "batch": b, "steps": p["steps"], "train_items_per_s": b * p["steps"] / seconds,
            "ddim_timesteps": timesteps, **out}


def main() -> None:
    job = job_from_argv()
    shapes = job["shapes"]
    if job["mode"] == "count":
        emit({"decoder": [count(make_decoder(shapes, kw, {}).unets) for kw in job.get("decoder", [])],
              "prior": [count(make_prior(shapes, kw, {})) for kw in job.get("prior", [])]})
        return
    set_threads(job["threads"])
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      mixed_precision="bf16" if job["precision"] == "bf16" else "no")
    result = {"side": "dalle2-pytorch", "versions": {k: metadata.version(k) for k in ("torch", "dalle2-pytorch", "accelerate")},
              "torch_threads": torch.get_num_threads(), "precision": job["precision"]}
    for name, fn in (("decoder", run_decoder), ("prior", run_prior)):
        if job.get(name):
            with contextlib.redirect_stdout(sys.stderr):        # keep stdout for the one JSON line
                result[name] = fn(job, acc)
    emit(result)


if __name__ == "__main__":
    main()
