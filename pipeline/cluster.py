"""Where the data stages' work runs (``cluster.engine``): this machine, or Spark tasks.

The stages describe their work as a map over independent items (shards, groups of shards) plus
steps on the driver; this module runs the map. ``local`` runs it on this machine, in spawned worker
processes as many as the stage's share of the cores (in this process on one core); ``spark`` is
``sc.parallelize(items, len(items)).map(fn).collect()`` on the session built from
``cluster.spark`` (master, conf, the executors' Python), which retries a failed task
(``spark.task.maxFailures``). Results come back in item order either way, so what a stage writes
does not depend on the engine (tests/test_cluster.py). ``fn`` and the items are pickled to the
executors: module-level functions and plain data only.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from . import threads
from .errors import StageError
from .progress import progress

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)     # what executors put on sys.path


def spark_session(cluster, extra_conf: Optional[dict] = None):
    """The SparkSession of ``cluster.spark`` (an existing active one is reused as it is).

    Executors run this interpreter (or ``spark.python``), with this package importable first on
    their path: the same code on the driver and in every task.
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError as err:
        raise StageError("cluster.engine is spark but pyspark is not installed: pip install '.[spark]' "
                         "(pyspark 3.5.3, and a Java 17 runtime on every node)") from err
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    s = cluster.spark
    python = s.python or sys.executable
    os.environ["PYSPARK_PYTHON"] = python
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != PACKAGE_ROOT]
    path = os.pathsep.join([PACKAGE_ROOT, *rest])
    os.environ["PYTHONPATH"] = path                   # local[N]: python workers inherit the JVM's env
    builder = (SparkSession.builder.master(s.master).appName("unclip-pipeline")
               .config("spark.executorEnv.PYTHONPATH", path)
               .config("spark.executorEnv.PYSPARK_PYTHON", python))
    for key, value in {**s.conf, **(extra_conf or {})}.items():
        builder = builder.config(key, value)
    if s.task_gpus:
        builder = builder.config("spark.task.resource.gpu.amount", str(s.task_gpus))
    return builder.getOrCreate()


@contextlib.contextmanager
def session(cluster, extra_conf: Optional[dict] = None):
    """The Spark session for a stage under ``engine: spark`` (None for local), stopped at the end
    only if the stage started it (a session someone else made, e.g. a notebook's, stays).
    ``extra_conf``: the stage's own settings (e.g. its executors' environment), applied only to a
    session made here: a reused session keeps its own conf."""
    if cluster.engine != "spark":
        yield None
        return
    from pyspark.sql import SparkSession
    existed = SparkSession.getActiveSession() is not None
    spark = spark_session(cluster, extra_conf)
    try:
        yield spark
    finally:
        if not existed:
            spark.stop()


def map_items(spark, fn: Callable[[Any], Any], items: list, desc: str = "", unit: str = "shard",
              processes: Optional[int] = None) -> list:
    """[fn(item) for item in items], in item order: one Spark task per item with ``spark``, else on
    this machine, in ``processes`` worker processes (default: this stage's share of the cores,
    :func:`pipeline.threads.share`), or in this process when that is one or there is one item."""
    if spark is None:
        workers = min(len(items), threads.share() if processes is None else processes)
        if workers <= 1:
            return [fn(item) for item in progress(items, total=len(items), desc=desc, unit=unit)]
        return local_pool_map(fn, items, workers, desc, unit)
    if not items:
        return []
    return spark.sparkContext.parallelize(items, len(items)).map(fn).collect()


def local_pool_map(fn: Callable[[Any], Any], items: list, workers: int, desc: str, unit: str) -> list:
    """``map_items`` on ``workers`` spawned processes. The filter's scan and the crawl's
    verification decode every image of a shard in Python: in this process, one core works and
    the other idles while nothing runs beside them (2 cores: the filter stage on the embedded
    corpus 10.6 -> 8.1 s, medians of three alternating runs). Spawned, not forked: the stage's
    own threads (the crawl's server, a progress bar's) and OpenMP's state stay out of the
    workers. A worker's exception is raised here, as the loop would raise it."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool, \
            progress(total=len(items), desc=desc, unit=unit) as bar:
        futures = [pool.submit(fn, item) for item in items]
        for done in concurrent.futures.as_completed(futures):
            done.result()
            bar.update()
        return [f.result() for f in futures]
