"""Hard negative captions for CLIP's contrastive loss (NegCLIP: Yuksekgonul et al. 2023, "When and
why vision-language models behave like bags-of-words").

In-batch negatives almost never differ from the true caption by word order alone, so InfoNCE can
be minimised by a bag of words: CLIP learns that an image holds "red", "circle", "blue" and
"square", not which color is on which shape or which object is left of the other. The binding
chain (``bench/binding.py``) measured exactly that: from the true z_i, CLIP picks the caption over
its color-swapped twin 71-78 % of the time and over its relation-reversed twin 70-73 % (chance 50 %),
and the decoder cannot draw what z_i does not carry.

NegCLIP adds, for each caption, captions that use the same words in a wrong order, as extra
columns of the image-to-text softmax only. They are made from the text alone, so they apply to a
user's own captions too, wherever the words occur:

- ``relation``: every spatial word replaced by its opposite ("left of" -> "right of", "above" ->
  "below", "top left" -> "bottom right"): the relation, or a single object's position, reversed;
- ``binding``: the first two color words swapped ("a red circle left of a blue square" -> "a blue
  circle left of a red square"; "a red circle on a white background" -> "a white circle on a red
  background").

A caption with none of these words has no negative of that kind (its column is masked).
"""
from __future__ import annotations

import re
from typing import Optional

import torch

KINDS = ("relation", "binding")

OPPOSITES = {"left": "right", "right": "left", "above": "below", "below": "above", "top": "bottom",
             "bottom": "top", "upper": "lower", "lower": "upper", "over": "under", "under": "over"}
# Basic color terms of English (Berlin and Kay's eleven) and common neighbours.
COLOR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink", "black", "white",
               "gray", "grey", "brown", "magenta", "violet", "teal", "turquoise", "gold", "silver")

_SPATIAL = re.compile(r"\b(" + "|".join(OPPOSITES) + r")\b", re.IGNORECASE)
_COLOR = re.compile(r"\b(" + "|".join(COLOR_WORDS) + r")\b", re.IGNORECASE)


def _same_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


def reverse_relation(caption: str) -> Optional[str]:
    """Every spatial word replaced by its opposite; None when the caption has none."""
    flipped, n = _SPATIAL.subn(lambda m: _same_case(OPPOSITES[m.group(1).lower()], m.group(1)), caption)
    return flipped if n else None


def swap_colors(caption: str) -> Optional[str]:
    """The first two different color words swapped; None when there are not two."""
    found = list(_COLOR.finditer(caption))
    if not found:
        return None
    first = found[0]
    second = next((m for m in found[1:] if m.group(1).lower() != first.group(1).lower()), None)
    if second is None:
        return None
    a, b = first.span(), second.span()
    return caption[:a[0]] + second.group(1) + caption[a[1]:b[0]] + first.group(1) + caption[b[1]:]


MAKERS = {"relation": reverse_relation, "binding": swap_colors}


def hard_negatives(captions: list[str], kinds: tuple[str, ...]) -> tuple[list[str], torch.Tensor]:
    """-> (negative captions, K = len(kinds) per caption in caption-major order, the caption itself
    where a kind does not apply; mask [B, K] bool, True where the negative exists)."""
    texts, mask = [], []
    for caption in captions:
        row = [MAKERS[k](caption) for k in kinds]
        texts += [t if t is not None else caption for t in row]
        mask.append([t is not None for t in row])
    return texts, torch.tensor(mask, dtype=torch.bool).view(len(captions), len(kinds))
