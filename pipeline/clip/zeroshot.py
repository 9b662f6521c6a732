"""CLIP evaluation on the val split: retrieval recall@k and zero-shot attribute accuracy.

Zero-shot prompts are built from the corpus grammar: for a single-object scene, the canonical
caption "a {size} {color} {shape} {position phrase}" is written once per value of one attribute
with the other attributes kept true, and the model must pick the true one by image-text cosine.
This is the test of attribute binding that CLIP fails last on shape and position.

For a two-object scene the true caption "a {color0} {shape0} {rel} a {color1} {shape1}" is set
against its counterfactuals, each differing in one thing: the two colors swapped (binding, chance
1/2), the relation reversed (relation, chance 1/2), one color replaced by another (colors, chance
1/13). These are the CLIP rows of the binding chain (``bench/binding.py``): does z_i carry them?
"""
from __future__ import annotations

import itertools
import re

import torch

from ..data.scenes import COLORS, PAIR_TEMPLATES, POSITION_PHRASES, POSITIONS, RELATION_PHRASES, SHAPES, SIZES

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


REVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PAIR_CHECKS = ("colors", "binding", "relation", "all")


def pair_caption(color0: str, shape0: str, relation: str, color1: str, shape1: str) -> str:
    """The corpus's first two-object template, with its "a" -> "an" rule (data.corpus.caption)."""
    text = PAIR_TEMPLATES[0].format(color0=color0, shape0=shape0, rel=RELATION_PHRASES[relation],
                                    color1=color1, shape1=shape1)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def pair_candidates(gt: dict) -> list[str]:
    """A two-object scene's true caption, then colors swapped, relation reversed, and each color
    replaced by each other corpus color (3 + 2 * (len(COLORS) - 2) captions, in that order)."""
    (o0, o1), rel = gt["objects"], gt["relation"]
    c0, s0, c1, s1 = o0["color"], o0["shape"], o1["color"], o1["shape"]
    out = [pair_caption(c0, s0, rel, c1, s1), pair_caption(c1, s0, rel, c0, s1),
           pair_caption(c0, s0, REVERSE[rel], c1, s1)]
    others = [c for c in COLORS if c not in (c0, c1)]          # two objects never share a color
    out += [pair_caption(c, s0, rel, c1, s1) for c in others]
    out += [pair_caption(c0, s0, rel, c, s1) for c in others]
    return out


def pair_verdicts(z: torch.Tensor, z_cands: torch.Tensor) -> dict[str, list[bool]]:
    """Zero-shot verdicts per scene. z [n, D] (an image- or text-side embedding per scene),
    z_cands [n, K, D] (each scene's ``pair_candidates``, embedded)."""
    sims = torch.einsum("nd,nkd->nk", z.float(), z_cands.float())           # [n, K]
    true = sims[:, 0]
    v = {"colors": (true > sims[:, 3:].max(dim=1).values).tolist(),       # ties count as wrong
         "binding": (true > sims[:, 1]).tolist(), "relation": (true > sims[:, 2]).tolist()}
    v["all"] = [a and b and c for a, b, c in zip(v["colors"], v["binding"], v["relation"])]
    return v


def pair_zero_shot(clip, z_img: torch.Tensor, gts: list[dict], batch_size: int = 512) -> dict:
    """Accuracy (percent) of ``pair_verdicts`` on the two-object scenes."""
    pairs = [i for i, gt in enumerate(gts) if gt and len(gt["objects"]) == 2]
    if not pairs:
        return {}
    cands = [pair_candidates(gts[i]) for i in pairs]
    z_cands = embed_texts(clip, [c for cs in cands for c in cs], batch_size).view(len(pairs), len(cands[0]), -1)
    v = pair_verdicts(z_img[pairs], z_cands)
    return {"n_two_object": len(pairs)} | {f"{k}_acc": round(100.0 * sum(v[k]) / len(pairs), 2) for k in PAIR_CHECKS}


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
    out["zero_shot_pairs"] = pair_zero_shot(clip, z_img, split["gt"], batch_size)
    return out
