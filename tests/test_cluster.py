"""Scale-out (issue 21): the `cluster` section, and the engines giving the local engine's outputs."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from pipeline import cluster, config, threads

REPO = Path(__file__).resolve().parents[1]


def test_cluster_section_is_in_no_stage_recipe():
    """Switching engine or launcher must not make DVC rerun anything: no stage lists it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        params = (stage.get("do") or stage).get("params", [])
        assert not [p for p in params if str(p).split(".")[0] == "cluster"], name


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c.update(engine="ray"), "cluster.engine"),
    (lambda c: c["train"].update(launcher="torchrun", nnodes=2), "rdzv_endpoint"),
    (lambda c: c["train"].update(node_rank=1), "node_rank"),
    (lambda c: c["train"].update(rdzv_endpoint="no-port"), "cluster.train.rdzv_endpoint"),
    (lambda c: c["spark"].update(mastr="local[2]"), "cluster.spark.mastr: unknown key"),
])
def test_bad_cluster_config_names_the_key(params_path, mutate, key):
    raw = yaml.safe_load(params_path.read_text())
    mutate(raw["cluster"])
    with pytest.raises(config.ConfigError) as err:
        config.resolve(raw, "default")
    assert key in str(err.value)


def test_saved_config_leaves_out_where_it_ran(smoke_cfg):
    from pipeline.bundle import run_config
    spark = smoke_cfg.model_copy(update={"cluster": config.ClusterConfig(engine="spark")})
    assert run_config(spark) == run_config(smoke_cfg)


# ---- Spark local[2] against the local engine, on the smoke corpus -------------------------------
def _files(directory: Path, pattern: str = "*.tar") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob(pattern))}


@pytest.fixture(scope="module")
def spark():
    """One local[2] session for the module (the stages reuse an active session and leave it)."""
    pytest.importorskip("pyspark")
    from pipeline import cluster
    c = config.ClusterConfig(engine="spark", spark=config.SparkConfig(conf={
        **config.SparkConfig().conf, "spark.sql.shuffle.partitions": "4", "spark.ui.showConsoleProgress": "false"}))
    session = cluster.spark_session(c)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def engines(spark, data_ws, smoke_cfg, tmp_path_factory):
    """(local workspace, spark workspace, {stage: (local metrics, spark metrics)}): crawl and filter
    of data_ws's corpus under Spark, and embed of the same filtered shards and CLIP under both."""
    import json
    import shutil

    from pipeline.stages import run_stage
    from pipeline.workspace import Workspace
    spark_cfg = smoke_cfg.model_copy(update={"cluster": config.ClusterConfig(engine="spark")})
    local = Workspace.at(tmp_path_factory.mktemp("local_engine"))
    remote = Workspace.at(tmp_path_factory.mktemp("spark_engine"))
    for ws in (local, remote):
        (ws.root / "params.yaml").write_text((REPO / "params.yaml").read_text())
        shutil.copytree(data_ws.corpus, ws.corpus)
    for name in ("raw", "filtered"):
        shutil.copytree(getattr(data_ws, name), getattr(local, name))
    figures = {s: [json.loads(data_ws.metrics_path(s).read_text())] for s in ("crawl", "filter")}
    figures["crawl"].append(run_stage("crawl", spark_cfg, remote))
    # The filter and embed compare on identical inputs: the crawled samples' json holds the corpus
    # server's ephemeral port, different in every crawl. Spark's crawl is kept aside for its test.
    shutil.move(remote.raw, remote.root / "crawled")
    shutil.copytree(local.raw, remote.raw)
    figures["filter"].append(run_stage("filter", spark_cfg, remote))
    run_stage("clip", smoke_cfg, local)
    shutil.copytree(local.clip, remote.clip)
    figures["embed"] = [run_stage("embed", smoke_cfg, local), run_stage("embed", spark_cfg, remote)]
    return local, remote, figures


@pytest.mark.slow      # ~70-180 s with the module's Spark session, crawl, CLIP and both embeds
def test_spark_crawl_gives_the_same_shards_and_log(engines):
    import pandas as pd
    local, remote, figures = engines
    # Byte for byte, but for the corpus server's ephemeral port in each sample's url (two local
    # crawls differ there too): same shard files, same samples in the same order, same members.
    from pipeline.data.shards import iter_shard, shard_paths

    def shards(ws):
        return {p.name: [{k: re.sub(rb"127\.0\.0\.1:\d+", b"HOST", v) if k == "json" else v
                          for k, v in s.items() if k not in ("__shard__", "__url__")} for s in iter_shard(p)]
                for p in shard_paths(ws)}
    assert shards(remote.root / "crawled") == shards(local.raw) and len(shards(local.raw)) > 1
    cols = ["url_index", "key", "url", "status", "reason", "attempts"]
    pd.testing.assert_frame_equal(pd.read_parquet(remote.root / "crawled" / "crawl_log.parquet")[cols],
                                  pd.read_parquet(local.raw / "crawl_log.parquet")[cols])
    a, b = figures["crawl"]
    for k in ("attempted", "succeeded", "failed", "failed_by_reason", "faults_by_kind_vs_reason", "shards"):
        assert a[k] == b[k], k
    assert b["attempted"] == b["succeeded"] + sum(b["failed_by_reason"].values())


def _crawl_twice(cfg, ws, corpus: Path, first, second) -> list[dict]:
    """Crawl the corpus's rows ``first``, then (incremental) rows ``second``: the figures of both."""
    import pandas as pd

    from pipeline.stages import run_stage
    pairs = pd.read_parquet(corpus / "pairs.parquet")
    figures = []
    for rows in (first, second):
        pairs.iloc[rows].to_parquet(ws.corpus / "pairs.parquet", index=False)
        figures.append(run_stage("crawl", cfg, ws))
    return figures


@pytest.mark.slow      # ~2-3 min: four crawls of most of the smoke corpus
def test_spark_incremental_crawl_gives_the_same_diff_and_log(spark, data_ws, smoke_cfg, tmp_path_factory):
    """A rerun on a list that lost some URLs and gained others: the same new part, log and counts."""
    import shutil

    import pandas as pd

    from pipeline.data.shards import iter_shard, shard_paths
    from pipeline.workspace import Workspace
    n = len(pd.read_parquet(data_ws.corpus / "pairs.parquet"))
    first, second = list(range(0, n - 60)), list(range(25, n))      # removes 25 URLs, adds 60
    runs = {}
    for engine in ("local", "spark"):
        ws = Workspace.at(tmp_path_factory.mktemp(f"incremental_{engine}"))
        (ws.root / "params.yaml").write_text((REPO / "params.yaml").read_text())
        shutil.copytree(data_ws.corpus, ws.corpus)
        cfg = smoke_cfg.model_copy(update={"cluster": config.ClusterConfig(engine=engine)})
        runs[engine] = ws, _crawl_twice(cfg, ws, data_ws.corpus, first, second)
    (local, (a0, a1)), (remote, (b0, b1)) = runs["local"], runs["spark"]
    assert b1["incremental"] == a1["incremental"] and a1["incremental"]["new_urls"] == 60
    assert a1["incremental"]["reused_urls"] == n - 60 and a1["incremental"]["part"] == 1
    for k in ("attempted", "succeeded", "failed", "failed_by_reason", "faults_by_kind_vs_reason", "totals"):
        assert (a0[k], a1[k]) == (b0[k], b1[k]), k
    assert b1["attempted"] == 60 == b1["succeeded"] + sum(b1["failed_by_reason"].values())
    assert b1["totals"]["urls"] == n == b0["attempted"] + b1["attempted"]

    def rows(ws):        # set-identical rows (the order too, as it happens)
        log = pd.read_parquet(ws.raw / "crawl_log.parquet")
        return log.sort_values(["part", "url_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(rows(remote), rows(local))
    assert set(rows(local).query("part == 1")["url"]) == set(pd.read_parquet(
        data_ws.corpus / "pairs.parquet").iloc[n - 60:]["url"])

    def shards(ws):
        return {p.name: [{k: re.sub(rb"127\.0\.0\.1:\d+", b"HOST", v) if k == "json" else v
                          for k, v in s.items() if k not in ("__shard__", "__url__")} for s in iter_shard(p)]
                for p in shard_paths(ws.raw)}
    mine, theirs = shards(remote), shards(local)
    assert mine == theirs and any(name.startswith("part001-") for name in mine)


@pytest.mark.slow      # a few seconds on the module's Spark session
@pytest.mark.parametrize("max_attempts", [1, 2, 3])
def test_spark_diff_is_the_local_diff(spark, smoke_cfg, tmp_path, max_attempts):
    """crawl_spark.to_crawl against crawl.to_crawl on a user's list (retries apply): URLs new,
    gone, succeeded, failed for good, failed transiently below and at the attempt limit, a log
    from before retries (no attempts column) and a reason column of Nones."""
    import pandas as pd

    from pipeline.data import crawl, crawl_spark
    cfg = smoke_cfg.model_copy(update={"crawl": smoke_cfg.crawl.model_copy(update={"max_attempts": max_attempts})})
    old = pd.DataFrame({"url_index": range(6), "key": [None] * 6, "url": [f"u{i}" for i in range(6)],
                        "status": ["success", "failed", "failed", "failed", "failed", "success"],
                        "reason": [None, "http_404", "timeout", "http_5xx", "other", None],
                        "error_message": [None, "404", "timed out", "500", "x", None],
                        "part": 0, "attempts": [1, 1, 1, 2, 3, 1]})
    urls = pd.DataFrame({"url": [f"u{i}" for i in (0, 2, 3, 4, 5, 7, 8)], "caption": "c", "url_index": range(7)})
    diffs = []
    for log in (old, old.drop(columns="attempts"), old.assign(reason=None, status="success")):
        log.to_parquet(tmp_path / "log.parquet", index=False)
        expect = crawl.to_crawl(cfg, urls, None, log.assign(attempts=log.get("attempts", 1)))
        got = crawl_spark.to_crawl(spark, urls, crawl_spark.previous_log(spark, tmp_path / "log.parquet"),
                                   max_attempts)
        pd.testing.assert_frame_equal(got[0], expect[0])
        assert got[1:] == expect[1:]
        diffs.append(expect)
    # u2 (timeout, tried once) and u3 (5xx, twice) are due below the limit; u4 (3 tries) never
    assert diffs[0][2] == {1: 0, 2: 1, 3: 2}[max_attempts] == len(diffs[0][0]) - 2
    assert list(diffs[2][0]["url"]) == ["u7", "u8"] and diffs[2][1:] == (6, 0)


@pytest.mark.slow      # ~70-180 s with the module's Spark session, crawl, CLIP and both embeds
def test_spark_filter_gives_the_same_shards_and_drops(engines):
    local, remote, figures = engines
    for pattern in ("*.tar", "dropped.parquet", "fingerprints.npz"):
        assert _files(remote.filtered, pattern) == _files(local.filtered, pattern), pattern
    a, b = figures["filter"]
    for k in ("input", "kept", "dropped_by_reason", "near_dedup", "dedup_vs_truth", "shards_out"):
        assert a[k] == b[k], k
    assert b["input"] == b["kept"] + sum(b["dropped_by_reason"].values())


@pytest.mark.slow      # ~70-180 s with the module's Spark session, crawl, CLIP and both embeds
def test_spark_embed_gives_the_same_samples_in_shards_named_after_their_inputs(engines):
    """Set-identical: every sample's members byte for byte; the cut into shards follows the inputs."""
    import numpy as np
    import pandas as pd

    from pipeline.data.shards import iter_samples, shard_paths
    local, remote, figures = engines
    assert [p.name for p in shard_paths(remote.embeddings)] == [p.name for p in shard_paths(local.filtered)]

    def samples(ws):
        return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
                for s in iter_samples(shard_paths(ws.embeddings))}
    mine, theirs = samples(remote), samples(local)
    assert mine.keys() == theirs.keys() and len(mine) > 0
    assert all(mine[k] == theirs[k] for k in mine)

    def retrieval(ws):
        meta = pd.concat([pd.read_parquet(p) for p in sorted((ws.embeddings / "metadata").glob("*.parquet"),
                                                              key=lambda p: int(p.stem.split("_")[-1]))])
        emb = np.concatenate([np.load(p) for p in sorted((ws.embeddings / "img_emb").glob("*.npy"),
                                                         key=lambda p: int(p.stem.split("_")[-1]))])
        return dict(zip(meta["key"], emb.tobytes() and list(map(bytes, emb))))
    assert retrieval(remote) == retrieval(local)
    a, b = figures["embed"]
    for k in ("input", "kept", "dropped_low_similarity", "captions_truncated", "kept_by_split", "similarity",
              "mismatch_auroc"):
        assert a.get(k) == b.get(k), k
    assert b["input"] == b["kept"] + b["dropped_low_similarity"]


@pytest.mark.slow      # ~20 s on the module's Spark session
@pytest.mark.parametrize("n_bands", [2, 3, 5])
def test_spark_band_probes_are_the_local_search(spark, n_bands):
    """dedup_spark's probe join (flips of band_radii bits, or none with 5 bands) finds the local
    search's pairs, with earlier samples (``first``) compared against but never dropped."""
    import numpy as np

    from pipeline.data import dedup, dedup_spark
    rng = np.random.default_rng(n_bands)
    base = rng.integers(0, 2 ** 63, 200, dtype=np.uint64)
    flips = [np.bitwise_or.reduce(np.uint64(1) << rng.integers(0, 64, rng.integers(0, 7)).astype(np.uint64))
             for _ in range(400)]
    phash = np.concatenate([base, base[rng.integers(0, 200, 400)] ^ np.array(flips, np.uint64)])
    thumbs = np.zeros((len(phash), 8, 8, 3), np.uint8)
    thumbs[rng.random(len(phash)) < 0.3] = 200
    match, stats = dedup.near_duplicates(phash, thumbs, 4, 1.0, 100, n_bands)
    theirs, their_stats = dedup_spark.near_duplicates(spark, phash, thumbs, 4, 1.0, 100, n_bands)
    assert (theirs == match).all() and (match >= 0).sum() > 50 and their_stats == stats


# ---- the local engine's worker processes ------------------------------------------------------------
def pid_and_double(item):
    """A map's function (module-level: pickled by name to the spawned workers)."""
    if item == "bad":
        raise ValueError("bad item")
    return os.getpid(), 2 * item


def test_local_map_runs_in_worker_processes_and_keeps_item_order():
    out = cluster.map_items(None, pid_and_double, list(range(7)), processes=2)
    assert [doubled for _, doubled in out] == [2 * i for i in range(7)]
    assert os.getpid() not in {pid for pid, _ in out}
    with pytest.raises(ValueError, match="bad item"):
        cluster.map_items(None, pid_and_double, [1, "bad", 3], processes=2)


def test_local_map_takes_the_stages_share_of_the_cores(tmp_path, monkeypatch):
    """One core (a test worker's, or the flow's share beside another stage): this process alone;
    the flow's share of two: worker processes, whatever OMP_NUM_THREADS says."""
    share = tmp_path / "filter.threads"
    monkeypatch.setenv(threads.SHARE_ENV, str(share))
    share.write_text("1\n")
    assert {pid for pid, _ in cluster.map_items(None, pid_and_double, [1, 2, 3])} == {os.getpid()}
    share.write_text("2\n")
    assert os.getpid() not in {pid for pid, _ in cluster.map_items(None, pid_and_double, [1, 2, 3])}
