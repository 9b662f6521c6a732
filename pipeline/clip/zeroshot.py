"""CLIP evaluation on the val split: retrieval recall@k and zero-shot attribute accuracy.

Zero-shot prompts are built from the corpus grammar: for a single-object scene, the canonical
caption "a {size} {color} {shape} {position phrase}" is written once per value of one attribute
with the other attributes kept true, and the model must pick the true one by image-text cosine.
This is the test of attribute binding that CLIP fails last on shape and position.
"""
from __future__ import annotations

import itertools

import torch

from ..data.scenes import COLORS, POSITION_PHRASES, POSITIONS, SHAPES, SIZES

ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "position": POSITIONS, "size": tuple(SIZES)}


def canonical_caption(color: str, shape: str, size: str, position: str) -> str:
    return f"a {size} {color} {shape} {POSITION_PHRASES[position][0]}"


@torch.no_grad()
def embed_images(clip, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([clip.encode_image(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def embed_texts(clip, captions: list[str], batch_size: int) -> torch.Tensor:
    return torch.cat([clip.encode_text(clip.tokenize(captions[i:i + batch_size]))[0]
                      for i in range(0, len(captions), batch_size)])


def recall_at_k(z_img: torch.Tensor, z_txt: torch.Tensor, ks=(1, 5)) -> dict:
    """Pair i is (z_img[i], z_txt[i]); recall@k in both directions, in percent."""
    sim = z_img @ z_txt.T                                   # [N, N]
    target = torch.arange(len(sim))
    out = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        rank = (s > s[target, target][:, None]).sum(dim=1)   # how many beat the true match
        for k in ks:
            out[f"{name}_r@{k}"] = round(100.0 * (rank < k).float().mean().item(), 2)
    return out


def zero_shot(clip, z_img: torch.Tensor, gts: list[dict], batch_size: int = 512) -> dict:
    """Accuracy (percent) per attribute on the single-object scenes."""
    singles = [i for i, gt in enumerate(gts) if gt and len(gt["objects"]) == 1]
    if not singles:
        return {}
    # All canonical captions (8 colors x 3 shapes x 2 sizes x 9 positions = 432), embedded once.
    grid = list(itertools.product(ATTRIBUTES["color"], ATTRIBUTES["shape"], ATTRIBUTES["size"], ATTRIBUTES["position"]))
    index = {g: j for j, g in enumerate(grid)}
    z_txt = embed_texts(clip, [canonical_caption(*g) for g in grid], batch_size)
    sims = z_img[singles] @ z_txt.T                                   # [n_single, 432]
    out = {"n_single_object": len(singles)}
    for attr, values in ATTRIBUTES.items():
        correct = 0
        for row, i in enumerate(singles):
            o = gts[i]["objects"][0]
            truth = {"color": o["color"], "shape": o["shape"], "size": o["size"], "position": o["position"]}
            cands = [index[tuple({**truth, attr: v}[a] for a in ("color", "shape", "size", "position"))]
                     for v in values]
            correct += values[int(sims[row, cands].argmax())] == truth[attr]
        out[f"{attr}_acc"] = round(100.0 * correct / len(singles), 2)
    return out


def evaluate(clip, split: dict, batch_size: int) -> dict:
    """Figures for one in-memory split (see ``data.image_shards.load_image_split``)."""
    clip.model.eval()
    z_img = embed_images(clip, split["images"], batch_size)
    matched = [i for i, gt in enumerate(split["gt"]) if not (gt or {}).get("mismatched")]
    z_txt = embed_texts(clip, [split["captions"][i] for i in matched], batch_size)
    out = {"n_pairs": len(matched)}
    if matched:
        out.update(recall_at_k(z_img[matched], z_txt))
        out["mean_pair_cosine"] = round((z_img[matched] * z_txt).sum(-1).mean().item(), 4)
    # Ground truth describes the image, so a mismatched caption does not disqualify a scene here.
    out["zero_shot"] = zero_shot(clip, z_img, split["gt"], batch_size)
    return out
