"""Benchmark: the filter's duplicate search at 1x, 4x, 16x the smoke corpus (and more).

    python bench/near_dedup.py [--scales 1,4,16] [--base 400] [--workdir DIR] [--all-pairs-max 70000]

For each scale k it renders the embedded corpus with k x ``--base`` scenes (the smoke profile's
400 by default; its planted exact and near duplicates and fault URLs scale with it), fingerprints
every non-fault image as the filter's map does (pipeline/data/dedup.py: rules, pixel sha256,
pHash, thumbnail), then times, on one core:

- exact dedup, the group-by over pixel hashes;
- near dedup through banded pHash candidates (multi-index hashing with the bands
  ``dedup.choose_bands`` picks, what the stage runs), the fixed d + 1 bands it started from
  (``bands5``), and the all-pairs search (up to ``--all-pairs-max`` samples), checking all three
  find the same matches;

and prints one table: samples, seconds per step, candidate pairs, the time per sample, and the
recall of the planted near and exact duplicates. Cost that grows near-linearly keeps its
``us/sample`` flat across rows.

The corpus draws few distinct layouts (one or two shapes at a few positions on a few
backgrounds), so its pHashes crowd: the pairs within 4 bits, which any exact search must
check by color, grow as N^2 there. A second table (``--spread``) times the same searches on
pHashes spread as web images' are (uniform 64-bit hashes, 1 % planted copies with up to 4
bits flipped) at the same sizes and up to 1.7M, where the fixed bands' proposals grow as N^2
and the chosen bands' near-linearly (fixed bands up to ``--bands5-max``, all pairs up to
``--all-pairs-max``: memory and time).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config  # noqa: E402
from pipeline.data import corpus, dedup  # noqa: E402
from pipeline.data.filter import score_against_truth  # noqa: E402
from pipeline.workspace import Workspace  # noqa: E402

PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


def fingerprints(ws: Workspace, f) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fingerprint table, pairs) for every non-fault URL of the corpus, as if crawled in order."""
    from pipeline.data.corpus_images import CorpusImages
    from pipeline.data.shards import ShardSink, shard_paths
    pairs = pd.read_parquet(ws.corpus / "pairs.parquet")
    good = pairs[pairs.fault.isna()]
    with ShardSink(ws.raw, 2500) as sink, CorpusImages(ws.corpus) as images:
        for row in good.itertuples():
            sink.write({"__key__": row.key, "jpg": images.read(row.url), "txt": row.caption.encode()})
    fp = functools.partial(dedup.fingerprint_shard, f=f)
    return pd.concat([fp(p) for p in shard_paths(ws.raw)], ignore_index=True), pairs


def one_scale(k: int, base: int, root: Path, all_pairs_max: int) -> dict:
    cfg = config.load(PARAMS, "smoke")
    cfg = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"n_scenes": k * base, "workers": 1})})
    f = cfg.filter
    ws = Workspace.at(root / f"x{k}")
    corpus.run(cfg, ws)
    t0 = time.perf_counter()
    table, pairs = fingerprints(ws, f)
    t_map = time.perf_counter() - t0

    survivors = table[table.reason.isna()]
    t0 = time.perf_counter()
    exact = dedup.exact_duplicates(survivors["digest"], survivors["key"], {})
    t_exact = time.perf_counter() - t0
    kept = survivors[exact.isna()]
    phash = kept["phash"].to_numpy(np.int64).view(np.uint64)
    thumbs = dedup.thumbs_of(kept["thumb"])

    searches = compare(phash, thumbs, f.phash_max_distance, f.thumb_max_cell_rmse, all_pairs_max, all_pairs_max)
    match, stats = searches.pop("match"), searches.pop("stats")

    keys = kept["key"].to_numpy()
    drops = pd.concat([
        pd.DataFrame({"key": survivors["key"][exact.notna()], "reason": "exact_duplicate",
                      "duplicate_of": exact[exact.notna()]}),
        pd.DataFrame({"key": keys[match >= 0], "reason": "near_duplicate", "duplicate_of": keys[match[match >= 0]]})])
    truth = score_against_truth(drops, pairs, set(table["key"]))
    n = len(table)
    return {"scale": k, "samples": n, "map_s": t_map, "exact_s": t_exact, **searches, **stats, "near_dropped": int((match >= 0).sum()),
            "near_recall": truth["near"]["recall"], "exact_recall": truth["exact"]["recall"],
            "false_positives": truth["near"]["false_positives"] + truth["exact"]["false_positives"]}


def compare(phash, thumbs, d: int, rmse: float, bands5_max: int, all_pairs_max: int) -> dict:
    """The chosen bands' search (lsh_s, its stats and matches), the fixed d + 1 bands' (bands5_s,
    bands5_proposals) and all pairs (all_pairs_s) where small enough; same_matches over those run."""
    t0 = time.perf_counter()
    match, stats = dedup.near_duplicates(phash, thumbs, d, rmse)
    out = {"lsh_s": time.perf_counter() - t0, "bands5_s": None, "bands5_proposals": None, "all_pairs_s": None}
    same = True
    if len(phash) <= bands5_max:
        t0 = time.perf_counter()
        ref, ref_stats = dedup.near_duplicates(phash, thumbs, d, rmse, n_bands=d + 1)
        out.update(bands5_s=time.perf_counter() - t0, bands5_proposals=ref_stats["band_candidates"])
        same &= bool((ref == match).all())
    if len(phash) <= all_pairs_max:
        t0 = time.perf_counter()
        ref, _ = dedup.near_duplicates_all_pairs(phash, thumbs, d, rmse)
        out["all_pairs_s"] = time.perf_counter() - t0
        same &= bool((ref == match).all())
    return {**out, "same_matches": same, "match": match, "stats": stats}


def spread_row(n: int, bands5_max: int, all_pairs_max: int, seed: int = 0) -> dict:
    """The searches on ``n`` uniform pHashes with 1 % near copies (<= 4 bits flipped), equal thumbnails."""
    rng = np.random.default_rng(seed)
    m = n // 100
    base = rng.integers(0, 2 ** 63, n - m, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n - m, dtype=np.uint64)
    flips = np.zeros(m, np.uint64)
    for _ in range(4):
        flips |= np.uint64(1) << rng.integers(0, 64, m).astype(np.uint64)
    phash = np.concatenate([base, base[rng.integers(0, n - m, m)] ^ flips])
    r = compare(phash, np.zeros((n, 8, 8, 3), np.uint8), 4, 3.25, bands5_max, all_pairs_max)
    return {"samples": n, **r, **r["stats"], "near_dropped": int((r["match"] >= 0).sum())}


def cell(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,4,16")
    ap.add_argument("--base", type=int, default=400, help="scenes at scale 1 (the smoke profile's n_scenes)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--all-pairs-max", type=int, default=70000)
    ap.add_argument("--bands5-max", type=int, default=250000, help="largest search with the fixed d + 1 bands")
    ap.add_argument("--spread", default="408,1632,6528,26112,104448,417792,1671168",
                    help="sizes for the table on uniformly spread pHashes ('' to skip)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="near-dedup-"))
    rows = [one_scale(int(k), args.base, root, args.all_pairs_max) for k in args.scales.split(",") if k]
    print(f"\nduplicate search, one core ({root}):")
    head = ("scale", "samples", "map_s", "exact_s", "lsh_s", "bands5_s", "all_pairs_s", "bands", "band_candidates",
            "bands5_proposals", "phash_candidates", "color_confirmed", "near_dropped", "same_matches", "near_recall",
            "exact_recall", "false_positives")
    print(" | ".join(head) + " | lsh us/sample | lsh us/phash candidate")
    for r in rows:
        print(" | ".join(cell(r[h]) for h in head)
              + f" | {1e6 * r['lsh_s'] / r['samples']:.1f} | {1e6 * r['lsh_s'] / max(r['phash_candidates'], 1):.2f}")
    if args.spread:
        print("\nspread pHashes (web-like), one core:")
        head = ("samples", "lsh_s", "bands5_s", "all_pairs_s", "bands", "band_candidates", "bands5_proposals",
                "near_dropped", "same_matches")
        print(" | ".join(head) + " | lsh us/sample")
        for n in map(int, args.spread.split(",")):
            r = spread_row(n, args.bands5_max, args.all_pairs_max)
            print(" | ".join(cell(r[h]) for h in head) + f" | {1e6 * r['lsh_s'] / n:.2f}", flush=True)


if __name__ == "__main__":
    main()
