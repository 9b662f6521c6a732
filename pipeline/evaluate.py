"""The `evaluate` stage: the whole cascade on held-out captions with fixed seeds, judged.

Captions: the first ``n_single`` one-object and ``n_pair`` two-object test-split captions that
describe their image (no planted mismatches), one image each, seed ``evaluate.seed``.

Figures (``metrics/evaluate.json``, and MLflow):

- ``quality``: the judge's reading of the final images against each caption's truth, per
  attribute (``judge.labels.check``), and the Frechet distance to the real test images in the
  judge's features beside the real-versus-real floor (``pipeline.quality``); also after every
  stage of the cascade (``quality_by_stage``), to show where an attribute is lost;
- ``ablation``: DALL-E 2 section 5.1 with the same captions, seeds and sampling budget:
  ``unclip`` (prior -> decoder), ``text_embedding`` (the decoder fed z_t in place of z_i, no
  prior) and ``caption_only`` (z_i dropped: the decoder's caption path alone);
- ``bars``: the issue's targets, each with its figure and whether it is reached;
- ``standard``: FID and KID through torchmetrics of the final images against the real test
  images (and FID's real-versus-real floor), in Inception-v3 when ``evaluate.inception_weights``
  names its weights file, else declared as FD-CLIP / KD-CLIP in the pipeline's CLIP; with the
  sample sizes, seed and KID subsets;
- ``clip_score``: 100 * mean cos(CLIP(image), z_t) after every stage, beside real images and
  shuffled captions; ``clip_score_conventions``: Hessel et al.'s 2.5 * max(cos, 0) and
  torchmetrics' 100 * max(cos, 0), labelled; the prior's cosines on these captions;
- network evaluations per image (guidance's second pass counted) and seconds per image.

Grids (``reports/evaluate/``, logged as MLflow artifacts): the README's prompts x seeds after
every stage, test captions beside their real images, and the ``n_worst`` samples the judge
scores worst (``worst.png`` / ``worst.json``). The run's HTML report (``pipeline.report``) is
built from these after the stage's metrics are written.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from . import tracking
from .config import PriorConfig
from .data.shards import shard_paths
from .embeddings import load_split
from .generate import Unclip, save_grid
from .images import grid, save_png
from .judge.labels import parse_gt
from .judge.stage import Judge
from .prior.stage import evaluate as prior_figures
from .progress import say
from .quality import (ClipFeatures, InceptionFeatures, clip_scores as clip_scores_both, extract, fid_kid,
                      frechet_distance, prepare, score, worst_samples)
from .stages import StageError
from .workspace import atomic_dir

# (figure, path into the quality dict, bar): the targets of the quality issue
BARS = (("single color", ("single", "color"), 95), ("single shape", ("single", "shape"), 90),
        ("single position", ("single", "position"), 90), ("single size", ("single", "size"), 85),
        ("pair colors", ("pair", "colors"), 85), ("pair relation", ("pair", "relation"), 75))
FD_FLOOR_FACTOR = 3.0
NFE_BUDGET = 40
ABLATIONS = ("unclip", "text_embedding", "caption_only")


def clip_cosines(clip, images_uint8: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """cos(CLIP(image), z_t) per image [N], images through ``quality.prepare`` like FD-CLIP's."""
    with torch.no_grad():
        e = clip.encode_image(prepare(images_uint8, clip.image_size).to(z_t.device)).float()
    return F.cosine_similarity(e, z_t, dim=-1).cpu()


def clip_score(clip, images_uint8: torch.Tensor, z_t: torch.Tensor) -> float:
    """100 * mean cos(CLIP(image), z_t): torchmetrics' scale without its clamp at 0, so that a
    shuffled-caption baseline can read below zero (both clamped conventions: ``quality.clip_scores``)."""
    return round(100 * clip_cosines(clip, images_uint8, z_t).mean().item(), 2)


def feature_extractor(e, unclip):
    """The FID/KID network: Inception from ``evaluate.inception_weights``, else FD-CLIP (declared)."""
    if not e.inception_weights:
        return ClipFeatures(unclip.clip)
    try:
        return InceptionFeatures(e.inception_weights).to(unclip.device)
    except (FileNotFoundError, RuntimeError, KeyError) as err:
        raise StageError(f"evaluate.inception_weights: {err}") from None


def pick_rows(gts: list, n_single: int, n_pair: int) -> list[int]:
    """The first ``n_single`` one-object then ``n_pair`` two-object rows whose caption describes
    their image (not a planted mismatch)."""
    single, pair = [], []
    for i, g in enumerate(gts):
        g = parse_gt(g)
        if not g or g.get("mismatched"):
            continue
        (single if len(g["objects"]) == 1 else pair).append(i)
    return single[:n_single] + pair[:n_pair]


def bars(quality: dict, floor: float, nfe_total: int) -> dict:
    out = {name: {"value": quality[a][b], "bar": bar, "ok": quality[a][b] is not None and quality[a][b] >= bar}
           for name, (a, b), bar in BARS}
    fd = quality["frechet_distance"]
    out["frechet within 3x floor"] = {"value": round(fd / floor, 2) if floor > 0 else None,
                                      "bar": FD_FLOOR_FACTOR, "ok": floor > 0 and fd <= FD_FLOOR_FACTOR * floor}
    out["network evaluations"] = {"value": nfe_total, "bar": NFE_BUDGET, "ok": nfe_total <= NFE_BUDGET}
    return out


def run(cfg, ws) -> dict:
    e = cfg.evaluate
    paths = shard_paths(ws.embeddings)
    if not paths:
        raise StageError(f"no shards in {ws.embeddings}: run the embed stage first")
    try:
        unclip = Unclip.load(ws.root / "models")
        judge = Judge.load(ws.judge, unclip.device)
    except (FileNotFoundError, ValueError) as err:
        raise StageError(str(err)) from None
    extractor = feature_extractor(e, unclip)          # before any work: a bad weights path fails fast
    size = unclip.sizes[-1]
    test = load_split(paths, "test", image_size=size)
    rows = pick_rows(test["gt"], e.n_single, e.n_pair)
    if not rows:
        raise StageError("no test-split captions with ground truth in the embeddings")
    idx = torch.tensor(rows)
    captions, gts = [test["captions"][i] for i in rows], [test["gt"][i] for i in rows]

    # real-versus-real floor: val images of the same one/two-object mix, as many
    val = load_split(paths, "val", image_size=size)
    floor_rows = pick_rows(val["gt"], sum(len(parse_gt(g)["objects"]) == 1 for g in gts),
                           sum(len(parse_gt(g)["objects"]) == 2 for g in gts))
    _, real_feats = judge.predict(test["images"][idx])
    _, floor_feats = judge.predict(val["images"][torch.tensor(floor_rows)])
    floor = round(frechet_distance(floor_feats, real_feats), 3)

    ablation, result, preds = {}, None, []
    for variant in ABLATIONS:
        z_i = {"unclip": None, "text_embedding": None, "caption_only": None}[variant]
        if variant == "text_embedding":
            z_i = unclip.encode_text(captions)[0]
        elif variant == "caption_only":
            z_i = torch.zeros_like(unclip.encode_text(captions[:1])[0]).expand(len(captions), -1)
        say("evaluate", f"ablation {variant}: {len(captions)} captions through the cascade")
        out = unclip.generate(captions, n=1, seed=e.seed, batch_size=e.batch_size, z_i=z_i)
        ablation[variant] = score(judge, out["images"], gts, real_feats,
                                  preds=preds if variant == "unclip" else None) | {
            "nfe_per_image": sum(out["nfe"].values()), "seconds_per_image": round(out["seconds"] / len(rows), 3)}
        if variant == "unclip":
            result = out
    quality = ablation["unclip"]
    names = ["decoder"] + [f"upsample_{j}" for j in range(1, len(result["stages"]))]
    by_stage = {name: score(judge, imgs, gts, real_feats) for name, imgs in zip(names, result["stages"])}

    z_t = result["z_t"].to(unclip.device)
    cosines = {name: clip_cosines(unclip.clip, imgs, z_t) for name, imgs in zip(names, result["stages"])}
    cosines["real_images"] = clip_cosines(unclip.clip, test["images"][idx], z_t)
    clip_scores = {name: round(100 * c.mean().item(), 2) for name, c in cosines.items() if name != "real_images"}

    # standard FID / KID (or the declared FD-CLIP fallback) of the final images, and its floor
    say("evaluate", f"{extractor.name}: features of {len(rows)} generated, {len(rows)} real and "
                    f"{len(floor_rows)} more real images")
    real_std = extract(extractor, test["images"][idx])
    standard = {"metric": extractor.name, "feature_extractor": extractor.description,
                "n_generated": len(rows), "n_real": len(rows), "seed": e.seed,
                **fid_kid(extract(extractor, result["images"]), real_std, seed=e.seed,
                          subsets=e.kid_subsets, subset_size=e.kid_subset_size)}
    standard["fid_floor_real_vs_real"] = fid_kid(
        extract(extractor, val["images"][torch.tensor(floor_rows)]), real_std, seed=e.seed, kid=False)["fid"]
    worst = worst_samples(preds, gts, e.n_worst)
    nfe_total = sum(result["nfe"].values())
    figures = {
        "n_captions": len(rows), "n_single": len(rows) - sum(len(parse_gt(g)["objects"]) == 2 for g in gts),
        "seed": e.seed, "sizes": unclip.sizes,
        "quality": quality, "frechet_floor_real_vs_real": floor, "quality_by_stage": by_stage,
        "ablation": ablation, "bars": bars(quality, floor, nfe_total),
        "judge_test_accuracy": judge.meta.get("info", {}).get("test_accuracy"),
        "standard": standard,
        "clip_score": clip_scores,
        "clip_score_conventions": {name: clip_scores_both(c) for name, c in cosines.items()},
        "clip_score_real_images": round(100 * cosines["real_images"].mean().item(), 2),
        "clip_score_shuffled_captions": clip_score(unclip.clip, result["images"], torch.roll(z_t, 1, 0)),
        "nfe_per_image": result["nfe"], "nfe_total": nfe_total,
        "seconds_per_image": round(result["seconds"] / len(rows), 3),
    }
    prior = unclip.prior_meta["config"]["prior"]
    test_sub = {k: (v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in rows]) for k, v in test.items()
                if k != "n"} | {"n": len(rows)}
    figures["prior"] = prior_figures(unclip.prior, test_sub, PriorConfig.model_validate(prior))

    with atomic_dir(ws.reports / "evaluate") as out:
        prompts = list(e.grid_prompts)
        examples = unclip.generate(prompts, n=e.grid_seeds, seed=e.seed, batch_size=e.batch_size)
        for k, name in enumerate(names):
            save_grid(examples, e.grid_seeds, out / f"prompts_{name}.png", stage=k)
        # held-out captions: real test image above the generated one, 8 per row pair, both kinds
        half = [i for i in range(len(rows)) if i < 8] + [i for i in range(figures["n_single"], len(rows))][:8]
        sel = torch.tensor(half)
        real, gen = test["images"][idx[sel]], result["images"][sel]
        pairs = [t for i in range(0, len(half), 8) for t in (real[i:i + 8], gen[i:i + 8])]
        save_png(grid(torch.cat(pairs), 8), out / "test_real_vs_generated.png")
        (out / "test_captions.json").write_text(json.dumps([captions[i] for i in half], indent=1))
        # the worst-judged samples: generated image beside the real one, and what the judge saw
        if worst:
            sel = torch.tensor([w["index"] for w in worst])
            both = [t for i in range(0, len(worst), 8) for t in (test["images"][idx[sel]][i:i + 8],
                                                                 result["images"][sel][i:i + 8])]
            save_png(grid(torch.cat(both), 8), out / "worst.png")
        (out / "worst.json").write_text(json.dumps(
            [w | {"caption": captions[w["index"]]} for w in worst], indent=1))
    for png in sorted((ws.reports / "evaluate").glob("*.png")):
        tracking.log_artifact(png, "evaluate")
    flat = {f"{kind}_{k}": v for kind in ("single", "pair") for k, v in quality[kind].items() if k != "n"}
    tracking.log_metrics({f"quality_{k}": v for k, v in flat.items() if v is not None}
                         | {"frechet_distance": quality["frechet_distance"], "frechet_floor": floor}
                         | {f"clip_score_{k}": v for k, v in clip_scores.items()}
                         | {"clip_score_real_images": figures["clip_score_real_images"], "nfe_total": nfe_total}
                         | {f"{extractor.name}_{k}": standard[k] for k in ("fid", "kid_mean", "fid_floor_real_vs_real")}
                         | {f"prior_{k}": v for k, v in figures["prior"].items() if k.startswith("cos")})
    missed = [k for k, b in figures["bars"].items() if not b["ok"]]
    s, p = quality["single"], quality["pair"]
    say("evaluate", f"{len(rows)} test captions: one object color {s['color']}% shape {s['shape']}% "
                    f"size {s['size']}% position {s['position']}%; two objects colors {p['colors']}% "
                    f"relation {p['relation']}%; FD {quality['frechet_distance']} (real vs real "
                    f"{floor}); {nfe_total} network evaluations per image; "
                    + (f"bars missed: {', '.join(missed)}" if missed else "every bar reached")
                    + f" -> {(ws.reports / 'evaluate').relative_to(ws.root)}/")
    return figures
