"""Quality figures of generated images against the corpus's ground truth, through the judge.

- per-attribute accuracy of the judge's reading against the caption's truth (``judge.labels.check``);
- the Frechet distance between generated and real test images in the judge's feature space,
  beside the same distance between two disjoint sets of real images of the same size and mix
  (the floor: what sampling noise alone gives).
"""
from __future__ import annotations

import numpy as np
import torch

from .images import resize, to_model, to_uint8
from .judge.labels import accuracy, check, readable
from .judge.model import Judge


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


def score(judge: Judge, images: torch.Tensor, gts: list, real_features: torch.Tensor,
          preds: list | None = None) -> dict:
    """Attribute accuracy of ``images`` (uint8) against their captions' truth ``gts``, and the
    Frechet distance of their judge features to ``real_features``. ``preds`` returns the judge's
    per-image readings when a list is passed."""
    readings, feats = judge.predict(images)
    if preds is not None:
        preds.extend(readings)
    return accuracy(readings, gts) | {"frechet_distance": round(frechet_distance(feats, real_features), 3)}


def worst_samples(preds: list[dict], gts: list, k: int) -> list[dict]:
    """The ``k`` images the judge scores worst: fewest of their caption's checks passed (the
    "all" summary excluded), ties in caption order. Each: index, fraction passed, the failed
    checks, and what the judge saw in the corpus's words."""
    rows = []
    for i, (p, g) in enumerate(zip(preds, gts)):
        v = {name: ok for name, ok in check(p, g).items() if name != "all"}
        rows.append({"index": i, "passed": round(sum(v.values()) / len(v), 3),
                     "failed": [name for name, ok in v.items() if not ok], "judge_saw": readable(p)})
    return sorted(rows, key=lambda r: (r["passed"], r["index"]))[:k]


# ---- the standard metrics: FID / KID (torchmetrics) and CLIP score in both conventions -------------
#
# Both image sets reach the feature extractor through the same code: uint8 [N, 3, S, S] tensors at
# the cascade's final resolution (generated images are never JPEG-encoded; the real ones are the
# corpus's JPEGs decoded by ``embeddings.load_split``), then ``prepare`` below, then the extractor.
# clean-fid (Parmar et al. 2022) shows how far FID moves when the two sets are resized differently.

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"     # torch-fidelity's, what papers use


class InceptionFeatures(torch.nn.Module):
    """The standard FID network: torch-fidelity's Inception-v3 port (2048-d pool features) through
    torchmetrics, with its weights from a local file (no download). Input uint8 [B, 3, H, W]; it
    resizes to 299 px itself, the same way for both sets."""
    name = "FID"

    def __init__(self, weights_path: str):
        super().__init__()
        from pathlib import Path
        if not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"evaluate.inception_weights: {weights_path} is not a file (expected torch-fidelity's "
                f"{INCEPTION_WEIGHTS_FILE}; unset the key to report FD-CLIP instead)")
        try:
            # torch-fidelity loads the file with weights_only=False (it would run any pickled code
            # in it): it gets only a file that loads as plain tensors and data.
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- whatever the reason, the file is not usable
            from .errors import StageError
            raise StageError(f"evaluate.inception_weights: {weights_path} does not load as plain weights "
                             f"({type(err).__name__}: {str(err)[:200]}); expected torch-fidelity's "
                             f"{INCEPTION_WEIGHTS_FILE}") from None
        from torchmetrics.image.fid import NoTrainInceptionV3
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(weights_path))
        self.num_features = 2048
        self.description = f"Inception-v3 pool3 (torch-fidelity weights {Path(weights_path).name}): standard FID/KID"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.net(images_uint8).reshape(images_uint8.shape[0], -1)


class ClipFeatures(torch.nn.Module):
    """The declared fallback: the pipeline's own CLIP image tower (unit-norm z_i). Figures in this
    space are FD-CLIP / KD-CLIP, comparable between runs that share a CLIP, never with papers' FID."""
    name = "FD-CLIP"

    def __init__(self, clip):
        super().__init__()
        self.clip = clip                        # a Clip (not a Module: its weights stay where they are)
        self.num_features = int(clip.embed_dim)
        self.device = next(clip.model.parameters()).device
        self.description = "the pipeline's CLIP image tower (models/clip), not Inception: FD-CLIP, not comparable with published FID"

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(prepare(images_uint8, self.clip.image_size))


def prepare(images_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """The one resize both sets go through: uint8 [N, 3, S, S] -> uint8 [N, 3, size, size]."""
    if images_uint8.shape[-1] == size:
        return images_uint8
    return to_uint8(resize(to_model(images_uint8), size))


@torch.no_grad()
def extract(extractor: torch.nn.Module, images_uint8: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> float64 features [N, d], in batches, on the extractor's device."""
    out = [extractor(images_uint8[i:i + batch_size].to(extractor.device)).double().cpu()
           for i in range(0, images_uint8.shape[0], batch_size)]
    return torch.cat(out)


class _GivenFeatures(torch.nn.Module):
    """Lets torchmetrics' FID/KID take features we already extracted (so each image goes through
    the network once for both): ``update(features [N, d], real=...)``."""

    def __init__(self, d: int):
        super().__init__()
        self.num_features = d

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(generated: torch.Tensor, real: torch.Tensor, *, seed: int, subsets: int = 100,
            subset_size: int = 1000, kid: bool = True) -> dict:
    """torchmetrics' FrechetInceptionDistance and KernelInceptionDistance (polynomial kernel of
    degree 3, as Binkowski et al.) on features [N, d] already extracted. KID draws ``subsets``
    random subsets of min(``subset_size``, N_gen, N_real) from a generator seeded with ``seed``."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    d = generated.shape[1]
    fid = FrechetInceptionDistance(feature=_GivenFeatures(d)).double()
    fid.update(real.double(), real=True)
    fid.update(generated.double(), real=False)
    if not kid:
        return {"fid": round(float(fid.compute()), 4)}
    size = min(subset_size, generated.shape[0], real.shape[0])
    kernel = KernelInceptionDistance(feature=_GivenFeatures(d), subsets=subsets, subset_size=size)
    kernel.update(real.double(), real=True)
    kernel.update(generated.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kernel.compute()
    return {"fid": round(float(fid.compute()), 4), "kid_mean": round(float(kid_mean), 6),
            "kid_std": round(float(kid_std), 6), "kid_subsets": subsets, "kid_subset_size": size}


def clip_scores(cos: torch.Tensor) -> dict:
    """CLIP score of image-caption cosines [N] in both conventions in use, labelled:
    Hessel et al. 2021 (CLIPScore, w = 2.5): mean 2.5 * max(cos, 0); torchmetrics' CLIPScore:
    mean 100 * max(cos, 0)."""
    c = cos.double().clamp_min(0)
    return {"hessel_2.5": round(2.5 * c.mean().item(), 4), "torchmetrics_100": round(100 * c.mean().item(), 2),
            "n": int(cos.numel())}
