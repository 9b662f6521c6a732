"""Incremental data and retraining decisions (pipeline/data/incremental.py, pipeline/retrain.py).

The filter on an addition must give what a full filter of all the data gives (duplicates of old
images caught against the old kept samples), touching only the new shards; the retrain rules
continue a model only when its data just grew and nothing else changed. The whole chain on a
real crawl, through DVC and the Prefect flow, is in test_flow.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from pipeline import config, retrain
from pipeline.data import incremental
from pipeline.data import corpus, filter as filt
from pipeline.data.corpus_images import CorpusImages
from pipeline.data.shards import ShardSink, iter_samples, shard_paths
from pipeline.workspace import Workspace, file_sha256


def cfg_with(additions=(), **retrain_keys):
    """A small corpus whose added block re-posts old images (exact and near copies)."""
    return config.resolve({"corpus": {"n_scenes": 200, "duplicate_fraction": 0.1, "near_duplicate_fraction": 0.1,
                                      "fault_fraction": 0.0, "render_scale": 2, "workers": 1,
                                      "additions": list(additions)},
                           "filter": {"shard_size": 50},
                           "retrain": retrain_keys})


def write_raw(ws: Workspace, rows: pd.DataFrame, prefix: str) -> None:
    """Stand-in for one crawl part: the rows' images as raw shards named ``{prefix}NNNNN.tar``."""
    with ShardSink(ws.raw, 40, prefix) as sink, CorpusImages(ws.corpus) as images:
        for row in rows.itertuples():
            meta = {"key": row.key, "split": row.split, "gt": row.gt, "url": row.url}
            sink.write({"__key__": row.key, "jpg": images.read(row.url),
                        "txt": row.caption.encode(), "json": json.dumps(meta).encode()})


def drops_of(ws: Workspace) -> pd.DataFrame:
    d = pd.read_parquet(ws.filtered / filt.DROPPED)[["key", "reason", "duplicate_of"]]
    return d.sort_values("key").reset_index(drop=True)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """(cfg, incremental ws, full ws, figures of the incremental filter run, base pairs, all pairs)."""
    cfg = cfg_with([30])
    inc = Workspace.at(tmp_path_factory.mktemp("incremental"))
    corpus.run(cfg, inc)
    pairs = pd.read_parquet(inc.corpus / "pairs.parquet")
    base = corpus.build_pairs(cfg_with())[1]
    old, new = pairs.iloc[:len(base)], pairs.iloc[len(base):]
    write_raw(inc, old, "")
    filt.run(cfg, inc)                                      # part 0
    before = {p.name: p.read_bytes() for p in shard_paths(inc.filtered)}
    write_raw(inc, new, incremental.part_prefix(1))         # an addition arrives
    figures = filt.run(cfg, inc)                            # part 1: the new raw shard only
    # The same data filtered in one go.
    full = Workspace.at(tmp_path_factory.mktemp("full"))
    full.corpus.parent.mkdir(parents=True, exist_ok=True)
    full.corpus.symlink_to(inc.corpus)
    write_raw(full, old, "")
    write_raw(full, new, incremental.part_prefix(1))
    filt.run(cfg_with(incremental_data=False), full)
    return cfg, inc, full, figures, before, new


def test_an_addition_is_filtered_alone_and_earlier_shards_stay(grown):
    _, inc, _, figures, before, new = grown
    assert figures["incremental"]["part"] == 1 and figures["shards_in"] == 1
    assert figures["input"] == len(new)                     # only the new samples were read
    for name, data in before.items():
        assert (inc.filtered / name).read_bytes() == data   # linked, unchanged
    added = [p.name for p in shard_paths(inc.filtered) if p.name not in before]
    assert added and all(n.startswith("part001-") for n in added)
    assert figures["totals"]["input"] == sum(1 for _ in iter_samples(shard_paths(inc.raw)))


def test_incremental_filter_equals_a_full_one(grown):
    _, inc, full, figures, _, new = grown
    kept = lambda ws: sorted(s["__key__"] for s in iter_samples(shard_paths(ws.filtered)))   # noqa: E731
    assert kept(inc) == kept(full)
    pd.testing.assert_frame_equal(drops_of(inc), drops_of(full))
    # The addition re-posts images of the first block: caught against the earlier kept samples.
    drops = drops_of(inc)
    old_keys = set(pd.read_parquet(inc.corpus / "pairs.parquet").key) - set(new.key)
    reposts = drops[drops.key.isin(new.key) & drops.duplicate_of.isin(old_keys)]
    assert {"exact_duplicate", "near_duplicate"} <= set(reposts.reason), drops
    assert figures["dedup_vs_truth"]["exact"]["false_positives"] == 0


def test_nothing_new_keeps_the_output_and_a_config_change_redoes_it(grown, tmp_path):
    cfg, inc, _, _, _, _ = grown
    state = incremental.read_state(inc.filtered)
    again = filt.run(cfg, inc)
    assert again["incremental"]["part"] is None and again["input"] == 0
    assert incremental.read_state(inc.filtered) == state
    changed = cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"phash_max_distance": 3})})
    redo = filt.run(changed, inc)
    assert redo["incremental"]["part"] == 0 and "config or code changed" in redo["incremental"]["why"]
    assert redo["input"] == redo["totals"]["input"] and not any("part" in p.name for p in shard_paths(inc.filtered))


# ---- retrain: keep, continue or start from scratch --------------------------------------------
def fake_model(model_dir: Path, data_dir: Path, cfg, arch: dict, clip_sha: str = "c0") -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(2)}, str(model_dir / "model.safetensors"))
    (model_dir / "model.json").write_text(json.dumps({"kind": "prior", "arch": arch, "clip": {"sha256": clip_sha},
                                                      "config": cfg.model_dump(mode="json")}))
    retrain.write_lineage(model_dir, data_dir, {"val": {"figure": 1.0}})


def shard(data_dir: Path, name: str, payload: bytes) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / name).write_bytes(payload)


def test_warm_start_only_when_the_data_grew_and_nothing_else_changed(tmp_path):
    cfg, arch = cfg_with(), {"layers": 2}
    data, model = tmp_path / "embeddings", tmp_path / "prior"
    shard(data, "00000.tar", b"a")
    fake_model(model, data, cfg, arch)
    decide = lambda c=cfg, a=arch, sha="c0": retrain.warm_start(c, model, data, "prior", c.prior, a, sha)  # noqa: E731
    assert decide()[0] is None and "no new data" in decide()[1]
    shard(data, "part001-00000.tar", b"b")                  # an addition
    warm, _ = decide()
    assert warm is not None and warm.steps == -(-cfg.prior.steps * cfg.retrain.finetune_fraction // 1)
    assert warm.warmup_steps <= cfg.prior.warmup_steps and warm.sha256 == file_sha256(model / "model.safetensors")
    assert decide(a={"layers": 3})[1] == "the architecture changed"
    assert "CLIP changed" in decide(sha="c1")[1]
    lr = cfg.model_copy(update={"prior": cfg.prior.model_copy(update={"lr": 1e-5})})
    assert decide(c=lr)[1] == "prior changed since the earlier model"
    scratch = cfg_with(init_from="scratch")
    assert decide(c=scratch)[1] == "retrain.init_from: scratch"
    shard(data, "00000.tar", b"A")                          # old data rewritten: not growth
    assert decide()[0] is None and "changed" in decide()[1]


def test_clip_is_kept_when_its_data_grew(tmp_path):
    cfg = cfg_with()
    ws = Workspace.at(tmp_path)
    shard(ws.filtered, "00000.tar", b"a")
    fake_model(ws.clip, ws.filtered, cfg, {})
    assert retrain.keep_frozen(cfg, ws, "clip", "keep", ws.clip, ws.filtered, "clip")[0] is None
    shard(ws.filtered, "part001-00000.tar", b"b")
    kept, why = retrain.keep_frozen(cfg, ws, "clip", "keep", ws.clip, ws.filtered, "clip")
    assert kept == {"val": {"figure": 1.0}, "retrain": {"mode": "kept", "why": why}}
    assert retrain.keep_frozen(cfg, ws, "clip", "retrain", ws.clip, ws.filtered, "clip")[0] is None
    other = cfg.model_copy(update={"clip": cfg.clip.model_copy(update={"steps": 5})})
    assert retrain.keep_frozen(other, ws, "clip", "keep", ws.clip, ws.filtered, "clip")[0] is None
