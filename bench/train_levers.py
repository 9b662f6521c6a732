"""Benchmark: the throughput levers of issue 16, each measured side by side on the decoder's step.

    python bench/train_levers.py [--repeats 7] [--steps 3] [--levers ema_foreach,channels_last,compile,fp32,batch64]
        [--out reports/bench/train_levers.json]

The decoder at its params.yaml config (the model with the largest fixed cost per step,
bench/train_throughput.py) trains on one synthetic batch of its shapes, one step being the
stage's: forward + loss under autocast, backward, clipping, fused AdamW, EMA. Every lever is a
variant of that step; all variants run round-robin, ``--steps`` steps per timed block after a
warm-up, ``--repeats`` blocks, and the table gives each variant's median seconds per step and
the median of its paired ratios to the baseline (block by block: the machine is noisy).

    baseline       the step as the stage runs it (bf16 autocast: what precision auto measures faster here)
    ema_foreach    diffusers' EMAModel with foreach updates instead of its Python loop over ~260 tensors
    channels_last  the model and the images in channels-last memory format (oneDNN's preferred layout)
    compile        torch.compile(model) (inductor); its compile time is printed beside (counted
                   against a run's steps: it pays only if (saved s/step x steps) > compile seconds)
    fp32           no autocast (precision fp32)
    batch64        twice the batch: per-sample cost (s/step / 2 is what to compare)
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
from pipeline.decoder.network import UnclipDecoder  # noqa: E402
from pipeline.decoder.stage import arch_of, training_fns  # noqa: E402
from pipeline.device import resolved_precision  # noqa: E402
from pipeline.training import build_optimizer  # noqa: E402
from pipeline.workspace import atomic_write_json  # noqa: E402

LEVERS = ("ema_foreach", "channels_last", "compile", "fp32", "batch64")


def batch_of(d, b: int, seed: int = 0) -> dict:
    """A decoder batch of the embed stage's shapes: uint8 images, unit z_i, token encodings, masks."""
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randint(0, 256, (b, 3, d.image_size, d.image_size), dtype=torch.uint8, generator=g),
            "z_i": torch.nn.functional.normalize(torch.randn(b, 128, generator=g), dim=-1),
            "tokens": torch.randn(b, 24, 128, generator=g),
            "mask": torch.arange(24)[None] < torch.randint(3, 25, (b, 1), generator=g)}


def variant(d, lever: str):
    """(step function, setup seconds) for the decoder with ``lever`` applied ('baseline': none)."""
    torch.manual_seed(0)
    model = UnclipDecoder(**arch_of(d, 128, 128)).train()
    if lever == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    optimizer, _, ema = build_optimizer(model, d)
    if lever == "ema_foreach":
        ema.foreach = True
    _, loss_fn = training_fns(d, [])
    batch = batch_of(d, 2 * d.batch_size if lever == "batch64" else d.batch_size)
    if lever == "channels_last":
        batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
    params = [p for p in model.parameters()]
    net = model
    setup = 0.0
    if lever == "compile":
        net = torch.compile(model)
    precision = "fp32" if lever == "fp32" else None

    def step():
        with resolved_precision(precision):
            loss = loss_fn(net, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, d.grad_clip)
        optimizer.step()
        ema.step(params)

    if lever == "compile":                    # the first calls compile (forward and backward graphs)
        t0 = time.perf_counter()
        step()
        step()
        setup = time.perf_counter() - t0
    return step, setup


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--levers", default=",".join(LEVERS))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--out", default="reports/bench/train_levers.json")
    args = ap.parse_args(argv)
    d = config.load(args.params, args.profile).decoder
    names = ["baseline"] + [x for x in args.levers.split(",") if x]
    steps, setup = {}, {}
    for name in names:
        steps[name], setup[name] = variant(d, name)
        for _ in range(2):
            steps[name]()                                       # warm-up
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for n in names:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[n]()
            times[n].append((time.perf_counter() - t0) / args.steps)
    rows = {}
    for n in names:
        ratio = statistics.median(b / t for b, t in zip(times["baseline"], times[n]))
        per_sample = statistics.median(times[n]) / (2 * d.batch_size if n == "batch64" else d.batch_size)
        rows[n] = {"s_per_step": round(statistics.median(times[n]), 4), "speedup_vs_baseline": round(ratio, 3),
                   "ms_per_sample": round(1000 * per_sample, 3), "setup_s": round(setup[n], 1)}
        print(f"{n:14s} {rows[n]['s_per_step']:.4f} s/step  x{ratio:.2f} vs baseline (median of paired ratios)  "
              f"{rows[n]['ms_per_sample']:.2f} ms/sample" + (f"  compile {setup[n]:.0f} s" if setup[n] else ""))
    report = {"threads": torch.get_num_threads(), "decoder_batch": d.batch_size, "variants": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    main()
