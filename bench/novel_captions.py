"""The cascade on captions phrased outside the corpus's templates, judged against the same truth.

    python bench/novel_captions.py [--workspace .] [--n-single 256] [--n-pair 256] [--seed 0]
                                   [--models DIR] [--families F,...] [--guidance G] [--prior-guidance G]
                                   [--prior-steps K] [--n-candidates K] [--upsampler-strength S]
                                   [--out reports/bench/novel_captions.json]

The phrasings are pipeline/phrasings.py's (``evaluate`` judges the held-out families on a subset);
this bench judges every family (and the probe ``unseen``) on all the test scenes, template by template, beside the test split's
own captions (``test_split``, what ``evaluate`` judges), with the same seed. Beside each, how often
CLIP itself prefers the caption to its twin with the spatial words reversed or the colors swapped,
from the real image's z_i: whether z_t carries what the phrasing says before the prior and decoder
see it. It stops where the corpus has come to train on a held-out phrasing.

Each family's templates take turns over the rows (row i gets template i mod k), so every
template is judged on about n / k captions; the json has each template's figures and the words
it adds to the corpus's vocabulary. A word no training caption has keeps its row of CLIP's token
table as initialised (weight decay aside: pipeline/clip/vocab.py), so it reaches the prior and the
decoder as noise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.clip import negatives  # noqa: E402
from pipeline.data.embedding_shards import load_split  # noqa: E402
from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.evaluate import pick_rows  # noqa: E402
from pipeline.generate import Unclip  # noqa: E402
from pipeline.judge.labels import accuracy, parse_gt  # noqa: E402
from pipeline.judge.model import Judge  # noqa: E402
from pipeline.phrasings import UNTRAINED, new_words, phrase, trained_on  # noqa: E402
from pipeline.quality import score  # noqa: E402
from pipeline.workspace import Workspace, atomic_write_json  # noqa: E402


def clip_verdicts(unclip, z_i: torch.Tensor, captions: list[str]) -> dict[str, list]:
    """Per caption, whether CLIP itself, from the real image's z_i, scores it above its twin with the
    spatial words reversed (``relation``) and with its first two colors swapped (``binding``): the
    NegCLIP twins of pipeline/clip/negatives.py; None where the caption has no such twin."""
    z = torch.nn.functional.normalize(z_i.float(), dim=-1)
    out = {}
    for kind, make in negatives.MAKERS.items():
        verdicts: list = [None] * len(captions)
        rows = [(k, t) for k, c in enumerate(captions) if (t := make(c)) is not None]
        if rows:
            idx = torch.tensor([k for k, _ in rows])
            true = torch.nn.functional.normalize(unclip.encode_text([captions[k] for k, _ in rows])[0], dim=-1)
            twin = torch.nn.functional.normalize(unclip.encode_text([t for _, t in rows])[0], dim=-1)
            for (k, _), ok in zip(rows, ((z[idx] * true).sum(-1) > (z[idx] * twin).sum(-1)).tolist()):
                verdicts[k] = ok
        out[kind] = verdicts
    return out


def clip_prefers(verdicts: dict[str, list], idx: list[int]) -> dict:
    """Percent of the rows ``idx`` that have a twin of each kind where CLIP prefers the caption (None: no twin)."""
    out = {}
    for kind, v in verdicts.items():
        have = [v[k] for k in idx if v[k] is not None]
        out[kind] = round(100 * sum(have) / len(have), 2) if have else None
    return out


def judged(judge, images: torch.Tensor, gts: list, real: torch.Tensor) -> dict:
    """``score``, with no Frechet distance (None) for a template that phrased a single image: a small test split."""
    if len(images) >= 2:
        return score(judge, images, gts, real)
    return accuracy(judge.predict(images)[0], gts) | {"frechet_distance": None}


def figures(fig: dict) -> str:
    s, p = fig["single"], fig["pair"]
    return (f"color {s['color']:5.1f}  shape {s['shape']:5.1f}  size {s['size']:5.1f}  position {s['position']:5.1f}  "
            f"both colors {p['colors']:5.1f}  relation {p['relation']:5.1f}  FD {fig['frechet_distance']:6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--models", default=None, help="a bundle directory (default: the workspace's models/)")
    ap.add_argument("--n-single", type=int, default=256)
    ap.add_argument("--n-pair", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--upsampler-strength", type=float, default=None,
                    help="where the upsamplers start (default: the models' own sampling)")
    ap.add_argument("--families", default=None,
                    help="comma-separated subset of test_split, original and the untrained families (default: all)")
    # sampling overrides (default: the models' own saved sampling), to weigh a sampling setting on held-out phrasings
    ap.add_argument("--guidance", type=float, default=None, help="the decoder's guidance scale")
    ap.add_argument("--prior-guidance", type=float, default=None)
    ap.add_argument("--prior-steps", type=int, default=None)
    ap.add_argument("--n-candidates", type=int, default=None,
                    help="the prior's candidates per caption, the one nearest z_t kept (the paper's 2)")
    ap.add_argument("--out", default=None, help="default: <workspace>/reports/bench/novel_captions.json")
    args = ap.parse_args()
    sampling = {"guidance": args.guidance, "prior_guidance": args.prior_guidance, "prior_steps": args.prior_steps,
                "n_candidates": args.n_candidates, "upsampler_strength": args.upsampler_strength}
    ws = Workspace.at(args.workspace)
    unclip, judge = Unclip.load(Path(args.models) if args.models else ws.root / "models"), Judge.load(ws.judge)
    test = load_split(shard_paths(ws.embeddings), "test", image_size=unclip.sizes[-1])
    rows = pick_rows(test["gt"], args.n_single, args.n_pair)
    gts = [parse_gt(test["gt"][i]) for i in rows]
    picked = torch.tensor(rows)
    z_i = test["z_i"][picked]                             # the real test images' CLIP embeddings
    _, real = judge.predict(test["images"][picked])
    held = trained_on()
    if held:
        raise SystemExit(f"the corpus now trains on the bench's held-out phrasings {held}: choose others")
    families = {"test_split": [(None, test["captions"][i]) for i in rows],
                **{f: [phrase(g, f, k) for k, g in enumerate(gts)] for f in ("original", *UNTRAINED)}}
    if args.families:
        wanted = args.families.split(",")
        if unknown := set(wanted) - set(families):
            raise SystemExit(f"--families: unknown {sorted(unknown)}; choose from {list(families)}")
        families = {f: families[f] for f in wanted}
    out: dict = {"n_single": args.n_single, "n_pair": args.n_pair, "seed": args.seed,
                 "sampling": {k: v for k, v in sampling.items() if v is not None}, "families": {}}
    for family, phrased in families.items():
        captions = [c for _, c in phrased]
        generated = unclip.generate(captions, n=1, seed=args.seed, batch_size=args.batch_size, **sampling)
        images, out["nfe"] = generated["images"], generated["nfe"]
        verdicts = clip_verdicts(unclip, z_i, captions)
        fig = score(judge, images, gts, real) | {"clip_prefers": clip_prefers(verdicts, range(len(captions)))}
        by_template = {}
        for template in dict.fromkeys(t for t, _ in phrased if t is not None):
            idx = [k for k, (t, _) in enumerate(phrased) if t == template]
            by_template[template] = {"n": len(idx), "new_words": new_words(template), "example": phrased[idx[0]][1],
                                     **judged(judge, images[torch.tensor(idx)], [gts[k] for k in idx], real),
                                     "clip_prefers": clip_prefers(verdicts, idx)}
        out["families"][family] = {**fig, "examples": captions[:2] + captions[len(captions) // 2:][:2],
                                   "by_template": by_template}
        print(f"{family:10s} {figures(fig)}  CLIP: {fig['clip_prefers']}", flush=True)
        for template, t in by_template.items():
            kind = "single" if t["single"]["n"] else "pair"       # a template phrases one kind of scene
            keys = ("color", "shape", "size", "position") if kind == "single" else ("colors", "relation")
            clip = " ".join(f"{k[:3]} {v:5.1f}" for k, v in t["clip_prefers"].items() if v is not None)
            print(f"    {t['n']:3d}  {' '.join(f'{k} {t[kind][k]:5.1f}' for k in keys):55s} CLIP {clip:19s} "
                  f"{t['example']!r}" + (f"  new: {', '.join(t['new_words'])}" if t["new_words"] else ""), flush=True)
    print(f"sampling {out['sampling'] or 'as saved'}: network evaluations per image {out['nfe']}")
    path = Path(args.out) if args.out else ws.reports / "bench" / "novel_captions.json"
    atomic_write_json(path, out)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
