"""Benchmark: the CPU work of one CLIP training batch, streamed as before against the decoded buffer.

    python bench/clip_batches.py [--workspace .] [--batches 60] [--repeats 5]

Before 2026-12-04 (fourth session) CLIP's batches were streamed by webdataset in one DataLoader
worker: every sample's tar members parsed, its metadata read, its JPEG decoded with PIL, its
caption tokenized and given its hard negatives, each time it was drawn (about 13 times per image
on the default profile). On 2 cores that worker's CPU time is taken from the training step.
Now (``pipeline/clip/data.py``) each shard is decoded, tokenized and given its negatives once
per pass into a buffer, and a batch is a tensor index.

Both run here in this process, one thread (as the worker ran), on the workspace's filtered
shards and the default CLIP's tokenizer and negatives, alternating, ``--repeats`` times:

- ``streamed``: seconds per batch of the old pipeline (``image_shards.train_stream`` with the
  old per-sample decode and collate), after one warm-up batch;
- ``buffered``: seconds to fill the buffer (every shard of the default data: it all fits), and
  seconds per batch drawn from it; per step = draw + fill / the steps between fills (the run's
  steps when every shard fits, as on the default data; else one pass over the data).

Prints the medians and writes ``reports/bench/clip_batches.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config  # noqa: E402
from pipeline.clip import model as clip_model  # noqa: E402
from pipeline.clip.data import BUFFER_BYTES, train_batches  # noqa: E402
from pipeline.clip.negatives import hard_negatives  # noqa: E402
from pipeline.data.image_shards import decode_image, resize_uint8, train_stream  # noqa: E402
from pipeline.data.shards import count_samples, shard_paths  # noqa: E402
from pipeline.workspace import Workspace, atomic_write_json  # noqa: E402


def streamed(paths, tokenize, batch_size: int, seed: int, size: int, negatives: tuple[str, ...]):
    """The pipeline as it was: per-sample PIL decode in webdataset's map, tokenize in the collate."""
    def to_pair(sample):
        return decode_image(sample["jpg"]), sample["txt"].decode("utf-8")

    def collate(batch):
        images = torch.stack([resize_uint8(img, size) for img, _ in batch])
        captions = [cap for _, cap in batch]
        texts, mask = hard_negatives(captions, negatives)
        return images, tokenize(captions), tokenize(texts).view(len(captions), len(negatives), -1), mask
    return iter(train_stream(paths, to_pair, collate, batch_size, 0, seed))


def per_batch(it, n: int) -> float:
    next(it)                                        # warm-up (and the shuffle buffer's first fill)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return (time.perf_counter() - t0) / n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ws = Workspace.at(args.workspace)
    cfg = config.load(ws.params)
    c = cfg.clip
    paths = shard_paths(ws.filtered)
    clip = clip_model.build(c.model)
    kinds = tuple(c.hard_negatives)
    n_train = sum(count_samples(p) for p in paths)           # an upper bound: val/test are counted too
    resident = max(1, BUFFER_BYTES // (max(1, count_samples(paths[0])) * 3 * c.model.image_size ** 2))
    # as train_batches: a buffer that holds every shard is filled once a run, else once a pass
    steps_per_fill = c.steps if resident >= len(paths) else max(1, n_train // c.batch_size)
    rows = {"streamed": [], "buffered_fill": [], "buffered_draw": []}
    for r in range(args.repeats):
        rows["streamed"].append(per_batch(streamed(paths, clip.tokenize, c.batch_size, c.seed + r,
                                                   c.model.image_size, kinds), args.batches))
        t0 = time.perf_counter()
        it = train_batches(paths, clip.tokenize, c.batch_size, c.seed + r, c.model.image_size, kinds)
        next(it)                                    # the buffer is filled on the first draw
        rows["buffered_fill"].append(time.perf_counter() - t0)
        rows["buffered_draw"].append(per_batch(it, args.batches))
        print(f"round {r + 1}/{args.repeats}: streamed {rows['streamed'][-1] * 1e3:.1f} ms/batch, buffer filled in "
              f"{rows['buffered_fill'][-1]:.1f} s, drawn {rows['buffered_draw'][-1] * 1e3:.2f} ms/batch", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    buffered_step = med["buffered_draw"] + med["buffered_fill"] / steps_per_fill
    out = {"batch_size": c.batch_size, "shards": len(paths), "steps_per_fill": steps_per_fill,
           "streamed_s_per_batch": round(med["streamed"], 4), "buffered_fill_s": round(med["buffered_fill"], 2),
           "buffered_draw_s_per_batch": round(med["buffered_draw"], 5),
           "buffered_s_per_step": round(buffered_step, 4), "ratio": round(med["streamed"] / buffered_step, 1),
           "saved_s_per_default_run": round((med["streamed"] - buffered_step) * c.steps, 1), "rounds": rows}
    print(f"CPU per CLIP batch ({c.batch_size}, one thread, medians of {args.repeats}): streamed "
          f"{med['streamed'] * 1e3:.1f} ms; buffered {buffered_step * 1e3:.1f} ms (fill {med['buffered_fill']:.1f} s "
          f"per {steps_per_fill} steps, draw {med['buffered_draw'] * 1e3:.2f} ms): {out['ratio']}x, "
          f"{out['saved_s_per_default_run']} s of CPU over {c.steps} steps")
    dest = ws.root / "reports" / "bench" / "clip_batches.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(dest, out)
    print(f"-> {dest}")
    return out


if __name__ == "__main__":
    main()
