"""Quality against network evaluations: guidance scales and sampling steps per sampler, judged.

    python bench/sweep_sampling.py [--workspace .] [--n-single 128] [--n-pair 128] [--seed 0]
                                   [--only decoder_guidance,prior_guidance,decoder_steps,prior_steps,upsampler_steps,reference,reference_base]

Every point runs the whole cascade (CLIP text -> prior -> decoder -> upsamplers) on the same
held-out test captions with the same seed, changing one setting from the trained models'
defaults, and scores the final images with the judge (``evaluate``'s figures). Sweeps:

    decoder_guidance    the decoder's guidance scale at its default sampler and steps
    prior_guidance      the prior's guidance scale
    prior_candidates    the prior's rerank: 1, 2 (the default) or 4 draws per caption, the best z_i . z_t kept
    decoder_steps       steps per sampler (ddpm, ddim, dpm++) for the decoder
    prior_steps         steps per sampler for the prior
    upsampler_steps     steps per sampler for both upsamplers
    last_upsampler_steps  steps (its default sampler) of the last upsampler only
    upsampler_aug       the noise level of a noise-augmented upsampler's input (first, then both)
    upsampler_strength  where both upsamplers start (1: pure noise, as the paper; s < 1: the bicubic
                        upsample noised to t = s T, SDEdit) at their default steps
    reference           every stage at 250 steps of its default sampler (what the defaults must match)
    reference_base      the prior and the decoder at 250 steps (the decoder also with DDPM), upsamplers at default

Prints one line per point, writes ``reports/sweeps/sweep.json`` and a plot of every sweep
(quality against network evaluations per image) to ``reports/sweeps/sweep.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import background  # noqa: E402
from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.data.embedding_shards import load_split  # noqa: E402
from pipeline.evaluate import pick_rows  # noqa: E402
from pipeline.generate import Unclip  # noqa: E402
from pipeline.judge.model import Judge  # noqa: E402
from pipeline.quality import score  # noqa: E402
from pipeline.workspace import Workspace, atomic_write_json  # noqa: E402

SAMPLERS = ("ddpm", "ddim", "dpm++")
FIGS = (("single", "shape"), ("single", "position"), ("single", "size"), ("pair", "colors"), ("pair", "relation"))


def sweeps(steps_grid, samplers=SAMPLERS) -> dict[str, list[dict]]:
    g = steps_grid
    return {
        "decoder_guidance": [{"guidance": s} for s in (1.0, 1.5, 2.0, 3.0, 4.0)],
        "prior_guidance": [{"prior_guidance": s} for s in (1.0, 1.5, 2.0, 3.0)],
        # the prior's rerank: draws per caption, the one with the largest z_i . z_t kept (the paper's 2)
        "prior_candidates": [{"n_candidates": k} for k in (1, 2, 4)],
        "decoder_steps": [{"sampler": sm, "steps": n} for sm in samplers for n in g],
        "prior_steps": [{"prior_sampler": sm, "prior_steps": n} for sm in samplers for n in g],
        "upsampler_steps": [{"upsampler_sampler": sm, "upsampler_steps": n} for sm in samplers for n in g],
        # the last upsampler alone (64 px: 7 of every 10 of the upsamplers' seconds)
        "last_upsampler_steps": [{"upsampler_steps": [None, n]} for n in g],
        "upsampler_strength": [{"upsampler_strength": s} for s in (1.0, 0.7, 0.5, 0.35, 0.2)],
        # noise-augmented upsamplers (upsample.stages.<k>.noise_aug): the level their input is noised
        # to, the first upsampler's (which sees the decoder's output) and then both
        "upsampler_aug": [{"upsampler_aug": [a, None]} for a in (0.0, 2.0, 4.0, 6.0, 8.0, 12.0)]
                         + [{"upsampler_aug": [a, a]} for a in (2.0, 4.0)],
        "reference": [{"prior_steps": 250, "steps": 250, "upsampler_steps": 250}],
        # the prior and the decoder at 250 steps (their default sampler, then ancestral DDPM for the
        # decoder), the upsamplers at their defaults: their steps sweep is flat from 2 steps, and at
        # 250 steps they cost more than the rest of the stack together
        "reference_base": [{"prior_steps": 250, "steps": 250}, {"prior_steps": 250, "steps": 250, "sampler": "ddpm"}],
    }


def cannot_take(setting: dict, upsamplers: list) -> str | None:
    """Why the trained models cannot take ``setting``, else None: a noise level (``upsampler_aug``, one for all or
    one per upsampler) for an upsampler trained without noise conditioning augmentation, which
    ``pipeline/upsampler/diffusion.py`` refuses (its network has no level input)."""
    levels = setting.get("upsampler_aug")
    if levels is None:
        return None
    levels = levels if isinstance(levels, (list, tuple)) else [levels] * len(upsamplers)
    for j, (level, (model, _)) in enumerate(zip(levels, upsamplers)):
        if level and not getattr(model, "noise_aug", False):
            return f"upsampler {j + 1} was trained without noise conditioning augmentation: no level {level} for it"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--n-single", type=int, default=128)
    ap.add_argument("--n-pair", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default="2,4,8,16,32", help="steps grid of the per-sampler sweeps")
    ap.add_argument("--samplers", default=",".join(SAMPLERS), help="samplers of the per-sampler sweeps")
    ap.add_argument("--only", default=None, help="comma-separated sweeps to run")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    ws = Workspace.at(args.workspace)
    unclip, judge = Unclip.load(ws.root / "models"), Judge.load(ws.judge)
    test = load_split(shard_paths(ws.embeddings), "test", image_size=unclip.sizes[-1])
    rows = pick_rows(test["gt"], args.n_single, args.n_pair)
    captions, gts = [test["captions"][i] for i in rows], [test["gt"][i] for i in rows]
    _, real = judge.predict(test["images"][torch.tensor(rows)])
    real_noise = background.figures(test["images"][torch.tensor(rows)], gts, captions, real=True)["noise"]
    todo = sweeps([int(s) for s in args.steps.split(",")], tuple(args.samplers.split(",")))
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    defaults = {"prior": unclip.prior_meta["info"]["sampling"], "decoder": unclip.decoder_meta["info"]["sampling"],
                "upsamplers": [m["info"]["sampling"] for _, m in unclip.upsamplers],
                "n_candidates": unclip.prior_meta["info"].get("n_candidates", 2)}
    print(f"{len(rows)} test captions, seed {args.seed}; defaults {json.dumps(defaults)}", flush=True)
    results: dict = {"n_single": args.n_single, "n_pair": args.n_pair, "seed": args.seed, "defaults": defaults,
                     "sweeps": {}}
    out_dir = ws.reports / "sweeps"
    for name, points in [("default", [{}]), *todo.items()]:
        results["sweeps"][name] = []
        for setting in points:
            why = cannot_take(setting, unclip.upsamplers)
            if why:
                results["sweeps"][name].append({"setting": setting, "skipped": why})
                print(f"{name:16s} {json.dumps(setting):55s} skipped: {why}", flush=True)
                continue
            t0 = time.perf_counter()
            out = unclip.generate(captions, n=1, seed=args.seed, batch_size=args.batch_size, **setting)
            fig = score(judge, out["images"], gts, real) | {"setting": setting, "nfe": sum(out["nfe"].values()),
                                                            "background": background.figures(
                                                                out["images"], gts, captions, real_noise=real_noise),
                                                            "nfe_by_stage": out["nfe"],
                                                            "seconds": round(time.perf_counter() - t0, 1)}
            results["sweeps"][name].append(fig)
            print(f"{name:16s} {json.dumps(setting):55s} NFE {fig['nfe']:4d}  "
                  + "  ".join(f"{a}.{b} " + ("  n/a" if fig[a][b] is None else f"{fig[a][b]:5.1f}")   # a kind with no captions
                              for a, b in FIGS)
                  + f"  FD {fig['frechet_distance']:7.1f}  bg noise {fig['background']['noise']:5.2f}"
                  + f"  ({fig['seconds']} s)", flush=True)
            atomic_write_json(out_dir / "sweep.json", results)
    plotted = plot(results, out_dir / "sweep.png")
    print(f"-> {out_dir / 'sweep.json'}" + (f", {out_dir / 'sweep.png'}" if plotted else ""))


def plot(results: dict, path: Path) -> bool:
    """One panel per swept setting; False (nothing drawn) when only fixed points were run
    (``--only default,reference_base``)."""
    names = [n for n in results["sweeps"] if n not in ("default", "reference", "reference_base")]
    if not names:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    default = results["sweeps"]["default"][0]
    ref = (results["sweeps"].get("reference") or [None])[0]
    mean = lambda f: sum(f[a][b] for a, b in FIGS) / len(FIGS)          # noqa: E731
    for ax, name in zip(axes[0], names):
        pts = [p for p in results["sweeps"][name] if "skipped" not in p]
        groups: dict = {}
        for p in pts:
            key = p["setting"].get("sampler") or p["setting"].get("prior_sampler") or p["setting"].get(
                "upsampler_sampler") or "guidance"
            groups.setdefault(key, []).append(p)
        for key, ps in groups.items():
            ax.plot([p["nfe"] for p in ps], [mean(p) for p in ps], marker="o", label=key)
            if key == "guidance":
                for p in ps:
                    ax.annotate(str(next(iter(p["setting"].values()))), (p["nfe"], mean(p)), fontsize=7)
        ax.scatter([default["nfe"]], [mean(default)], marker="*", s=120, color="k", label="default", zorder=5)
        if ref:
            ax.axhline(mean(ref), color="gray", ls="--", lw=1, label="250 steps")
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("network evaluations per image")
        ax.set_ylabel("mean judged accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


if __name__ == "__main__":
    main()
