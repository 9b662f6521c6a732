"""An independent reader of the corpus's images: classic computer vision, no learning, no judge.

    python bench/independent_reader.py --workspace . [--n 256] [--source real|generated]
        [--models DIR] [--images-npz PATH] [--save-npz PATH] [--out reports/bench/independent_reader.json]

The project's quality figures come from its own judge, a CNN trained on real corpus images
(and on 16-48 px blurred round trips of them), so it may read low-resolution cues a person would
not. This reader shares no code with the project's judge or quality figures: it knows only the
grammar of CORPUS.md (its colors, backgrounds, the three shapes, the two half-widths, the 3x3
grid), copied here as numbers, and reads each 64 px image with fixed geometry and no learning
(``read_image`` and the checks import nothing from ``pipeline``; ``main`` uses it only to load the
test images and captions, to sample the cascade and to write the json):

1. background: the median of the 2 px border ring, named by the nearest background color;
2. foreground: pixels farther than ``FG_DISTANCE`` (Euclidean RGB) from that median; 8-connected
   components (``scipy.ndimage.label``); a component whose core (pixels at least ``CORE`` of the
   way from the background to a palette color) holds two palette colors, each a fair share and
   their centres apart (two touching objects), is split pixel by pixel by the nearer
   background->color segment; specks under ``MIN_AREA`` px of coverage are dropped;
3. per object: its color is the nearest palette color of its core's median RGB; its coverage
   (0..1 per pixel, the projection onto the background->object color segment) is fitted by each
   of the three silhouettes (circle, square, equilateral triangle), least squares over free
   centre, half-width, rotation and blur: the sharp silhouette anti-aliased by a 1 px box, then a
   Gaussian of ``blur`` px (the other object's pixels are left out of the fit; the canvas clips a
   silhouette as it clips the drawing). The shape is the best fit, and it is read only when

   - that fit covers the object: intersection over union (both at half coverage) >= ``MIN_IOU``;
   - it is distinct from the runner-up silhouette: ``distinct`` = (runner-up's squared error -
     best's) / (squared difference of the two fitted silhouettes) >= ``MIN_DISTINCT``. This is 1
     for an object that is exactly the best silhouette, 0 for one halfway between the two, and
     does not move with pixel noise (which adds the same to both errors);
   - it is an outline, not a blob: ``blur`` <= ``MAX_BLUR`` px;

   otherwise the shape is read as ``unclear``, never as the nearest silhouette. Reference points,
   on the 946 real test images: blur <= 1.27 px (99 % <= 1.06), distinct >= 0.84, IoU >= 0.92;
   through 32 px and back (bicubic) blur 0.8-1.2, through 16 px blur 1.5-2.1 and distinct >= 0.52,
   through 8 px blur 2.8-4.0 and the small shapes' distinct mostly < 0.3. ``silhouette``
   (reported beside ``shape``, not part of ``all``) is the lenient reading: the best-fitting
   silhouette whenever it covers the object, however soft or ambiguous.
   Size: the fitted half-width against the geometric mean of the two half-widths (0.1625 of the
   canvas); position: the fitted centre's nearest grid cell;
4. two-object scenes: the axis is that of the larger centre difference, the first object is the
   left (upper) one, as the judge's labels order them.

Checks as ``pipeline.judge.labels.check`` defines them (re-implemented here): a one-object
caption's attribute is right only when exactly one object is read; ``colors``: exactly two
objects, the two named colors; ``shapes``: and each color on its named shape; ``relation``:
exactly two objects on the named axis, the named colors in the named order. Each percentage
comes with its binomial standard error.

``--source real`` reads the real held-out test images (the reader's own accuracy);
``--source generated`` samples the trained cascade (``Unclip.load(models).generate(captions, n=1,
seed=0)``) on the first ``--n`` one-object and ``--n`` two-object test captions (``pick_rows``);
``--images-npz`` reads saved images (``images`` uint8 [N, 3, 64, 64], ``captions``, ``gt``: a json
string per row or one json list).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage, optimize

# ---- the grammar of CORPUS.md, as numbers (not imported from the pipeline) ---------------------
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "cyan": (40, 200, 210), "pink": (240, 120, 180),
}
SHAPES = ("circle", "square", "triangle")
HALF_WIDTHS = {"small": 0.12, "large": 0.22}
GRID = (0.2, 0.5, 0.8)
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
UNCLEAR = "unclear"

# ---- the reader's settings (tuned on real test images; see the module doc) ------------------------
SIZE = 64                          # px the reader works at
RING = 2                           # px of border ring for the background
FG_DISTANCE = 40.0                 # RGB distance from the background that makes a pixel foreground
CORE = 0.75                        # core pixels: coverage at least this (color votes, color median)
MIN_AREA = 24.0                    # px of coverage: smaller components are specks
COLOR_SHARE = 0.15                 # a second palette color needs this share of a component's core ...
SPLIT_DISTANCE = 0.25              # ... and its core's centre this far (of the canvas) from the first's
SIZE_SPLIT = math.sqrt(HALF_WIDTHS["small"] * HALF_WIDTHS["large"])   # 0.1625 of the canvas
MIN_IOU = 0.85                     # the best silhouette covers the object this well (real: >= 0.92)
MIN_DISTINCT = 0.4                 # ... distinct from the runner-up silhouette (real: >= 0.84)
MAX_BLUR = 2.4                     # ... and a Gaussian blur of at most this (px; real <= 1.27, 8 px blobs >= 2.8)
SHARP_BLUR = 1.35                  # figures only: as sharp as a real image (or one through 32 px and back)
FIT_MARGIN = 6                     # px around an object's box where its fit is measured

_PAL_NAMES = tuple(PALETTE)
_PAL = np.array([PALETTE[c] for c in _PAL_NAMES], dtype=np.float64)
_BG_NAMES = tuple(BACKGROUNDS)
_BG = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float64)


# ---- silhouettes: signed distance (px, negative inside) of each shape ------------------------------
def signed_distance(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, h: float,
                    theta: float) -> np.ndarray:
    """``h``: half-width (circle: radius; square: half side; triangle: half base, apex up at
    ``theta`` = 0, image y pointing down); ``theta`` in radians."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return np.hypot(dx, dy) - h
    c, s = math.cos(theta), math.sin(theta)
    if shape == "square":
        u, v = dx * c + dy * s, -dx * s + dy * c
        return np.maximum(np.abs(u), np.abs(v)) - h
    # equilateral triangle: outward edge normals at 90 (the base, down), 210 and 330 degrees
    d = None
    for phi in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6):
        a = phi + theta
        e = dx * math.cos(a) + dy * math.sin(a)
        d = e if d is None else np.maximum(d, e)
    return d - h / math.sqrt(3)


def coverage_model(shape: str, x, y, params) -> np.ndarray:
    """The sharp silhouette anti-aliased by a 1 px box filter, then blurred by a Gaussian of
    ``blur`` px: coverage 0..1 per pixel."""
    cx, cy, h, theta, blur = params
    sharp = np.clip(0.5 - signed_distance(shape, x, y, cx, cy, h, theta), 0.0, 1.0)
    return ndimage.gaussian_filter(sharp, blur, mode="nearest", truncate=3.0) if blur > 0.05 else sharp


_SHAPE_AREA = {"circle": math.pi, "square": 4.0, "triangle": math.sqrt(3.0)}   # area / h^2
_STARTS = {"circle": (0.0,), "square": (-0.35, 0.0, 0.35), "triangle": (-0.5, 0.0, 0.5)}   # radians


def fit_shape(shape: str, alpha: np.ndarray, weight: np.ndarray, x: np.ndarray, y: np.ndarray,
              centre: tuple[float, float], area: float) -> dict:
    """Least-squares fit of one silhouette to the coverage ``alpha`` (pixels of ``weight`` 1)."""
    h0 = math.sqrt(max(area, 1.0) / _SHAPE_AREA[shape])
    w = weight.astype(np.float64)

    def full(q):                       # a circle has no rotation to fit
        return (q[0], q[1], q[2], 0.0, q[3]) if shape == "circle" else tuple(q)

    def loss(q):
        p = full(q)
        if p[2] <= 0.5 or not 0.0 <= p[4] <= 6.0:
            return 1e9
        r = coverage_model(shape, x, y, p) - alpha
        return float((w * r * r).sum())

    best = None
    for t0 in _STARTS[shape]:
        q0 = [centre[0], centre[1], h0, 0.7] if shape == "circle" else [centre[0], centre[1], h0, t0, 0.7]
        res = optimize.minimize(loss, np.array(q0), method="Powell",
                                options={"xtol": 1e-2, "ftol": 1e-4, "maxfev": 1500})
        if best is None or res.fun < best.fun:
            best = res
    p = full(best.x)
    model = coverage_model(shape, x, y, p)
    inside_m, inside_a = (model >= 0.5) & weight, (alpha >= 0.5) & weight
    union = (inside_m | inside_a).sum()
    iou = float((inside_m & inside_a).sum() / union) if union else 0.0
    theta = float(p[3]) if shape != "circle" else 0.0
    return {"shape": shape, "cx": float(p[0]), "cy": float(p[1]), "h": float(abs(p[2])), "theta": theta,
            "blur": round(float(p[4]), 3), "loss": float(best.fun), "iou": round(iou, 4), "_model": model}


# ---- reading one image ------------------------------------------------------------------------------
def _nearest(table: np.ndarray, rgb: np.ndarray) -> int:
    return int(np.argmin(((table - rgb) ** 2).sum(-1)))


def _segment_alpha(rgb: np.ndarray, bg: np.ndarray, color: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: coverage along the segment background -> color, and the distance off it."""
    d = color - bg
    dd = max(float(d @ d), 1e-6)
    t = ((rgb - bg) @ d) / dd
    a = np.clip(t, 0.0, 1.0)
    off = np.linalg.norm(rgb - (bg + a[..., None] * d), axis=-1)
    return a, off


def grid_position(x: float, y: float) -> str:
    """Canvas fractions -> the nearest of the 3x3 cells."""
    col = int(np.argmin([abs(x - g) for g in GRID]))
    row = int(np.argmin([abs(y - g) for g in GRID]))
    return POSITIONS[3 * row + col]


def read_image(image) -> dict:
    """One image (uint8 [3, H, W] or [H, W, 3], 64 px) -> what the reader sees: background,
    objects (color, shape, size, position, centre, fit figures), in the corpus's words."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    if img.shape[:2] != (SIZE, SIZE):
        from PIL import Image
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC))
    rgb = img.astype(np.float64)
    n = rgb.shape[0]
    ii, jj = np.mgrid[0:n, 0:n]
    ring = np.minimum(np.minimum(ii, jj), np.minimum(n - 1 - ii, n - 1 - jj)) < RING
    bg = np.median(rgb[ring], axis=0)
    background = _BG_NAMES[_nearest(_BG, bg)]
    dist = np.linalg.norm(rgb - bg, axis=-1)
    fg = dist > FG_DISTANCE
    labels, n_comp = ndimage.label(fg, structure=np.ones((3, 3)))

    # every foreground pixel to the palette color whose background->color segment passes nearest
    seg = [_segment_alpha(rgb, bg, _PAL[k]) for k in range(len(_PAL))]
    offs = np.stack([o for _, o in seg])
    nearest = np.argmin(offs, axis=0)
    pal_alpha = np.take_along_axis(np.stack([a for a, _ in seg]), nearest[None], 0)[0]

    # objects: (boolean mask, object RGB)
    found: list[tuple[np.ndarray, np.ndarray]] = []
    for k in range(1, n_comp + 1):
        comp = labels == k
        core = comp & (pal_alpha >= CORE)
        if not core.any():
            continue
        votes = Counter(nearest[core].tolist())
        need = max(8, COLOR_SHARE * core.sum())
        present = [c for c, v in votes.most_common() if v >= need] or [votes.most_common(1)[0][0]]
        cols = {c: np.median(rgb[core & (nearest == c)], axis=0) for c in present}
        if len(present) > 1:
            # two objects only when their colors' cores lie apart (real pairs: centres >= 0.4 of the
            # canvas apart); a mottled single blob keeps its majority color
            cores = [np.argwhere(core & (nearest == c)).mean(axis=0) for c in present]
            if max(np.hypot(*(a - b)) for a in cores for b in cores) < SPLIT_DISTANCE * n:
                present = present[:1]
        if len(present) == 1:
            found.append((comp, cols[present[0]]))
            continue
        # touching objects: each pixel to the nearest background->object color segment
        owner = np.argmin(np.stack([_segment_alpha(rgb, bg, cols[c])[1] for c in present]), axis=0)
        for j, c in enumerate(present):
            part = comp & (owner == j)
            sub, m = ndimage.label(part, structure=np.ones((3, 3)))
            if m == 0:
                continue
            sizes = ndimage.sum(part, sub, range(1, m + 1))
            found.append((sub == (1 + int(np.argmax(sizes))), cols[c]))

    x, y = jj + 0.5, ii + 0.5
    objects = []
    for mask, col in found:
        alpha, _ = _segment_alpha(rgb, bg, col)
        area = float(alpha[mask].sum())
        if area < MIN_AREA:
            continue
        objects.append({"color": _PAL_NAMES[_nearest(_PAL, col)], "rgb": [round(float(v), 1) for v in col],
                        "area": round(area, 1), "_alpha": alpha, "_mask": mask})
    all_masks = [o["_mask"] for o in objects]
    for o in objects:
        mask, alpha = o.pop("_mask"), o.pop("_alpha")
        others = np.zeros_like(mask)
        for m in all_masks:
            if m is not mask:
                others |= m
        rows, cols_ = np.nonzero(mask)
        r0, r1 = max(rows.min() - FIT_MARGIN, 0), min(rows.max() + FIT_MARGIN + 1, n)
        c0, c1 = max(cols_.min() - FIT_MARGIN, 0), min(cols_.max() + FIT_MARGIN + 1, n)
        sl = (slice(r0, r1), slice(c0, c1))
        weight = ~others[sl]                                      # the other object is left out
        a = np.where(weight, alpha[sl], 0.0)
        w_a = a * weight
        cx = float((w_a * x[sl]).sum() / max(w_a.sum(), 1e-6))
        cy = float((w_a * y[sl]).sum() / max(w_a.sum(), 1e-6))
        fits = {s: fit_shape(s, a, weight, x[sl], y[sl], (cx, cy), o["area"]) for s in SHAPES}
        best, second = sorted(fits.values(), key=lambda f: f["loss"])[:2]
        covers = best["iou"] >= MIN_IOU
        apart = float((weight * (best["_model"] - second["_model"]) ** 2).sum())
        distinct = (second["loss"] - best["loss"]) / max(apart, 1e-9)
        clear = covers and distinct >= MIN_DISTINCT and best["blur"] <= MAX_BLUR
        h = best["h"] / n
        o |= {"shape": best["shape"] if clear else UNCLEAR, "silhouette": best["shape"] if covers else UNCLEAR,
              "best_fit": best["shape"], "blur": best["blur"], "distinct": round(distinct, 3),
              "size": "small" if h < SIZE_SPLIT else "large", "half_width": round(h, 4),
              "x": round(best["cx"] / n, 4), "y": round(best["cy"] / n, 4),
              "centroid": [round(cx / n, 4), round(cy / n, 4)],
              "position": grid_position(best["cx"] / n, best["cy"] / n),
              "fit": {s: {"iou": f["iou"], "blur": f["blur"], "loss": round(f["loss"], 3)} for s, f in fits.items()}}
    out = {"background": background, "background_rgb": [round(float(v), 1) for v in bg],
           "n_objects": len(objects), "objects": objects}
    if len(objects) == 2:
        a, b = objects
        horizontal = abs(a["x"] - b["x"]) >= abs(a["y"] - b["y"])
        key = "x" if horizontal else "y"
        first, second = (a, b) if a[key] <= b[key] else (b, a)
        out |= {"axis": "horizontal" if horizontal else "vertical", "first": first["color"], "second": second["color"]}
    return out


# ---- checks against a caption's truth (as pipeline.judge.labels.check defines them) -----------------
def parse_truth(gt) -> Optional[dict]:
    if gt is None:
        return None
    return json.loads(gt) if isinstance(gt, str) else gt


def canonical(gt: dict) -> tuple[str, dict, dict]:
    """(axis, first, second) of a two-object truth: first = the left (or upper) object."""
    o0, o1 = gt["objects"]
    rel = gt["relation"]
    axis = "horizontal" if rel in ("left of", "right of") else "vertical"
    return (axis, o0, o1) if rel in ("left of", "above") else (axis, o1, o0)


def check(read: dict, gt) -> dict[str, bool]:
    gt = parse_truth(gt)
    objs = gt["objects"]
    one = read["n_objects"] == len(objs)
    if len(objs) == 1:
        t, r = objs[0], (read["objects"][0] if one else {})
        v = {"count": one} | {k: one and r.get(k) == t[k] for k in ("color", "shape", "size", "position")}
        v["all"] = all(v[k] for k in ("color", "shape", "size", "position"))
        v["silhouette"] = one and r.get("silhouette") == t["shape"]
        return v
    axis, a, b = canonical(gt)
    seen = {o["color"]: o["shape"] for o in read["objects"]} if one else {}
    outline = {o["color"]: o["silhouette"] for o in read["objects"]} if one else {}
    named = {a["color"]: a["shape"], b["color"]: b["shape"]}
    colors = one and len(seen) == 2 and set(seen) == set(named)
    v = {"count": one, "colors": colors,
         "shapes": colors and all(seen[c] == s for c, s in named.items()),
         "relation": one and read.get("axis") == axis and read.get("first") == a["color"]
         and read.get("second") == b["color"]}
    v["all"] = v["colors"] and v["shapes"] and v["relation"]
    v["silhouettes"] = colors and all(outline[c] == s for c, s in named.items())
    return v


SINGLE_CHECKS = ("count", "color", "shape", "size", "position", "all", "silhouette")
PAIR_CHECKS = ("count", "colors", "shapes", "relation", "all", "silhouettes")


def percent(ok: list[bool]) -> tuple[Optional[float], Optional[float]]:
    """Percent right and its binomial standard error."""
    n = len(ok)
    if not n:
        return None, None
    p = sum(ok) / n
    return round(100 * p, 2), round(100 * math.sqrt(p * (1 - p) / n), 2)


def figures(reads: list[dict], gts: list) -> dict:
    """The judged figures' shape (``single`` / ``pair`` percentages with ``n``), their standard
    errors, the one-object shape confusion (true -> read) and size confusion, the background."""
    out: dict = {}
    se: dict = {}
    for kind, names, n_obj in (("single", SINGLE_CHECKS, 1), ("pair", PAIR_CHECKS, 2)):
        verdicts = [check(r, g) for r, g in zip(reads, gts) if len(parse_truth(g)["objects"]) == n_obj]
        out[kind], se[kind] = {"n": len(verdicts)}, {"n": len(verdicts)}
        for k in names:
            out[kind][k], se[kind][k] = percent([v[k] for v in verdicts])
    shape_conf: dict = {s: Counter() for s in SHAPES}
    size_conf: dict = {s: Counter() for s in HALF_WIDTHS}
    for r, g in zip(reads, gts):
        g = parse_truth(g)
        if len(g["objects"]) != 1:
            continue
        t = g["objects"][0]
        got = r["objects"][0] if r["n_objects"] == 1 else None
        shape_conf[t["shape"]][got["shape"] if got else f"{r['n_objects']} objects"] += 1
        size_conf[t["size"]][got["size"] if got else f"{r['n_objects']} objects"] += 1
    bg_ok = [r["background"] == parse_truth(g)["background"] for r, g in zip(reads, gts)]
    b = np.array([o["blur"] for r in reads for o in r["objects"]])
    distinct = np.array([o["distinct"] for r in reads for o in r["objects"]])
    blur = ({"median": round(float(np.median(b)), 2), "p10": round(float(np.percentile(b, 10)), 2),
             "p90": round(float(np.percentile(b, 90)), 2),
             "sharp_as_real_pct": round(100 * float((b <= SHARP_BLUR).mean()), 2),
             "blob_pct": round(100 * float((b > MAX_BLUR).mean()), 2),
             "ambiguous_pct": round(100 * float((distinct < MIN_DISTINCT).mean()), 2), "n_objects": len(b)}
            if len(b) else None)
    return {"quality": out, "standard_error": se,
            "shape_confusion": {s: dict(sorted(c.items())) for s, c in shape_conf.items()},
            "size_confusion": {s: dict(sorted(c.items())) for s, c in size_conf.items()},
            "background_read_right": percent(bg_ok)[0], "blur_px": blur}


def describe(read: dict) -> str:
    objs = "; ".join(f"{o['size']} {o['color']} {o['shape']} @{o['position']} (fit {o['best_fit']} "
                     f"iou {o['fit'][o['best_fit']]['iou']} blur {o['blur']} distinct {o['distinct']}, h {o['half_width']})"
                     for o in read["objects"])
    rel = f" [{read['axis']}: {read['first']} then {read['second']}]" if "axis" in read else ""
    return f"{read['background']}: {read['n_objects']} objects: {objs}{rel}"


def truth_text(gt) -> str:
    g = parse_truth(gt)
    objs = "; ".join(f"{o['size']} {o['color']} {o['shape']} @{o['position']}" for o in g["objects"])
    return f"{g['background']}: {objs}" + (f" [{g['relation']}]" if g.get("relation") else "")


def read_all(images, gts: list, captions: list) -> tuple[list[dict], list[dict]]:
    """Readings of every image, and the failed ones (index, caption, truth, reading, failed checks)."""
    reads, failures = [], []
    for i, (img, g) in enumerate(zip(images, gts)):
        r = read_image(np.asarray(img))
        reads.append(r)
        failed = [k for k, ok in check(r, g).items() if not ok and k not in ("all", "silhouette", "silhouettes")]
        if failed:
            failures.append({"index": i, "caption": captions[i] if captions else None, "failed": failed,
                             "truth": truth_text(g), "read": describe(r)})
    return reads, failures


# ---- the bench ---------------------------------------------------------------------------------------
def print_table(title: str, fig: dict) -> None:
    q, se = fig["quality"], fig["standard_error"]
    print(f"{title}  (percent right ± standard error)")
    print(f"  one object  (n={q['single']['n']}): " + "  ".join(
        f"{k} {q['single'][k]} ± {se['single'][k]}" for k in SINGLE_CHECKS if q['single'][k] is not None))
    print(f"  two objects (n={q['pair']['n']}): " + "  ".join(
        f"{k} {q['pair'][k]} ± {se['pair'][k]}" for k in PAIR_CHECKS if q['pair'][k] is not None))
    print("  one-object shapes, true -> read: " + "; ".join(
        f"{t}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for t, c in fig["shape_confusion"].items()))
    print("  one-object sizes, true -> read: " + "; ".join(
        f"{t}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for t, c in fig["size_confusion"].items()))
    e = fig["blur_px"]
    if e:
        print(f"  blur of the fitted silhouettes (Gaussian px) over {e['n_objects']} objects: median {e['median']} "
              f"(p10 {e['p10']}, p90 {e['p90']}); {e['sharp_as_real_pct']}% as sharp as real images (<= {SHARP_BLUR}), "
              f"{e['blob_pct']}% blobs (> {MAX_BLUR}); {e['ambiguous_pct']}% ambiguous (distinct < {MIN_DISTINCT})")


def load_npz(path: Path) -> tuple[np.ndarray, list, list]:
    z = np.load(path, allow_pickle=False)
    images = z["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        sys.exit(f"{path}: images must be uint8 [N, 3, H, W], not {images.dtype} {list(images.shape)}")
    gt = z["gt"]
    gts = json.loads(str(gt)) if gt.ndim == 0 else [json.loads(str(g)) for g in gt]
    captions = [str(c) for c in z["captions"]] if "captions" in z.files else [None] * len(gts)
    if not len(images) == len(gts) == len(captions):
        sys.exit(f"{path}: {len(images)} images, {len(gts)} truths, {len(captions)} captions")
    return images, gts, captions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--n", type=int, default=256, help="one-object and two-object test captions each")
    ap.add_argument("--source", choices=("real", "generated"), default="real")
    ap.add_argument("--models", default=None, help="default: <workspace>/models")
    ap.add_argument("--images-npz", default=None, help="read these saved images instead (images, captions, gt)")
    ap.add_argument("--save-npz", default=None, help="also save the images read (for --images-npz)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="default: <workspace>/reports/bench/independent_reader.json")
    ap.add_argument("--failures", type=int, default=1000, help="failed readings kept in the json (at most)")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pipeline.workspace import Workspace, atomic_write_json   # only to find and write files
    ws = Workspace.at(args.workspace)
    t0 = time.perf_counter()
    info: dict = {"reader": {"fg_distance": FG_DISTANCE, "min_area_px": MIN_AREA, "min_iou": MIN_IOU,
                             "min_distinct": MIN_DISTINCT, "max_blur_px": MAX_BLUR, "sharp_blur_px": SHARP_BLUR, "size_split_half_width": round(SIZE_SPLIT, 4),
                             "size_px": SIZE}}
    if args.images_npz:
        images, gts, captions = load_npz(Path(args.images_npz))
        info |= {"source": "npz", "images_npz": str(args.images_npz)}
        meta = np.load(args.images_npz).get("meta")
        if meta is not None:                            # what wrote the file (--save-npz)
            info["npz_meta"] = {k: v for k, v in json.loads(str(meta)).items() if k != "reader"}
    else:
        import torch
        from pipeline.data.shards import shard_paths
        from pipeline.data.embedding_shards import load_split
        from pipeline.evaluate import pick_rows
        paths = shard_paths(ws.embeddings)
        if not paths:
            sys.exit(f"no embedding shards in {ws.embeddings}: run the embed stage first")
        test = load_split(paths, "test", image_size=SIZE)
        rows = pick_rows(test["gt"], args.n, args.n)
        if not rows:
            sys.exit("no test captions with ground truth in the embeddings")
        gts = [parse_truth(test["gt"][i]) for i in rows]
        captions = [test["captions"][i] for i in rows]
        info |= {"source": args.source, "n_asked": args.n, "seed": args.seed}
        if args.source == "real":
            images = test["images"][torch.tensor(rows)].numpy()
        else:
            from pipeline.generate import Unclip
            models = Path(args.models) if args.models else ws.root / "models"
            unclip = Unclip.load(models)
            print(f"sampling the cascade ({models}) on {len(captions)} test captions, seed {args.seed}", flush=True)
            out = unclip.generate(captions, n=1, seed=args.seed, batch_size=args.batch_size)
            images = out["images"].numpy()
            info |= {"models": str(models), "sizes": unclip.sizes, "nfe": out["nfe"],
                     "sample_seconds": out["seconds"]}
    if args.save_npz:
        Path(args.save_npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.save_npz, images=np.asarray(images, dtype=np.uint8), captions=np.array(captions, dtype=str),
                            gt=np.array([json.dumps(g) for g in gts]), meta=np.array(json.dumps(info, default=str)))
        info["saved_npz"] = str(args.save_npz)
    reads, failures = read_all(images, gts, captions)
    fig = figures(reads, gts)
    info |= {"n_images": len(images), "image_size": int(images.shape[-1]), **fig,
             "n_failed": len(failures), "failures": failures[:args.failures],
             "seconds": round(time.perf_counter() - t0, 1)}
    print_table(f"independent reader on {info['source']} images", fig)
    out_path = Path(args.out) if args.out else ws.reports / "bench" / "independent_reader.json"
    atomic_write_json(out_path, info)
    print(f"-> {out_path}")


if __name__ == "__main__":
    main()
