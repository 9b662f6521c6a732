"""Benchmark: the embed stage's throughput beside the bare CLIP forward pass on the same batches.

    python bench/embed.py [--workspace DIR] [--samples 5000] [--repeats 3]

Needs a workspace where the `filter` and `clip` stages have run (e.g. after `make run`). The
bare pass encodes batches already decoded and tokenised in memory (image tower, text tower with
per-token states: exactly the stage's model work); the stage pass is `embed_shards` over the
same shards, reading, decoding, encoding and writing shards + the clip-retrieval layout. The two
alternate `--repeats` times; the medians are compared, and the median of the repeats' own
stage/bare ratios (each pair measured back to back) is printed beside (the machines are shared
and noisy).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config  # noqa: E402
from pipeline.clip import model as clip_model  # noqa: E402
from pipeline.device import device_of  # noqa: E402
from pipeline.embed import batches, embed_shards, encode_batch  # noqa: E402
from pipeline.data.shards import count_samples, shard_paths  # noqa: E402
from pipeline.workspace import Workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--samples", type=int, default=5000, help="at least this many samples (whole shards)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-workers", type=int, default=None, help="override embed.num_workers")
    args = ap.parse_args()
    ws = Workspace.at(args.workspace)
    cfg = config.load(ws.params, args.profile)
    embed = cfg.embed
    if args.num_workers is not None:
        embed = embed.model_copy(update={"num_workers": args.num_workers})
    paths, n = [], 0
    for p in shard_paths(ws.filtered):
        if n >= args.samples:
            break
        paths.append(p)
        n += count_samples(p)
    if not paths or not (ws.clip / "model.safetensors").exists():
        sys.exit(f"{ws.root}: needs data/filtered and models/clip (run `make run` or the filter and clip stages)")
    clip = clip_model.load(ws.clip, device_of())
    preloaded = [(b["images"], b["tokens"]) for b in batches(paths, clip.tokenize, clip.image_size,
                                                               embed.batch_size, 0)]
    print(f"{n} samples in {len(paths)} shards, batch {embed.batch_size}, {torch.get_num_threads()} threads, "
          f"embed.num_workers={embed.num_workers}", flush=True)

    def bare() -> float:
        t0 = time.perf_counter()
        for images, tokens in preloaded:
            encode_batch(clip, images, tokens)
        return n / (time.perf_counter() - t0)

    def stage() -> float:
        getattr(clip.tokenizer, "words", {}).clear()   # the stage starts cold (preloading warmed the memo)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            embed_shards(clip, paths, Path(tmp), batch_size=embed.batch_size, shard_size=embed.shard_size,
                         num_workers=embed.num_workers, min_similarity=embed.min_similarity,
                         token_dtype=embed.token_dtype)
            return n / (time.perf_counter() - t0)

    bare()                                   # warm-up (allocator, oneDNN kernels)
    rates = {"bare": [], "stage": []}
    for i in range(args.repeats):
        rates["bare"].append(bare())
        rates["stage"].append(stage())
        print(f"repeat {i + 1}: bare {rates['bare'][-1]:.0f} img/s, stage {rates['stage'][-1]:.0f} img/s", flush=True)
    b, s = statistics.median(rates["bare"]), statistics.median(rates["stage"])
    paired = statistics.median(st / ba for ba, st in zip(rates["bare"], rates["stage"]))
    print(f"median: bare CLIP forward {b:.0f} img/s | embed stage {s:.0f} img/s | stage/bare = {100 * s / b:.1f} % "
          f"(median of the {args.repeats} side-by-side ratios: {100 * paired:.1f} %)")


if __name__ == "__main__":
    main()
