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
  prior) and ``caption_only`` (z_i dropped: the decoder's caption path alone), each judged on the
  first ``evaluate.ablation_per_kind`` captions of each kind (``n_captions``);
- ``background`` (in ``quality`` and every ``ablation`` variant): the background read from the
  pixels outside the objects' boxes (``pipeline.background``): of the captions that name one,
  the percent whose image shows it (``named_right``); its noise in 8-bit levels (``noise``, stray
  pixels apart: ``stray``) and ``noise_ratio`` against the real test images of the same captions,
  whose figures (and the reading's accuracy on them, ``read_right``) are ``background_real_images``;
- ``diversity``: DALL-E 2's claim that unCLIP keeps more diversity than GLIDE at equal guidance
  (``pipeline.diversity``): ``evaluate.diversity_seeds`` samples of each of
  ``evaluate.diversity_prompts`` held-out captions (half one-object), their mean pairwise distance
  in the judge's features and their judged fidelity, for ``unclip`` and ``caption_only`` at the
  decoder's trained guidance, beside real renders of the same scenes (``real_images``);
  ``bench/diversity_sweep.py`` sweeps the guidance;
- ``phrasings``: captions a user would write (``pipeline.phrasings``): the first
  ``evaluate.phrasings_per_kind`` judged scenes of each kind rephrased outside the corpus's
  templates (``reordered``, ``rephrased``), judged against the same truth beside unCLIP's images of
  the test split's captions of those scenes (``test_split``); ``bench/novel_captions.py`` goes
  template by template;
- ``bars``: the issue's targets, each with its figure and whether it is reached;
- ``standard``: FID and KID through torchmetrics of the final images against the real test
  images (and FID's real-versus-real floor), in Inception-v3 when ``evaluate.inception_weights``
  names its weights file, else declared as FD-CLIP / KD-CLIP in the pipeline's CLIP; with the
  sample sizes, seed and KID subsets;
- ``clip_score``: 100 * mean cos(CLIP(image), z_t) after every stage, beside real images and
  shuffled captions; ``clip_score_conventions``: Hessel et al.'s 2.5 * max(cos, 0) and
  torchmetrics' 100 * max(cos, 0), labelled; the prior's cosines on these captions;
- network evaluations per image (guidance's second pass counted) and seconds per image.

On data without ground truth (a user's URL list: the judge stage was skipped, ``pipeline.truth``)
nothing is judged: ``ground_truth: false`` and ``not_measured`` name the figures that do not exist
and why; the figures are ``standard`` (with its real-versus-real floor from val images), the CLIP
score, the prior's cosines and ``ablation`` in those figures, on the first ``n_single + n_pair``
test captions. ``clip_score_final`` (the last stage's) is in both, for the promotion gate.

Grids (``reports/evaluate/``, logged as MLflow artifacts): ``evaluate.prompts`` (unset: the
README's prompts on the corpus, the first 4 test captions on a URL list) x seeds after
every stage, test captions beside their real images, and the ``n_worst`` samples the judge
scores worst (``worst.png`` / ``worst.json``). The run's HTML report (``pipeline.report``) is
built from these after the stage's metrics are written.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from . import background, bundle, diversity, phrasings, prior_comparison, tracking, truth
from .config import PriorConfig
from .data.shards import shard_paths
from .data.embedding_shards import load_split
from .generate import Unclip, save_grid
from .images import grid, resize, save_png, to_model, to_uint8
from .judge.labels import parse_gt
from .judge.model import Judge
from .prior.figures import evaluate as prior_figures
from .progress import say
from .quality import (ClipFeatures, InceptionFeatures, clip_scores as clip_scores_both, extract, fid_kid,
                      frechet_distance, prepare, score, worst_samples)
from .errors import StageError
from .workspace import atomic_dir

# (figure, path into the quality dict, bar): the targets of the quality issue
BARS = (("single color", ("single", "color"), 95), ("single shape", ("single", "shape"), 90),
        ("single position", ("single", "position"), 90), ("single size", ("single", "size"), 85),
        ("pair colors", ("pair", "colors"), 85), ("pair relation", ("pair", "relation"), 75))
FD_FLOOR_FACTOR = 3.0
BACKGROUND_NAMED_BAR = 95          # percent of the captions that name a background whose image shows it
BACKGROUND_NOISE_FACTOR = 2.0      # the background's noise at most this times the real images' (floored)
NFE_BUDGET = 40
ABLATIONS = ("unclip", "text_embedding", "caption_only")
# The grids' prompts on the embedded corpus when evaluate.prompts is unset (the README's examples)
EXAMPLE_PROMPTS = ("a small red circle in the top left", "a large blue square in the center",
                   "a green triangle to the left of a yellow circle", "a purple square above an orange triangle")


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


def judged_se(percent: float | None, n: int | None) -> float | None:
    """The binomial standard error (points) of a judged percentage over ``n`` images: at 256 and
    85 %, 2.2 points; one fixed sampling seed against another moved a fresh run's pair colors 4.3
    (twenty-sixth session)."""
    if percent is None or not n:
        return None
    p = percent / 100
    return round(100 * (p * (1 - p) / n) ** 0.5, 2)


def bars(quality: dict, floor: float, nfe_total: int) -> dict:
    """Each bar's value, the bar, whether it is reached, and for the judged percentages their
    standard error ``se`` (a value within it of its bar is a draw of the sample, either way)."""
    out = {name: {"value": quality[a][b], "bar": bar, "ok": quality[a][b] is not None and quality[a][b] >= bar,
                  "se": judged_se(quality[a][b], quality[a].get("n"))}
           for name, (a, b), bar in BARS}
    fd = quality["frechet_distance"]
    out["frechet within 3x floor"] = {"value": round(fd / floor, 2) if floor > 0 else None,
                                      "bar": FD_FLOOR_FACTOR, "ok": floor > 0 and fd <= FD_FLOOR_FACTOR * floor}
    out["network evaluations"] = {"value": nfe_total, "bar": NFE_BUDGET, "ok": nfe_total <= NFE_BUDGET}
    bg = quality.get("background") or {}
    named, ratio = bg.get("named_right"), bg.get("noise_ratio")
    out["background named right"] = {"value": named, "bar": BACKGROUND_NAMED_BAR,
                                     "ok": named is not None and named >= BACKGROUND_NAMED_BAR}
    out["background noise within 2x real"] = {"value": ratio, "bar": BACKGROUND_NOISE_FACTOR,
                                              "ok": ratio is not None and ratio <= BACKGROUND_NOISE_FACTOR}
    return out


def diversity_figures(e, corpus, unclip, judge, captions: list, gts: list,
                      size: int) -> tuple[dict, torch.Tensor, list]:
    """``evaluate.diversity_seeds`` samples of each of ``evaluate.diversity_prompts`` of the captions
    (half one-object) through unCLIP and the caption-only path, and as many real renders of each
    caption's scene: diversity and fidelity of each (``pipeline.diversity``). Also a grid's rows:
    per caption (the first 4 of each kind) its real renders, unCLIP's and caption-only's samples,
    and those captions."""
    pick = diversity.pick(range(len(captions)), gts, e.diversity_prompts)
    caps, truths, k = [captions[i] for i in pick], [gts[i] for i in pick], e.diversity_seeds
    out = {"n_prompts": len(pick), "n_single": sum(len(parse_gt(g)["objects"]) == 1 for g in truths),
           "seeds": k, "seed": e.seed, "guidance": unclip.decoder_meta["info"]["sampling"]["guidance_scale"]}
    images = {}
    for variant in ("unclip", "caption_only"):
        z_i = None
        if variant == "caption_only":
            z_i = torch.zeros_like(unclip.encode_text(caps[:1])[0]).expand(len(caps) * k, -1)
        say("evaluate", f"diversity {variant}: {len(caps)} captions x {k} samples")
        gen = unclip.generate(caps, n=k, seed=e.seed, batch_size=e.batch_size, z_i=z_i)
        images[variant] = gen["images"]
        out[variant] = diversity.figures(judge, gen["images"], truths, k) | {
            "seconds_per_image": round(gen["seconds"] / (len(caps) * k), 3)}
    images["real_images"] = diversity.render_real(truths, k, corpus, size, seed=e.seed)
    out["real_images"] = diversity.figures(judge, images["real_images"], truths, k)
    cap = out["caption_only"]["diversity"]
    out["unclip_over_caption_only"] = round(out["unclip"]["diversity"] / cap, 3) if cap > 0 else None
    shown = list(range(min(4, out["n_single"]))) + list(range(out["n_single"], len(pick)))[:4]
    rows = torch.cat([images[v][p * k:(p + 1) * k] for p in shown for v in ("real_images", "unclip", "caption_only")])
    return out, rows, [caps[p] for p in shown]


def clip_figures(unclip, result: dict, names: list[str], real_images: torch.Tensor) -> dict:
    """CLIP score after every stage (100 * mean cos), in both clamped conventions, of the real
    images of the same captions and of the final images against shuffled captions."""
    z_t = result["z_t"].to(unclip.device)
    cosines = {name: clip_cosines(unclip.clip, imgs, z_t) for name, imgs in zip(names, result["stages"])}
    cosines["real_images"] = clip_cosines(unclip.clip, real_images, z_t)
    clip_scores = {name: round(100 * c.mean().item(), 2) for name, c in cosines.items() if name != "real_images"}
    return {"clip_score": clip_scores, "clip_score_final": clip_scores[names[-1]],
            "clip_score_conventions": {name: clip_scores_both(c) for name, c in cosines.items()},
            "clip_score_real_images": round(100 * cosines["real_images"].mean().item(), 2),
            "clip_score_shuffled_captions": clip_score(unclip.clip, result["images"], torch.roll(z_t, 1, 0))}


def stage_names(result: dict) -> list[str]:
    return ["decoder"] + [f"upsample_{j}" for j in range(1, len(result["stages"]))]


def ablation_inputs(unclip, variant: str, captions: list[str]):
    """The image embedding each variant of DALL-E 2 section 5.1 feeds the decoder (None: the prior's)."""
    if variant == "text_embedding":
        return unclip.encode_text(captions)[0]
    if variant == "caption_only":
        return torch.zeros_like(unclip.encode_text(captions[:1])[0]).expand(len(captions), -1)
    return None


def judged_figures(e, cfg, unclip, judge, extractor, test: dict, val: dict, size: int) -> tuple[dict, dict]:
    """Data with ground truth (the embedded corpus): everything, judged. Returns the figures and
    what the grids need (``held``: rows, captions, the unCLIP result, the worst, diversity rows)."""
    rows = pick_rows(test["gt"], e.n_single, e.n_pair)
    if not rows:
        raise StageError("no test-split captions with ground truth in the embeddings")
    idx = torch.tensor(rows)
    captions, gts = [test["captions"][i] for i in rows], [test["gt"][i] for i in rows]

    # real-versus-real floor: val images of the same one/two-object mix, as many
    floor_rows = pick_rows(val["gt"], sum(len(parse_gt(g)["objects"]) == 1 for g in gts),
                           sum(len(parse_gt(g)["objects"]) == 2 for g in gts))
    _, real_feats = judge.predict(test["images"][idx])
    _, floor_feats = judge.predict(val["images"][torch.tensor(floor_rows)])
    floor = round(frechet_distance(floor_feats, real_feats), 3)
    real_background = background.figures(test["images"][idx], gts, captions, real=True)

    quality, ablation, result, preds = judged_ablation(e, unclip, judge, captions, gts, real_feats,
                                                       real_background["noise"])
    names = stage_names(result)
    # each stage's background taken bicubically to the final size (where the speckle comes from)
    final = result["stages"][-1].shape[-1]
    by_stage = {name: score(judge, imgs, gts, real_feats) | {"background": background.figures(
                    to_uint8(resize(to_model(imgs), final)), gts, captions, real_noise=real_background["noise"])}
                for name, imgs in zip(names, result["stages"])}
    clips = clip_figures(unclip, result, names, test["images"][idx])

    standard = standard_figures(e, extractor, result["images"], test["images"][idx],
                                val["images"][torch.tensor(floor_rows)])
    worst = worst_samples(preds, gts, e.n_worst)
    spread, spread_rows, spread_captions = (diversity_figures(e, cfg.corpus, unclip, judge, captions, gts, size)
                                            if e.diversity_prompts else (None, None, []))
    nfe_total = sum(result["nfe"].values())
    figures = {
        "ground_truth": True,
        "n_captions": len(rows), "n_single": len(rows) - sum(len(parse_gt(g)["objects"]) == 2 for g in gts),
        "seed": e.seed, "sizes": unclip.sizes,
        "quality": quality, "frechet_floor_real_vs_real": floor, "quality_by_stage": by_stage,
        "ablation": ablation, "bars": bars(quality, floor, nfe_total),
        "background_real_images": real_background,
        "judge_test_accuracy": judge.meta.get("info", {}).get("test_accuracy"),
        "standard": standard, **clips,
        "nfe_per_image": result["nfe"], "nfe_total": nfe_total,
        "seconds_per_image": round(result["seconds"] / len(rows), 3),
    }
    if spread is not None:
        figures["diversity"] = spread
    if e.phrasings_per_kind:
        figures["phrasings"] = judged_phrasings(e, unclip, judge, gts, real_feats, result)
    # the grids' held-out captions: the first 8 of each kind
    n_single = figures["n_single"]
    shown = [i for i in range(len(rows)) if i < 8] + [i for i in range(n_single, len(rows))][:8]
    held = {"rows": rows, "captions": captions, "result": result, "shown": shown, "worst": worst,
            "spread_rows": spread_rows, "spread_captions": spread_captions, "real_feats": real_feats}
    return figures, held


def judged_ablation(e, unclip, judge, captions: list[str], gts: list, real_feats: torch.Tensor,
                    real_noise) -> tuple[dict, dict, dict, list]:
    """DALL-E 2's ablation (section 5.1), judged. unCLIP runs on every caption (its figures are the
    stage's ``quality``); the other variants of :data:`ABLATIONS` run on the first
    ``evaluate.ablation_per_kind`` captions of each kind, and every variant's row, unCLIP's
    included (read from its images of those captions), is judged on that same subset, so the rows
    compare like with like (the Frechet distance too: it grows as the sample shrinks). Returns
    unCLIP's judged figures on every caption, the ablation's rows, the unCLIP result over every
    caption and the judge's reading of its images (for the worst samples)."""
    # the judged captions are already one-object then two-object, none mismatched: pick_rows takes the first of each
    subset = pick_rows(gts, e.ablation_per_kind, e.ablation_per_kind)
    sub = torch.tensor(subset)
    sub_captions, sub_gts = [captions[i] for i in subset], [gts[i] for i in subset]

    def judged(images: torch.Tensor, out: dict, caps: list[str], truths: list, feats: torch.Tensor,
               preds: list | None = None) -> dict:
        return score(judge, images, truths, feats, preds=preds) | {
            "nfe_per_image": sum(out["nfe"].values()), "seconds_per_image": round(out["seconds"] / len(out["images"]), 3),
            "background": background.figures(images, truths, caps, real_noise=real_noise)}

    say("evaluate", f"unclip: {len(captions)} captions through the cascade")
    result = unclip.generate(captions, n=1, seed=e.seed, batch_size=e.batch_size)
    preds: list = []
    quality = judged(result["images"], result, captions, gts, real_feats, preds)
    ablation = {"unclip": judged(result["images"][sub], result, sub_captions, sub_gts, real_feats[sub])}
    for variant in ABLATIONS[1:]:
        say("evaluate", f"ablation {variant}: {len(subset)} captions through the cascade")
        out = unclip.generate(sub_captions, n=1, seed=e.seed, batch_size=e.batch_size,
                              z_i=ablation_inputs(unclip, variant, sub_captions))
        ablation[variant] = judged(out["images"], out, sub_captions, sub_gts, real_feats[sub])
    for row in ablation.values():
        row["n_captions"] = len(subset)
    return quality, ablation, result, preds


def judged_phrasings(e, unclip, judge, gts: list, real_feats: torch.Tensor, result: dict) -> dict:
    """Captions a user would write: the first ``evaluate.phrasings_per_kind`` judged scenes of each
    kind rephrased by each held-out family of pipeline/phrasings.py (its templates taking turns),
    judged against the same truth; ``test_split``: unCLIP's images of the test split's own captions
    of those scenes (read from ``result``), so the rows compare like with like."""
    subset = pick_rows(gts, e.phrasings_per_kind, e.phrasings_per_kind)
    sub = torch.tensor(subset)
    truths = [parse_gt(gts[i]) for i in subset]
    out = {"n_captions": len(subset),
           "test_split": with_se(score(judge, result["images"][sub], truths, real_feats[sub]))}
    for family in phrasings.HELD_OUT:
        rephrased = [phrasings.phrase(g, family, k)[1] for k, g in enumerate(truths)]
        say("evaluate", f"phrasings {family}: {len(subset)} captions through the cascade (e.g. {rephrased[0]!r})")
        images = unclip.generate(rephrased, n=1, seed=e.seed, batch_size=e.batch_size)["images"]
        out[family] = with_se(score(judge, images, truths, real_feats[sub])) | {"example": rephrased[0]}
    return out


def with_se(row: dict) -> dict:
    """A judged row (``single`` and ``pair`` percentages, each with its ``n``) with ``se``: each percentage's
    binomial standard error in points (at 128 images and 50 %, 4.4: the held-out families' rows are half
    the bars' sample; the difference of two such figures has about 1.4x their standard error)."""
    return row | {"se": {kind: {k: judged_se(v, row[kind].get("n")) for k, v in row[kind].items() if k != "n"}
                         for kind in ("single", "pair") if isinstance(row.get(kind), dict)}}


def standard_figures(e, extractor, generated: torch.Tensor, real: torch.Tensor, floor_real: torch.Tensor) -> dict:
    """Standard FID / KID (or the declared FD-CLIP fallback) of the final images against the real
    ones, and its floor: ``floor_real`` (other real images of the same mix) against the same."""
    say("evaluate", f"{extractor.name}: features of {len(generated)} generated, {len(real)} real and "
                    f"{len(floor_real)} more real images")
    real_std = extract(extractor, real)
    standard = {"metric": extractor.name, "feature_extractor": extractor.description,
                "n_generated": len(generated), "n_real": len(real), "seed": e.seed,
                **fid_kid(extract(extractor, generated), real_std, seed=e.seed,
                          subsets=e.kid_subsets, subset_size=e.kid_subset_size)}
    standard["fid_floor_real_vs_real"] = fid_kid(extract(extractor, floor_real), real_std, seed=e.seed, kid=False)["fid"]
    return standard


def unjudged_figures(e, unclip, extractor, test: dict, val: dict) -> tuple[dict, dict]:
    """Data without ground truth (a user's URL list): no judge, so the figures are the standard
    metrics (FID/KID or the declared FD-CLIP/KD-CLIP, with their real-versus-real floor), the CLIP
    score, the prior's cosines and the ablation of DALL-E 2 section 5.1 in those figures, on the
    first ``n_single + n_pair`` test captions, one image each."""
    rows = list(range(min(e.n_single + e.n_pair, test["n"])))
    if len(rows) < 2:
        raise StageError(f"the test split of the embeddings holds {test['n']} pair(s); FID/KID need at least 2 "
                         f"(a larger list, or a larger crawl.split.test)")
    idx = torch.tensor(rows)
    captions = [test["captions"][i] for i in rows]
    real_std = extract(extractor, test["images"][idx])
    n_floor = min(len(rows), val["n"])
    floor_std = extract(extractor, val["images"][:n_floor]) if n_floor >= 2 else None

    def standard_of(images: torch.Tensor) -> dict:
        return fid_kid(extract(extractor, images), real_std, seed=e.seed, subsets=e.kid_subsets,
                       subset_size=e.kid_subset_size)

    ablation, result = {}, None
    for variant in ABLATIONS:
        z_i = ablation_inputs(unclip, variant, captions)
        say("evaluate", f"ablation {variant}: {len(captions)} captions through the cascade")
        out = unclip.generate(captions, n=1, seed=e.seed, batch_size=e.batch_size, z_i=z_i)
        z_t = out["z_t"].to(unclip.device)
        ablation[variant] = {"standard": standard_of(out["images"]),
                             "clip_score": clip_score(unclip.clip, out["images"], z_t),
                             "nfe_per_image": sum(out["nfe"].values()),
                             "seconds_per_image": round(out["seconds"] / len(rows), 3)}
        if variant == "unclip":
            result = out
    names = stage_names(result)
    say("evaluate", f"{extractor.name}: features of {len(rows)} generated, {len(rows)} real and "
                    f"{n_floor} more real images")
    standard = {"metric": extractor.name, "feature_extractor": extractor.description,
                "n_generated": len(rows), "n_real": len(rows), "seed": e.seed, **ablation["unclip"]["standard"],
                "fid_floor_real_vs_real": (fid_kid(floor_std, real_std, seed=e.seed, kid=False)["fid"]
                                           if floor_std is not None else None),
                "n_floor": n_floor}
    nfe_total = sum(result["nfe"].values())
    figures = {
        "ground_truth": False,
        "not_measured": {"why": truth.NO_TRUTH, "figures": list(truth.NOT_MEASURED)},
        "n_captions": len(rows), "seed": e.seed, "sizes": unclip.sizes,
        "ablation": ablation, "standard": standard,
        **clip_figures(unclip, result, names, test["images"][idx]),
        "nfe_per_image": result["nfe"], "nfe_total": nfe_total,
        "seconds_per_image": round(result["seconds"] / len(rows), 3),
    }
    held = {"rows": rows, "captions": captions, "result": result, "shown": list(range(min(16, len(rows)))),
            "worst": [], "spread_rows": None, "spread_captions": []}
    return figures, held


def compare_priors(e, ws, unclip, judge, test: dict, held: dict) -> dict:
    """DALL-E 2's comparison of priors on these captions (``pipeline.prior_comparison``)."""
    rows, captions = held["rows"], held["captions"]
    idx = torch.tensor(rows)
    test_sub = {k: test[k][idx] for k in ("z_i", "z_t", "tokens", "mask")} | {"n": len(rows)}
    priors = prior_comparison.load_priors(ws.root, ws.root / "models", e.compare_priors, unclip.device)
    say("evaluate", f"prior comparison: {', '.join(priors)} through the same cascade, {len(rows)} captions")
    real_feats = held.get("real_feats")          # the judged figures' (a bench's ``held`` may lack them)
    if judge is not None and real_feats is None:
        real_feats = judge.predict(test["images"][idx])[1]
    truth_of = {} if judge is None else {"judge": judge, "gts": [test["gt"][i] for i in rows],
                                         "real_feats": real_feats}
    return prior_comparison.compare(e, unclip, priors, captions, test_sub, **truth_of)


def grid_prompts(e, test: dict, judged: bool) -> list[str]:
    """``evaluate.prompts``; unset, the corpus's example prompts on data with ground truth, else
    the first 4 held-out test captions of the data."""
    if e.prompts:
        return list(e.prompts)
    return list(EXAMPLE_PROMPTS) if judged else list(test["captions"][:len(EXAMPLE_PROMPTS)])


def write_grids(e, out, unclip, prompts: list[str], test: dict, held: dict) -> None:
    """The report's images: the prompts x seeds after every stage, held-out captions' real images
    above their generated ones, the worst-judged samples and the diversity rows (judged data)."""
    rows, captions, result = held["rows"], held["captions"], held["result"]
    idx = torch.tensor(rows)
    examples = unclip.generate(prompts, n=e.grid_seeds, seed=e.seed, batch_size=e.batch_size)
    for k, name in enumerate(stage_names(result)):
        save_grid(examples, e.grid_seeds, out / f"prompts_{name}.png", stage=k)
    (out / "prompts.json").write_text(json.dumps({"prompts": prompts, "seeds": e.grid_seeds}, indent=1))
    # held-out captions: real test image above the generated one, 8 per row pair
    half = held["shown"]
    sel = torch.tensor(half)
    real, gen = test["images"][idx[sel]], result["images"][sel]
    pairs = [t for i in range(0, len(half), 8) for t in (real[i:i + 8], gen[i:i + 8])]
    save_png(grid(torch.cat(pairs), 8), out / "test_real_vs_generated.png")
    (out / "test_captions.json").write_text(json.dumps([captions[i] for i in half], indent=1))
    # the worst-judged samples: generated image beside the real one, and what the judge saw
    worst = held["worst"]
    if worst:
        sel = torch.tensor([w["index"] for w in worst])
        both = [t for i in range(0, len(worst), 8) for t in (test["images"][idx[sel]][i:i + 8],
                                                             result["images"][sel][i:i + 8])]
        save_png(grid(torch.cat(both), 8), out / "worst.png")
    (out / "worst.json").write_text(json.dumps(
        [w | {"caption": captions[w["index"]]} for w in worst], indent=1))
    # diversity: per caption, its real renders, unCLIP's samples, caption-only's samples (a row each)
    spread_rows, spread_captions = held["spread_rows"], held["spread_captions"]
    if spread_rows is not None and len(spread_rows):
        labels = [f"{kind}: {c}" if kind == "real" else kind for c in spread_captions
                  for kind in ("real", "unclip", "caption-only")]
        save_png(grid(spread_rows, e.diversity_seeds, row_labels=labels), out / "diversity.png")
        (out / "diversity_captions.json").write_text(json.dumps(
            {"rows_per_caption": ["real_images", "unclip", "caption_only"], "captions": spread_captions}, indent=1))


def run(cfg, ws) -> dict:
    e = cfg.evaluate
    paths = shard_paths(ws.embeddings)
    if not paths:
        raise StageError(f"no shards in {ws.embeddings}: run the embed stage first")
    no_judge = truth.skipped(ws.judge)
    try:
        unclip = Unclip.load(ws.root / "models")
        judge = None if no_judge else Judge.load(ws.judge, unclip.device)
    except (FileNotFoundError, ValueError) as err:
        raise StageError(str(err)) from None
    extractor = feature_extractor(e, unclip)          # before any work: a bad weights path fails fast
    size = unclip.sizes[-1]
    test = load_split(paths, "test", image_size=size)
    val = load_split(paths, "val", image_size=size)
    judged = judge is not None
    if judged:
        figures, held = judged_figures(e, cfg, unclip, judge, extractor, test, val, size)
    else:
        if any(parse_gt(g) for g in test["gt"]):
            raise StageError(f"the test split carries ground truth but the judge was skipped ({no_judge}): "
                             f"run the judge stage again (`dvc repro -f judge`)")
        say("evaluate", f"no judged figures: {no_judge}")
        figures, held = unjudged_figures(e, unclip, extractor, test, val)
    rows = held["rows"]
    prior = unclip.prior_meta["config"]["prior"]
    test_sub = {k: (v[torch.tensor(rows)] if isinstance(v, torch.Tensor) else [v[i] for i in rows])
                for k, v in test.items() if k != "n"} | {"n": len(rows)}
    figures["prior"] = prior_figures(unclip.prior, test_sub, PriorConfig.model_validate(prior))
    if e.compare_priors:
        figures["prior_comparison"] = compare_priors(e, ws, unclip, judge, test, held)
    prompts = grid_prompts(e, test, judged)
    figures["prompts"] = prompts
    figures["bundle"] = bundle.digests(ws.root / "models")   # the weights measured: the gate registers only these

    with atomic_dir(ws.reports / "evaluate") as out:
        write_grids(e, out, unclip, prompts, test, held)
    for png in sorted((ws.reports / "evaluate").glob("*.png")):
        tracking.log_artifact(png, "evaluate")
    where = f"{(ws.reports / 'evaluate').relative_to(ws.root)}/"
    (log_judged if judged else log_unjudged)(figures, extractor.name, len(rows), where)
    return figures


def common_metrics(figures: dict, metric: str) -> dict:
    """The MLflow metrics of an evaluation with or without ground truth."""
    standard = figures["standard"]
    return ({f"clip_score_{k}": v for k, v in figures["clip_score"].items()}
            | {"clip_score_real_images": figures["clip_score_real_images"], "nfe_total": figures["nfe_total"]}
            | {f"{metric}_{k}": standard[k] for k in ("fid", "kid_mean", "fid_floor_real_vs_real")
               if standard[k] is not None}
            | {f"prior_{k}": v for k, v in figures["prior"].items() if k.startswith("cos")})


def log_unjudged(figures: dict, metric: str, n: int, where: str) -> None:
    """MLflow metrics and the closing line of an evaluation without ground truth."""
    standard, nfe_total = figures["standard"], figures["nfe_total"]
    tracking.log_metrics(common_metrics(figures, metric) | {f"ablation_{v}_{k}": a[k] for v, a in figures["ablation"].items()
                                                            for k in ("clip_score",)})
    say("evaluate", f"{n} test captions (no ground truth: nothing judged): {metric} "
                    f"{standard['fid']} (real vs real {standard['fid_floor_real_vs_real']}), KID "
                    f"{standard['kid_mean']}; CLIP score {figures['clip_score_final']} (real images "
                    f"{figures['clip_score_real_images']}, shuffled captions {figures['clip_score_shuffled_captions']}); "
                    f"ablation {metric} " + ", ".join(f"{v} {a['standard']['fid']}" for v, a in
                                                      figures["ablation"].items())
                    + f"; {nfe_total} network evaluations per image -> {where}")


def log_judged(figures: dict, metric: str, n: int, where: str) -> None:
    """MLflow metrics and the closing line of a judged evaluation."""
    quality, floor, spread = figures["quality"], figures["frechet_floor_real_vs_real"], figures.get("diversity")
    real_background = figures["background_real_images"]
    flat = {f"{kind}_{k}": v for kind in ("single", "pair") for k, v in quality[kind].items() if k != "n"}
    tracking.log_metrics({f"quality_{k}": v for k, v in flat.items() if v is not None}
                         | {"frechet_distance": quality["frechet_distance"], "frechet_floor": floor}
                         | common_metrics(figures, metric)
                         | {f"background_{k}": v for k, v in quality["background"].items() if v is not None}
                         | ({f"diversity_{v}_{k}": spread[v][k] for v in ("unclip", "caption_only", "real_images")
                             for k in ("diversity", "fidelity") if spread[v][k] is not None} if spread else {})
                         | {f"phrasings_{family}_{kind}_{k}": v for family, row in figures.get("phrasings", {}).items()
                            if isinstance(row, dict) for kind in ("single", "pair")
                            for k, v in row[kind].items() if k != "n" and v is not None})
    missed = [k + (f" ({b['value']} against {b['bar']}, standard error {b['se']})" if b.get("se") else "")
              for k, b in figures["bars"].items() if not b["ok"]]
    s, p = quality["single"], quality["pair"]
    say("evaluate", f"{n} test captions: one object color {s['color']}% shape {s['shape']}% "
                    f"size {s['size']}% position {s['position']}%; two objects colors {p['colors']}% "
                    f"relation {p['relation']}%; FD {quality['frechet_distance']} (real vs real "
                    f"{floor}); background named right {quality['background']['named_right']}% "
                    f"(n={quality['background']['n_named']}), noise {quality['background']['noise']} vs real "
                    f"{real_background['noise']}; "
                    + (f"diversity unCLIP {spread['unclip']['diversity']} (fidelity {spread['unclip']['fidelity']}%) "
                       f"vs caption-only {spread['caption_only']['diversity']} "
                       f"({spread['caption_only']['fidelity']}%), "
                       f"real {spread['real_images']['diversity']}; " if spread else "")
                    + f"{figures['nfe_total']} network evaluations per image; "
                    + (f"bars missed: {', '.join(missed)}" if missed else "every bar reached")
                    + f" -> {where}")
