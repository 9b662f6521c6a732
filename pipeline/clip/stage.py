"""The `clip` stage: train (or resolve a pretrained) CLIP, evaluate it on val, save models/clip/."""
from __future__ import annotations

import json

import torch

from .. import retrain, tracking
from ..bundle import run_config
from ..data.shards import shard_paths
from ..progress import say
from ..errors import StageError
from ..training import clear_checkpoints
from ..workspace import atomic_dir
from . import model as clip_model
from ..data.image_shards import load_image_split
from .train import train
from .zeroshot import evaluate


def run(cfg, ws) -> dict:
    c = cfg.clip
    paths = shard_paths(ws.filtered)
    if not paths:
        raise StageError(f"no shards in {ws.filtered}: run the filter stage first")
    kept, why = retrain.keep_frozen(cfg, ws, "clip", cfg.retrain.clip, ws.clip, ws.filtered, "clip")
    if kept is not None:
        say("clip", f"kept as it is: {why}")
        return kept
    say("clip", f"training: {why}")
    checkpoints = ws.root / ".unclip" / "checkpoints" / "clip"
    curve: list[tuple[int, float]] = []

    def on_log(step, figures):
        curve.append((step, figures["loss"]))
        tracking.log_metrics({"train_loss": figures["loss"], "lr": figures["lr"]}, step=step)

    with atomic_dir(ws.clip) as out:
        if c.pretrained:
            try:
                clip = clip_model.load_pretrained(c.pretrained)
            except (ValueError, RuntimeError, FileNotFoundError) as err:
                raise StageError(str(err)) from None
            summary = {"pretrained": c.pretrained}
        else:
            clip, summary = train(c, paths, checkpoints, on_log=on_log,
                                  depends={"data": retrain.lineage(ws.filtered)["shards"]})
        val = load_image_split(paths, "val", clip.image_size)
        if not val["keys"]:
            raise StageError("the val split is empty: no sample's json carries split='val' (a URL list: give "
                             "some rows split 'val', or leave split empty and set crawl.split.val above 0)")
        with torch.no_grad():
            figures = evaluate(clip, val, c.eval_batch_size)
        clip_model.save(clip, out, run_config(cfg))
        (out / "train_curve.json").write_text(json.dumps(curve))
        plot = out / "clip_figures.png"
        _plot(curve, figures, plot)
        retrain.write_lineage(out, ws.filtered, {"train": summary, "val": figures})
    clear_checkpoints(checkpoints)                          # only now: a kill before this resumes at the end

    tracking.log_artifact(ws.clip / "clip_figures.png", "clip")
    zs, zp = figures.get("zero_shot", {}), figures.get("zero_shot_pairs", {})
    say("clip", f"val: zero-shot color {zs.get('color_acc')}%, shape {zs.get('shape_acc')}%, position "
                f"{zs.get('position_acc')}%, pair binding {zp.get('binding_acc')}%, relation "
                f"{zp.get('relation_acc')}%; recall@1 i->t {figures.get('image_to_text_r@1')}% "
                f"-> {ws.clip.relative_to(ws.root)}/ (model.safetensors)")
    return {"train": summary, "val": figures, "retrain": {"mode": "trained", "why": why}}


def _plot(curve, figures, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    if curve:
        a.plot(*zip(*curve))
    a.set(title="contrastive loss", xlabel="step")
    zs = {k.removesuffix("_acc"): v for k, v in figures.get("zero_shot", {}).items() if k.endswith("_acc")}
    b.bar(list(zs), list(zs.values()))
    b.set(title="val zero-shot accuracy (%)", ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
