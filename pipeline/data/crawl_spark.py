"""The crawl's per-URL work as Spark jobs (``cluster.engine: spark``): the steps of
pipeline/data/crawl.py after the download, with the same results.

- the incremental diff: the URL list anti-joined on ``url`` with the earlier log's URLs that are
  done (not :func:`pipeline.data.crawl.retry_due`); the earlier log is read by Spark, never by the driver;
- the verification: a task per downloaded shard (:func:`shard_check`: the strict decode, and how
  many samples the shard holds); the copy into URL-list order, a task per output shard
  (:func:`write_output_shard`), cut from the per-shard counts alone (an img2dataset shard holds
  a contiguous run of the list, so output shard k is the good samples k*S ... (k+1)*S - 1 of
  consecutive input shards): the bytes :func:`pipeline.data.crawl.verify_and_rewrite` writes. Each task also
  writes the (url_index, key) of what it wrote as a small parquet;
- the log: the URLs to crawl left-joined on ``url_index`` to img2dataset's records (its own
  per-shard parquet), the verification's drops and the written keys, each row made by
  :func:`crawl.log_rows` in ``mapInPandas``; the attempts a join with the earlier log, the whole
  log that log anti-joined with this part's URLs plus this part's rows, written by one task;
- the figures: a ``groupBy`` of the log (status, reason, planted fault, split) and the most
  frequent "other" messages.

The driver holds the URL list (it reads and checks it, and img2dataset's reader splits it into
download shards on the driver too), the per-shard counts, the verification's drops (a few per
cent at most) and the figures; never the earlier log, img2dataset's records or the new log.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .. import cluster
from ..errors import StageError
from . import crawl_records as crawl
from .crawl_records import INDEX, SOURCE_KEY, TRANSIENT
from .shards import ShardSink, iter_shard, shard_paths

LOG_SCHEMA = "url_index long, key string, url string, status string, reason string, error_message string"
# The URLs of a part as the jobs read them: the list's key (None without one), the corpus's
# planted fault kind and the list's split, for the figures.
TODO_SCHEMA = pa.schema([(INDEX, pa.int64()), ("key", pa.string()), ("url", pa.string()),
                         ("fault", pa.string()), ("split", pa.string())])


def previous_log(spark, path: Path):
    """The earlier crawl's log as a DataFrame, typed (pandas writes a column of Nones as nulls
    of type int32) and with ``attempts`` (1 in a log from before retries)."""
    from pyspark.sql import functions as F
    has_attempts = "attempts" in spark.read.parquet(str(path)).columns
    old = read_parquet(spark, [path], LOG_SCHEMA + ", part long" + (", attempts long" if has_attempts else ""))
    return old if has_attempts else old.withColumn("attempts", F.lit(1).cast("long"))


def retry_due(log, max_attempts: int):
    """:func:`pipeline.data.crawl.retry_due` as a column (never null: a null reason is not transient)."""
    from pyspark.sql import functions as F
    return ((F.col("status") == "failed") & F.coalesce(F.col("reason").isin(*TRANSIENT), F.lit(False))
            & (F.col("attempts") < max_attempts))


def to_crawl(spark, urls: pd.DataFrame, old, max_attempts: int) -> tuple[pd.DataFrame, int, int]:
    """:func:`pipeline.data.crawl.to_crawl` as an anti-join: (the URLs to fetch now, old rows reused, retried).
    The driver gets back the row numbers of the URLs to fetch, to write img2dataset's input."""
    from pyspark.sql import functions as F
    listed = spark.createDataFrame(pd.DataFrame({INDEX: urls[INDEX].astype("int64"),
                                                 "url": urls["url"].astype(str)}), "url_index long, url string")
    due = retry_due(old, max_attempts)
    todo = listed.join(old.where(~due).select("url"), "url", "left_anti")
    rows = np.sort(np.array([r[0] for r in todo.select(INDEX).collect()], dtype=np.int64))
    retried = (todo.select("url").distinct()
               .join(old.where(due).select("url").distinct(), "url", "left_semi").count())
    reused = old.count() - retried
    return urls[urls[INDEX].isin(rows)], reused, retried


# ---- the verification and the copy --------------------------------------------------------------
def shard_check(path: str) -> tuple[int, dict[int, str]]:
    """(samples in one downloaded shard, {url_index: error} of those that do not decode strictly)."""
    errors = crawl.decode_errors(path)
    return sum(1 for _ in iter_shard(Path(path))), errors


def copy_jobs(paths: list[str], checks: list[tuple[int, dict]], shard_size: int, prefix: str) -> list[dict]:
    """The copy cut into one job per output shard: output shard k holds the good samples
    k*shard_size ... (k+1)*shard_size - 1 in (input shard, url_index) order, which is the order
    :func:`pipeline.data.crawl.verify_and_rewrite` writes them in; a job names each input shard it reads, the
    range of that shard's good samples (sorted by url_index) it takes, and the shard's drops."""
    good = np.array([n - len(bad) for n, bad in checks], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(good)])
    jobs = []
    for k, first in enumerate(range(0, int(starts[-1]), shard_size)):
        last = min(first + shard_size, int(starts[-1]))
        reads = [(paths[i], max(first - int(starts[i]), 0), min(last - int(starts[i]), int(good[i])),
                  sorted(checks[i][1])) for i in range(len(paths)) if starts[i] < last and starts[i + 1] > first]
        jobs.append({"prefix": prefix, "index": k, "reads": reads})
    return jobs


def write_output_shard(job: dict) -> int:
    """One output shard of the copy (a Spark task): the samples of ``job["reads"]``, each input
    shard's good samples sorted by url_index and sliced, keys as :func:`crawl.write_sample` makes
    them; ``written/<name>.parquet`` lists (url_index, key). A retried task starts over."""
    name = f"{job['prefix']}{job['index']:05d}.tar"
    out, written_dir = Path(job["out"]), Path(job["written"])
    scratch = out / f".task-{name}"
    shutil.rmtree(scratch, ignore_errors=True)
    index, keys = [], []
    with ShardSink(scratch, 1 << 62) as sink:
        for path, lo, hi, bad in job["reads"]:
            bad = set(bad)
            good = [(meta[INDEX], sample, meta) for sample in iter_shard(Path(path))
                    if (meta := json.loads(sample["json"]))[INDEX] not in bad]
            for i, sample, meta in sorted(good, key=lambda t: t[0])[lo:hi]:
                keys.append(crawl.write_sample(sink, sample, meta, job["prefix"]))
                index.append(i)
    pq.write_table(pa.table({INDEX: pa.array(index, pa.int64()), "written_key": pa.array(keys, pa.string())}),
                   scratch / "written.parquet")
    (scratch / "written.parquet").replace(written_dir / f"{name}.parquet")
    if sink.count:
        (scratch / "00000.tar").replace(out / name)
    shutil.rmtree(scratch)
    return sink.count


def verify_and_rewrite(spark, src: Path, out: Path, work: Path, shard_size: int,
                       prefix: str) -> tuple[int, dict[int, str]]:
    """:func:`pipeline.data.crawl.verify_and_rewrite` as two maps: (samples written, {url_index: error} dropped);
    what was written under which key is in ``work/written/`` for :func:`crawl_log`."""
    paths = [str(p) for p in shard_paths(src)]
    checks = cluster.map_items(spark, shard_check, paths)
    (work / "written").mkdir(parents=True, exist_ok=True)
    jobs = [j | {"out": str(out), "written": str(work / "written")}
            for j in copy_jobs(paths, checks, shard_size, prefix)]
    written = sum(cluster.map_items(spark, write_output_shard, jobs))
    return written, {i: e for _, bad in checks for i, e in bad.items()}


# ---- the log ------------------------------------------------------------------------------------
def write_todo(todo: pd.DataFrame, faults: Optional[pd.Series], path: Path) -> None:
    """This part's URLs as the jobs read them (:data:`TODO_SCHEMA`)."""
    def strings(values) -> list:
        return [v if isinstance(v, str) else None for v in values]
    none = [None] * len(todo)
    pq.write_table(pa.table({
        INDEX: todo[INDEX].to_numpy(np.int64), "key": strings(todo[SOURCE_KEY]) if SOURCE_KEY in todo else none,
        "url": strings(todo["url"]), "fault": strings(faults.loc[todo.index]) if faults is not None else none,
        "split": strings(todo["split"]) if "split" in todo else none}, schema=TODO_SCHEMA), path)


def read_parquet(spark, paths, schema: str):
    """The parquet files ``paths`` (one per shard) as one DataFrame, the columns of ``schema``
    (an empty one without files: a crawl where every download shard failed, or nothing was kept)."""
    from pyspark.sql import functions as F
    files = sorted(map(str, paths))
    if not files:
        return spark.createDataFrame([], schema)
    return spark.read.parquet(*files).select(*[F.col(c).cast(t) for c, t in (f.split() for f in schema.split(", "))])


def crawl_log(spark, work: Path, i2d: Path, dropped: dict[int, str], written: int):
    """:func:`pipeline.data.crawl.crawl_log` as joins on url_index: the part's log (with its fault and split
    columns), cached; img2dataset's lost URLs and a log that does not reconcile are errors."""
    from pyspark.sql import functions as F
    todo = spark.read.parquet(str(work / "todo.parquet"))
    records = read_parquet(spark, i2d.glob("*.parquet"), "url_index long, status string, error_message string")
    records = records.select(INDEX, F.col("status").alias("rec_status"), F.col("error_message").alias("rec_message"))
    lost = todo.join(records, INDEX, "left_anti").count()
    if lost:
        raise StageError(crawl.lost_message(lost, todo.count()))
    if records.groupBy(INDEX).count().where(F.col("count") > 1).limit(1).count():
        raise StageError("img2dataset recorded some URLs twice; cannot account for the crawl")
    drops = spark.createDataFrame(pd.DataFrame({INDEX: np.array(list(dropped), np.int64),
                                                "drop_error": list(dropped.values())}),
                                  "url_index long, drop_error string")
    keys = read_parquet(spark, (work / "written").glob("*.parquet"), "url_index long, written_key string")
    joined = todo.join(records, INDEX, "left").join(drops, INDEX, "left").join(keys, INDEX, "left")

    def rows(frames):
        for fr in frames:
            yield crawl.log_rows(fr).assign(fault=fr["fault"].values, split=fr["split"].values)

    log = joined.mapInPandas(rows, LOG_SCHEMA + ", fault string, split string").cache()
    success = log.where(F.col("status") == "success").select(INDEX)
    differ = success.join(keys, INDEX, "left_anti").count() + keys.join(success, INDEX, "left_anti").count()
    if differ:
        raise StageError(f"crawl does not reconcile: img2dataset reports {success.count()} successes, "
                         f"the verified shards hold {written} samples ({differ} differ)")
    return log


def tally(log) -> tuple[pd.DataFrame, dict[str, int]]:
    """(rows per status, reason, fault and split; the most frequent "other" messages, ties in
    url_index order as :class:`collections.Counter` orders them over the log's rows)."""
    from pyspark.sql import functions as F
    counts = log.groupBy("status", "reason", "fault", "split").count().toPandas()
    other = (log.where(F.col("reason") == "other").groupBy("error_message")
             .agg(F.count("*").alias("n"), F.min(INDEX).alias("first"))
             .orderBy(F.desc("n"), "first").limit(crawl.OTHER_MESSAGES_SHOWN).collect())
    return counts.rename(columns={"count": "n"}), {r["error_message"]: int(r["n"]) for r in other}


def write_full_log(spark, log, old, part: int, path: Path) -> tuple[int, int]:
    """The whole log (``crawl_log.parquet``): this part's rows with their attempts, after the
    earlier rows of the URLs this part did not fetch again, in (part, url_index) order (the
    order the local engine's concatenation gives); returns (URLs, successes)."""
    from pyspark.sql import functions as F
    columns = [*LOG_SCHEMA.replace(",", "").split()[::2], "part", "attempts"]
    log = log.withColumn("part", F.lit(part).cast("long"))
    if old is None:
        full = log.withColumn("attempts", F.lit(1).cast("long")).select(*columns)
    else:
        before = old.groupBy("url").agg(F.max("attempts").alias("before"))
        log = (log.join(before, "url", "left")
               .withColumn("attempts", (F.coalesce(F.col("before"), F.lit(0)) + 1).cast("long")))
        full = old.join(log.select("url"), "url", "left_anti").select(*columns).unionByName(log.select(*columns))
    staging = path.parent / f".{path.name}.spark"
    full = full.cache()
    counts = {r["status"]: int(r["count"]) for r in full.groupBy("status").count().collect()}
    if not counts.get("success"):
        return sum(counts.values()), 0            # crawl.write_log refuses it: nothing is written
    full.repartition(1).sortWithinPartitions("part", INDEX).write.mode("overwrite").parquet(str(staging))
    (part_file,) = staging.glob("part-*.parquet")
    part_file.replace(path)
    shutil.rmtree(staging)
    full.unpersist()
    return sum(counts.values()), counts["success"]
