"""A prior's sampling settings against how close it gets: cos(predicted z_i, true z_i) and
cos(predicted z_i, z_t) on the val split's captions, per guidance scale and temperature.

    python bench/prior_sampling_sweep.py --workspace W [--prior models/prior_autoregressive] \
        [--guidance 1,2] [--temperature 1,0.7,0.5,0.3,0.1] [--candidates 2]

For the autoregressive prior (``prior.kind: autoregressive``), whose temperature trades the
sample's spread for closeness; a diffusion prior is swept over guidance only (its temperature
means nothing). Seeded (``--seed``): every setting draws from the same generator state. Prints a
table and the seconds each setting took; touches nothing in the workspace.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import bundle  # noqa: E402
from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.data.embedding_shards import load_split  # noqa: E402
from pipeline.prior import kinds  # noqa: E402
from pipeline.prior.figures import sample_in_batches  # noqa: E402
from pipeline.workspace import Workspace  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--prior", default="models/prior_autoregressive", help="a prior's model directory, relative to the workspace")
    ap.add_argument("--guidance", type=floats, default=[1.0, 2.0])
    ap.add_argument("--temperature", type=floats, default=[1.0, 0.7, 0.5, 0.3, 0.1])
    ap.add_argument("--candidates", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ws = Workspace.at(args.workspace)
    try:
        model, meta = bundle.load_model(ws.root / args.prior, "prior", kinds.build)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(str(err))
    val = load_split(shard_paths(ws.embeddings), "val")
    temperatures = args.temperature if kinds.is_autoregressive(model) else [1.0]
    print(f"{args.prior} ({meta['info'].get('prior_kind', 'diffusion')}), {val['n']} val captions, "
          f"{args.candidates} candidates; cos(predicted z_i, true z_i) / cos(predicted z_i, z_t) [seconds]")
    print("| guidance | " + " | ".join(f"T {t}" for t in temperatures) + " |")
    print("|" + " --- |" * (len(temperatures) + 1))
    for g in args.guidance:
        cells = []
        for t in temperatures:
            sampling = kinds.PriorSampling.of(meta["info"], guidance_scale=g, temperature=t,
                                              n_candidates=args.candidates)
            t0 = time.perf_counter()
            z, _ = sample_in_batches(model, val, sampling, args.batch_size, args.seed)
            cos_i = F.cosine_similarity(z, val["z_i"], dim=-1).mean().item()
            cos_t = F.cosine_similarity(z, val["z_t"], dim=-1).mean().item()
            cells.append(f"{cos_i:.3f} / {cos_t:.3f} [{time.perf_counter() - t0:.1f}]")
        print(f"| {g} | " + " | ".join(cells) + " |", flush=True)
    print(f"text baseline cos(true z_i, z_t): {F.cosine_similarity(val['z_i'], val['z_t'], dim=-1).mean().item():.3f}")


if __name__ == "__main__":
    main()
