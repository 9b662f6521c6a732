"""Benchmark: one model's training step under variants of threads and precision, side by side.

    python bench/step_variants.py [--models clip,decoder,upsample@1,prior] [--variants 1:bf16,2:bf16]
        [--repeats 5] [--steps 3] [--profile default] [--params params.yaml]

The step is ``bench/train_throughput.py``'s (the stage's model, loss, optimizer, EMA and scheduler on
synthetic inputs of the stage's shapes). A variant is ``THREADS:PRECISION``; PRECISION is ``bf16``
or ``fp32`` (what ``precision: auto`` would resolve to, set with ``device.resolved_precision``), or
``bf32``: fp32 tensors whose convolutions and matmuls oneDNN computes in bf16
(``torch.backends.mkldnn.fp32_precision = "bf16"``, AMX where the CPU has it), without autocast's
casts. Per model, the variants run in turn in one process, ``--repeats`` timed blocks of
``--steps`` steps after one untimed block each, so the machine's drift hits every variant alike;
the medians are printed with each variant's speed relative to the first (1.36x: 1.36 times as many steps per second).

Two questions it answers on a given machine: how much a stage gains from a second thread (the
flow runs independent stages side by side at one thread each when one would gain little), and
which precision a model trains fastest in.
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
from pipeline import config  # noqa: E402
from pipeline.device import resolved_precision  # noqa: E402


def parse_variant(text: str) -> tuple[int, str]:
    threads, _, precision = text.partition(":")
    if precision not in ("bf16", "fp32", "bf32") or not threads.isdigit() or int(threads) < 1:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected THREADS:bf16|fp32|bf32, e.g. 2:bf16")
    return int(threads), precision


def parse_variants(text: str) -> list[tuple[int, str]]:
    """``--variants``: comma-separated THREADS:PRECISION (argparse reports a bad one as a usage error)."""
    return [parse_variant(v) for v in text.split(",")]


def run_variant(bench, batches, threads: int, precision: str, steps: int) -> float:
    """Seconds per step of ``steps`` steps at ``threads`` threads in ``precision``; the thread count
    and oneDNN's fp32 math are put back as they were."""
    before = torch.get_num_threads(), torch.backends.mkldnn.fp32_precision
    torch.set_num_threads(threads)
    torch.backends.mkldnn.fp32_precision = "bf16" if precision == "bf32" else "none"
    try:
        with resolved_precision("fp32" if precision == "bf32" else precision):
            return tt.timed_steps(bench, batches, steps)
    finally:
        torch.set_num_threads(before[0])
        torch.backends.mkldnn.fp32_precision = before[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="clip,decoder,upsample@1,prior")
    ap.add_argument("--variants", type=parse_variants, default="1:bf16,2:bf16",
                    help="THREADS:bf16|fp32|bf32, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    variants = args.variants
    cfg = config.load(Path(args.params), args.profile)
    device = torch.device("cpu")
    print(tt.cpu_info())
    out = {}
    for name in args.models.split(","):
        bench = tt.build(cfg, [name], device, lambda b: 4 * b)[0]
        batches = bench.batches(bench.batch)
        times: dict[tuple, list[float]] = {v: [] for v in variants}
        for rep in range(args.repeats + 1):
            for v in variants:
                t = run_variant(bench, batches, *v, args.steps)
                if rep:                                           # the first round warms up
                    times[v].append(t)
        med = {v: statistics.median(t) for v, t in times.items()}
        first = med[variants[0]]
        row = ", ".join(f"{th}:{p} {s:.4f} s ({first / s:.2f}x)"
                        for (th, p), s in med.items())
        print(f"{name} (batch {bench.batch}): {row}", flush=True)
        out[name] = {f"{th}:{p}": round(s, 4) for (th, p), s in med.items()}
    return out


if __name__ == "__main__":
    main()
