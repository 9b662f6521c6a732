"""Benchmark: peak memory of each training stage's data path when the data grows.

    python bench/memory_growth.py [--workspace .] [--scales 1,4] [--batches 40]

Each training stage reads its data one way; this runs that reader alone in a fresh process, at
the workspace's data (scale 1) and at the same shards listed ``scale`` times over (scale 4: four
times the data, as far as the reader can tell), draws ``--batches`` batches of the stage's
default batch size, and prints the process's peak resident memory (ru_maxrss) beside the
baseline of a process that only imported the same modules:

    prior, decoder   embeddings.train_batches: a rolling buffer of at most 16 whole shards
                     (decoder: with its images at 16 px)
    clip             clip.data.train_batches: a rolling buffer of decoded shards, at most 512 MiB of
                     images (with tokens and hard negatives)
    judge            judge.stage.batches: the same kind of buffer of decoded train images with ground
                     truth, at most 512 MiB (before 2026-12-04's sixth session: the whole train split)
    upsampler        data.image_shards.train_stream: WebDataset shards streamed through a 2,000-sample
                     shuffle buffer (decode in the loader)

The stages' models and optimizers come on top of this and do not grow with the data. The
stage-level figure (the model included) is ``peak_rss_mb`` in every ``metrics/<stage>.json``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READERS = ("baseline", "prior", "decoder", "clip", "judge", "upsampler")


def child(reader: str, workspace: str, scale: int, batches: int) -> None:
    """Runs in the fresh process: read, then print the peak RSS in MiB as JSON."""
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401

    from pipeline.data.image_shards import decode_image, train_stream
    from pipeline.data.shards import shard_paths
    from pipeline.data.embedding_shards import train_batches
    ws = Path(workspace)
    emb, filtered = shard_paths(ws / "data" / "embeddings") * scale, shard_paths(ws / "data" / "filtered") * scale
    n = 0
    if reader in ("prior", "decoder"):
        it = train_batches(emb, 256 if reader == "prior" else 32, seed=0, image_size=16 if reader == "decoder" else None)
        for _ in range(batches):
            n += len(next(it)["z_i"])
    elif reader == "clip":
        from pipeline.clip import model as clip_model
        from pipeline.clip.data import train_batches as clip_batches
        from pipeline.config import Config
        tokenize = clip_model.build(Config().clip.model).tokenize      # the default CLIP's tokenizer (a few MiB)
        it = clip_batches(filtered, tokenize, 256, seed=0, image_size=64, negatives=("relation", "binding"))
        for _ in range(batches):
            n += len(next(it)[0])
    elif reader == "judge":
        from pipeline.judge.stage import batches as judge_batches
        it = judge_batches(filtered, 64, 128, seed=0, p_degrade=0.5)
        for _ in range(batches):
            n += len(next(it)[0])
    elif reader == "upsampler":
        it = iter(train_stream(filtered, lambda s: decode_image(s["jpg"]), lambda b: len(b), 64, 0, 0))
        for _ in range(batches):
            n += next(it)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": round(kib / 1024, 1), "samples": n, "shards": len(emb if reader in ("prior", "decoder") else filtered)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--scales", default="1,4")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--child", nargs=3, metavar=("READER", "SCALE", "BATCHES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.workspace, int(args.child[1]), int(args.child[2]))
    scales = [int(s) for s in args.scales.split(",")]
    rows = {}
    for reader in READERS:
        for scale in scales if reader != "baseline" else [1]:
            out = subprocess.run([sys.executable, __file__, "--workspace", args.workspace, "--child", reader,
                                  str(scale), str(args.batches)], capture_output=True, text=True, check=True)
            rows[f"{reader} x{scale}"] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{reader:10s} x{scale}: peak RSS {rows[f'{reader} x{scale}']['peak_rss_mb']:8.1f} MiB "
                  f"({rows[f'{reader} x{scale}']['shards']} shards listed, {rows[f'{reader} x{scale}']['samples']} samples drawn)",
                  flush=True)
    out = Path(args.workspace) / "reports" / "bench" / "memory_growth.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
