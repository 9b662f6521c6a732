"""Benchmark: the throughput levers of issue 16, each measured side by side on the decoder's step.

    python bench/train_levers.py [--repeats 7] [--steps 3]
        [--levers loops,channels_last,compile,fp32,batch64,batch128,transformer,glide,self_cross,cross]
        [--out reports/bench/train_levers.json]

The decoder at its params.yaml config (the model with the largest fixed cost per step,
bench/train_throughput.py) trains on one synthetic batch of its shapes, one step being the
stage's: forward + loss under autocast, backward, clipping (``training.clip_gradients``), fused
AdamW, EMA (``training.ema_model``: one foreach lerp).
Every lever is a
variant of that step; all variants run round-robin, ``--steps`` steps per timed block after a
warm-up, ``--repeats`` blocks, and the table gives each variant's median seconds per step and
the median of its paired ratios to the baseline (block by block: the machine is noisy).

    baseline       the step as the stage runs it (bf16 autocast: what precision auto measures faster here)
    diffusers      the UNet through diffusers' own forward instead of pipeline/lean_unet.py's (same
                   modules and weights, more small ops: what the stage ran before)
    loops          the step before foreach: EMAModel's Python loop over every tensor and clipping's
                   per-tensor norms (what the stage ran before; the baseline uses foreach for both)
    torch_update   the update as the stage ran it before the eleventh session: diffusers' foreach EMA
                   (a sub into temporaries, then a sub_ with alpha) and torch's clip_grad_norm_
                   (foreach; it multiplies every gradient on every step, by 1.0 when nothing is clipped)
    channels_last  the model and the images in channels-last memory format (oneDNN's preferred layout)
    compile        torch.compile(model) (inductor); its compile time is printed beside (counted
                   against a run's steps: it pays only if (saved s/step x steps) > compile seconds)
    compile_cpp    the same with inductor's C++ wrapper (the compiled graph calls its kernels from
                   C++, not Python: less dispatch per op)
    dynamo         torch.compile(model, backend="eager"): TorchDynamo captures the forward's torch
                   calls into one flat FX graph and runs it as it is, same kernels, no inductor:
                   what is left of the modules' Python (diffusers' argument handling, hooks, the
                   module tree) is gone from every step; the outputs are bit-identical
    fp32           no autocast (precision fp32)
    batch64        twice the batch: per-sample cost (s/step / 2 is what to compare)
    batch128       four times the batch (s/step / 4)
    transformer    the decoder with diffusers' transformer attention blocks (attention_block: transformer)
    glide          the decoder with GLIDE's attention blocks (attention_block: glide)
    self_cross     the transformer blocks without their feed-forward (attention_block: self_cross)
    cross          the transformer blocks cut to their cross-attention (attention_block: cross)

``--parts``: instead, the baseline step split into forward, backward, clipping, optimizer and EMA
(milliseconds, medians) at batch 1, 8 and the config's, and the aten calls of one forward at batch
1 (torch.profiler): where the fixed cost per step is.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config  # noqa: E402
from pipeline.decoder.network import UnclipDecoder  # noqa: E402
from pipeline.decoder.stage import arch_of, training_fns  # noqa: E402
from pipeline.device import resolved_precision  # noqa: E402
from pipeline.training import build_optimizer, clip_gradients  # noqa: E402
from pipeline.workspace import atomic_write_json  # noqa: E402

LEVERS = ("diffusers", "loops", "torch_update", "channels_last", "compile", "compile_cpp", "dynamo", "fp32", "batch64",
          "batch128", "transformer", "glide", "self_cross", "cross")
BLOCKS = ("transformer", "glide", "self_cross", "cross")      # levers that are a decoder.attention_block
SCALE = {"batch64": 2, "batch128": 4}          # the batch of a lever, in multiples of the config's


def batch_of(d, b: int, seed: int = 0) -> dict:
    """A decoder batch of the embed stage's shapes: uint8 images, unit z_i, token encodings, masks."""
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randint(0, 256, (b, 3, d.image_size, d.image_size), dtype=torch.uint8, generator=g),
            "z_i": torch.nn.functional.normalize(torch.randn(b, 128, generator=g), dim=-1),
            "tokens": torch.randn(b, 24, 128, generator=g),
            "mask": torch.arange(24)[None] < torch.randint(3, 25, (b, 1), generator=g)}


def variant(d, lever: str, batch_size: int):
    """(step function, setup seconds) for the decoder with ``lever`` applied ('baseline': none)
    at ``batch_size`` samples a step."""
    torch.manual_seed(0)
    if lever in BLOCKS:
        d = d.model_copy(update={"attention_block": lever})
    model = UnclipDecoder(**arch_of(d, 128, 128)).train()
    if lever == "diffusers":
        model.lean = False
    if lever == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    optimizer, _, ema = build_optimizer(model, d)
    if lever == "loops":
        ema.foreach = False
    _, loss_fn = training_fns(d, [])
    batch = batch_of(d, batch_size)
    if lever == "channels_last":
        batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
    params = [p for p in model.parameters()]
    net = model
    setup = 0.0
    if lever in ("compile", "compile_cpp"):
        net = torch.compile(model)
    if lever == "dynamo":
        net = torch.compile(model, backend="eager")
    precision = "fp32" if lever == "fp32" else None

    def step():
        with resolved_precision(precision):
            loss = loss_fn(net, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if lever in ("loops", "torch_update"):
            torch.nn.utils.clip_grad_norm_(params, d.grad_clip, foreach=lever != "loops")
            optimizer.step()
            EMAModel.step(ema, params)         # diffusers' own update (a loop with foreach False)
        else:
            clip_gradients(params, d.grad_clip)
            optimizer.step()
            ema.step(params)

    if lever in ("compile", "compile_cpp", "dynamo"):   # the first calls compile (forward and backward graphs)
        import torch._inductor.config as inductor
        t0 = time.perf_counter()
        with inductor.patch(cpp_wrapper=lever == "compile_cpp"):
            step()
            step()
        setup = time.perf_counter() - t0
    return step, setup


def fixed_cost(times: dict, lever: str, sizes: list[int]) -> dict:
    """The intercept a of the least-squares line s/step = a + b * batch over ``lever``'s batch
    sweep, and a / (s/step) at each batch: the share of a step that does not shrink with the batch."""
    x = sizes
    y = [statistics.median(times[(lever, n)]) for n in sizes]
    mx, my = statistics.mean(x), statistics.mean(y)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    a = my - slope * mx
    return {"intercept_s": round(a, 4), "ms_per_sample": round(1000 * slope, 3),
            "share": {str(n): round(a / t, 3) for n, t in zip(x, y)}}


def parts(d, repeats: int) -> dict:
    """Milliseconds of each part of the baseline step at batch 1, 8 and the config's (``--parts``)."""
    torch.manual_seed(0)
    model = UnclipDecoder(**arch_of(d, 128, 128)).train()
    optimizer, _, ema = build_optimizer(model, d)
    _, loss_fn = training_fns(d, [])
    params = list(model.parameters())

    def step(batch) -> list[float]:
        marks = [time.perf_counter()]
        with resolved_precision(None):
            loss = loss_fn(model, batch)
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        clip_gradients(params, d.grad_clip)
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        ema.step(params)
        marks.append(time.perf_counter())
        return [1000 * (b - a) for a, b in zip(marks, marks[1:])]

    batches = {n: batch_of(d, n) for n in (1, 8, d.batch_size)}
    for b in batches.values():
        step(b), step(b)
    got = {n: [] for n in batches}
    for _ in range(repeats):
        for n, b in batches.items():
            got[n].append(step(b))
    names = ("forward", "backward", "clipping", "optimizer", "ema")
    out = {str(n): {k: round(statistics.median(col), 2) for k, col in zip(names, zip(*rows))} for n, rows in got.items()}
    for n, row in out.items():
        print(f"batch {n:>3s}: " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()) + f"  (ms; sum {sum(row.values()):.1f})")
    b1 = batches[1]
    with torch.no_grad(), resolved_precision(None), torch.profiler.profile() as prof:
        loss_fn(model, b1)
    calls = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
    print(f"one forward at batch 1: {calls} aten calls, {casts} of them casts (_to_copy)")
    return {"ms": out, "forward_aten_calls_batch1": calls, "forward_casts_batch1": casts}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--levers", default=",".join(LEVERS))
    ap.add_argument("--fixed", default="baseline,diffusers,transformer,glide",
                    help="levers whose fixed cost per step is measured (a sweep at batch/4, batch/2, batch)")
    ap.add_argument("--parts", action="store_true", help="the baseline step's parts at batch 1, 8, batch (see above)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--out", default="reports/bench/train_levers.json")
    args = ap.parse_args(argv)
    d = config.load(args.params, args.profile).decoder
    if args.parts:
        return parts(d, args.repeats)
    names = ["baseline"] + [x for x in args.levers.split(",") if x]
    fixed = [x for x in args.fixed.split(",") if x in names]
    sweep = [d.batch_size // 4, d.batch_size // 2]
    keys = [(n, SCALE.get(n, 1) * d.batch_size) for n in names] + [(n, b) for n in fixed for b in sweep]
    steps, setup = {}, {}
    for key in keys:
        steps[key], setup[key] = variant(d, *key)
        for _ in range(2):
            steps[key]()                                         # warm-up
    times = {k: [] for k in keys}
    for _ in range(args.repeats):                                # round-robin: noise hits all alike
        for k in keys:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[k]()
            times[k].append((time.perf_counter() - t0) / args.steps)
    base = times[("baseline", d.batch_size)]
    rows = {}
    for n in names:
        key = (n, SCALE.get(n, 1) * d.batch_size)
        ratio = statistics.median(b / t for b, t in zip(base, times[key]))
        rows[n] = {"batch": key[1], "s_per_step": round(statistics.median(times[key]), 4),
                   "speedup_vs_baseline": round(ratio, 3),
                   "ms_per_sample": round(1000 * statistics.median(times[key]) / key[1], 3),
                   "setup_s": round(setup[key], 1)}
        if n in fixed:
            rows[n]["fixed_cost"] = fixed_cost(times, n, sweep + [d.batch_size])
        print(f"{n:12s} batch {key[1]:4d}  {rows[n]['s_per_step']:.4f} s/step  x{ratio:.2f} vs baseline (median of "
              f"paired ratios)  {rows[n]['ms_per_sample']:.2f} ms/sample"
              + (f"  fixed {rows[n]['fixed_cost']['intercept_s']:.4f} s = "
                 f"{100 * rows[n]['fixed_cost']['share'][str(d.batch_size)]:.0f} % of the step" if n in fixed else "")
              + (f"  compile {setup[key]:.0f} s" if setup[key] else ""))
    report = {"threads": torch.get_num_threads(), "decoder_batch": d.batch_size,
              "attention_block": d.attention_block, "variants": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    main()
