"""What CLIP alone reads from captions phrased outside the corpus's templates: a CLIP trained here
(``--set`` over the workspace's ``clip`` section) or loaded (``--load``), before any prior or decoder.

    python bench/clip_phrasings.py [--workspace .] [--load models/clip | --set rewrites=3 --set steps=1800]
                                   [--threads 2] [--out reports/bench/clip_phrasings.json] [--keep DIR]

On the test split's first 256 one-object and 256 two-object real images (evaluate's rows), for the
test split's own captions and each family of pipeline/phrasings.py (``original``, the held-out
``reordered`` and ``rephrased``, and the probe ``unseen``), per family and per template:

- ``relation`` / ``binding``: how often CLIP, from the real image's z_i, scores the caption above its
  twin with the spatial words reversed / its first two colors swapped (bench/novel_captions.py's
  ``clip_verdicts``: chance 50 %);
- ``r@1``: image-to-text recall@1 among the family's 256 captions of the same kind (one object,
  two objects): does z_t carry the whole scene;
- ``to_canonical`` (``relation`` / ``binding``): how often the caption's z_t lies nearer the test split's
  caption of its scene than that caption's reversed / color-swapped twin: where the prior, trained on
  the corpus's captions' z_t, will place it (bench/binding.py's z_t row; 100 for the test split itself);
  ``pairs`` and ``to_canonical_pairs``: the same two figures on the two-object scenes alone (a one-object
  caption's "relation" twin reverses its position).

With ``--set`` it trains the CLIP first (the clip stage's own ``train``, at ``--threads``, into a
scratch checkpoint folder beside ``--out``) and adds CLIP's val figures (zero-shot, recall).
A CLIP takes about 5 min at 900 steps on 2 cores; the json keeps the training summary.

The thread count draws the CLIP: a step's sums depend on it, and what CLIP reads of the held-out
phrasings is set in its first half. ``make run`` trains CLIP at one thread until the stages beside it
end (about step 900 on a 2-core machine), so ``--threads 1`` trains the CLIP a fresh run of the same
config trains (within a point of every figure of two fresh runs' CLIPs, two configs), and
``--threads 2`` another draw (seed 0: the held-out new orders' relation 64.5 against 51.6; with
``rewrites_pronoun_first`` 96.5 against 60.2; docs/MEASURED.md, thirty-first session). Compare two
configs at the same threads, and take ``--threads 1`` for what a fresh run will train.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from novel_captions import clip_prefers, clip_verdicts  # noqa: E402

from pipeline.clip import model as clip_model  # noqa: E402
from pipeline.clip.train import train  # noqa: E402
from pipeline.clip.zeroshot import embed_images, embed_texts, evaluate  # noqa: E402
from pipeline.config import load, with_overrides  # noqa: E402
from pipeline.data.image_shards import load_image_split  # noqa: E402
from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.evaluate import pick_rows  # noqa: E402
from pipeline.judge.labels import parse_gt  # noqa: E402
from pipeline.phrasings import UNTRAINED, phrase  # noqa: E402
from pipeline.workspace import Workspace, atomic_write_json  # noqa: E402


class TextEncoder:
    """``encode_text(captions) -> (z_t, ...)``, as clip_verdicts reads the cascade's."""

    def __init__(self, clip):
        self.clip = clip

    def encode_text(self, captions: list[str]):
        return (embed_texts(self.clip, list(captions), 512),)


def recall_at_1(z_i: torch.Tensor, z_t: torch.Tensor, kinds: list[range]) -> list[float]:
    """Image-to-text recall@1 (percent) within each range of rows (one kind of scene; None for an empty one)."""
    out = []
    for r in kinds:
        if not len(r):
            out.append(None)
            continue
        sim = z_i[r.start:r.stop] @ z_t[r.start:r.stop].T
        out.append(round(100 * (sim.argmax(1) == torch.arange(len(r))).float().mean().item(), 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--load", default=None, help="a CLIP folder (models/clip); default: train one with --set")
    ap.add_argument("--set", action="append", default=[], help="key=<json> over params.yaml's clip section")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; 1 draws the CLIP make run trains (see above), 2 another draw")
    ap.add_argument("--out", default=None, help="default: <workspace>/reports/bench/clip_phrasings.json")
    ap.add_argument("--keep", default=None, help="with --set: keep the trained CLIP in this folder (for --load)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ws = Workspace.at(args.workspace)
    out_path = Path(args.out) if args.out else ws.reports / "bench" / "clip_phrasings.json"
    paths = shard_paths(ws.filtered)
    result: dict = {}
    if args.load:
        clip = clip_model.load(Path(args.load))
        result["clip"] = str(args.load)
    else:
        c = with_overrides(load(ws.root / "params.yaml").clip, args.set, "clip")
        with tempfile.TemporaryDirectory(dir=out_path.parent if out_path.parent.exists() else None) as scratch:
            clip, result["train"] = train(c, paths, Path(scratch))
        if args.keep:                                     # as the clip stage saves it: --load reads it back
            clip_model.save(clip, Path(args.keep), {"clip": c.model_dump(mode="json"), "bench": "clip_phrasings"})
        result["clip"] = {"set": args.set}
    clip.model.eval()
    with torch.no_grad():
        if not args.load:
            result["val"] = evaluate(clip, load_image_split(paths, "val", clip.image_size), 512)
        test = load_image_split(paths, "test", clip.image_size)
        rows = pick_rows(test["gt"], 256, 256)
        gts = [parse_gt(test["gt"][i]) for i in rows]
        n_single = sum(len(g["objects"]) == 1 for g in gts)
        z_i = torch.nn.functional.normalize(embed_images(clip, test["images"][torch.tensor(rows)], 256).float(), dim=-1)
        kinds = [range(0, n_single), range(n_single, len(rows))]
        families = {"test_split": [(None, test["captions"][i]) for i in rows],
                    **{f: [phrase(g, f, k) for k, g in enumerate(gts)] for f in ("original", *UNTRAINED)}}
        encoder = TextEncoder(clip)
        canonical = [c for _, c in families["test_split"]]
        result["families"] = {}
        for family, phrased in families.items():
            captions = [c for _, c in phrased]
            verdicts = clip_verdicts(encoder, z_i, captions)
            z_t = torch.nn.functional.normalize(encoder.encode_text(captions)[0].float(), dim=-1)
            # where the prior will read z_t: nearer its scene's canonical caption than that caption's twins?
            placed = clip_verdicts(encoder, z_t, canonical)
            fig = {**clip_prefers(verdicts, range(len(captions))), "r@1": recall_at_1(z_i, z_t, kinds),
                   "pairs": clip_prefers(verdicts, kinds[1]), "to_canonical": clip_prefers(placed, range(len(captions))),
                   "to_canonical_pairs": clip_prefers(placed, kinds[1]), "by_template": {}}
            for template in dict.fromkeys(t for t, _ in phrased if t is not None):
                idx = [k for k, (t, _) in enumerate(phrased) if t == template]
                fig["by_template"][template] = clip_prefers(verdicts, idx) | {
                    f"to_canonical_{k}": v for k, v in clip_prefers(placed, idx).items()}
            result["families"][family] = fig
            said = "  ".join(f"{k} {v:5.1f}" for k, v in (("relation", fig["relation"]), ("binding", fig["binding"]),
                                                             ("r@1 one object", fig["r@1"][0]),
                                                             ("two objects", fig["r@1"][1]),
                                                             ("two objects' relation", fig["pairs"]["relation"]),
                                                             ("z_t to canonical: relation",
                                                              fig["to_canonical"]["relation"]),
                                                             ("binding", fig["to_canonical"]["binding"]),
                                                             ("two objects' relation",
                                                              fig["to_canonical_pairs"]["relation"]))
                             if v is not None)
            print(f"{family:10s} {said}", flush=True)
            for template, t in fig["by_template"].items():
                said = "  ".join(f"{k} {v:5.1f}" for k, v in t.items() if v is not None)
                print(f"    {said:60s} {template}", flush=True)
    if "val" in result:
        print("val", {k: v for k, v in result["val"].items() if not isinstance(v, dict)},
              result["val"].get("zero_shot_pairs"))
    atomic_write_json(out_path, result)
    print(f"-> {out_path}")


if __name__ == "__main__":
    main()
