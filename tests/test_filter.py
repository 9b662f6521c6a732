"""The filter stage on the smoke corpus and on crafted samples, one per rule."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import config
from pipeline.data import corpus, filter as filt
from pipeline.data.corpus_images import CorpusImages
from pipeline.data.shards import ShardSink, iter_samples, shard_paths
from pipeline.stages import StageError
from pipeline.workspace import Workspace

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def build_raw_shards(ws: Workspace, shard_size: int) -> None:
    """Stand-in for the crawl stage: every non-fault URL of ``data/corpus`` as a raw sample.

    Samples follow pairs.parquet's (interleaved) order and carry img2dataset-like json.
    """
    pairs = pd.read_parquet(ws.corpus / "pairs.parquet")
    pairs = pairs[pairs.fault.isna()]
    with ShardSink(ws.raw, shard_size) as sink, CorpusImages(ws.corpus) as images:
        for row in pairs.itertuples():
            meta = {"key": row.key, "split": row.split, "gt": row.gt, "url": row.url, "caption": row.caption}
            sink.write({"__key__": row.key, "jpg": images.read(row.url),
                        "txt": row.caption.encode(), "json": json.dumps(meta).encode()})


def smoke_cfg():
    return config.load(PARAMS, "smoke")


def read_out(ws: Workspace) -> dict[str, dict]:
    return {s["__key__"]: s for s in iter_samples(shard_paths(ws.filtered))}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(cfg, ws, metrics) of the filter stage over raw shards of the smoke corpus."""
    cfg = smoke_cfg()
    ws = Workspace.at(tmp_path_factory.mktemp("smoke"))
    corpus.run(cfg, ws)
    build_raw_shards(ws, cfg.crawl.shard_size)
    return cfg, ws, filt.run(cfg, ws)


# ---- crafted samples ----------------------------------------------------------------------------
def scene_image(color: str, background: str = "white") -> Image.Image:
    # Off centre on purpose: a centred circle is symmetric, its odd DCT coefficients vanish and
    # pHash bits become coin flips under JPEG noise (no longer the same hash for red and blue).
    obj = corpus.Obj(color, "circle", "large", "top left", 0.3, 0.35, 0.0, corpus.COLORS[color])
    return corpus.render(corpus.Scene(0, background, [obj]), 64, 4)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


CAPTION = "a big red circle in the top left"


def crafted_samples() -> list[tuple[str, bytes, str, str | None]]:
    """(key, image bytes, caption, expected drop reason or None for kept), in shard order."""
    red = scene_image("red")
    red_jpg = encode(red, quality=95)
    decoded = Image.open(io.BytesIO(red_jpg)).convert("RGB")
    return [
        ("base", red_jpg, CAPTION, None),
        ("blue", encode(scene_image("blue"), quality=95), "a big blue circle in the top left", None),
        ("gray", encode(scene_image("red", "gray"), quality=95), CAPTION, None),
        ("corrupt", red_jpg[: len(red_jpg) // 2], CAPTION, "unreadable"),
        ("html", b"<html>soft 404</html>", CAPTION, "unreadable"),
        ("tiny", encode(red.resize((16, 16)), quality=95), CAPTION, "too_small"),
        ("wide", encode(red.resize((160, 64)), quality=95), CAPTION, "aspect_ratio"),
        ("empty", red_jpg, "  ", "caption_empty"),
        ("oneword", red_jpg, "circle", "caption_too_short"),       # with min_caption_words: 2 (default 1)
        ("wordy", red_jpg, " ".join(["red"] * 41), "caption_too_long"),
        ("copy", red_jpg, CAPTION, "exact_duplicate"),
        # Other bytes, same pixels: a lossless re-encode of the decoded JPEG.
        ("png", encode(decoded, "PNG"), CAPTION, "exact_duplicate"),
        # A re-upload as the corpus makes them: resized by a quarter, re-encoded at quality 80.
        ("reupload", encode(red.resize((80, 80), Image.BICUBIC), quality=80), CAPTION, "near_duplicate"),
    ]


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    cfg = smoke_cfg()
    cfg = cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"min_caption_words": 2})})
    ws = Workspace.at(tmp_path_factory.mktemp("crafted"))
    samples = crafted_samples()
    with ShardSink(ws.raw, shard_size=5) as sink:        # several shards: dedup spans them
        for key, img, text, _ in samples:
            ext = "png" if key == "png" else "jpg"
            sink.write({"__key__": key, ext: img, "txt": text.encode()})
    return cfg, ws, samples, filt.run(cfg, ws)


def test_each_rule_fires_on_its_crafted_sample(crafted):
    cfg, ws, samples, metrics = crafted
    drops = pd.read_parquet(ws.filtered / "dropped.parquet").set_index("key")
    for key, _, _, reason in samples:
        if reason is None:
            assert key not in drops.index, f"{key} dropped as {drops.reason.get(key)}"
        else:
            assert drops.reason[key] == reason, key
    for key in ("copy", "png", "reupload"):
        assert drops.duplicate_of[key] == "base"
    expected = {r: sum(1 for *_, why in samples if why == r) for r in filt.REASONS}
    assert metrics["dropped_by_reason"] == expected
    assert set(read_out(ws)) == {k for k, *_, why in samples if why is None}
    assert "dedup_vs_truth" not in metrics          # no corpus ground truth in this workspace


def test_red_and_blue_share_a_phash_but_are_not_near_duplicates(crafted):
    cfg, ws, samples, metrics = crafted
    phash = {k: filt.phash64(Image.open(io.BytesIO(img)))
             for k, img, *_ in samples if k in ("base", "blue", "gray")}
    # pHash alone would call them duplicates of the red one: only the colors tell them apart.
    for other in ("blue", "gray"):
        distance = int(np.bitwise_count(np.uint64(phash["base"] ^ phash[other])))
        assert distance <= cfg.filter.phash_max_distance, other
    assert metrics["near_dedup"]["color_rejected"] >= 2
    assert {"blue", "gray"} <= set(read_out(ws))


def test_near_duplicates_is_greedy_over_kept_samples():
    # a~b and b~c but not a~c: b goes, c stays (it only resembles a dropped sample).
    phash = np.array([0b0000, 0b0011, 0b1111, 0b0000], np.uint64)
    thumbs = np.zeros((4, filt.THUMB_GRID, filt.THUMB_GRID, 3), np.uint8)
    thumbs[3] = 200                                       # same pHash as a, other colors
    match, stats = filt.near_duplicates(phash, thumbs, max_distance=2, max_rmse=6.0)
    assert match.tolist() == [-1, 0, -1, -1]
    # Candidates (pHash <= 2): 1~0, 2~1 (confirmed); 3~0, 3~1 (rejected by color). The bands
    # (22, 21, 21 bits) propose all 6 pairs in each band (the upper two are 0 in every hash) and
    # the lowest band only 3~0 (0b0000 twice): 13 proposals.
    assert stats == {"bands": 3, "band_candidates": 13, "phash_candidates": 4, "color_confirmed": 2,
                     "color_rejected": 2}


@pytest.mark.parametrize("max_distance", [0, 2, 4, 9])
def test_banded_candidates_are_the_all_pairs_candidates(max_distance):
    """Pigeonhole: pHashes within d bits have a band within band_radii's flips of each other, so
    the band search proposes every pair the all-pairs search finds, with any number of bands
    (multi-index hashing), and the greedy drops are the same."""
    import math

    from pipeline.data import dedup
    rng = np.random.default_rng(max_distance)
    base = rng.integers(0, 2 ** 63, 300, dtype=np.uint64)
    # clusters of near copies: a few random bits flipped, so every distance up to ~2d occurs
    flips = [np.bitwise_or.reduce(np.uint64(1) << rng.integers(0, 64, rng.integers(0, 2 * max_distance + 2))
                                  .astype(np.uint64)) for _ in range(900)]
    phash = np.concatenate([base, base[rng.integers(0, 300, 900)] ^ np.array(flips, np.uint64)])
    thumbs = np.zeros((len(phash), filt.THUMB_GRID, filt.THUMB_GRID, 3), np.uint8)
    thumbs[rng.random(len(phash)) < 0.3] = 200                # other colors: rejected candidates
    layouts = [m for m in range(1, max_distance + 2)         # those with at most 2,500 probes a sample
               if sum(math.comb(w, k) for (_, w), r in zip(dedup.band_layout(m), dedup.band_radii(m, max_distance))
                      for k in range(r + 1)) <= 2500]
    assert max_distance + 1 in layouts and (max_distance < 2 or len(layouts) >= 3)
    for first in (0, 500):
        ref, ref_stats = dedup.near_duplicates_all_pairs(phash, thumbs, max_distance, 1.0, first)
        for m in layouts:
            i, j, banded, bands = dedup.candidate_pairs(phash, max_distance, first, m)
            match, stats = dedup.near_duplicates(phash, thumbs, max_distance, 1.0, first, m)
            assert len(i) == ref_stats["phash_candidates"] > 0 and banded >= len(i) and bands == stats["bands"] == m
            assert (match == ref).all() and (match >= 0).sum() > 0
            assert {k: stats[k] for k in ref_stats} == ref_stats


def test_bands_are_chosen_by_their_work():
    """Narrow bands for few hashes; wider ones, probed with flips, once the narrow buckets crowd."""
    from pipeline.data import dedup
    rng = np.random.default_rng(0)
    assert dedup.band_radii(5, 4) == [0] * 5 and dedup.band_radii(3, 4) == [1, 1, 0]
    assert dedup.band_radii(2, 4) == [2, 1] and dedup.band_radii(4, 4) == [1, 0, 0, 0]
    assert len(dedup.flip_masks(21, 1)) == 22 and len(dedup.flip_masks(32, 2)) == 529
    spread = rng.integers(0, 2 ** 63, 1 << 18, dtype=np.uint64) * np.uint64(2)
    assert dedup.choose_bands(spread[:5000], 4) == 5 and dedup.choose_bands(spread, 4) < 5
    crowded = np.repeat(spread[:50], 100)                  # 50 hashes, 100 copies each
    assert dedup.choose_bands(crowded, 4) == 5             # flips would only add work there


# ---- the smoke corpus ---------------------------------------------------------------------------
def test_counts_reconcile(smoke):
    cfg, ws, m = smoke
    pairs = pd.read_parquet(ws.corpus / "pairs.parquet")
    assert m["input"] == int(pairs.fault.isna().sum())
    assert set(m["dropped_by_reason"]) == set(filt.REASONS)
    assert m["input"] == m["kept"] + sum(m["dropped_by_reason"].values())
    assert len(read_out(ws)) == m["kept"]
    assert len(pd.read_parquet(ws.filtered / "dropped.parquet")) == m["input"] - m["kept"]


def test_kept_shards_decode_and_preserve_keys_and_bytes(smoke):
    cfg, ws, m = smoke
    raw = {s["__key__"]: s for s in iter_samples(shard_paths(ws.raw))}
    out = read_out(ws)
    assert len(shard_paths(ws.filtered)) == -(-m["kept"] // cfg.filter.shard_size)
    for key, sample in out.items():
        assert min(Image.open(io.BytesIO(sample["jpg"])).convert("RGB").size) >= cfg.filter.min_size
        for field in ("jpg", "txt", "json"):
            assert sample[field] == raw[key][field], (key, field)


def test_planted_duplicates_are_all_dropped(smoke):
    cfg, ws, m = smoke
    pairs = pd.read_parquet(ws.corpus / "pairs.parquet")
    kept = set(read_out(ws))
    planted = pairs[pairs.duplicate_kind.notna()]
    assert len(planted) > 0
    for copy, original in zip(planted.key, planted.duplicate_of):
        # Shard order decides which copy survives; exactly one must.
        assert (copy in kept) + (original in kept) == 1, (copy, original)
    for kind in ("exact", "near"):
        truth = m["dedup_vs_truth"][kind]
        assert truth["planted"] == int((planted.duplicate_kind == kind).sum())
        assert truth["recall"] == 1.0 and truth["false_positives"] == 0, (kind, truth)


def test_corrupt_shard_is_a_stage_error_and_writes_nothing(smoke, tmp_path):
    cfg, src, _ = smoke
    ws = Workspace.at(tmp_path)
    ws.raw.mkdir(parents=True)
    for p in shard_paths(src.raw):
        (ws.raw / p.name).write_bytes(p.read_bytes())
    last = shard_paths(ws.raw)[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2 + 100])   # cut mid-member
    with pytest.raises(StageError, match=last.name):
        filt.run(cfg, ws)
    assert sorted(p.name for p in ws.raw.parent.iterdir()) == ["raw"]      # no output, no temp dir


def test_no_raw_shards_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="crawl"):
        filt.run(smoke_cfg(), Workspace.at(tmp_path))


def test_pass_two_per_output_shard_writes_the_same_bytes(smoke, tmp_path):
    """The Spark engine's write (a job per output shard, reading only its input ranges) gives
    write_kept's shards byte for byte; here with shards of 150 so that jobs span input shards."""
    cfg, ws, m = smoke
    paths = shard_paths(ws.raw)
    s = filt.scan(paths, cfg.filter, keep_keys=False)
    keep = np.asarray(s.index)
    assert sum(s.sizes) == s.n
    for out, write in (("stream", None), ("jobs", filt.write_output_shard)):
        if write is None:
            filt.write_kept(paths, keep, tmp_path / out, 150)
        else:
            jobs = filt.output_jobs(paths, s.sizes, keep, 150, "", frozenset(), "center_crop", (255, 255, 255))
            assert any(len(j["reads"]) > 1 for j in jobs)
            assert sum(write(j | {"out": str(tmp_path / out)}) for j in jobs) == len(keep)
    stream, jobs = (sorted((tmp_path / d).glob("*.tar")) for d in ("stream", "jobs"))
    assert [p.name for p in stream] == [p.name for p in jobs] and len(stream) > 2
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(stream, jobs))
