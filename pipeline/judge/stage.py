"""The `judge` stage: train the judge on real corpus images (train split of the filtered
shards) against their ground truth, measure it on the real test images, save it. On data
without ground truth (a user's URL list) the stage is skipped: ``models/judge/skipped.json``
says why, and evaluate reports no judged figures (``pipeline.truth``).

Training sees the real images as they are and, half the time, degraded the way generated
images differ from real ones (a bicubic down-and-up round trip through 16-48 px, a slight
color cast, noise), so that it reads a blurry, tinted or noisy rendering of a shape as that
shape; what it must tell apart (the 8 colors, 3 shapes, 2 sizes, 9 cells) stays far apart under
these degradations, and its accuracy on clean real test images is reported beside every figure.

Figures (``metrics/judge.json``): per head accuracy on the real test images (the bars: color
and shape >= 98 %, the rest >= 95 %), and the caption checks of ``labels.check`` on the same
images, i.e. what a perfect generator would score.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .. import bundle, retrain, tracking, truth
from ..data.image_shards import decode_images, load_image_split, require_train_samples
from ..data.shard_buffer import EmptyBuffer, buffered_batches
from ..data.shards import count_samples, iter_shard, sample_meta, shard_paths, split_of
from ..images import resize, to_model, to_uint8
from ..progress import say
from ..errors import StageError
from ..device import autocast
from ..training import Checkpointer, clear_checkpoints, config_hash, cosine_with_warmup, fit
from ..workspace import atomic_dir
from .labels import HEADS, IGNORE, VOCAB, accuracy, parse_gt, target_tensor
from .model import Judge
from .network import JudgeNet

DEGRADE_SIZES = (16, 24, 32, 48)
BUFFER_BYTES = 512 * 2**20     # decoded train images held at most (as CLIP's: 16 shards of 2,500 at 64 px)
NO_TRUTH = "the judge needs ground truth (the embedded corpus's json); these shards have none"


def like_generated(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """With probability ``p`` per batch, what generated images do to a clean rendering: a
    bicubic round trip through a random lower resolution (blur), a small color cast over the
    whole image (per image and channel, up to +-0.08 of the [-1, 1] range) and Gaussian noise of
    a random strength (up to 0.12). x in [-1, 1], [B, 3, S, S]."""
    if torch.rand((), generator=gen).item() >= p:
        return x
    size = DEGRADE_SIZES[int(torch.randint(len(DEGRADE_SIZES), (), generator=gen))]
    if size < x.shape[-1]:
        x = resize(resize(x, size), x.shape[-1])
    cast = 0.08 * (2 * torch.rand(x.shape[0], 3, 1, 1, generator=gen) - 1)
    sigma = 0.12 * torch.rand(x.shape[0], 1, 1, 1, generator=gen)
    return (x + cast + sigma * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def read_part(path, size: int) -> dict:
    """One shard's train samples that have ground truth: ``images`` uint8 [n, 3, S, S] (decoded
    once per pass, OpenCV), ``targets`` [n, heads]."""
    blobs, gts = [], []
    for s in iter_shard(path):
        meta = sample_meta(s)
        if split_of(meta) == "train" and parse_gt(meta.get("gt")):
            blobs.append(s["jpg"])
            gts.append(meta["gt"])
    if not blobs:
        return {"n": 0}
    return {"images": decode_images(blobs, size), "targets": target_tensor(gts), "n": len(blobs)}


def batches(paths: list, size: int, batch_size: int, seed: int, p_degrade: float,
            buffer_bytes: int = BUFFER_BYTES) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless seeded random batches (images in [-1, 1], targets [B, heads]) of the train split,
    from a rolling buffer of decoded shards (:mod:`pipeline.data.shard_buffer`): at most
    ``buffer_bytes`` of images resident however large the data (it held the whole split before)."""
    per_shard = max(1, count_samples(paths[0])) * 3 * size ** 2
    draws = buffered_batches(paths, lambda p: read_part(p, size), {"images", "targets"}, batch_size, seed=seed,
                             buffer_shards=max(1, buffer_bytes // per_shard), empty=NO_TRUTH)

    def checked() -> Iterator[dict]:
        try:
            yield next(draws)
        except EmptyBuffer:                      # the first buffer holds no train image with ground truth
            raise StageError(NO_TRUTH) from None
        yield from draws

    return degraded(checked(), seed, p_degrade)


def degraded(draws: Iterator[dict], seed: int, p_degrade: float) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches {"images": uint8 [B, 3, S, S], "targets"} -> (images in [-1, 1], degraded as
    :func:`like_generated` with probability ``p_degrade``, targets [B, heads])."""
    gen = torch.Generator().manual_seed(seed)
    for b in draws:
        yield like_generated(to_model(b["images"]), gen, p_degrade), b["targets"]


def loss_fn(net, batch, precision: str):
    x, t = batch
    dev = next(net.parameters()).device
    with autocast(precision, dev):
        logits, _ = net(x.to(dev))
    t = t.to(dev)
    # each head's cross-entropy over the scenes it applies to
    return sum(F.cross_entropy(l.float(), t[:, k], ignore_index=IGNORE) for k, l in enumerate(logits)
               if (t[:, k] != IGNORE).any())


def head_accuracy(preds: list[dict[str, int]], targets: torch.Tensor) -> dict:
    """Percent right per head over the images it applies to."""
    p = torch.tensor([[r[h] for h in HEADS] for r in preds])
    out = {}
    for k, h in enumerate(HEADS):
        m = targets[:, k] != IGNORE
        out[h] = round(100 * (p[m, k] == targets[m, k]).float().mean().item(), 2) if m.any() else None
    return out


def attribute_accuracy(heads: dict) -> dict:
    """The issue's bars per attribute: an object attribute counts both of its readings (the
    one-object heads and the two-object ones, worst of them)."""
    worst = lambda *ks: min(heads[k] for k in ks if heads[k] is not None)     # noqa: E731
    return {"count": heads["count"], "color": worst("color", "color_a", "color_b"),
            "shape": worst("shape", "shape_a", "shape_b"), "size": worst("size", "size_a", "size_b"),
            "position": heads["position"], "relation_axis": heads["axis"]}


def train(cfg, ws, paths: list, size: int) -> tuple[JudgeNet, dict, dict]:
    """Train the judge on the real train images with ground truth; returns the net, its
    constructor arguments and the training summary."""
    j = cfg.judge
    require_train_samples(paths)         # a StageError naming the splits found, before any decoding
    say("judge", f"training on the real train images of {len(paths)} shard(s) at {size} px")
    torch.manual_seed(j.seed)
    arch = {"image_size": size, "channels": list(j.channels), "feature_dim": j.feature_dim}
    net = JudgeNet(**arch)
    optimizer = torch.optim.AdamW(net.parameters(), lr=j.lr, weight_decay=j.weight_decay)
    scheduler = cosine_with_warmup(optimizer, j.warmup_steps, j.steps)
    # resumed only by a run of the same config on the same data
    ckpt = Checkpointer(ws.checkpoints / "judge", config_hash({"judge": j.model_dump(mode="json"), "arch": arch,
                                                               "data": retrain.lineage(ws.filtered)["shards"]}),
                        every=j.checkpoint_every)
    summary = fit(net, optimizer, scheduler, batches(paths, size, j.batch_size, j.seed, j.p_degrade),
                  lambda m, b: loss_fn(m, b, j.precision), steps=j.steps, checkpointer=ckpt,
                  grad_clip=j.grad_clip, desc="judge: train", precision=j.precision,
                  precision_cache=ws.checkpoints / "precision.json",
                  on_log=lambda s, f: tracking.log_metrics({"train_loss": f["loss"]}, step=s))
    return net, arch, summary


def accuracy_on_test(judge: Judge, paths: list, size: int) -> dict:
    """The judge's accuracy on the real test images, per attribute, per head, per caption check,
    and after a round trip through 16 px."""
    test = load_image_split(paths, "test", size)
    rows = [i for i, g in enumerate(test["gt"]) if parse_gt(g)]
    if not rows:
        raise StageError("the test split of the filtered shards is empty")
    gts = [test["gt"][i] for i in rows]
    preds, _ = judge.predict(test["images"][rows])
    heads = head_accuracy(preds, target_tensor(gts))
    # the same images after a round trip through 16 px (the decoder's resolution by default):
    # how much of each attribute a low-resolution rendering can still show
    blurred = to_uint8(resize(resize(to_model(test["images"][rows]), 16), size))
    preds_16, _ = judge.predict(blurred)
    return {"n_test": len(rows), "test_accuracy": attribute_accuracy(heads),
            "test_head_accuracy": heads, "test_caption_checks": accuracy(preds, gts),
            "test_accuracy_via_16px": attribute_accuracy(head_accuracy(preds_16, target_tensor(gts))),
            "vocab": {h: list(VOCAB[h]) for h in HEADS}}


def run(cfg, ws) -> dict:
    paths = shard_paths(ws.filtered)
    if not paths:
        raise StageError(f"no shards in {ws.filtered}: run the filter stage first")
    if not truth.has_ground_truth(paths):
        # A URL list: nothing to train the judge on, and nothing it could check. Evaluate reads the skip.
        with atomic_dir(ws.judge) as out:
            figures = truth.write_skipped(out, "judge", truth.NO_TRUTH)
        say("judge", f"skipped: {truth.NO_TRUTH}")
        return figures
    kept, why = retrain.keep_frozen(cfg, ws, "judge", cfg.retrain.judge, ws.judge, ws.filtered, "judge")
    if kept is not None:
        say("judge", f"kept as it is: {why}")
        return kept
    say("judge", f"training: {why}")
    size = cfg.corpus.image_size
    net, arch, summary = train(cfg, ws, paths, size)
    net.eval()
    figures = {"train": summary, **accuracy_on_test(Judge(net, {"arch": arch}, torch.device("cpu")), paths, size)}
    with atomic_dir(ws.judge) as out:
        bundle.save_model(out, net, kind="judge", arch=arch, run_config=bundle.run_config(cfg),
                          info={"test_accuracy": figures["test_accuracy"]})
        retrain.write_lineage(out, ws.filtered, figures)
    clear_checkpoints(ws.checkpoints / "judge")           # only now: a kill before this resumes at the end
    tracking.log_metrics({f"test_acc_{k}": v for k, v in figures["test_accuracy"].items()})
    acc = figures["test_accuracy"]
    say("judge", "real test images: " + ", ".join(f"{k} {v}%" for k, v in acc.items())
        + f" -> models/judge/")
    return {**figures, "retrain": {"mode": "trained", "why": why}}
