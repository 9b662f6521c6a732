"""Diversity against judged fidelity as the decoder's guidance scale grows, for unCLIP and the
caption-only path: DALL-E 2's figures 9 and 11 on the corpus.

    python bench/diversity_sweep.py [--workspace .] [--profile default] [--guidance 1,2,3,5]
                                    [--prompts 16] [--seeds 8] [--seed 0] [--batch-size 64]

The paper's claim (section 5.2): raising the guidance scale trades diversity for fidelity, and
unCLIP, whose image embedding is sampled by the prior, keeps more of its diversity than GLIDE
(the caption alone) at the same guidance. Here, on ``--prompts`` held-out test captions (half
one-object, half two-object, the first ones ``evaluate`` uses), each sampled ``--seeds`` times
(``Unclip.generate(..., n=seeds, guidance=g)``, the same seed at every point):

- ``unclip``: prior -> decoder -> upsamplers, the decoder at guidance g (the prior at its own);
- ``caption_only``: the decoder with z_i zeroed (evaluate's ``caption_only`` ablation), at g.

Per point: ``diversity`` (per caption the mean pairwise distance of its samples in the judge's
features, averaged over the captions), ``fidelity`` (the mean percent of each caption's checks
the judge passes) and ``all_right`` (percent passing all), from ``pipeline.diversity``; beside them
the same figures of real renders of the same scenes (``real_images``). Prints a table, writes
``reports/sweeps/diversity.json`` and a plot of diversity against fidelity (``diversity.png``).
Nothing here touches the workspace's models, metrics or DVC state.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config, diversity  # noqa: E402
from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.data.embedding_shards import load_split  # noqa: E402
from pipeline.evaluate import pick_rows  # noqa: E402
from pipeline.generate import Unclip  # noqa: E402
from pipeline.judge.model import Judge  # noqa: E402
from pipeline.workspace import Workspace, atomic_write_json  # noqa: E402

PATHS = ("unclip", "caption_only")


def sweep(unclip, judge, captions: list, gts: list, k: int, guidances: list[float], seed: int,
          batch_size: int, corpus, size: int, log=print) -> dict:
    """The figures of every (guidance, path) point and of the real renders; see the module docstring."""
    results: dict = {"n_prompts": len(captions), "seeds": k, "seed": seed, "captions": captions,
                     "default_guidance": unclip.decoder_meta["info"]["sampling"]["guidance_scale"],
                     "real_images": diversity.figures(judge, diversity.render_real(gts, k, corpus, size, seed=seed),
                                                      gts, k),
                     "points": []}
    log(f"{'guidance':>8s}  {'path':12s}  {'diversity':>9s}  {'fidelity %':>10s}  {'all right %':>11s}  {'s/img':>6s}")
    r = results["real_images"]
    log(f"{'-':>8s}  {'real_images':12s}  {r['diversity']:9.4g}  {r['fidelity']:10.2f}  {r['all_right']:11.2f}  "
        f"{'-':>6s}")
    zeros = torch.zeros_like(unclip.encode_text(captions[:1])[0]).expand(len(captions) * k, -1)
    for g in guidances:
        for path in PATHS:
            t0 = time.perf_counter()
            out = unclip.generate(captions, n=k, seed=seed, batch_size=batch_size, guidance=g,
                                  z_i=zeros if path == "caption_only" else None)
            fig = {"guidance": g, "path": path} | diversity.figures(judge, out["images"], gts, k) | {
                "nfe_per_image": sum(out["nfe"].values()),
                "seconds_per_image": round((time.perf_counter() - t0) / (len(captions) * k), 3)}
            results["points"].append(fig)
            log(f"{g:8.2f}  {path:12s}  {fig['diversity']:9.4g}  {fig['fidelity']:10.2f}  {fig['all_right']:11.2f}  "
                f"{fig['seconds_per_image']:6.3f}")
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for name in PATHS:
        pts = [p for p in results["points"] if p["path"] == name]
        ax.plot([p["fidelity"] for p in pts], [p["diversity"] for p in pts], marker="o", label=name)
        for p in pts:
            ax.annotate(f"g={p['guidance']:g}", (p["fidelity"], p["diversity"]), fontsize=7)
    real = results["real_images"]
    ax.scatter([real["fidelity"]], [real["diversity"]], marker="*", s=140, color="k", label="real renders", zorder=5)
    ax.set_xlabel("judged fidelity (% of each caption's checks passed)")
    ax.set_ylabel("diversity (mean pairwise distance, judge features)")
    ax.set_title(f"{results['n_prompts']} captions x {results['seeds']} samples")
    ax.legend(fontsize=8)
    ax.grid(alpha=.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--profile", default=None, help="params.yaml profile (the corpus's rendering settings)")
    ap.add_argument("--guidance", default="1,2,3,5", help="the decoder's guidance scales")
    ap.add_argument("--prompts", type=int, default=16, help="held-out captions, half of them one-object")
    ap.add_argument("--seeds", type=int, default=8, help="samples per caption (at least 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="json path (default <workspace>/reports/sweeps/diversity.json)")
    args = ap.parse_args(argv)
    if args.seeds < 2 or args.prompts < 1:
        ap.error("--seeds must be at least 2 and --prompts at least 1")
    ws = Workspace.at(args.workspace)
    cfg = config.load(ws.params, args.profile)
    unclip = Unclip.load(ws.root / "models")
    judge = Judge.load(ws.judge, unclip.device)
    size = unclip.sizes[-1]
    test = load_split(shard_paths(ws.embeddings), "test")
    rows = pick_rows(test["gt"], args.prompts - args.prompts // 2, args.prompts // 2)
    rows = diversity.pick(rows, test["gt"], args.prompts)
    captions, gts = [test["captions"][i] for i in rows], [test["gt"][i] for i in rows]
    print(f"{len(rows)} test captions x {args.seeds} samples, seed {args.seed}, final images {size} px", flush=True)
    results = sweep(unclip, judge, captions, gts, args.seeds, [float(g) for g in args.guidance.split(",")],
                    args.seed, args.batch_size, cfg.corpus, size, log=lambda s: print(s, flush=True))
    out = Path(args.out) if args.out else ws.reports / "sweeps" / "diversity.json"
    atomic_write_json(out, results)
    plot(results, out.with_suffix(".png"))
    print(f"-> {out}, {out.with_suffix('.png')}")
    by = {(p["guidance"], p["path"]): p for p in results["points"]}
    for g in sorted({p["guidance"] for p in results["points"]}):
        u, c = by[(g, "unclip")], by[(g, "caption_only")]
        ratio = u["diversity"] / c["diversity"] if c["diversity"] > 0 else float("nan")
        print(f"guidance {g:g}: unCLIP / caption-only diversity {ratio:.2f} "
              f"(fidelity {u['fidelity']:.1f} vs {c['fidelity']:.1f} %)")
    print(json.dumps({"real_images": results["real_images"]}))


if __name__ == "__main__":
    main()
