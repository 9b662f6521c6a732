"""Our side of the comparison (run with the project's venv: .venv/bin/python).

    ours.py '{"mode": "describe"}'
        -> the default decoder and prior of params.yaml: shapes, architecture, parameter counts,
           training batch, sampler settings and the precision they train in here
    ours.py '{"mode": "run", "threads": 2, "precision": "auto", "decoder": {...}, "prior": {...}}'
        -> per model: params, training items/s, sampling s/item and NFE

Training is the stages' own recipe, verbatim: ``train_diffusion_model`` (accelerate, fused AdamW,
warmup + cosine LR, gradient clipping, the non-finite guard and a diffusers ``EMAModel`` updated
every step) around the stages' loss functions (decoder: ``decoder.stage.training_fns``, v target,
Min-SNR weights and both condition drops; prior: the prior stage's ``loss_fn``, x0 target, text
dropped for guidance), on synthetic batches of the shapes the stages see. Timed: ``steps`` whole
optimizer steps after ``warmup`` (time stamps at the loss function's calls, so one extra step
runs at the end). Sampling (timed after one 1-row call) is the stages' own: ``decoder.stage.decode``
and ``prior.figures.sample_in_batches`` with the sampler, steps, guidance and candidates of params.yaml.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RowCounter, emit, job_from_argv, rows, set_threads, synthetic, timed_sampling  # noqa: E402
from pipeline import config  # noqa: E402
from pipeline.decoder import stage as decoder_stage  # noqa: E402
from pipeline.decoder.diffusion import Condition, DecoderSampling  # noqa: E402
from pipeline.decoder.network import UnclipDecoder  # noqa: E402
from pipeline.diffusion import noise_schedule  # noqa: E402
from pipeline.prior import diffusion as prior_diffusion  # noqa: E402
from pipeline.prior import figures as prior_figures  # noqa: E402
from pipeline.prior import kinds  # noqa: E402
from pipeline.prior.kinds import PriorSampling  # noqa: E402
from pipeline.prior import stage as prior_stage  # noqa: E402
from pipeline.prior.network import UnclipPrior  # noqa: E402
from pipeline.device import autocast, use_bf16  # noqa: E402
from pipeline.training import train_diffusion_model  # noqa: E402


def shapes_of(cfg) -> dict:
    m = cfg.clip.model
    return {"embed_dim": m.embed_dim, "text_width": m.text_width, "context_length": m.context_length,
            "image_size": cfg.decoder.image_size}


def build(cfg, shapes: dict):
    torch.manual_seed(0)
    d_arch = decoder_stage.arch_of(cfg.decoder, shapes["embed_dim"], shapes["text_width"])
    p_arch = prior_stage.arch_of(cfg.prior, shapes["embed_dim"], shapes["text_width"], shapes["context_length"])
    return UnclipDecoder(**d_arch), d_arch, UnclipPrior(**p_arch), p_arch


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_timed(model, tc, loss_fn, data: dict, batch: int, warmup: int, steps: int, desc: str) -> float:
    """Seconds of ``steps`` optimizer steps of ``train_diffusion_model`` after ``warmup`` steps."""
    stamps: list[float] = []

    def stamped(net, b):
        stamps.append(time.perf_counter())
        return loss_fn(net, b)

    def make_batches(rank, world):
        i = 0
        while True:
            yield rows(data, i * batch, batch)
            i += 1

    tc = tc.model_copy(update={"steps": warmup + steps + 1, "batch_size": batch})
    with tempfile.TemporaryDirectory() as tmp:
        train_diffusion_model(model, tc, make_batches, stamped, checkpoint_dir=Path(tmp),
                              key={"bench": desc}, desc=desc)
    return stamps[warmup + steps] - stamps[warmup]


def run_decoder(cfg, shapes: dict, job: dict) -> dict:
    j, d = job["decoder"], cfg.decoder
    model = build(cfg, shapes)[0]
    _, loss_fn = decoder_stage.training_fns(d, [])
    b = j["batch"]
    data = synthetic(max(b, j["sample_batch"]) * 4, shapes)
    seconds = train_timed(model, d, loss_fn, data, b, j["warmup"], j["steps"], "ours: decoder")
    counter = RowCounter(model)          # after training the model holds the EMA weights

    def sample(n: int) -> None:
        decoder_stage.decode(model, Condition(data["z_i"][:n], data["tokens"][:n], data["mask"][:n]),
                             DecoderSampling.of(decoder_stage.sampling_info(d)), seed=d.seed, batch_size=n,
                             precision=d.precision)

    return {"params": count(model), "batch": b, "steps": j["steps"], "train_items_per_s": b * j["steps"] / seconds,
            **timed_sampling(sample, j["sample_batch"], counter)}


def run_prior(cfg, shapes: dict, job: dict) -> dict:
    j, p = job["prior"], cfg.prior
    model = build(cfg, shapes)[2]
    schedule = noise_schedule(prior_diffusion.PREDICTION)

    def loss_fn(net, batch):             # the prior stage's loss_fn
        dev = next(net.parameters()).device
        with autocast(p.precision, dev):
            return prior_diffusion.training_loss(net, batch["z_i"].to(dev), batch["z_t"].to(dev),
                                                 batch["tokens"].to(dev), batch["mask"].to(dev), schedule,
                                                 p_uncond=p.p_uncond)

    b = j["batch"]
    data = synthetic(max(b, j["sample_batch"]) * 4, shapes)
    seconds = train_timed(model, p, loss_fn, data, b, j["warmup"], j["steps"], "ours: prior")
    counter = RowCounter(model)

    def sample(n: int) -> None:
        prior_figures.sample_in_batches(model, {"n": n, "z_t": data["z_t"][:n], "tokens": data["tokens"][:n],
                                              "mask": data["mask"][:n]},
                                      PriorSampling.of(kinds.sampling_info(p)), n, p.seed, p.precision)

    out = timed_sampling(sample, j["sample_batch"], counter)
    out["nfe_per_item"] /= p.n_candidates                     # per candidate
    return {"params": count(model), "batch": b, "steps": j["steps"], "train_items_per_s": b * j["steps"] / seconds,
            **out}


def describe(cfg) -> dict:
    shapes = shapes_of(cfg)
    decoder, d_arch, prior, p_arch = build(cfg, shapes)
    d, p = cfg.decoder, cfg.prior
    return {"shapes": shapes,
            "decoder": {"params": count(decoder), "arch": d_arch, "batch": d.batch_size,
                        "prediction_type": d.prediction_type, "sampling": d.sampling.model_dump(),
                        "lr": d.lr, "weight_decay": d.weight_decay, "grad_clip": d.grad_clip,
                        "warmup_steps": d.warmup_steps, "ema_decay": d.ema_decay,
                        "p_drop_image": d.p_drop_image_embed, "p_drop_caption": d.p_drop_caption},
            "prior": {"params": count(prior), "arch": p_arch, "batch": p.batch_size, "sampling": p.sampling.model_dump(),
                      "n_candidates": p.n_candidates, "lr": p.lr, "weight_decay": p.weight_decay,
                      "grad_clip": p.grad_clip, "warmup_steps": p.warmup_steps, "ema_decay": p.ema_decay,
                      "p_uncond": p.p_uncond},
            "precision": "bf16" if use_bf16(d.precision, torch.device("cpu")) else "fp32"}


def main() -> None:
    job = job_from_argv()
    cfg = config.load(ROOT / "params.yaml")
    if job["mode"] == "describe":
        emit(describe(cfg))
        return
    set_threads(job["threads"])
    prec = job.get("precision", "auto")
    cfg = cfg.model_copy(update={"decoder": cfg.decoder.model_copy(update={"precision": prec}),
                                 "prior": cfg.prior.model_copy(update={"precision": prec})})
    shapes = shapes_of(cfg)
    result = {"side": "ours", "versions": {k: metadata.version(k) for k in ("torch", "diffusers", "accelerate")},
              "torch_threads": torch.get_num_threads(),
              "precision": "bf16" if use_bf16(prec, torch.device("cpu")) else "fp32"}
    for name, fn in (("decoder", run_decoder), ("prior", run_prior)):
        if job.get(name):
            with contextlib.redirect_stdout(sys.stderr):        # keep stdout for the one JSON line
                result[name] = fn(cfg, shapes, job)
    emit(result)


if __name__ == "__main__":
    main()
