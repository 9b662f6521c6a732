"""The first N single-object test captions through the trained cascade, for counting by eye.

    python bench/single_object_grid.py [--workspace .] [--n 32] [--seed 0] [--out single_object.png]

Writes a grid (one caption per row: the generated image, then the real test image) and prints
each caption with its ground truth (color, shape, size, position), so a reviewer can count how
many images show the named color and shape in the named region. (Issue 4 replaces the eye with
a trained judge.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.data.embedding_shards import load_split  # noqa: E402
from pipeline.generate import Unclip  # noqa: E402
from pipeline.images import grid, save_png  # noqa: E402
from pipeline.workspace import Workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="single_object.png")
    args = ap.parse_args()
    ws = Workspace.at(args.workspace)
    unclip = Unclip.load(ws.root / "models")
    test = load_split(shard_paths(ws.embeddings), "test", image_size=unclip.sizes[-1])
    rows = [i for i, gt in enumerate(test["gt"])
            if gt and not gt.get("mismatched") and len(gt.get("objects", [])) == 1][:args.n]
    if not rows:
        sys.exit(f"{ws.embeddings}: no single-object test captions with ground truth")
    captions = [test["captions"][i] for i in rows]
    out = unclip.generate(captions, n=1, seed=args.seed)
    pairs = torch.stack([torch.stack([g, test["images"][i]]) for g, i in zip(out["images"], rows)]).flatten(0, 1)
    save_png(grid(pairs, 2, scale=max(1, 64 // pairs.shape[-1]), row_labels=captions), Path(args.out))
    for k, (c, i) in enumerate(zip(captions, rows)):
        o = test["gt"][i]["objects"][0]
        print(f"{k:3d}  {c:<70}  {o['color']} {o['shape']}, {o['size']}, {o['position']}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
