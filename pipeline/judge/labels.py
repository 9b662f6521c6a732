"""Ground truth <-> the judge's heads, and scoring what the judge saw against a caption's truth.

A scene holds one object or two (CORPUS.md). The heads:

    count                   1 or 2 objects
    background              white / gray / black
    color shape size position        the object of a one-object scene
    axis                    two-object scenes: horizontal (left of / right of) or vertical (above / below)
    color_a shape_a size_a  the first object along that axis (the left one, or the upper one)
    color_b shape_b size_b  the second

Two-object scenes are read in this canonical order (not the caption's order, which the image
cannot show): "a red circle to the right of a blue square" is axis horizontal, a = the blue
square, b = the red circle. Heads that do not apply to a scene get the target -1 (ignored).
"""
from __future__ import annotations

import json
from typing import Optional

import torch

from ..data.scenes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES

COLOR_NAMES, SIZE_NAMES, BACKGROUND_NAMES = tuple(COLORS), tuple(SIZES), tuple(BACKGROUNDS)
AXES = ("horizontal", "vertical")
VOCAB: dict[str, tuple] = {
    "count": (1, 2), "background": BACKGROUND_NAMES,
    "color": COLOR_NAMES, "shape": SHAPES, "size": SIZE_NAMES, "position": POSITIONS,
    "axis": AXES,
    "color_a": COLOR_NAMES, "shape_a": SHAPES, "size_a": SIZE_NAMES,
    "color_b": COLOR_NAMES, "shape_b": SHAPES, "size_b": SIZE_NAMES,
}
HEADS = tuple(VOCAB)
IGNORE = -1


def parse_gt(gt) -> Optional[dict]:
    """The ground truth as stored in the shards' json (a dict, or its json string)."""
    if gt is None:
        return None
    return json.loads(gt) if isinstance(gt, str) else gt


def canonical_pair(gt: dict) -> tuple[str, dict, dict]:
    """(axis, first, second) of a two-object scene: first = the left (or upper) object."""
    o0, o1 = gt["objects"]
    rel = gt["relation"]
    axis = "horizontal" if rel in ("left of", "right of") else "vertical"
    return (axis, o0, o1) if rel in ("left of", "above") else (axis, o1, o0)


def targets(gt) -> list[int]:
    """One row of class indices (``IGNORE`` where a head does not apply), in ``HEADS`` order."""
    gt = parse_gt(gt)
    t = dict.fromkeys(HEADS, IGNORE)
    objects = gt["objects"]
    t["count"] = VOCAB["count"].index(len(objects))
    t["background"] = BACKGROUND_NAMES.index(gt["background"])
    if len(objects) == 1:
        o = objects[0]
        t |= {"color": COLOR_NAMES.index(o["color"]), "shape": SHAPES.index(o["shape"]),
              "size": SIZE_NAMES.index(o["size"]), "position": POSITIONS.index(o["position"])}
    else:
        axis, a, b = canonical_pair(gt)
        t["axis"] = AXES.index(axis)
        for suffix, o in (("a", a), ("b", b)):
            t |= {f"color_{suffix}": COLOR_NAMES.index(o["color"]), f"shape_{suffix}": SHAPES.index(o["shape"]),
                  f"size_{suffix}": SIZE_NAMES.index(o["size"])}
    return [t[h] for h in HEADS]


def target_tensor(gts: list) -> torch.Tensor:
    """[N, len(HEADS)] int64."""
    return torch.tensor([targets(g) for g in gts], dtype=torch.long)


def readable(pred: dict[str, int]) -> dict:
    """One image's head outputs (class indices) -> what the judge sees, in the corpus's words."""
    name = {h: VOCAB[h][i] for h, i in pred.items()}
    if name["count"] == 1:
        objects = [{k: name[k] for k in ("color", "shape", "size", "position")}]
        return {"n_objects": 1, "background": name["background"], "objects": objects}
    first, second = ({k: name[f"{k}_{s}"] for k in ("color", "shape", "size")} for s in ("a", "b"))
    relation = "left of" if name["axis"] == "horizontal" else "above"
    return {"n_objects": 2, "background": name["background"], "relation": relation, "objects": [first, second]}


# ---- scoring an image against the truth of its caption ------------------------------------------
SINGLE_CHECKS = ("count", "color", "shape", "size", "position", "all")
PAIR_CHECKS = ("count", "colors", "shapes", "relation", "all")


def check(pred: dict[str, int], gt) -> dict[str, bool]:
    """Per-attribute verdicts for one image (head outputs ``pred``) against the caption's truth.

    One object: each attribute is right only if the judge also sees one object.
    Two objects: ``colors``: both named colors are there; ``shapes``: each named color sits on
    its named shape (attribute binding); ``relation``: the objects are on the named axis in
    the named order (the object of the first color is left of / above the other, or the
    reverse for right of / below). ``all``: every check of the caption at once.
    """
    gt = parse_gt(gt)
    t = dict(zip(HEADS, targets(gt)))
    one = pred["count"] == t["count"]
    if len(gt["objects"]) == 1:
        v = {"count": one} | {k: one and pred[k] == t[k] for k in ("color", "shape", "size", "position")}
        v["all"] = all(v[k] for k in ("color", "shape", "size", "position"))
        return v
    seen = {pred["color_a"]: pred["shape_a"], pred["color_b"]: pred["shape_b"]}
    named = {t["color_a"]: t["shape_a"], t["color_b"]: t["shape_b"]}
    colors = one and len(seen) == 2 and set(seen) == set(named)
    v = {"count": one, "colors": colors,
         "shapes": colors and all(seen[c] == s for c, s in named.items()),
         "relation": one and pred["axis"] == t["axis"] and pred["color_a"] == t["color_a"]
         and pred["color_b"] == t["color_b"]}
    v["all"] = v["colors"] and v["shapes"] and v["relation"]
    return v


def accuracy(preds: list[dict[str, int]], gts: list) -> dict:
    """Percent right per check, separately for one- and two-object captions, with their counts."""
    out: dict = {}
    for kind, names, n_obj in (("single", SINGLE_CHECKS, 1), ("pair", PAIR_CHECKS, 2)):
        verdicts = [check(p, g) for p, g in zip(preds, gts) if len(parse_gt(g)["objects"]) == n_obj]
        out[kind] = {"n": len(verdicts)} | {
            k: round(100 * sum(v[k] for v in verdicts) / len(verdicts), 2) if verdicts else None for k in names}
    return out


# ---- captions in the corpus's grammar -> ground truth (for `unclip judge --caption`) -------------
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_POSITION_WORDS = {   # the corpus's phrases (data.scenes.POSITION_PHRASES), longest first when matched
    "top left": "top left", "top-left": "top left", "upper left": "top left",
    "top right": "top right", "top-right": "top right", "upper right": "top right",
    "bottom left": "bottom left", "bottom-left": "bottom left", "lower left": "bottom left",
    "bottom right": "bottom right", "bottom-right": "bottom right", "lower right": "bottom right",
    "top edge": "top", "bottom edge": "bottom", "left side": "left", "right side": "right",
    "center": "center", "middle": "center", "top": "top", "bottom": "bottom", "left": "left", "right": "right",
}
_RELATION_WORDS = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
_INVERSE = {"left of": "right of", "above": "below"}
# two objects named by their places ("a red circle on the left and a blue square on the right"): no
# corpus template, but a phrasing users write
_SIDE_WORDS = {"left of": ("on the left", "on the right"), "above": ("at the top", "at the bottom")}


def parse_caption(caption: str) -> Optional[dict]:
    """A caption of the corpus's grammar -> the truth it names (as the shards store it), or None
    when it names no complete scene. Beyond the corpus's templates it reads a size after the noun,
    two objects named by their places, and a relation said through a pronoun ("a blue square, and a
    red circle to the left of it"; "... with a red circle to its left"). Attributes a caption leaves out (the size in some
    two-object captions) are filled with a default, so score those captions on the checks the
    caption names."""
    import re
    text = caption.lower()
    phrase, rel = next(((phrase, r) for phrase, r in _RELATION_WORDS.items() if phrase in text), (None, None))
    its = None if rel else re.search(r"\bto its (left|right)\b", text)   # "a blue square with a red circle to its left"
    if its:
        rel = f"{its.group(1)} of"
    obj = re.compile(r"(?:\b(small|little|tiny|large|big)\s+)?\b(" + "|".join(COLOR_NAMES) + r")\s+("
                     + "|".join(SHAPES) + r")\b")
    matches = list(obj.finditer(text))
    found = [{"size": _SIZE_WORDS.get(m.group(1) or "", "small"), "color": m.group(2), "shape": m.group(3)}
             for m in matches]
    bg = next((b for b in BACKGROUND_NAMES if f"{b} background" in text), "white")
    if rel and len(found) == 2:
        if its or re.search(rf"{re.escape(phrase)} it\b", text):   # "a blue square, and a red circle left of it"
            found = found[::-1]                                   # the pronoun's object is named first
        return {"background": bg, "relation": rel, "objects": found}
    if rel is None and len(found) == 2:           # named by their places: "a red circle on the left and a blue ..."
        for r, (near, far) in _SIDE_WORDS.items():
            if near in text and far in text:
                return {"background": bg, "relation": r if text.index(near) < text.index(far) else _INVERSE[r],
                        "objects": found}
        return None
    if len(found) == 1 and not matches[0].group(1):      # the size after the noun: "..., large in size"
        after = re.search(r"\b(small|little|tiny|large|big)\b", text[matches[0].end():])
        if after:
            found[0]["size"] = _SIZE_WORDS[after.group(1)]
    if rel is None and len(found) == 1:
        rest = text.replace(f"{found[0]['color']} {found[0]['shape']}", " ")
        pos = next((p for phrase, p in sorted(_POSITION_WORDS.items(), key=lambda kv: -len(kv[0]))
                    if re.search(rf"\b{re.escape(phrase)}\b", rest)), None)
        if pos is None:
            return None
        return {"background": bg, "relation": None, "objects": [found[0] | {"position": pos}]}
    return None
