"""Benchmark: the cascade's sampling speed (evaluate's seconds per image) under its levers.

    python bench/sampling_throughput.py [--workspace .] [--captions 64] [--repeats 5]
        [--batch-sizes 32,64,128] [--decoder-steps 8 --upsampler-steps 4,2]
        [--out reports/bench/sampling_throughput.json]

Needs a workspace with trained models (``models/``: clip, prior, decoder, upsamplers). Runs
``Unclip.generate`` (prior -> decoder -> upsamplers, the models' own sampling defaults: the
network evaluations evaluate counts) on ``--captions`` held-out-like captions, one image each,
fixed seed, once per variant and batch size, the variants interleaved round-robin ``--repeats``
times (the machine is shared and noisy: the medians and the median of the paired ratios are
printed):

    two_passes   the code before the throughput issue: classifier-free guidance as two network
                 calls per step, the upsamplers in NCHW with fp32 weights under bf16 autocast
    one_batch    ... guidance's two passes as one call on a doubled batch (``Denoiser.guided``)
    upsampler_layout  ... and the upsamplers in channels_last with bf16 weights where sampling runs
                 in bf16 (``upsampler.diffusion.for_sampling``, what ``Unclip.load`` does now)
    steps        ... and ``--decoder-steps`` / ``--upsampler-steps`` instead of the models' saved
                 sampling steps (fewer network evaluations: its images differ, its quality is
                 bench/sweep_sampling.py's to judge)

at each evaluate batch size. All variants draw the same noise, so their images agree up to
float rounding (the largest pixel difference is printed: a claim of "only faster" checked).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Optional
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.diffusion import Denoiser  # noqa: E402
from pipeline.generate import Unclip  # noqa: E402
from pipeline.upsampler import diffusion as up_diffusion  # noqa: E402
from pipeline.workspace import atomic_write_json  # noqa: E402

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center",
            "a green triangle to the left of a yellow circle", "a purple square above an orange triangle",
            "a small cyan triangle at the bottom right", "a pink circle below a green square",
            "a large yellow square on the left", "an orange circle to the right of a blue triangle"]


def two_passes(net, cond, uncond, scale, guided_channels=None):
    """``Denoiser.guided`` as it was: the conditional and unconditional passes as two calls."""
    return Denoiser(lambda x, t: net(x, t, *cond).float(), lambda x, t: net(x, t, *uncond).float(), scale,
                    guided_channels)


VARIANTS = ("two_passes", "one_batch", "upsampler_layout")


def run(unclip: Unclip, captions: list[str], batch_size: int, variant: str,
        plain_upsamplers: list, steps: Optional[dict] = None) -> tuple[float, torch.Tensor]:
    """Seconds per image and the images of one variant; ``steps``: generate's step overrides
    (the ``steps`` variant: the upsampler layout with fewer sampling steps)."""
    patch = mock.patch.object(Denoiser, "guided", staticmethod(two_passes)) if variant == "two_passes" \
        else mock.patch.object(Denoiser, "guided", Denoiser.guided)
    laid_out = unclip.upsamplers
    ups = laid_out if variant in ("upsampler_layout", "steps") else plain_upsamplers
    with patch, mock.patch.object(unclip, "upsamplers", ups):
        t0 = time.perf_counter()
        out = unclip.generate(captions, n=1, seed=0, batch_size=batch_size, **(steps if variant == "steps" else {}))
        return (time.perf_counter() - t0) / len(captions), out["images"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--captions", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-sizes", default="32,64,128")
    ap.add_argument("--decoder-steps", type=int, default=None,
                    help="adds the variant 'steps': upsampler_layout with the decoder at this many steps")
    ap.add_argument("--upsampler-steps", default=None,
                    help="... and the upsamplers at these steps (one per upsampler, comma-separated)")
    ap.add_argument("--out", default=None, help="default: <workspace>/reports/bench/sampling_throughput.json")
    args = ap.parse_args()
    steps = {k: v for k, v in (("steps", args.decoder_steps),
                               ("upsampler_steps", [int(n) for n in args.upsampler_steps.split(",")]
                                if args.upsampler_steps else None)) if v}
    names = VARIANTS + (("steps",) if steps else ())
    root = Path(args.workspace)
    unclip = Unclip.load(root / "models")
    plain = [up_diffusion.load(p, unclip.device) for p in sorted((root / "models").glob("upsampler_*"))]
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.captions)]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    variants = [(v, b) for b in sizes for v in names]
    times: dict[str, list[float]] = {f"{v}@{b}": [] for v, b in variants}
    images: dict[str, torch.Tensor] = {}
    for v in names:                                                 # warm-up
        run(unclip, captions[:8], 8, v, plain, steps)
    for r in range(args.repeats):
        for v, b in variants:
            s, imgs = run(unclip, captions, b, v, plain, steps)
            times[f"{v}@{b}"].append(s)
            images.setdefault(f"{v}@{b}", imgs)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {t[-1]:.4f}" for k, t in times.items()), flush=True)
    base = f"two_passes@{sizes[0]}"
    rows = {}
    for key, t in times.items():
        paired = statistics.median(a / b for a, b in zip(times[base], t))
        diff = (images[key].int() - images[base].int()).abs().max().item()
        rows[key] = {"s_per_image": round(statistics.median(t), 4), "speedup_vs_base": round(paired, 3),
                     "max_pixel_diff_vs_base": diff, "repeats": [round(x, 4) for x in t]}
        print(f"{key:16s} {rows[key]['s_per_image']:.4f} s/image  x{paired:.2f} vs {base} (median of paired "
              f"ratios)  max |pixel diff| {diff}")
    out = Path(args.out) if args.out else root / "reports" / "bench" / "sampling_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"captions": len(captions), "threads": torch.get_num_threads(), "base": base,
                            "steps_variant": steps,
                            "variants": rows})
    print(f"-> {out}")


if __name__ == "__main__":
    main()
