"""Where the cascade's background noise is: by stage, by distance to the objects, by spatial
frequency, one-object against two-object scenes, and with the stray objects' rims counted or not.

    python bench/background_noise.py [--workspace .] [--n 256] [--seed 0] [--rims 0,1,2]
                                     [--out <workspace>/reports/background_noise]

The whole cascade runs on ``--n`` one-object and ``--n`` two-object held-out test captions (as
``evaluate`` picks them, one seed), and every stage's output, taken bicubically to the final size
as ``evaluate`` does, is read beside the real test images of the same captions and those real
images taken down to each base size and back (what the base resolution alone costs). Per set of
images, in 8-bit levels (``pipeline.background``):

    noise        evaluate's figure (stray pixels and their 1 px rim left out)
    rims r=R     the same with the pixels within R px of a stray pixel left out (0: the rim counted,
                 evaluate's ``noise_with_rims``)
    near / far   the noise in the ring 0.08-0.16 of the canvas around the truth's boxes / beyond it
    low-pass     the noise of the 7x7 local mean (a smooth drift reads here, pixel speckle does not)
    one / two    the noise of the one-object / two-object scenes
    quantiles    of the per-image noise: 50th, 75th, 90th percentiles

Writes ``background_noise.json`` and ``stages.png``: for 12 of the captions, each stage's image
above its deviation from its median color amplified 8 times (gray = flat).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import background  # noqa: E402
from pipeline.data.embedding_shards import load_split  # noqa: E402
from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.evaluate import pick_rows, stage_names  # noqa: E402
from pipeline.generate import Unclip  # noqa: E402
from pipeline.images import resize, to_model, to_uint8  # noqa: E402
from pipeline.judge.labels import parse_gt  # noqa: E402
from pipeline.workspace import Workspace, atomic_write_json  # noqa: E402

NEAR = 0.16         # of the canvas: the outer edge of the near band (its inner edge is background.MARGIN)


def regions(images: torch.Tensor, gts: list) -> dict:
    """Mean noise of the near band, the far part and the 7x7 low-pass image over the background
    (``background.region_noise`` with only the stray pixels left out, not their rims)."""
    x = images.double()
    low = F.avg_pool2d(F.pad(x, (3, 3, 3, 3), mode="replicate"), 7, stride=1)
    out = {"near": [], "far": [], "low_pass": []}
    nan = float("nan")
    for img, lo, g in zip(x, low, gts):
        size = img.shape[-1]
        inner, outer = background.mask(g, size), background.mask(g, size, margin=NEAR)
        out["near"].append(background.region_noise(img, inner & ~outer, edge=0, empty=nan)[0])
        out["far"].append(background.region_noise(img, outer, edge=0, empty=nan)[0])
        out["low_pass"].append(background.region_noise(lo, inner, edge=0, empty=nan)[0])
    return {k: round(float(torch.tensor(v).nanmean()), 3) for k, v in out.items()}


def figures(images: torch.Tensor, gts: list, two: torch.Tensor, rims: list[int]) -> dict:
    n, stray = background.noise(images, gts)
    q = torch.quantile(n, torch.tensor([0.5, 0.75, 0.9], dtype=torch.float64)).tolist()
    return {"noise": round(n.mean().item(), 3), "stray_percent": round(100 * stray.mean().item(), 2),
            "rims": {str(r): round(background.noise(images, gts, edge=r)[0].mean().item(), 3) for r in rims},
            **regions(images, gts),
            "one_object": round(n[~two].mean().item(), 3), "two_objects": round(n[two].mean().item(), 3),
            "quantiles_50_75_90": [round(v, 2) for v in q]}


def amplified(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> its deviation from each image's median color, x8, around mid-gray."""
    x = images.float()
    return ((x - x.flatten(2).median(2).values[:, :, None, None]) * 8 + 128).clamp(0, 255).to(torch.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--n", type=int, default=256, help="one-object and two-object test captions each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rims", default="0,1,2", help="px around stray pixels to leave out (at the final size)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ws = Workspace.at(args.workspace)
    out_dir = Path(args.out) if args.out else ws.reports / "background_noise"
    unclip = Unclip.load(ws.root / "models")
    size = unclip.sizes[-1]
    test = load_split(shard_paths(ws.embeddings), "test", image_size=size)
    rows = pick_rows(test["gt"], args.n, args.n)
    captions, gts = [test["captions"][i] for i in rows], [parse_gt(test["gt"][i]) for i in rows]
    two = torch.tensor([len(g["objects"]) == 2 for g in gts])
    real = test["images"][torch.tensor(rows)]
    rims = [int(r) for r in args.rims.split(",")]
    to_final = lambda imgs: to_uint8(resize(to_model(imgs), size))     # noqa: E731

    sets = {"real test images": real}
    for s in unclip.sizes[:-1]:
        sets[f"real, through {s} px and back"] = to_final(to_uint8(resize(to_model(real), s)))
    result = unclip.generate(captions, n=1, seed=args.seed, batch_size=args.batch_size)
    for name, imgs in zip(stage_names(result), result["stages"]):
        sets[name] = to_final(imgs)

    report = {"n_single": args.n, "n_pair": args.n, "seed": args.seed, "sets": {}}
    print(f"{len(rows)} test captions, seed {args.seed}; levels of 8-bit", flush=True)
    for name, imgs in sets.items():
        fig = figures(imgs, gts, two, rims)
        report["sets"][name] = fig
        print(f"{name:32s} noise {fig['noise']:5.2f}  rims " + " ".join(f"r={r} {v:5.2f}" for r, v in fig["rims"].items())
              + f"  near {fig['near']:5.2f} far {fig['far']:5.2f} low-pass {fig['low_pass']:5.2f}"
              + f"  one {fig['one_object']:5.2f} two {fig['two_objects']:5.2f}  quantiles {fig['quantiles_50_75_90']}",
              flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "background_noise.json", report)
    from torchvision.utils import save_image
    shown = [s for name, s in sets.items() if not name.startswith("real,")]
    rows_img = [t for s in shown for t in (s[:12], amplified(s[:12]))]
    save_image(torch.cat(rows_img).float() / 255, str(out_dir / "stages.png"), nrow=12, padding=1)
    print(f"-> {out_dir / 'background_noise.json'}, {out_dir / 'stages.png'}")


if __name__ == "__main__":
    main()
