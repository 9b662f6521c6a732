"""Benchmark: does the decoder's training depend on the CPU thread count?

    python bench/thread_determinism.py [--steps 40] [--threads 1,2] [--precision bf16]

Trains the decoder at its params.yaml config from the same initial weights on the same synthetic
batches (the bench/train_levers.py shapes, a fixed seed per step) once per thread count, and the
first thread count a second time, then compares the runs: the first step whose loss differs and
the largest weight difference at the end. A stage that runs beside another in ``make run`` trains
at one thread and takes both when the other ends (pipeline/threads.py); if the thread count
changes the sums, two runs of one config train different weights whenever that moment differs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import config  # noqa: E402
from pipeline.decoder.network import UnclipDecoder  # noqa: E402
from pipeline.decoder.stage import arch_of, training_fns  # noqa: E402
from pipeline.device import resolved_precision  # noqa: E402
from pipeline.training import build_optimizer, clip_gradients  # noqa: E402
from train_levers import batch_of  # noqa: E402


def train(d, threads: int, steps: int, precision: str) -> tuple[list[float], torch.Tensor]:
    """(losses, the final weights flattened) of ``steps`` decoder steps at ``threads`` threads."""
    torch.set_num_threads(threads)
    _, loss_fn = training_fns(d, [])
    torch.manual_seed(0)
    model = UnclipDecoder(**arch_of(d, 128, 128)).train()
    optimizer, _, ema = build_optimizer(model, d)
    params, losses = list(model.parameters()), []
    for i in range(steps):
        batch = batch_of(d, d.batch_size, seed=i)
        torch.manual_seed(1000 + i)                 # the loss's own draws: timesteps, noise, condition drops
        with resolved_precision(precision):
            loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(params, d.grad_clip)
        optimizer.step()
        ema.step(params)
        losses.append(loss.item())
    return losses, torch.cat([p.detach().flatten() for p in params])


def compare(a, b) -> str:
    (la, wa), (lb, wb) = a, b
    first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), None)
    return (f"first differing loss at step {first}, " if first is not None else "every loss identical, ") + \
           f"max |weight difference| {float((wa - wb).abs().max()):.3g}, relative {float((wa - wb).norm() / wa.norm()):.3g}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    args = ap.parse_args(argv)
    d = config.load(args.params, args.profile).decoder
    counts = [int(n) for n in args.threads.split(",")]
    before = torch.get_num_threads()
    runs = {n: train(d, n, args.steps, args.precision) for n in counts}
    again = train(d, counts[0], args.steps, args.precision)
    torch.set_num_threads(before)
    print(f"decoder, {args.steps} steps, {args.precision}:")
    print(f"  {counts[0]} thread(s) twice: {compare(runs[counts[0]], again)}")
    for n in counts[1:]:
        print(f"  {counts[0]} against {n} threads: {compare(runs[counts[0]], runs[n])}")


if __name__ == "__main__":
    main()
