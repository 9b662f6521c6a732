"""Benchmark: the applications of the unCLIP latent on held-out corpus test images, scored by the
judge (issue 6's figures).

    python bench/applications.py [--workspace .] [--n 64] [--steps 100] [--out reports/applications]
        [--textdiff-caption none|after] [--textdiff-guidance 1.0] [--skip vary,inpaint]

Needs a workspace after `make run`. On the first ``--n`` one-object test images (no planted
mismatches):

- reconstruction through DDIM inversion of the decoder: PSNR against the input at the decoder's
  resolution;
- variations (each eta of the bipartite latent, and fresh noise): cos(CLIP(variation), z_i of the
  source) and PSNR against the source at the final resolution (identical would be infinite);
- text diffs "a <color> <shape>" -> "a <other color> <shape>" over theta: the judge sees the new
  color (target) and keeps shape, size and position (kept); with ``--textdiff-caption after`` the
  decoder also gets the target caption (and ``--textdiff-guidance`` its guidance scale);
- inpainting: the object's box (its half-width + 0.08 of the canvas) repainted with the caption
  "a <size> <other color> <shape> in the <position>": pixels outside the mask unchanged (max
  |difference|), and the judge sees the caption's color there.

Prints a table per application and writes ``applications.json`` and sample grids to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.applications import edits  # noqa: E402
from pipeline.clip.zeroshot import canonical_caption  # noqa: E402
from pipeline.applications.files import join, save_rows  # noqa: E402
from pipeline.data.scenes import COLORS, SIZES  # noqa: E402
from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.data.embedding_shards import load_split  # noqa: E402
from pipeline.evaluate import pick_rows  # noqa: E402
from pipeline.generate import Unclip  # noqa: E402
from pipeline.images import psnr  # noqa: E402
from pipeline.judge.labels import VOCAB, parse_gt  # noqa: E402
from pipeline.judge.model import Judge  # noqa: E402
from pipeline.workspace import Workspace  # noqa: E402

MARGIN = 0.08


def other_color(color: str, k: int) -> str:
    names = list(COLORS)
    return names[(names.index(color) + 1 + k % (len(names) - 1)) % len(names)]


def read(judge: Judge, images: torch.Tensor) -> list[dict]:
    preds, _ = judge.predict(images)
    return [{h: VOCAB[h][i] for h, i in p.items()} for p in preds]


def pct(xs) -> float:
    xs = list(xs)
    return round(100 * sum(xs) / max(len(xs), 1), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=edits.INVERSION_STEPS)
    ap.add_argument("--thetas", default="0,0.2,0.3,0.4,0.5,0.6")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--textdiff-caption", choices=("none", "after", "before_after"), default="none",
                    help="the decoder's text condition in text diffs: none (z_theta alone) or the target caption")
    ap.add_argument("--textdiff-guidance", type=float, default=1.0)
    ap.add_argument("--textdiff-captions", choices=("short", "full"), default="short",
                    help="short: 'a red circle' -> 'a blue circle'; full: the whole description, size and "
                         "position words on both sides ('a small red circle in the top left' -> 'a small blue ...')")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: vary,inpaint")
    ap.add_argument("--out", default="reports/applications")
    args = ap.parse_args()
    ws = Workspace.at(args.workspace)
    out = ws.root / args.out
    out.mkdir(parents=True, exist_ok=True)
    unclip = Unclip.load(ws.root / "models")
    judge = Judge.load(ws.judge, unclip.device)
    size = unclip.sizes[-1]
    test = load_split(shard_paths(ws.embeddings), "test", image_size=size)
    rows = pick_rows(test["gt"], args.n, 0)
    images = test["images"][torch.tensor(rows)]
    objs = [parse_gt(test["gt"][i])["objects"][0] for i in rows]
    figures: dict = {"n": len(rows), "steps": args.steps, "seed": args.seed, "sizes": unclip.sizes}
    print(f"{len(rows)} one-object test images; decoder at {unclip.sizes[0]} px, final {size} px; "
          f"{args.steps} DDIM steps for inversion and sampling", flush=True)

    skip = set(filter(None, args.skip.split(",")))
    k = min(8, len(rows))
    # 1. reconstruction and variations
    if "vary" not in skip:
        t0 = time.perf_counter()
        res = edits.vary(unclip, images, seed=args.seed, etas=(0.0, 0.5, 1.0), n=1, steps=args.steps)
        z_src = res["z_i"]
        var = {}
        for name, imgs in [(f"eta {e:g}", x) for e, x in res["by_eta"].items()] + [("fresh noise", res["fresh"])]:
            with torch.no_grad():
                z = unclip.clip.encode_image(imgs.to(unclip.device)).float().cpu()
            p = psnr(imgs, images)
            var[name] = {"cos_to_source": round(F.cosine_similarity(z, z_src).mean().item(), 4),
                         "psnr_to_source_db": round(p.mean().item(), 2),
                         "identical": int((imgs == images).flatten(1).all(1).sum())}
        figures["reconstruction"] = {"psnr_db_mean": round(res["psnr"].mean().item(), 2),
                                     "psnr_db_median": round(res["psnr"].median().item(), 2),
                                     "psnr_db_min": round(res["psnr"].min().item(), 2),
                                     "at_px": unclip.sizes[0]}
        figures["variations"] = var
        figures["vary_seconds"] = round(time.perf_counter() - t0, 1)
        save_rows([("input", images[:k]), ("reconstruction (decoder px)", res["reconstruction"][:k])]
                  + [(f"eta {e:g}", x[:k]) for e, x in res["by_eta"].items()] + [("fresh noise", res["fresh"][:k])],
                  out / "variations.png")
        print(f"reconstruction PSNR at {unclip.sizes[0]} px: mean {figures['reconstruction']['psnr_db_mean']} dB "
              f"(median {figures['reconstruction']['psnr_db_median']}, min {figures['reconstruction']['psnr_db_min']})")
        for name, v in var.items():
            print(f"  variations {name:12s} cos to source {v['cos_to_source']:.4f}  PSNR to source "
                  f"{v['psnr_to_source_db']:.2f} dB  identical {v['identical']}/{len(rows)}")

    # 2. text diffs: one attribute (the color)
    t0 = time.perf_counter()
    thetas = [float(t) for t in args.thetas.split(",")]
    new = [other_color(o["color"], j) for j, o in enumerate(objs)]
    if args.textdiff_captions == "full":
        before = [canonical_caption(o["color"], o["shape"], o["size"], o["position"]) for o in objs]
        after = [canonical_caption(c, o["shape"], o["size"], o["position"]) for c, o in zip(new, objs)]
    else:
        before = [f"a {o['color']} {o['shape']}" for o in objs]
        after = [f"a {c} {o['shape']}" for c, o in zip(new, objs)]
    td = edits.textdiff(unclip, images, before, after, thetas=thetas, seed=args.seed, steps=args.steps,
                        caption=args.textdiff_caption, guidance=args.textdiff_guidance)
    by_theta = {}
    for theta, imgs in td["by_theta"].items():
        seen = read(judge, imgs)
        by_theta[f"{theta:g}"] = {
            "target": pct(s["count"] == 1 and s["color"] == c for s, c in zip(seen, new)),
            "kept": pct(s["count"] == 1 and all(s[a] == o[a] for a in ("shape", "size", "position"))
                        for s, o in zip(seen, objs)),
            "kept_per_attribute": {a: pct(s["count"] == 1 and s[a] == o[a] for s, o in zip(seen, objs))
                                   for a in ("shape", "size", "position")}}
    best = max(by_theta, key=lambda t: (min(by_theta[t]["target"], by_theta[t]["kept"]), by_theta[t]["target"]))
    figures["textdiff"] = {"edit": "color", "by_theta": by_theta, "chosen_theta": float(best),
                           "decoder_caption": args.textdiff_caption, "guidance": args.textdiff_guidance,
                           "captions": args.textdiff_captions, "example": [before[0], after[0]],
                           "seconds": round(time.perf_counter() - t0, 1)}
    save_rows([("input", images[:k])] + [(f"theta {t:g}", x[:k]) for t, x in td["by_theta"].items()],
              out / "textdiff.png")
    print("text diffs (color): " + "; ".join(f"theta {t}: target {v['target']}% kept {v['kept']}%"
                                              for t, v in by_theta.items()) + f"; chosen theta {best}")

    # 3. inpainting: the object's box, repainted in another color
    if "inpaint" not in skip:
        t0 = time.perf_counter()
        masks = torch.zeros(len(rows), 1, size, size)
        for j, o in enumerate(objs):
            h = SIZES[o["size"]] + MARGIN
            x0, x1 = max(0, round((o["x"] - h) * size)), min(size, round((o["x"] + h) * size))
            y0, y1 = max(0, round((o["y"] - h) * size)), min(size, round((o["y"] + h) * size))
            masks[j, :, y0:y1, x0:x1] = 1
        captions = [f"a {o['size']} {c} {o['shape']} in the {o['position']}" for c, o in zip(new, objs)]
        inp = edits.inpaint(unclip, images, masks, captions, seed=args.seed, steps=args.steps)
        keep = (masks == 0).expand_as(images)
        outside = (inp["images"].int() - images.int()).abs()[keep]
        seen = read(judge, inp["images"])
        figures["inpaint"] = {"max_abs_change_outside_mask": int(outside.max()) if outside.numel() else 0,
                              "caption_color_inside": pct(s["count"] == 1 and s["color"] == c for s, c in zip(seen, new)),
                              "caption_color_and_shape": pct(s["count"] == 1 and s["color"] == c and s["shape"] == o["shape"]
                                                             for s, c, o in zip(seen, new, objs)),
                              "mask_fraction_mean": round(masks.mean().item(), 3),
                              "seconds": round(time.perf_counter() - t0, 1)}
        shown = (images.float() * (1 - 0.6 * masks)).round().to(torch.uint8)
        save_rows([("input", images[:k]), ("mask", shown[:k]), ("inpainted", inp["images"][:k])], out / "inpaint.png")
        print(f"inpainting: max |change| outside the mask {figures['inpaint']['max_abs_change_outside_mask']}; "
              f"caption's color inside {figures['inpaint']['caption_color_inside']}% "
              f"(color and shape {figures['inpaint']['caption_color_and_shape']}%)")

        # 4. interpolation: one strip, for the eye
        inter = edits.interpolate(unclip, images[:1], images[1:2], frames=8, seed=args.seed, steps=args.steps)
        save_rows([("interpolation", join([images[:1], inter["frames"], images[1:2]]))], out / "interpolation.png")

    (out / "applications.json").write_text(json.dumps(figures, indent=1))
    print(f"-> {out}/ (applications.json, variations.png, textdiff.png, inpaint.png, "
          f"interpolation.png)")


if __name__ == "__main__":
    main()
