"""Benchmark: two of train_throughput.py's models, one training step each in turn, and the median of the pairs' ratios.

    python bench/paired_steps.py A B [--threads 1] [--pairs 30] [--warmup 3] [--profile default]

On a shared machine a step's time drifts by 20 % from minute to minute; a step of A and a
step of B taken back to back see the same machine, so the median of their ratios is a steadier
figure than the ratio of two medians. The order alternates (A B, B A, ...) so neither always
runs first. A and B are any of ``bench/train_throughput.py``'s models at their stage's batch
size, e.g. ``clip-full-table clip`` (CLIP's whole token table against the rows its captions use)
or ``judge-nchw judge`` (the judge's body in NCHW against channels-last). Prints each one's
median seconds per step and the median (and quartiles) of B's time over A's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_throughput as tt  # noqa: E402


def paired(a: "tt.Bench", b: "tt.Bench", pairs: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds of A's and of B's step in each of ``pairs`` back-to-back pairs."""
    streams = [a.batches(a.batch), b.batches(b.batch)]
    for bench, it in zip((a, b), streams):
        for _ in range(warmup):
            tt.train_step(bench, it)
    times = ([], [])
    for i in range(pairs):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            bench = (a, b)[j]
            tt.sync(bench.device)
            start = time.perf_counter()
            tt.train_step(bench, streams[j])
            tt.sync(bench.device)
            times[j].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    tt.add_setup_args(ap)
    args = ap.parse_args(argv)
    cfg, device = tt.setup(args)
    a, b = tt.build(cfg, [args.a, args.b], device, lambda batch: 2 * batch)
    ta, tb = paired(a, b, args.pairs, args.warmup)
    ratios = [y / x for x, y in zip(ta, tb)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    out = {"a": args.a, "b": args.b, "threads": torch.get_num_threads(), "pairs": args.pairs,
           "a_s": statistics.median(ta), "b_s": statistics.median(tb), "b_over_a": statistics.median(ratios),
           "quartiles": [q[0], q[2]]}
    print(f"{args.a}: {out['a_s']:.4f} s per step, {args.b}: {out['b_s']:.4f} s (medians); {args.b} / {args.a} "
          f"per pair: median {out['b_over_a']:.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}), {args.pairs} pairs, "
          f"{out['threads']} thread(s); native bf16: {tt.native_cpu_bf16()}, "
          f"AMX: {tt.cpu_info()['flags'].get('amx_tile')}")
    return out


if __name__ == "__main__":
    main()
