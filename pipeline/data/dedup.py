"""Duplicate search for the filter stage, in the shape a distributed engine runs it.

Three steps, each one a familiar data-parallel operation (pipeline/data/dedup_spark.py runs the
same steps as Spark jobs; this module runs them in one process with numpy/pandas):

1. *Fingerprints as a map* (:func:`fingerprint_shard`): one raw shard -> one row per sample:
   the first per-sample rule it fails, and for a survivor its pixel sha256, 64-bit pHash and
   8x8 color thumbnail. Shards are independent, so any number of tasks can fingerprint them.
2. *Exact duplicates as a group-by* (:func:`exact_duplicates`): survivors grouped by pixel hash;
   the first in input order is kept, the others point at it (or at an earlier run's sample with
   that hash, incremental).
3. *Near duplicates through banded pHash candidates* (multi-index hashing, Norouzi, Punjani and
   Fleet 2012, :func:`candidate_pairs`): the 64 pHash bits are cut into ``m`` bands. Two hashes
   within Hamming distance ``d`` differ in at most ``d`` bits, so (pigeonhole) some band holds at
   most ``floor(d / m)`` of them: probing every band's value with all its flips of up to
   ``floor(d / m)`` bits finds the pair (with ``m = d + 1`` no flips: the pair shares a band's
   value exactly, a plain join on (band, value)). Candidates are then filtered by the true
   distance: the *same* candidate set as comparing all pairs, at the cost of the probes and the
   buckets' sizes instead of N^2/2. ``m`` is chosen per search from the hashes themselves
   (:func:`choose_bands`): fewer, wider bands once the narrow ones' buckets crowd, which keeps
   the work per sample near constant as N grows (about 70 probes a sample at 1M spread
   hashes, 1,100 at 400M). Each candidate is confirmed by color (thumbnail cells), and a
   greedy pass in input order (:func:`greedy_matches`: a sample is dropped only for matching an
   earlier sample that was itself kept) decides the drops, exactly as the all-pairs search did.

The greedy pass is sequential, but it sees only confirmed pairs (about one per near duplicate),
so a driver holds it at any scale.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

from .rules import THUMB_GRID, check, phash64, pixel_sha256, thumbnail
from .shards import iter_shard

# Near-duplicate candidates are scored in batches of this many pairs (thumbnail gathers).
PAIR_BATCH = 8192
# The all-pairs reference search bounds its (rows x samples) uint64 XOR matrix to 32 MiB.
PAIR_BUDGET = 1 << 22
FINGERPRINT_COLUMNS = ("key", "shard", "reason", "square", "digest", "phash", "thumb")


# ---- 1. fingerprints: a map over shards ----------------------------------------------------------
def fingerprint_shard(path, f) -> pd.DataFrame:
    """One row per sample of the shard at ``path``, in shard order.

    Columns: key, shard (file name), reason (the first rule failed, None for a survivor), square
    (bool), digest (32-byte pixel sha256), phash (uint64 as int64 bits), thumb (192 bytes: the
    (8, 8, 3) uint8 cell means). Fingerprints are None/0 for a sample that failed a rule, and
    pHash/thumbnail are left out (0, b"") when ``f.near_dedup`` is off. ``f``: the filter config.
    """
    rows = []
    for sample in iter_shard(path):
        key, shard = sample["__key__"], sample["__shard__"]
        reason, img = check(sample, f)
        if reason:
            rows.append((key, shard, reason, False, None, 0, b""))
            continue
        digest = pixel_sha256(img) if f.exact_dedup else None
        ph, th = (phash64(img), thumbnail(img).tobytes()) if f.near_dedup else (0, b"")
        rows.append((key, shard, None, img.width != img.height, digest,
                     int(np.uint64(ph).view(np.int64)), th))
    return pd.DataFrame(rows, columns=list(FINGERPRINT_COLUMNS))


def thumbs_of(column) -> np.ndarray:
    """(N, 8, 8, 3) uint8 from a column of 192-byte thumbnails."""
    return np.frombuffer(b"".join(column), np.uint8).reshape(-1, THUMB_GRID, THUMB_GRID, 3)


# ---- 2. exact duplicates: a group-by over pixel hashes ------------------------------------------
def exact_duplicates(digest: pd.Series, key: pd.Series, earlier: dict[bytes, str]) -> pd.Series:
    """For each survivor (rows in input order), the key it exactly duplicates, else None.

    Group by pixel hash: the first row of a group is kept unless an earlier run kept that hash
    (``earlier``: digest -> key), and every other row points at the group's first key.
    """
    frame = pd.DataFrame({"digest": digest.values, "key": key.values})
    first = frame.groupby("digest", sort=False)["key"].transform("first")
    is_first = ~frame["digest"].duplicated(keep="first")
    prior = frame["digest"].map(earlier)
    out = first.where(~is_first, None)
    out = prior.where(prior.notna(), out)
    return pd.Series(out.values, index=digest.index, dtype=object)


# ---- 3. near duplicates: banded pHash candidates, color check, greedy ----------------------------
def band_layout(n_bands: int) -> list[tuple[int, int]]:
    """(shift, width) of ``n_bands`` bands cutting the 64 pHash bits (widths differ by at most
    one: 13, 13, 13, 13, 12 for 5 bands)."""
    widths = [64 // n_bands + (i < 64 % n_bands) for i in range(n_bands)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
    return list(zip(shifts, widths))


def band_values(phash: np.ndarray, n_bands: int) -> np.ndarray:
    """(bands, N) uint64: each band's bits of each pHash."""
    phash = phash.astype(np.uint64)
    return np.stack([(phash >> np.uint64(s)) & np.uint64((1 << w) - 1) for s, w in band_layout(n_bands)])


def flip_masks(width: int, radius: int) -> np.ndarray:
    """(P,) uint64: every mask of at most ``radius`` of ``width`` bits, 0 first; P = sum C(width, k)."""
    masks, frontier = [0], [0]
    for _ in range(radius):        # each mask of k bits extended by one bit above its highest
        frontier = [m | 1 << bit for m in frontier for bit in range(m.bit_length(), width)]
        masks += frontier
    return np.array(masks, np.uint64)


def band_radii(n_bands: int, max_distance: int) -> list[int]:
    """The flips each band is probed with: d = m r + a (0 <= a < m) bits spread over m bands
    leave one of the first a + 1 bands within r bits or one of the others within r - 1 (else
    there would be at least (a + 1)(r + 1) + (m - a - 1) r = d + 1): r for the first a + 1,
    r - 1 for the rest (-1: not probed). With m = d + 1 every band is probed as it is (r = 0)."""
    r, a = divmod(max_distance, n_bands)
    return [r if b <= a else r - 1 for b in range(n_bands)]


# Work per probe against work per proposed pair (a table or sorted-array lookup vs a gather, XOR,
# popcount and key): what :func:`choose_bands` weighs (bench/near_dedup.py, spread hashes).
PROBE_COST = 2.0


def choose_bands(phash: np.ndarray, max_distance: int) -> int:
    """The number of bands m (1 ... d + 1) whose search does the least work: the N x P probes
    (P = the flips of :func:`band_radii`) plus the pairs they propose, estimated per band as its
    probes per sample x the pairs sharing its value (exact for m = d + 1). Any m finds the same
    pairs; only the work differs: narrow bands, no flips, while their buckets stay small; wider
    ones with flips once N nears 2^(64 / m) or the hashes crowd."""
    n, best = len(phash), (float("inf"), max_distance + 1)
    for m in range(min(max_distance + 1, 64), 0, -1):
        flips = [sum(math.comb(w, k) for k in range(r + 1)) for (_, w), r in zip(band_layout(m), band_radii(m, max_distance))]
        if n * sum(flips) * PROBE_COST >= best[0]:
            continue
        shared = [int((c * (c - 1) // 2).sum()) for c in
                  (np.unique(v, return_counts=True)[1].astype(np.int64) for v in band_values(phash, m))]
        work = n * sum(flips) * PROBE_COST + sum(p * c for p, c in zip(flips, shared))
        best = min(best, (work, m))
    return best[1]


def _pairs_within_buckets(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with a > b for every two rows sharing a value: the join of one band with itself.

    Sort by value (stable, so indices ascend within a bucket); an element at rank r of its bucket
    pairs with the r elements before it: sum(r) pairs, generated without a Python loop.
    """
    order = np.argsort(values, kind="stable")
    v = values[order]
    n = len(v)
    start = np.flatnonzero(np.r_[True, v[1:] != v[:-1]]) if n else np.zeros(0, np.int64)
    bucket_start = np.repeat(start, np.diff(np.r_[start, n]))      # (N,) position of the bucket's first
    rank = np.arange(n) - bucket_start
    return order[np.repeat(np.arange(n), rank)], order[_expand(np.repeat(bucket_start, rank), rank)]


def _expand(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The positions starts[k], starts[k] + 1, ... (counts[k] of them) for each k, concatenated;
    ``starts`` already repeated counts[k] times."""
    total = int(counts.sum())
    return starts + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))


# Probes looked up at once by :func:`_pairs_within_flips` (bounds its (chunk, P) arrays).
PROBE_BATCH = 1 << 20


def _pairs_within_flips(values: np.ndarray, width: int, masks: np.ndarray,
                        first: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), a > b, a >= ``first``: every two rows whose ``width``-bit values differ by one of
    ``masks``. Each row a probes value[a] ^ mask among the rows sorted by value (a bucket's start
    from a table of 2^width counts when that is small, else a binary search); a pair is found
    from its larger row."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    if width <= TABLE_BITS:
        counts = np.bincount(v.astype(np.int64), minlength=1 << width)
        starts = np.cumsum(counts) - counts
    rows = max(1, PROBE_BATCH // len(masks))
    found_a, found_b = [], []
    for start in range(first, len(values), rows):
        q = np.arange(start, min(start + rows, len(values)))
        probes = (values[q, None] ^ masks[None, :]).ravel()                   # (len(q) * P,)
        if width <= TABLE_BITS:
            lo, count = starts[probes.astype(np.int64)], counts[probes.astype(np.int64)]
        else:
            lo = np.searchsorted(v, probes, "left")
            count = np.searchsorted(v, probes, "right") - lo
        a = np.repeat(np.repeat(q, len(masks)), count)
        b = order[_expand(np.repeat(lo, count), count)]
        found_a.append(a[a > b])
        found_b.append(b[a > b])
    empty = np.zeros(0, np.int64)
    return (np.concatenate(found_a), np.concatenate(found_b)) if found_a else (empty, empty)


TABLE_BITS = 24          # bands up to this wide look buckets up in a table (2^24 int64: 128 MiB)


def candidate_pairs(phash: np.ndarray, max_distance: int, first: int = 0,
                    n_bands: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(i, j, band_candidates, bands): every pair i > j, i >= ``first``, whose pHashes are within
    ``max_distance`` bits, sorted by i then j, found through ``n_bands`` bands (default
    :func:`choose_bands`; see the module doc); band_candidates: the pairs the bands proposed (a
    pair proposed by two bands counts twice), before the distance check."""
    n = len(phash)
    phash = phash.astype(np.uint64)
    m = n_bands or choose_bands(phash, max_distance)
    keys, banded = [], 0
    for values, (_, width), radius in zip(band_values(phash, m), band_layout(m), band_radii(m, max_distance)):
        if radius < 0:
            continue
        if radius == 0:
            a, b = _pairs_within_buckets(values)
        else:
            a, b = _pairs_within_flips(values, width, flip_masks(width, radius), first)
        banded += int((a >= first).sum())          # proposed for the samples searched (>= first)
        # The distance check before the de-duplication across bands: np.unique then sorts only
        # the close pairs (a tenth of the banded ones on the corpus), not every banded pair.
        keep = (a >= first) & (np.bitwise_count(phash[a] ^ phash[b]) <= max_distance)
        keys.append(a[keep].astype(np.int64) * n + b[keep])
    pair = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)   # sorted: by i, then j
    return pair // max(n, 1), pair % max(n, 1), banded, m


def thumb_distance(thumbs: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Largest per-cell RGB RMSE (0-255) between the thumbnails of pairs ``(i[k], j[k])``.

    thumbs: (N, G, G, 3) uint8; returns float32 (len(i),).
    """
    out = np.empty(len(i), np.float32)
    for s in range(0, len(i), PAIR_BATCH):
        d = thumbs[i[s:s + PAIR_BATCH]].astype(np.int32) - thumbs[j[s:s + PAIR_BATCH]]
        out[s:s + PAIR_BATCH] = np.sqrt((d * d).mean(axis=-1)).max(axis=(1, 2))
    return out


def greedy_matches(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """match[a] = the first (smallest) b with a confirmed pair (a, b) and b itself kept, else -1.

    ``(i, j)``: confirmed pairs, i > j, sorted by i then j. Rows are decided in order, so kept[b]
    (b < a) is final when a is decided: a chain a~b~c with a !~ c keeps a and c.
    """
    match = np.full(n, -1, np.int64)
    kept = np.ones(n, bool)
    for a, b in zip(i.tolist(), j.tolist()):
        if match[a] < 0 and kept[b]:
            match[a] = b
            kept[a] = False
    return match


def near_duplicates(phash: np.ndarray, thumbs: np.ndarray, max_distance: int,
                    max_rmse: float, first: int = 0, n_bands: Optional[int] = None) -> tuple[np.ndarray, dict]:
    """For each sample, the index of the earlier kept sample it nearly duplicates, else -1.

    Samples before ``first`` are an earlier run's kept samples (incremental): compared against,
    never dropped. phash: (N,) uint64; thumbs: (N, G, G, 3) uint8. A pair is a candidate when the
    pHash Hamming distance is <= ``max_distance`` (found through bands, :func:`candidate_pairs`)
    and confirmed when no thumbnail cell differs by more than ``max_rmse`` (:func:`thumb_distance`).
    ``n_bands``: the bands to search with (default :func:`choose_bands`; the same result for any).
    """
    i, j, banded, bands = candidate_pairs(phash, max_distance, first, n_bands)
    ok = thumb_distance(thumbs, i, j) <= max_rmse
    match = greedy_matches(len(phash), i[ok], j[ok])
    return match, {"bands": bands, "band_candidates": banded, "phash_candidates": len(i), "color_confirmed": int(ok.sum()),
                   "color_rejected": int(len(i) - ok.sum())}


def near_duplicates_all_pairs(phash: np.ndarray, thumbs: np.ndarray, max_distance: int,
                              max_rmse: float, first: int = 0) -> tuple[np.ndarray, dict]:
    """The all-pairs search the bands replaced (N^2/2 popcounts), kept as the reference the
    tests and ``bench/near_dedup.py`` compare :func:`near_duplicates` against."""
    n = len(phash)
    phash = phash.astype(np.uint64)
    rows = max(1, PAIR_BUDGET // max(n, 1))
    found_i, found_j = [], []
    for start in range(first, n, rows):
        stop = min(n, start + rows)
        dist = np.bitwise_count(phash[start:stop, None] ^ phash[None, :stop])        # (rows, stop)
        earlier = np.arange(stop)[None, :] < np.arange(start, stop)[:, None]
        i, j = np.nonzero((dist <= max_distance) & earlier)      # row-major: sorted by i, then j
        found_i.append(i + start)
        found_j.append(j)
    i = np.concatenate(found_i) if found_i else np.zeros(0, np.int64)
    j = np.concatenate(found_j) if found_j else np.zeros(0, np.int64)
    ok = thumb_distance(thumbs, i, j) <= max_rmse
    return greedy_matches(n, i[ok], j[ok]), {"phash_candidates": len(i), "color_confirmed": int(ok.sum()),
                                             "color_rejected": int(len(i) - ok.sum())}
