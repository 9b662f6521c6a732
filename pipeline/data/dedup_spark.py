"""The filter's duplicate search as Spark jobs (``cluster.engine: spark``): the steps of
pipeline/data/dedup.py, with the same results.

- fingerprints: one task per raw shard (:func:`dedup.fingerprint_shard`), rows in input order
  (shard number, position in the shard);
- exact duplicates: ``groupBy(digest)`` for the first key by input order, joined back;
- near duplicates: each pHash exploded into its bands (:func:`dedup.choose_bands`), each band's
  probes (its value with every flip of :func:`dedup.band_radii` bits) joined on (band, value)
  with the bands for the candidate pairs i > j, ``bit_count(phash_i ^ phash_j) <= d``, and the
  thumbnail check in pandas over Arrow (``mapInPandas``). Only the confirmed pairs (about one per near duplicate)
  come back to the driver, for the greedy pass in input order.

The driver still assembles the per-sample table from the map's results before the DataFrame jobs
read it (at scale the map would write parquet for them instead; docs/SCALING.md).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from . import dedup


def fingerprints(spark, fingerprint, paths) -> pd.DataFrame:
    """dedup.fingerprint_shard over ``paths`` as Spark tasks, concatenated in shard order."""
    from .. import cluster
    return pd.concat(cluster.map_items(spark, fingerprint, [str(p) for p in paths]), ignore_index=True)


def exact_duplicates(spark, survivors: pd.DataFrame, earlier: dict[bytes, str]) -> pd.Series:
    """:func:`dedup.exact_duplicates` as a group-by: for each survivor the key it duplicates, else None."""
    from pyspark.sql import functions as F
    rows = pd.DataFrame({"order": np.arange(len(survivors)), "key": survivors["key"].to_numpy(),
                         "digest": [bytearray(d) for d in survivors["digest"]]})
    df = spark.createDataFrame(rows, "order long, key string, digest binary")
    first = (df.groupBy("digest").agg(F.min(F.struct("order", "key")).alias("first"))
             .select("digest", F.col("first.order").alias("first_order"), F.col("first.key").alias("first_key")))
    joined = df.join(first, "digest").select("order", "first_order", "first_key", "digest").toPandas()
    joined = joined.sort_values("order")
    out = joined["first_key"].where(joined["order"] != joined["first_order"], None)
    prior = joined["digest"].map(lambda d: earlier.get(bytes(d)))
    out = prior.where(prior.notna(), out)
    return pd.Series(out.to_numpy(dtype=object), index=survivors.index, dtype=object)


def near_duplicates(spark, phash: np.ndarray, thumbs: np.ndarray, max_distance: int, max_rmse: float,
                    first: int = 0, n_bands: Optional[int] = None) -> tuple[np.ndarray, dict]:
    """:func:`dedup.near_duplicates` with the band join, distance and color check on Spark; the
    bands (:func:`dedup.choose_bands`) as the local search chooses them, a band probed with flips
    as a join of (band, value ^ mask) with (band, value), the masks a small broadcast table."""
    from pyspark.sql import functions as F
    n = len(phash)
    m = n_bands or dedup.choose_bands(phash, max_distance)
    bands = dedup.band_values(phash, m)                                  # (bands, N) uint64
    prints = spark.createDataFrame(pd.DataFrame({
        "idx": np.arange(n), "phash": phash.astype(np.uint64).view(np.int64),
        "thumb": [bytearray(t.tobytes()) for t in thumbs]}), "idx long, phash long, thumb binary")
    banded = spark.createDataFrame(pd.DataFrame({
        "idx": np.tile(np.arange(n), len(bands)), "band": np.repeat(np.arange(len(bands)), n),
        "value": bands.reshape(-1).view(np.int64)}), "idx long, band int, value long")
    flips = [(band, dedup.flip_masks(width, radius)) for band, ((_, width), radius)
             in enumerate(zip(dedup.band_layout(m), dedup.band_radii(m, max_distance))) if radius >= 0]
    masks = spark.createDataFrame(pd.DataFrame({
        "band": np.concatenate([np.full(len(f), band) for band, f in flips]),
        "mask": np.concatenate([f for _, f in flips]).view(np.int64)}), "band int, mask long")
    probes = (banded.join(F.broadcast(masks), "band")
              .select("idx", "band", F.col("value").bitwiseXOR(F.col("mask")).alias("value")))
    a, b = probes.alias("a"), banded.alias("b")
    pairs = (a.join(b, (F.col("a.band") == F.col("b.band")) & (F.col("a.value") == F.col("b.value"))
                    & (F.col("a.idx") > F.col("b.idx")) & (F.col("a.idx") >= first))
             .select(F.col("a.idx").alias("i"), F.col("b.idx").alias("j")))
    pairs.cache()
    banded_n = pairs.count()                        # per band, as dedup.candidate_pairs counts them
    pairs_all, pairs = pairs, pairs.distinct()
    pi, pj = prints.alias("pi"), prints.alias("pj")
    close = (pairs.join(pi, F.col("i") == F.col("pi.idx")).join(pj, F.col("j") == F.col("pj.idx"))
             .where(F.bit_count(F.col("pi.phash").bitwiseXOR(F.col("pj.phash"))) <= max_distance)
             .select("i", "j", F.col("pi.thumb").alias("ti"), F.col("pj.thumb").alias("tj")))

    def score(frames):
        for fr in frames:
            ti, tj = dedup.thumbs_of(fr["ti"]), dedup.thumbs_of(fr["tj"])
            d = ti.astype(np.int32) - tj
            rmse = np.sqrt((d * d).mean(axis=-1)).max(axis=(1, 2)) if len(fr) else np.zeros(0)
            yield pd.DataFrame({"i": fr["i"], "j": fr["j"], "ok": rmse <= max_rmse})

    scored = close.mapInPandas(score, "i long, j long, ok boolean").toPandas()
    pairs_all.unpersist()
    scored = scored.sort_values(["i", "j"])
    ok = scored[scored["ok"]]
    match = dedup.greedy_matches(n, ok["i"].to_numpy(), ok["j"].to_numpy())
    return match, {"bands": m, "band_candidates": int(banded_n), "phash_candidates": len(scored),
                   "color_confirmed": len(ok), "color_rejected": int(len(scored) - len(ok))}
