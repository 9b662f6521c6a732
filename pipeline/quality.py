"""Quality figures of generated images against the corpus's ground truth, through the judge.

- per-attribute accuracy of the judge's reading against the caption's truth (``judge.labels.check``);
- the Frechet distance between generated and real test images in the judge's feature space,
  beside the same distance between two disjoint sets of real images of the same size and mix
  (the floor: what sampling noise alone gives).
"""
from __future__ import annotations

import numpy as np
import torch

from .judge.labels import accuracy
from .judge.stage import Judge


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets [n, d] (float64).

    tr((S_a S_b)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2), which has the same spectrum as S_a S_b and
    avoids a non-symmetric matrix square root.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the Frechet distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


def score(judge: Judge, images: torch.Tensor, gts: list, real_features: torch.Tensor) -> dict:
    """Attribute accuracy of ``images`` (uint8) against their captions' truth ``gts``, and the
    Frechet distance of their judge features to ``real_features``."""
    preds, feats = judge.predict(images)
    return accuracy(preds, gts) | {"frechet_distance": round(frechet_distance(feats, real_features), 3)}
