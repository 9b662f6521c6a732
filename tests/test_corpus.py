"""The embedded corpus (CORPUS.md): deterministic, splits by scene, captions true to the ground truth."""
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data import corpus
from pipeline.data.corpus_images import CorpusImages
from pipeline.data import scenes
from pipeline.workspace import Workspace


@pytest.fixture(scope="module")
def built(tmp_path_factory, smoke_cfg):
    ws = Workspace.at(tmp_path_factory.mktemp("corpus"))
    metrics = corpus.run(smoke_cfg, ws)
    import pandas as pd
    return ws, metrics, pd.read_parquet(ws.corpus / "pairs.parquet")


def digest(directory):
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.suffix != ".png":   # PNG grids embed no randomness but skip metadata anyway
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_in_seed(built, smoke_cfg, tmp_path):
    ws, _, _ = built
    again = Workspace.at(tmp_path / "again")
    corpus.run(smoke_cfg.model_copy(update={"corpus": smoke_cfg.corpus.model_copy(update={"workers": 2})}), again)
    assert digest(again.corpus) == digest(ws.corpus)          # independent of worker count too
    other = Workspace.at(tmp_path / "other")
    corpus.run(smoke_cfg.model_copy(update={"corpus": smoke_cfg.corpus.model_copy(update={"seed": 1})}), other)
    assert digest(other.corpus) != digest(ws.corpus)


def test_counts_and_files(built, smoke_cfg):
    ws, m, pairs = built
    c = smoke_cfg.corpus
    assert m["scenes"] == c.n_scenes
    assert len(pairs) == m["urls"] == c.n_scenes + m["exact_duplicates"] + m["near_duplicates"] + sum(m["faults"].values())
    assert set(m["faults"]) == set(corpus.FAULT_KINDS)
    with CorpusImages(ws.corpus) as images:
        # one member per URL of an image and nothing else: the archive is the corpus's only image file
        assert images.names == set(pairs[pairs.fault.isna()].url)
        im = Image.open(io.BytesIO(images.read(pairs[pairs.fault.isna() & pairs.duplicate_kind.isna()].url.iloc[0])))
    assert im.size == (c.image_size, c.image_size)
    assert not (ws.corpus / "images").exists()
    share = (pairs[pairs.fault.isna()].n_objects == 2).mean()
    assert 0.25 < share < 0.55
    assert 0.01 < pairs.mismatched.mean() < 0.12


def test_exact_duplicates_are_the_same_bytes(built):
    ws, _, pairs = built
    with CorpusImages(ws.corpus) as images:
        for r in pairs[pairs.duplicate_kind == "exact"].itertuples():
            assert images.read(r.url) == images.read(f"images/{r.duplicate_of}.jpg")


def test_splits_are_by_scene(built):
    _, _, pairs = built
    real = pairs[pairs.fault.isna()]
    per_scene = real.groupby("scene_id").split.nunique()
    assert (per_scene == 1).all()
    assert set(real.split) == {"train", "val", "test"}


def test_captions_name_the_ground_truth(built):
    _, _, pairs = built
    ok = pairs[pairs.fault.isna() & ~pairs.mismatched]
    for r in ok.itertuples():
        gt = json.loads(r.gt)
        for o in gt["objects"]:
            assert o["color"] in r.caption and o["shape"] in r.caption
        if gt["relation"]:
            assert scenes.RELATION_PHRASES[gt["relation"]] in r.caption
    mism = pairs[pairs.mismatched]
    assert all(json.loads(g)["caption_scene_id"] != s for g, s in zip(mism["gt"], mism.scene_id))


def test_two_object_geometry_follows_the_relation():
    for i in range(300):
        s = corpus.sample_scene(0, i, two_object_fraction=1.0)
        a, b = s.objects
        dx, dy = b.x - a.x, b.y - a.y
        along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[s.relation]
        assert 0.4 - 1e-9 <= along <= 0.6 + 1e-9 and abs(across) <= 0.1 + 1e-9
        assert a.color != b.color


def test_rendered_color_is_where_the_ground_truth_says():
    s = corpus.sample_scene(3, 0, two_object_fraction=0.0)
    img = np.asarray(corpus.render(s, 64, 4)).astype(int)
    o = s.objects[0]
    px = img[int(o.y * 64), int(o.x * 64)]
    assert np.abs(px - np.array(corpus.COLORS[o.color])).max() <= 20


def test_a_missing_or_corrupt_image_archive_is_a_clear_error(tmp_path):
    from pipeline.errors import StageError
    with pytest.raises(StageError, match="not a readable corpus image archive.*run the corpus stage again"):
        CorpusImages(tmp_path)                                   # no images.zip
    (tmp_path / "images.zip").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(StageError, match="not a readable corpus image archive"):
        CorpusImages(tmp_path)
