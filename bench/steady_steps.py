"""Benchmark: one of train_throughput.py's models stepped at each batch size in a run of its own, and the fixed cost.

    python bench/steady_steps.py decoder [--batches 8,16,32] [--threads 2] [--blocks 7] [--steps 4] [--warmup 5]
        [--rounds 2] [--profile default]

``bench/train_throughput.py`` times every model and batch size in turns, so that the machine's
noise hits them alike; a turn starts where another model or batch size left the caches and
oneDNN's primitive cache. A training stage steps one model at one batch size for thousands of
steps. This times that steady state: per round, each batch size in turn takes ``--warmup``
untimed steps and then ``--blocks`` timed blocks of ``--steps`` steps, all before the next batch
size starts; the figure per batch size is the median over every block of every round (rounds
alternate the order of the batch sizes). The fixed cost is the intercept of the least-squares
line s/step = a + b x batch, as in train_throughput.py, and its share is a / (s/step at the
largest batch). On the twenty-third session's Zen 5 machine the decoder read 61 / 79 / 109 ms at
batch 8 / 16 / 32 this way (56 / 75 / 100 with a process per batch size) against 69 / 85 / 121 ms in
train_throughput.py's turns before they settled (docs/MEASURED.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_throughput as tt  # noqa: E402


def steady(bench: "tt.Bench", batch: int, warmup: int, blocks: int, steps: int) -> list[float]:
    """Seconds per step of each of ``blocks`` blocks of ``steps`` consecutive steps at ``batch``, after ``warmup``."""
    it = bench.batches(batch)
    for _ in range(warmup):
        tt.train_step(bench, it)
    return [tt.timed_steps(bench, it, steps) for _ in range(blocks)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a model of bench/train_throughput.py (decoder, prior, upsample@1, ...)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: batch/4, batch/2, batch)")
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    tt.add_setup_args(ap)
    args = ap.parse_args(argv)
    cfg, device = tt.setup(args)
    explicit = [int(b) for b in args.batches.split(",")] if args.batches else []
    bench = tt.build(cfg, [args.model], device, lambda batch: 2 * max([batch] + explicit))[0]
    sizes = explicit or tt.sweep_sizes(bench.batch, quick=False)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for r in range(args.rounds):
        for n in (sizes if r % 2 == 0 else sizes[::-1]):
            times[n] += steady(bench, n, args.warmup, args.blocks, args.steps)
    medians = {n: statistics.median(v) for n, v in times.items()}
    a, b = tt.fixed_cost(medians)
    top = max(sizes)
    out = {"model": args.model, "threads": torch.get_num_threads(), "s_per_step": medians,
           "fixed_s": a, "per_sample_s": b, "fixed_share": a / medians[top]}
    print(f"{args.model}, {out['threads']} thread(s), steady state (medians of {args.rounds} x {args.blocks} blocks "
          f"of {args.steps} steps): " + ", ".join(f"batch {n}: {1e3 * s:.1f} ms" for n, s in medians.items())
          + f"; fixed cost {1e3 * a:.1f} ms = {100 * out['fixed_share']:.0f} % of the step at batch {top}, "
          f"{1e3 * b:.2f} ms per sample")
    return out


if __name__ == "__main__":
    main()
