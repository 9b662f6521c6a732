"""Where two-object binding is lost: one table down the unCLIP chain, on held-out test captions.

    python bench/binding.py [--workspace .] [--n 128] [--seed 0] [--batch-size 64] \
        [--phrasing reordered|rephrased] [--out <workspace>/reports/bench/binding.json]

Takes the first ``--n`` two-object test-split captions of a trained workspace that describe their
image (``evaluate.pick_rows`` with ``n_single=0``) and follows each scene down the chain
caption -> z_t -prior-> z_i_hat -decoder-> image -upsamplers-> final image. Rows (in chain order):

    real images          the real test images, read by the judge: the judge's own ceiling
    z_t (text side)      CLIP zero-shot from the caption's text embedding (a ceiling check; a text
                         embedding against texts, so trivially right where the caption is already
                         in the canonical phrasing below)
    true z_i             CLIP zero-shot from the true image embedding: does z_i carry it at all?
    prior z_i_hat        the same zero-shot from the prior's output (sampled as ``Unclip.generate``
                         does: the prior's saved sampler, steps, guidance and candidates), and
                         cos(z_i_hat, z_i)
    decoder(true z_i)    the decoder alone from the true z_i, read by the judge
    decoder(z_i_hat)     the decoder alone from the prior's output, same noise as the row above
    decoder(true z_i), no caption
                         the decoder from the true z_i with the caption dropped (its p(x | z_i), the
                         path classifier-free guidance trains): what it reads from z_i alone
    cascade              ``Unclip.generate``: prior -> decoder -> upsamplers, final images, judged

With ``--phrasing`` a held-out family of pipeline/phrasings.py, the captions are the same scenes
phrased in that family's templates (what a user might write), and two rows follow the cascade:

    decoder(true z_i), canonical tokens
                         the decoder from the true z_i reading the canonical phrasing's tokens
                         instead: beside decoder(true z_i), what the phrasing costs the decoder
    cascade, canonical caption
                         the cascade on the canonical phrasing, same seed: beside the cascade,
                         what the phrasing costs the whole chain

Columns, each a percentage with its standard error (binomial: sqrt(p (1 - p) / n)):

    colors     CLIP: the true caption beats the 12 captions with one color replaced by another
               corpus color (chance 1/13). Judge: both named colors are in the image.
    binding    CLIP: the true caption beats the one with the two colors swapped between the objects
               (same shapes, same relation; chance 1/2). Judge: each named color sits on its named
               shape (``labels.check``'s ``shapes``).
    relation   CLIP: the true caption beats the one with the relation reversed (left of <-> right
               of, above <-> below; chance 1/2). Judge: the objects are on the named axis in the
               named order.
    all        the three at once, per scene.
    cos z_i    mean cos to the true z_i: of z_t, of z_i_hat, of CLIP(image) for image rows.

The CLIP captions are the corpus's first two-object template ("a {color0} {shape0} {rel} a {color1}
{shape1}", data.scenes.PAIR_TEMPLATES[0]) written from the ground truth, the true one and its
counterfactuals alike, so that only the attribute under test differs between them.

Seeds are fixed (``--seed``): the cascade's generator, and one decoder generator shared by both
decoder rows. Only reads the workspace's models and shards; writes the JSON (atomically) and
nothing else.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.clip.zeroshot import PAIR_CHECKS, pair_candidates, pair_verdicts  # noqa: E402
from pipeline.data.scenes import COLORS  # noqa: E402
from pipeline.data.shards import shard_paths  # noqa: E402
from pipeline.decoder.diffusion import Condition  # noqa: E402
from pipeline.decoder.diffusion import drop  # noqa: E402
from pipeline.decoder.stage import decode  # noqa: E402
from pipeline.data.embedding_shards import load_split  # noqa: E402
from pipeline.evaluate import judged_se, pick_rows  # noqa: E402
from pipeline.generate import Unclip  # noqa: E402
from pipeline.images import to_uint8  # noqa: E402
from pipeline.judge.labels import check, parse_gt  # noqa: E402
from pipeline.judge.model import Judge  # noqa: E402
from pipeline.phrasings import UNTRAINED, phrase  # noqa: E402
from pipeline.quality import prepare  # noqa: E402
from pipeline.workspace import Workspace, atomic_write_json  # noqa: E402

COLUMNS = PAIR_CHECKS
# candidate k of a scene's caption list: 0 true, 1 colors swapped, 2 relation reversed, 3.. one color replaced
N_REPLACED = 2 * (len(COLORS) - 2)
CHANCE = {"colors": round(100 / (1 + N_REPLACED), 2), "binding": 50.0, "relation": 50.0}


@torch.no_grad()
def text_embeddings(unclip: Unclip, captions: list[str], batch_size: int) -> torch.Tensor:
    """Unit-norm z_t [len(captions), D] on the CPU, each distinct caption encoded once."""
    unique = sorted(set(captions))
    z = torch.cat([unclip.encode_text(unique[i:i + batch_size])[0].cpu() for i in range(0, len(unique), batch_size)])
    at = {c: j for j, c in enumerate(unique)}
    return z[torch.tensor([at[c] for c in captions])]


# ---- figures ----------------------------------------------------------------------------------------
def percent(ok: list[bool]) -> dict:
    """Percent right and its binomial standard error."""
    n = len(ok)
    pct = 100 * sum(ok) / n if n else float("nan")
    return {"value": round(pct, 2), "se": judged_se(pct, n)}          # judged_se: None without images


def mean_se(x: torch.Tensor) -> dict:
    """Mean and standard error of a sample [n]."""
    n = x.numel()
    se = x.std().item() / math.sqrt(n) if n > 1 else 0.0
    return {"value": round(x.mean().item(), 4), "se": round(se, 4)}


def judged(judge: Judge, images: torch.Tensor, gts: list) -> dict:
    """The judge's verdicts per scene (uint8 images of any size; ``Judge.predict`` resizes them to
    its own resolution): labels.check's colors / shapes (= binding) / relation / all."""
    preds, _ = judge.predict(images)
    v = [check(p, g) for p, g in zip(preds, gts)]
    return {"colors": [x["colors"] for x in v], "binding": [x["shapes"] for x in v],
            "relation": [x["relation"] for x in v], "all": [x["all"] for x in v]}


def row(label: str, reader: str, verdicts: dict, cos: torch.Tensor | None = None) -> dict:
    return {"label": label, "reader": reader, "n": len(verdicts["all"])} | {
        k: percent(verdicts[k]) for k in COLUMNS} | {"cos_to_z_i": None if cos is None else mean_se(cos)}


@torch.no_grad()
def image_cos(unclip: Unclip, images: torch.Tensor, z_i: torch.Tensor) -> torch.Tensor:
    """cos(CLIP(image), true z_i) per scene [n]; uint8 images resized as ``evaluate.clip_cosines``."""
    e = unclip.clip.encode_image(prepare(images, unclip.clip.image_size).to(unclip.device)).float().cpu()
    return F.cosine_similarity(e, z_i, dim=-1)


# ---- the chain --------------------------------------------------------------------------------------
def chain(unclip: Unclip, judge: Judge, test: dict, rows: list[int], seed: int, batch_size: int,
          phrasing: str | None = None) -> dict:
    """Every row of the table for the test scenes ``rows``, their captions the test split's or
    (``phrasing``) the scenes phrased in that held-out family's templates."""
    idx = torch.tensor(rows)
    gts = [parse_gt(test["gt"][i]) for i in rows]
    captions = ([phrase(g, phrasing, k)[1] for k, g in enumerate(gts)] if phrasing
                else [test["captions"][i] for i in rows])
    z_i = test["z_i"][idx]                                                   # [n, D], true, from the embed stage
    cands = [pair_candidates(g) for g in gts]
    k = len(cands[0])
    z_cands = text_embeddings(unclip, [c for cs in cands for c in cs], batch_size).view(len(rows), k, -1)

    # the whole cascade first: its prior output is the z_i_hat of the rows below (same seed, same sampling)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    out = unclip.generate(captions, n=1, seed=seed, batch_size=batch_size)
    z_t, z_hat = out["z_t"].float(), out["z_i"].float()                      # [n, D] each
    seconds = time.perf_counter() - t0

    # the decoder alone from true z_i and from z_i_hat: same text conditioning, same noise
    _, enc, mask = unclip.encode_text(captions)                              # [n, L, W], [n, L]
    def decoded(z: torch.Tensor, enc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return to_uint8(decode(unclip.decoder, Condition(z, enc, mask), unclip.decoder_sampling(), seed=seed,
                               batch_size=batch_size, precision=unclip.precision))    # uint8 [n, 3, s0, s0]

    no = torch.ones(len(rows), dtype=torch.bool)
    dec = {"true": decoded(z_i, enc, mask), "prior": decoded(z_hat, enc, mask),
           "no_caption": decoded(*drop(z_i, enc, mask, ~no, no))}
    real = test["images"][idx]                                               # uint8 [n, 3, S, S]

    cos = lambda a: F.cosine_similarity(a, z_i, dim=-1)                      # noqa: E731
    table = {
        "real_images": row("real test images", "judge", judged(judge, real, gts), image_cos(unclip, real, z_i)),
        "z_t": row("z_t (text side, ceiling check)", "clip zero-shot", pair_verdicts(z_t, z_cands), cos(z_t)),
        "z_i": row("true z_i", "clip zero-shot", pair_verdicts(z_i, z_cands)),
        "z_i_hat": row("prior z_i_hat", "clip zero-shot", pair_verdicts(z_hat, z_cands), cos(z_hat)),
        "decoder_true_z_i": row("decoder(true z_i)", "judge", judged(judge, dec["true"], gts),
                                image_cos(unclip, dec["true"], z_i)),
        "decoder_z_i_hat": row("decoder(z_i_hat)", "judge", judged(judge, dec["prior"], gts),
                               image_cos(unclip, dec["prior"], z_i)),
        "decoder_no_caption": row("decoder(true z_i), no caption", "judge", judged(judge, dec["no_caption"], gts),
                                  image_cos(unclip, dec["no_caption"], z_i)),
        "cascade": row("cascade (final images)", "judge", judged(judge, out["images"], gts),
                       image_cos(unclip, out["images"], z_i)),
    }
    if phrasing:
        canonical = [phrase(g, "original", k)[1] for k, g in enumerate(gts)]
        _, enc_c, mask_c = unclip.encode_text(canonical)
        table["decoder_canonical_tokens"] = row("decoder(true z_i), canonical tokens", "judge",
                                                judged(judge, (d := decoded(z_i, enc_c, mask_c)), gts),
                                                image_cos(unclip, d, z_i))
        torch.manual_seed(seed)
        c = unclip.generate(canonical, n=1, seed=seed, batch_size=batch_size)["images"]
        table["cascade_canonical"] = row("cascade, canonical caption", "judge", judged(judge, c, gts),
                                         image_cos(unclip, c, z_i))
    example = {"caption": captions[0], "phrasing": phrasing or "test split", "true": cands[0][0],
               "colors_swapped": cands[0][1], "relation_reversed": cands[0][2], "color_replaced": cands[0][3:]}
    return {"rows": list(table), "table": table, "example_counterfactuals": example, "n_candidates_per_scene": k,
            "cascade_seconds": round(seconds, 2), "nfe_per_image": out["nfe"]}


def fmt(cell: dict | None, digits: int = 1) -> str:
    if cell is None:
        return "-"
    return f"{cell['value']:.{digits}f} ± {cell['se']:.{digits}f}"


def print_table(table: dict) -> None:
    head = f"{'link':<38}{'read by':<16}{'n':>5}" + "".join(f"{c:>16}" for c in COLUMNS) + f"{'cos z_i':>18}"
    print(head)
    print("-" * len(head))
    for r in table.values():
        print(f"{r['label']:<38}{r['reader']:<16}{r['n']:>5}" + "".join(f"{fmt(r[c]):>16}" for c in COLUMNS)
              + f"{fmt(r['cos_to_z_i'], 3):>18}")
    print("chance of the clip zero-shot: " + ", ".join(f"{k} {v}%" for k, v in CHANCE.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--n", type=int, default=128, help="two-object test captions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--phrasing", choices=UNTRAINED, default=None,
                    help="the scenes phrased in this held-out family's templates (default: the test split's captions)")
    ap.add_argument("--out", default=None, help="default: <workspace>/reports/bench/binding.json")
    args = ap.parse_args()
    ws = Workspace.at(args.workspace)
    paths = shard_paths(ws.embeddings)
    if not paths:
        sys.exit(f"no embedding shards in {ws.embeddings}: run the embed stage first")
    try:
        unclip = Unclip.load(ws.root / "models")
        judge = Judge.load(ws.judge, unclip.device)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(str(err))
    test = load_split(paths, "test", image_size=judge.image_size)
    rows = pick_rows(test["gt"], 0, args.n)
    if not rows:
        sys.exit("no two-object test captions with ground truth in the embeddings")
    figures = {"workspace": str(ws.root), "n_asked": args.n, "n": len(rows), "seed": args.seed,
               "sizes": unclip.sizes, "judge_size": judge.image_size, "chance": CHANCE,
               "prior_sampling": unclip.prior_meta["info"]["sampling"]
               | {"n_candidates": unclip.prior_meta["info"].get("n_candidates", 2)},
               "decoder_sampling": unclip.decoder_meta["info"]["sampling"]}
    figures |= chain(unclip, judge, test, rows, args.seed, args.batch_size, args.phrasing)
    figures["phrasing"] = args.phrasing
    print(f"{len(rows)} two-object test captions{f', phrased {args.phrasing}' if args.phrasing else ''}, "
          f"seed {args.seed}; percent right ± standard error")
    print_table(figures["table"])
    out = Path(args.out) if args.out else ws.reports / "bench" / "binding.json"
    atomic_write_json(out, figures)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
