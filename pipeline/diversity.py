"""Diversity at a given fidelity: DALL-E 2's headline claim (section 5.2, figures 9 and 11) that
unCLIP keeps more of it than GLIDE at the same guidance scale, measured on the corpus.

- ``diversity``: for each caption, the mean pairwise Euclidean distance among its ``k`` samples
  in the judge's features (``Judge.predict``), averaged over the captions. Identical samples
  give 0.
- ``fidelity``: the judge's reading of those same samples against each caption's truth: the
  mean percent of the caption's checks passed (``judge.labels.check``, ``all`` left out; a
  one-object caption has count, color, shape, size, position; a two-object one count, colors,
  shapes, relation) and ``all_right``, the percent of samples that pass all of them. Diversity
  means little without it: a generator that draws the wrong shape half the time is diverse.
- The reference: real images of the same captions, i.e. each caption's ground-truth scene
  drawn ``k`` times by the corpus's renderer under the corpus's jitter
  (``data.scenes.scene_from_ground_truth``), JPEG-coded like the corpus's images, at the
  generated images' resolution (``real_images``).

``evaluate`` reports these for unCLIP (prior -> decoder) and the caption-only path (the decoder
with z_i zeroed: the GLIDE-like baseline) at the decoder's trained guidance;
``bench/diversity_sweep.py`` sweeps the guidance scale.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .data.image_shards import decode_images
from .data.scenes import encode_jpeg, render, scene_from_ground_truth
from .images import resize, to_model, to_uint8
from .judge.labels import check, parse_gt

JITTER_SALT = 7_000_003     # the real draws' RNG: [seed, salt, scene, sample], apart from the corpus's streams


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over the k (k - 1) / 2 pairs of rows of ``features`` [k, d]."""
    if features.shape[0] < 2:
        raise ValueError("a pairwise distance needs at least 2 samples")
    d = torch.cdist(features.double()[None], features.double()[None])[0]
    i, j = torch.triu_indices(len(features), len(features), offset=1)
    return float(d[i, j].mean())


def per_caption_diversity(features: torch.Tensor, k: int) -> list[float]:
    """Features [P * k, d], caption-major (``Unclip.generate(..., n=k)``'s order) -> one mean
    pairwise distance per caption."""
    if features.shape[0] % k:
        raise ValueError(f"{features.shape[0]} feature rows are not a multiple of {k} samples per caption")
    return [mean_pairwise_distance(features[p * k:(p + 1) * k]) for p in range(features.shape[0] // k)]


def fidelity(readings: Sequence[dict], gts: Sequence) -> dict:
    """``fidelity``: mean percent of each caption's checks passed (``all`` left out);
    ``all_right``: percent of images that pass every check."""
    passed, whole = [], []
    for p, g in zip(readings, gts):
        v = check(p, g)
        whole.append(v.pop("all"))
        passed.append(sum(v.values()) / len(v))
    if not passed:
        return {"fidelity": None, "all_right": None}
    return {"fidelity": round(100 * sum(passed) / len(passed), 2), "all_right": round(100 * sum(whole) / len(whole), 2)}


def figures(judge, images: torch.Tensor, gts: Sequence, k: int) -> dict:
    """Diversity and fidelity of ``images`` (uint8 [P * k, 3, H, W], ``k`` per caption, caption-major)
    of the captions whose truths are ``gts`` [P]."""
    readings, feats = judge.predict(images)
    per = per_caption_diversity(feats, k)
    truths = [g for g in gts for _ in range(k)]
    return {"diversity": round(float(np.mean(per)), 4), "diversity_min": round(min(per), 4),
            "diversity_max": round(max(per), 4)} | fidelity(readings, truths)


def render_real(gts: Sequence, k: int, corpus, size: int, seed: int = 0) -> torch.Tensor:
    """Real images of the scenes ``gts`` [P], ``k`` draws each (caption-major), uint8
    [P * k, 3, size, size]: drawn by the corpus's renderer at its ``image_size`` and
    ``render_scale`` under the corpus's jitter, coded at its ``jpeg_quality``, decoded and resized
    as ``embeddings.load_split`` does the corpus's images. Deterministic in ``seed``."""
    blobs = []
    for p, g in enumerate(gts):
        g = parse_gt(g)
        for j in range(k):
            rng = np.random.default_rng([seed, JITTER_SALT, int(g.get("scene_id", p)), j])
            img = render(scene_from_ground_truth(g, rng), corpus.image_size, corpus.render_scale)
            blobs.append(encode_jpeg(img, corpus.jpeg_quality))
    if not blobs:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    images = decode_images(blobs, max(size, 1))
    return images if images.shape[-1] == size else to_uint8(resize(to_model(images), size))


def pick(rows: Sequence[int], gts: Sequence, n_prompts: int) -> list[int]:
    """Of ``rows`` (indices into ``gts``, ``evaluate.pick_rows``' order), the first
    ``n_prompts - n_prompts // 2`` one-object and ``n_prompts // 2`` two-object ones."""
    single = [i for i in rows if len(parse_gt(gts[i])["objects"]) == 1]
    pair = [i for i in rows if len(parse_gt(gts[i])["objects"]) == 2]
    return single[:n_prompts - n_prompts // 2] + pair[:n_prompts // 2]
