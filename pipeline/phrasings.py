"""The held-out scenes in phrasings no training caption has: captions a user would write.

``evaluate`` judges the test split's captions, which are held-out scenes phrased by the corpus's
templates (pipeline/data/scenes.py). The quality issue asks the bars to hold for captions a user
would write. :func:`phrase` rewrites a scene's ground truth (every attribute the judge checks named:
color, shape, size and position of one object; both colors, shapes and the relation of two) in
one of these families' templates, which take turns over the rows:

    original    the corpus's own templates (a copy: these captions stay the same if the corpus's
                templates change)
    reordered   new orders and punctuation of the corpus's words
                ("red circle, small, in the top left"; "on the left a red circle, on the right a blue square")
    rephrased   other words too ("draw a small red circle placed in the top left"; "a blue square with
                a red circle to its left")

``unseen`` (:data:`PROBES`) is read by the benches only: constructions no training caption has, rewrites
included ("a red circle and a blue square; the first is to the left of the second").

None of the held-out families' templates is a corpus template (:func:`trained_on`; tests/test_phrasings.py also
parses every phrasing back to its scene's truth), and no held-out phrasing is one of the language rewrites CLIP
trains on (pipeline/clip/rewrites.py; tests/test_clip_rewrites.py walks them all). ``evaluate`` judges the held-out families on the
first ``evaluate.phrasings_per_kind`` captions of each kind; ``bench/novel_captions.py`` on all of
them, template by template, beside what CLIP itself reads.
"""
from __future__ import annotations

import re

from .data import scenes

TO_ITS = {"left of": "to its left", "right of": "to its right", "above": "above it", "below": "below it"}
# the two objects' places as words the corpus has (its one-object positions), by the axis
SIDES = {"horizontal": ("on the left", "on the right"), "vertical": ("at the top", "at the bottom")}

# {size} {color} {shape} {pos} {pos_alt} {pos_title} {bg}: as scenes.py fills its templates
SINGLE = {
    "original": ("a {size} {color} {shape} {pos}",
                 "a photo of a {size} {color} {shape} {pos_alt} on a {bg} background",
                 "{pos_title}: a {size} {color} {shape}",
                 "there is a {size} {color} {shape} {pos}",
                 "{size} {color} {shape} {pos_alt}"),
    "reordered": ("{color} {shape}, {size}, {pos}",
                  "{pos_title}: {color} {shape} ({size})",
                  "a {color} {shape} {pos}, {size}",
                  "{pos_alt} there is a {size} {color} {shape}"),
    "rephrased": ("draw a {size} {color} {shape} {pos}",
                  "an image showing one {size} {color} {shape} {pos_alt}",
                  "a {size} {color} {shape} placed {pos}",
                  "{size} {color} {shape} located {pos_alt}, plain {bg} backdrop"),
    "unseen": ("one {color} {shape}, which is {size}, {pos}",
               "you can see a {size} {color} {shape} if you look {pos_alt}"),
}
HELD_OUT = ("reordered", "rephrased")       # the families judged: none of their templates is a corpus template
# A probe the benches read beside them (not evaluate): constructions that neither the corpus, the held-out
# families nor CLIP's language rewrites have (28th session, written before any CLIP was read on them), to
# tell whether what CLIP learns from the rewrites reaches past the constructions it trains on.
PROBES = ("unseen",)
UNTRAINED = (*HELD_OUT, *PROBES)            # every family whose templates no training caption has
# {color0} {shape0} {size0} {size1} {rel} {color1} {shape1} (the truth's order), {first}/{second}: the left (upper)
# and right (lower) object as "{color} {shape}", {side0}/{side1}: their places, {to_its}: {rel} seen
# from the second object, {bg}
PAIR = {
    "original": ("a {color0} {shape0} {rel} a {color1} {shape1}",
                 "a {size0} {color0} {shape0} {rel} a {size1} {color1} {shape1}",
                 "a photo of a {color0} {shape0} {rel} a {color1} {shape1} on a {bg} background",
                 "{color0} {shape0} {rel} {color1} {shape1}"),
    "reordered": ("{side0} a {first}, {side1} a {second}",
                  "{color1} {shape1}, and {rel} it a {color0} {shape0}",
                  "{color0} {shape0} {rel} {color1} {shape1}, {bg} background"),
    "rephrased": ("a {color0} {shape0} and a {color1} {shape1}, the {color0} one {rel} the {color1} one",
                  "a {color1} {shape1} with a {color0} {shape0} {to_its}",
                  "draw a {color0} {shape0} {rel} a {color1} {shape1}"),
    "unseen": ("a {color0} {shape0} and a {color1} {shape1}; the first is {rel} the second",
               "a {color1} {shape1}, which has a {color0} {shape0} {to_its}",
               "a {color1} {shape1} and, {to_its}, a {color0} {shape0}"),
}


def trained_on() -> list[str]:
    """The held-out families' templates that the corpus trains on (none, or they measure nothing held out)."""
    corpus = set(scenes.SINGLE_TEMPLATES) | set(scenes.PAIR_TEMPLATES)
    return [t for f in UNTRAINED for t in (*SINGLE[f], *PAIR[f]) if t in corpus]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def corpus_words() -> set[str]:
    """Every word a training caption can hold: the templates and every value they are filled with."""
    parts = [*scenes.SINGLE_TEMPLATES, *scenes.PAIR_TEMPLATES, *scenes.COLORS, *scenes.SHAPES, *scenes.BACKGROUNDS,
             *(w for ws in scenes.SIZE_WORDS.values() for w in ws), *scenes.RELATION_PHRASES.values(),
             *(p for ps in scenes.POSITION_PHRASES.values() for p in ps)]
    return set().union(*(_words(re.sub(r"\{\w+\}", " ", p)) for p in parts)) | {"an"}   # "an orange": scenes.caption


def new_words(template: str) -> list[str]:
    """The words of ``template`` (outside its slots) that no training caption has."""
    return sorted(_words(re.sub(r"\{\w+\}", " ", template)) - corpus_words())


def phrase(gt: dict, family: str, i: int) -> tuple[str, str]:
    """(template, caption) for scene truth ``gt`` in ``family``'s template ``i mod k``."""
    objects = gt["objects"]
    if len(objects) == 1:
        templates = SINGLE[family]
        o = objects[0]
        pos, pos_alt, pos_title = scenes.POSITION_PHRASES[o["position"]]
        size = scenes.SIZE_WORDS[o["size"]][i % len(scenes.SIZE_WORDS[o["size"]])]
        fill = {"size": size, "color": o["color"], "shape": o["shape"], "pos": pos, "pos_alt": pos_alt,
                "pos_title": pos_title, "bg": gt["background"]}
    else:
        templates = PAIR[family]
        (o0, o1), rel = objects, gt["relation"]
        axis = "horizontal" if rel in ("left of", "right of") else "vertical"
        first, second = (o0, o1) if rel in ("left of", "above") else (o1, o0)
        fill = {"color0": o0["color"], "shape0": o0["shape"], "color1": o1["color"], "shape1": o1["shape"],
                "size0": scenes.SIZE_WORDS[o0["size"]][0], "size1": scenes.SIZE_WORDS[o1["size"]][0],
                "rel": scenes.RELATION_PHRASES[rel],
                "to_its": TO_ITS[rel], "first": f"{first['color']} {first['shape']}",
                "second": f"{second['color']} {second['shape']}", "side0": SIDES[axis][0], "side1": SIDES[axis][1],
                "bg": gt["background"]}
    template = templates[i % len(templates)]
    return template, re.sub(r"\ba (?=[aeiou])", "an ", template.format(**fill))     # as scenes.caption
