"""The embedded corpus's world (CORPUS.md): its vocabulary (colors, shapes, sizes, positions,
relations, backgrounds), scenes of one or two objects, their captions and their rendering. The
corpus stage (``data/corpus.py``) draws and writes them; the judge's labels, CLIP's zero-shot
figures, the background and diversity figures read the same vocabulary and renderings.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

# ---- the grammar (CORPUS.md) ------------------------------------------------------------------
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "cyan": (40, 200, 210), "pink": (240, 120, 180),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.12, "large": 0.22}            # half-width as a fraction of the canvas
GRID = (0.2, 0.5, 0.8)
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")   # row-major over GRID (y, then x)
RELATIONS = ("left of", "right of", "above", "below")
CENTER_JITTER, COLOR_JITTER, ROTATION_JITTER = 0.04, 12, 10.0
FAULT_KINDS = ("http_404", "http_500", "timeout", "not_an_image", "truncated_jpeg", "too_large", "opted_out")

# ---- captions: several paraphrases per scene ----------------------------------------------------
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES = {   # (preposition phrase, alternative phrase, title)
    "top left": ("in the top left", "at the upper left", "top-left corner"),
    "top": ("at the top", "near the top edge", "top"),
    "top right": ("in the top right", "at the upper right", "top-right corner"),
    "left": ("on the left", "at the left side", "left side"),
    "center": ("in the center", "in the middle", "center"),
    "right": ("on the right", "at the right side", "right side"),
    "bottom left": ("in the bottom left", "at the lower left", "bottom-left corner"),
    "bottom": ("at the bottom", "near the bottom edge", "bottom"),
    "bottom right": ("in the bottom right", "at the lower right", "bottom-right corner"),
}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
# Six more templates (the size after the noun, the place first, two objects by their places, the
# relation through a pronoun, a definite clause) drew held-out phrasings better on one CLIP draw but
# cost 5 points of shape on the corpus's own on two (one under its bar): docs/MEASURED.md, 24th session.
SINGLE_TEMPLATES = (
    "a {size} {color} {shape} {pos}",
    "a photo of a {size} {color} {shape} {pos_alt} on a {bg} background",
    "{pos_title}: a {size} {color} {shape}",
    "there is a {size} {color} {shape} {pos}",
    "{size} {color} {shape} {pos_alt}",
)
PAIR_TEMPLATES = (
    "a {color0} {shape0} {rel} a {color1} {shape1}",
    "a {size0} {color0} {shape0} {rel} a {size1} {color1} {shape1}",
    "a photo of a {color0} {shape0} {rel} a {color1} {shape1} on a {bg} background",
    "{color0} {shape0} {rel} {color1} {shape1}",
)


@dataclass
class Obj:
    color: str
    shape: str
    size: str
    position: str           # nearest cell of the 3x3 grid
    x: float                # centre, fraction of the canvas (0 = left)
    y: float                # centre, fraction of the canvas (0 = top)
    rotation: float         # degrees
    rgb: tuple[int, int, int]


TRUTH_FIELDS = tuple(f.name for f in fields(Obj) if f.name != "rgb")    # an object's ground truth (not its jittered rgb)


@dataclass
class Scene:
    scene_id: int
    background: str
    objects: list[Obj]
    relation: Optional[str] = None     # relation of objects[0] to objects[1]
    split: str = "train"
    extra: dict = field(default_factory=dict)

    def ground_truth(self) -> dict:
        return {"scene_id": self.scene_id, "background": self.background, "relation": self.relation,
                "objects": [{k: getattr(o, k) for k in TRUTH_FIELDS} for o in self.objects]}


def nearest_position(x: float, y: float) -> str:
    col = int(np.argmin([abs(x - g) for g in GRID]))
    row = int(np.argmin([abs(y - g) for g in GRID]))
    return POSITIONS[3 * row + col]


def _jitter_rgb(rng, rgb) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1), 0, 255)) for c in rgb)


def _object(rng, color, x, y) -> Obj:
    shape = str(rng.choice(SHAPES))
    size = str(rng.choice(list(SIZES)))
    return Obj(color=color, shape=shape, size=size, position=nearest_position(x, y), x=float(x), y=float(y),
               rotation=float(rng.uniform(-ROTATION_JITTER, ROTATION_JITTER)), rgb=_jitter_rgb(rng, COLORS[color]))


def sample_scene(seed: int, scene_id: int, two_object_fraction: float) -> Scene:
    rng = np.random.default_rng([seed, scene_id])
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() >= two_object_fraction:
        cell = int(rng.integers(9))
        x, y = (GRID[cell % 3] + rng.uniform(-CENTER_JITTER, CENTER_JITTER),
                GRID[cell // 3] + rng.uniform(-CENTER_JITTER, CENTER_JITTER))
        obj = _object(rng, str(rng.choice(list(COLORS))), x, y)
        obj.position = POSITIONS[cell]   # the named cell, not recomputed from the jittered centre
        return Scene(scene_id, background, [obj])
    c0, c1 = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    relation = str(rng.choice(RELATIONS))
    along = rng.uniform(0.4, 0.6)          # separation along the relation's axis
    across = rng.uniform(-0.1, 0.1)        # misalignment across it
    a = rng.uniform(0.2, 0.8 - along)      # the smaller coordinate along the axis
    b = rng.uniform(0.25, 0.75)
    lo, hi = (a, b), (a + along, b + across)   # (along, across) for the two objects
    first, second = {"left of": (lo, hi), "right of": (hi, lo), "above": (lo, hi), "below": (hi, lo)}[relation]
    if relation in ("left of", "right of"):
        p0, p1 = first, second                      # (x, y)
    else:
        p0, p1 = first[::-1], second[::-1]          # along is y
    return Scene(scene_id, background, [_object(rng, c0, *p0), _object(rng, c1, *p1)], relation)


def scene_from_ground_truth(gt: dict, rng: Optional[np.random.Generator] = None) -> Scene:
    """The scene a ground-truth dict (``Scene.ground_truth()``, as the pairs and shards store it)
    describes, to draw again with ``render``.

    Without ``rng``: the stored centres and rotations, each object in its color's base RGB (the
    ground truth does not keep the jittered RGB, so this is not the corpus's image byte for
    byte). With ``rng``: another draw of the same scene under the corpus's jitter, i.e. another
    real image of the same caption: a one-object scene's centre anew within ``CENTER_JITTER`` of
    its named grid cell, a two-object scene's centres within ``CENTER_JITTER`` of the stored ones
    (the relation still holds), and every object's color (``COLOR_JITTER``) and rotation
    (``ROTATION_JITTER``) drawn anew. Colors, shapes, sizes, positions, relation and background
    are the ground truth's.
    """
    objects = []
    single = len(gt["objects"]) == 1
    for o in gt["objects"]:
        x, y, rotation, rgb = float(o["x"]), float(o["y"]), float(o.get("rotation", 0.0)), COLORS[o["color"]]
        if rng is not None:
            if single:
                cell = POSITIONS.index(o["position"])
                x, y = GRID[cell % 3], GRID[cell // 3]
            x = x + rng.uniform(-CENTER_JITTER, CENTER_JITTER)
            y = y + rng.uniform(-CENTER_JITTER, CENTER_JITTER)
            rotation = float(rng.uniform(-ROTATION_JITTER, ROTATION_JITTER))
            rgb = _jitter_rgb(rng, rgb)
        objects.append(Obj(color=o["color"], shape=o["shape"], size=o["size"], position=o["position"],
                           x=float(x), y=float(y), rotation=rotation, rgb=tuple(rgb)))
    return Scene(int(gt.get("scene_id", -1)), gt["background"], objects, gt.get("relation"))


def caption(scene: Scene, rng) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", _caption(scene, rng))   # "an orange circle"


def _caption(scene: Scene, rng) -> str:
    bg = scene.background
    if len(scene.objects) == 1:
        o = scene.objects[0]
        pos, pos_alt, title = POSITION_PHRASES[o.position]
        template = SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))]
        return template.format(size=rng.choice(SIZE_WORDS[o.size]), color=o.color, shape=o.shape, pos=pos,
                               pos_alt=pos_alt, pos_title=title, bg=bg)
    o0, o1 = scene.objects
    template = PAIR_TEMPLATES[int(rng.integers(len(PAIR_TEMPLATES)))]
    return template.format(color0=o0.color, shape0=o0.shape, size0=rng.choice(SIZE_WORDS[o0.size]),
                           color1=o1.color, shape1=o1.shape, size1=rng.choice(SIZE_WORDS[o1.size]),
                           rel=RELATION_PHRASES[scene.relation], bg=bg)


# ---- rendering ----------------------------------------------------------------------------------
def _polygon(shape: str, cx: float, cy: float, h: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices in pixels; ``h`` is the half-width. Triangles point up (apex at -90 deg)."""
    if shape == "square":
        angles, radius = (45, 135, 225, 315), h * math.sqrt(2)
    else:  # triangle: circumradius chosen so the base half-width is h
        angles, radius = (-90, 30, 150), h * 2 / math.sqrt(3)
    return [(cx + radius * math.cos(math.radians(a + rotation)), cy + radius * math.sin(math.radians(a + rotation)))
            for a in angles]


def render(scene: Scene, image_size: int, render_scale: int) -> Image.Image:
    big = image_size * render_scale
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, h = o.x * big, o.y * big, SIZES[o.size] * big
        if o.shape == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=o.rgb)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, h, o.rotation), fill=o.rgb)
    return img.resize((image_size, image_size), Image.BOX) if render_scale > 1 else img


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
