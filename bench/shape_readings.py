"""Where one-object shape is lost: the judge's shape readings by true shape and size, stage by stage.

    python bench/shape_readings.py [--workspace .] [--n 256] [--seed 0]

The cascade (prior -> decoder -> upsamplers, the bundle's sampling) draws the first ``--n``
one-object test captions as ``evaluate`` picks them; every stage's images are taken bicubically to
the final size and judged. Printed per stage: the shape accuracy, and each (true size, true shape)
-> read shape count, e.g. ``small circle -> square: 19``. The decoder alone from true z_i is
``bench/decoder_variant.py --load models/decoder``. Writes ``shape_readings.json`` to ``--out`` (default ``<workspace>/reports/bench``).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.embedding_shards import load_split  # noqa: E402
from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.evaluate import pick_rows  # noqa: E402
from pipeline.generate import Unclip  # noqa: E402
from pipeline.images import resize, to_model, to_uint8  # noqa: E402
from pipeline.judge.labels import check, parse_gt, readable  # noqa: E402
from pipeline.judge.model import Judge  # noqa: E402
from pipeline.workspace import Workspace, atomic_write_json  # noqa: E402


def readings(judge: Judge, images, gts: list) -> dict:
    """Shape accuracy (%) of uint8 images [N, 3, S, S] and a count per 'size shape -> read'."""
    preds, _ = judge.predict(images)
    counts, right = Counter(), 0
    for p, g in zip(preds, gts):
        truth = parse_gt(g)["objects"][0]
        right += check(p, g)["shape"]
        counts[f"{truth['size']} {truth['shape']} -> {readable(p)['objects'][0]['shape']}"] += 1
    return {"shape": round(100 * right / len(gts), 2), "readings": dict(sorted(counts.items()))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--n", type=int, default=256, help="one-object test captions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="default: <workspace>/reports/bench")
    args = ap.parse_args(argv)
    ws = Workspace.at(args.workspace)
    paths = shard_paths(ws.embeddings)
    if not paths:
        sys.exit(f"no embedding shards in {ws.embeddings}: run the embed stage first")
    try:
        unclip = Unclip.load(ws.root / "models")
        judge = Judge.load(ws.judge, unclip.device)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(str(err))
    size = unclip.sizes[-1]
    test = load_split(paths, "test", image_size=size)
    rows = pick_rows(test["gt"], args.n, 0)
    if not rows:
        sys.exit("no one-object test captions with ground truth in the embeddings")
    captions, gts = [test["captions"][i] for i in rows], [test["gt"][i] for i in rows]
    out = unclip.generate(captions, n=1, seed=args.seed, batch_size=args.batch_size)
    names = ["decoder"] + [f"upsample_{i + 1}" for i in range(len(out["stages"]) - 1)]
    stages = {}
    for name, images in zip(names, out["stages"]):
        stages[name] = readings(judge, to_uint8(resize(to_model(images), size)), gts)
        print(f"{name}: shape {stages[name]['shape']:.2f} %")
        for k, v in stages[name]["readings"].items():
            print(f"  {k}: {v}")
    result = {"n": len(rows), "seed": args.seed, "stages": stages}
    path = Path(args.out or ws.reports / "bench") / "shape_readings.json"
    atomic_write_json(path, result)                   # creates the folder
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
