"""corpus.additions: new data arriving as blocks appended after the earlier ones, which never move."""
import io
import json
import urllib.error
import urllib.request

import pandas as pd
import pytest
from PIL import Image

from pipeline import config
from pipeline.data import corpus, server
from pipeline.data.corpus_images import CorpusImages
from pipeline.workspace import Workspace

N = 200


def cfg(additions=(), **corpus_keys):
    """A small corpus with enough duplicates and faults that a block of 10-20 scenes has some."""
    return config.resolve({"corpus": {"n_scenes": N, "duplicate_fraction": 0.1, "near_duplicate_fraction": 0.1,
                                      "fault_fraction": 0.05, "additions": list(additions), **corpus_keys}})


@pytest.fixture(scope="module")
def pairs():
    """The pairs of additions [], [20] and [20, 10]."""
    return {adds: corpus.build_pairs(cfg(adds))[1] for adds in ((), (20,), (20, 10))}


def test_each_addition_appends_without_moving_earlier_rows(pairs):
    base, one, two = pairs[()], pairs[(20,)], pairs[(20, 10)]
    assert len(base) < len(one) < len(two)
    # Block 0 of [20] is the corpus without additions, exactly (values, dtypes, order).
    pd.testing.assert_frame_equal(one.iloc[:len(base)], base, check_exact=True)
    pd.testing.assert_frame_equal(two.iloc[:len(one)], one, check_exact=True)


def test_added_blocks_look_like_the_base(pairs):
    two = pairs[(20, 10)]
    # 20 scenes -> round(20 * 0.1) = 2 exact, 2 near, 1 fault; 10 scenes -> 1, 1, 0 (0.5 rounds to even).
    block1 = two.iloc[len(pairs[()]):len(pairs[(20,)])]
    block2 = two.iloc[len(pairs[(20,)]):]
    assert len(block1) == 20 + 2 + 2 + 1 and len(block2) == 10 + 1 + 1 + 0
    originals = block1[block1.duplicate_kind.isna() & block1.fault.isna()]
    assert sorted(originals.key) == [f"{i:07d}" for i in range(N, N + 20)]
    assert set(block1.key[block1.duplicate_kind == "exact"]) == {"a1d000000", "a1d000001"}
    assert set(block1.key[block1.duplicate_kind == "near"]) == {"a1n000000", "a1n000001"}
    assert list(block1.key[block1.fault.notna()]) == ["a1f000000"]
    assert set(block2.key[block2.duplicate_kind.notna()]) == {"a2d000000", "a2n000000"}


def test_keys_and_urls_unique_and_scene_ids_continue(pairs):
    two = pairs[(20, 10)]
    assert two.key.is_unique and two.url.is_unique
    originals = two[two.duplicate_kind.isna() & two.fault.isna()]
    assert sorted(originals.scene_id) == list(range(N + 30))
    for r in originals.itertuples():
        assert r.key == f"{r.scene_id:07d}" and r.url == f"images/{r.key}.jpg"
        assert json.loads(r.gt)["scene_id"] == r.scene_id
    # Scene i is the same scene whichever block holds it.
    s = corpus.sample_scene(0, N + 5, cfg().corpus.two_object_fraction)
    row = originals.set_index("scene_id").loc[N + 5]
    assert (row.background, row.color0, row.shape0) == (s.background, s.objects[0].color, s.objects[0].shape)


def test_added_duplicates_repost_older_scenes(pairs):
    """Re-posts come from all scenes so far: an incremental filter must catch them against old data."""
    two = pairs[(20, 10)]
    added = two.iloc[len(pairs[()]):]
    dups = added[added.duplicate_kind.notna()]
    src = dups.duplicate_of.str.lstrip("0").replace("", "0").astype(int)
    assert (src == dups.scene_id).all()
    assert (dups.scene_id < N + 30).all()
    # With this seed, both kinds re-post a block-0 scene (deterministic: fixed seed and sizes).
    assert ((dups.duplicate_kind == "exact") & (dups.scene_id < N)).any()
    assert ((dups.duplicate_kind == "near") & (dups.scene_id < N)).any()
    # Splits stay by scene across blocks: a re-post has its source's split.
    real = two[two.fault.isna()]
    assert (real.groupby("scene_id").split.nunique() == 1).all()


def test_added_faults_keep_the_server_pattern(pairs):
    two = pairs[(20, 10)]
    added_faults = two.iloc[len(pairs[()]):].dropna(subset=["fault"])
    assert list(added_faults.url) == ["fault/http_404/a1-0.jpg"]
    for url, kind in zip(added_faults.url, added_faults.fault):
        prefix, url_kind, name = url.split("/")      # what server.CorpusHandler routes on
        assert prefix == "fault" and url_kind == kind and kind in server.FAULTS


def test_split_fractions_hold_in_an_added_block():
    _, pairs = corpus.build_pairs(cfg([600], split={"val": 0.2, "test": 0.2}))
    new = pairs[pairs.fault.isna() & pairs.duplicate_kind.isna() & (pairs.scene_id >= N)]
    share = new["split"].value_counts(normalize=True)
    assert len(new) == 600
    assert 0.14 < share["val"] < 0.26 and 0.14 < share["test"] < 0.26
    # Mismatched captions borrow from the same split, within the block.
    mism = new[new.mismatched]
    assert len(mism) > 0
    by_id = new.set_index("scene_id")["split"]
    for g, split in zip(mism["gt"], mism["split"]):
        other = json.loads(g)["caption_scene_id"]
        assert other >= N and by_id[other] == split


# ---- the stage ----------------------------------------------------------------------------------
def fetch(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5.0) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_stage_renders_added_blocks(tmp_path):
    # Tiny images, and faults enough that the added block has one of each served kind.
    small = dict(image_size=16, render_scale=1, workers=1, fault_fraction=0.35)
    base_ws, ws = Workspace.at(tmp_path / "base"), Workspace.at(tmp_path / "added")
    base_m = corpus.run(cfg(**small), base_ws)
    m = corpus.run(cfg([20, 10], **small), ws)
    pairs = pd.read_parquet(ws.corpus / "pairs.parquet")
    base_pairs = pd.read_parquet(base_ws.corpus / "pairs.parquet")

    assert "additions" not in base_m
    assert m["additions"] == {"blocks": 2, "scenes": 30, "urls": len(pairs) - len(base_pairs)}
    assert {k: v for k, v in m.items() if k != "additions"}.keys() == base_m.keys()
    assert m["scenes"] == N + 30 and m["urls"] == len(pairs)

    images, base_images = CorpusImages(ws.corpus), CorpusImages(base_ws.corpus)
    assert images.names == set(pairs[pairs.fault.isna()].url)
    # Images of block 0 do not change when blocks are added.
    for key in base_pairs[base_pairs.duplicate_kind.isna() & base_pairs.fault.isna()].key:
        assert images.read(f"images/{key}.jpg") == base_images.read(f"images/{key}.jpg")
    added = pairs[pairs.key.str.startswith("a")]
    for r in added[added.duplicate_kind == "exact"].itertuples():
        assert images.read(r.url) == images.read(f"images/{r.duplicate_of}.jpg")
    old_near = added[(added.duplicate_kind == "near") & (added.scene_id < N)]
    assert len(old_near) > 0          # rendered with its source, which is in block 0
    for r in old_near.itertuples():
        assert Image.open(io.BytesIO(images.read(r.url))).size == (20, 20)   # the re-upload: 1.25x, re-encoded
    images.close(), base_images.close()

    # The fault server answers the added blocks' fault URLs by their kind.
    faults = added.dropna(subset=["fault"])
    assert set(faults.fault) == set(corpus.FAULT_KINDS)
    with server.serve_corpus(ws.corpus, timeout_s=0.3) as base:
        for url, kind in zip(faults.url, faults.fault):
            if kind == "timeout":
                continue                    # test_crawl covers the stall; it would cost a timeout here
            status, headers, body = fetch(f"{base}/{url}")
            fault = server.FAULTS[kind]
            assert status == fault.status, url
            if fault.body_file:
                assert body == (ws.corpus / "faults" / fault.body_file).read_bytes()
