"""Scale-out (issue 21): the `cluster` section, and the engines giving the local engine's outputs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline import config

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
