"""A user's own data, piece by piece: splits without a split column, images in the formats users'
lists serve, captions of every kind, the stages that need ground truth skipped, and the gate's
rules for data without it. (The whole flow on such a list: test_own_data_flow.py.)"""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers.fake_eval import fake_evaluation
from helpers.own_data import KINDS, encode
from pipeline import registry, truth
from pipeline.data import corpus, crawl, filter as filt
from pipeline.data.shards import ShardSink, iter_samples, sample_meta, shard_paths
from pipeline.stages import StageError
from pipeline.workspace import Workspace


def with_(cfg, section: str, **changes):
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=changes)})


# ---- splits --------------------------------------------------------------------------------------
def test_hash_split_is_stable_and_follows_the_fractions(smoke_cfg):
    ids = pd.Series([f"http://example.com/{i}.jpg" for i in range(20000)])
    splits = crawl.hash_split(ids, smoke_cfg.crawl.split)
    share = {k: float((splits == k).mean()) for k in crawl.SPLITS}
    assert share["test"] == pytest.approx(0.05, abs=0.006) and share["val"] == pytest.approx(0.05, abs=0.006)
    # the same id gets the same split in another order, in a grown list, in another process's run
    again = crawl.hash_split(ids[::-1], smoke_cfg.crawl.split)[::-1]
    assert (again == splits).all()
    grown = crawl.hash_split(pd.concat([ids, pd.Series(["http://example.com/new.jpg"])]), smoke_cfg.crawl.split)
    assert (grown[:-1] == splits).all()
    wider = crawl.hash_split(ids, smoke_cfg.crawl.split.model_copy(update={"val": 0.2, "test": 0.1}))
    assert float((wider == "val").mean()) == pytest.approx(0.2, abs=0.01)


def test_list_splits_take_the_column_where_given_else_the_hash(tmp_path, smoke_cfg):
    f = smoke_cfg.crawl.split
    table = pd.DataFrame({"url": [f"http://h/{i}" for i in range(6)], "caption": ["c"] * 6,
                          "key": [f"k{i}" for i in range(6)],
                          "split": ["val", "test", None, "", " train ", "train"]})
    got = crawl.list_splits(table, tmp_path / "l.csv", f)
    hashed = crawl.hash_split(table["key"], f)             # the key, not the URL, when there is one
    assert list(got) == ["val", "test", hashed[2], hashed[3], "train", "train"]
    bad = table.assign(split=["val", "validation", "train", "train", "train", "test"])
    with pytest.raises(StageError, match="'validation'.*expected one of train, val, test"):
        crawl.list_splits(bad, tmp_path / "l.csv", f)


def test_read_url_list_fills_captions_and_splits(tmp_path, smoke_cfg):
    path = tmp_path / "list.csv"
    pd.DataFrame({"url": ["http://h/a.jpg", "http://h/b.jpg"], "caption": ["sunset", None]}).to_csv(path, index=False)
    cfg = with_(smoke_cfg, "crawl", url_list=str(path))
    urls, faults = crawl.read_url_list(cfg, Workspace.at(tmp_path))
    assert faults is None and list(urls.caption) == ["sunset", ""]        # never the text "nan"
    assert list(urls.split) == list(crawl.hash_split(urls.url, cfg.crawl.split))
    pd.DataFrame({"url": ["http://h/a.jpg", None], "caption": ["x", "y"]}).to_csv(path, index=False)
    with pytest.raises(StageError, match="1 row\\(s\\) have no url"):
        crawl.read_url_list(cfg, Workspace.at(tmp_path))


# ---- images as users' lists serve them ------------------------------------------------------------
def resizer(background=(255, 255, 255), **kw):
    args = dict(image_size=256, resize_mode="no", resize_only_if_bigger=False, skip_reencode=True,
                encode_format="jpg", min_image_size=8, max_image_area=1048576) | kw
    return crawl.NormalizingResizer(background, **args)


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_becomes_an_upright_rgb_jpeg(kind):
    _, data = encode(kind, 0)
    img, w, h, ow, oh, err = resizer((10, 200, 30))(io.BytesIO(data))
    assert err is None
    with Image.open(io.BytesIO(img)) as out:
        assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (w, h))
        corner, centre = out.getpixel((1, 1)), out.getpixel((w // 2, h // 2))
        pixels = np.asarray(out, dtype=np.int32)
    if kind in ("jpeg", "nonsquare", "too_small"):
        assert img == data                              # a plain RGB JPEG is kept byte for byte
    if kind in ("png_rgba", "png_la", "png_palette", "webp"):      # transparent: the configured background
        assert np.abs(np.subtract(corner, (10, 200, 30))).max() <= 6, corner
    elif kind not in ("jpeg_gray", "too_small"):      # (gray has no hue; 20 px: chroma blocks reach the corner)
        assert np.abs(np.subtract(corner, (90, 120, 150))).max() <= 8, corner
    if kind == "png_rgba":                              # the disc is still there, on the background
        assert np.abs(pixels - np.asarray(corner)).max() > 50
    if kind == "gif_animated":                          # the first frame, not the black second one
        assert sum(centre) > 150
    if kind == "jpeg_exif_rotated":                     # stored 96 x 64 sideways, EXIF 6: upright 64 x 96
        assert (ow, oh, w, h) == (96, 64, 64, 96)


def test_size_rules_and_broken_images_keep_their_reasons():
    _, png = encode("png_rgba", 0)
    assert resizer(min_image_size=65)(io.BytesIO(png))[-1] == "image too small"
    assert resizer(max_image_area=63 * 64)(io.BytesIO(png))[-1] == "image area too large"
    err = resizer()(io.BytesIO(png[:len(png) // 2]))[-1]
    assert crawl.classify(err) == "corrupt_image", err
    assert crawl.classify(resizer()(io.BytesIO(b"<html>not an image</html>"))[-1]) == "not_an_image"


def _shard(tmp_path, items):
    with ShardSink(tmp_path / "raw", 100) as sink:
        for key, img, caption in items:
            sink.write({"__key__": key, "jpg": img, "txt": caption.encode(),
                        "json": json.dumps({"key": key, "split": "train"}).encode()})
    return shard_paths(tmp_path / "raw")


def test_filter_keeps_one_word_drops_empty_and_squares_the_rest(tmp_path, smoke_cfg):
    def jpeg(size, color):
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
        return buf.getvalue()
    f = smoke_cfg.filter
    assert f.min_caption_words == 1 and f.square == "center_crop"
    items = [("a", jpeg((64, 64), (200, 0, 0)), "sunset"), ("b", jpeg((64, 64), (0, 200, 0)), "  "),
             ("c", jpeg((96, 64), (0, 0, 200)), "a wide 🐱 picture"), ("d", jpeg((20, 20), (9, 9, 9)), "tiny one")]
    paths = _shard(tmp_path, items)
    s = filt.scan(paths, f, keep_keys=False)
    assert [d["reason"] for d in s.drops] == ["caption_empty", "too_small"] and len(s.index) == 2
    assert s.not_square == {2}
    for policy, side in (("center_crop", 64), ("pad", 96)):
        out = tmp_path / policy
        filt.write_kept(paths, np.array(s.index), out, 100, not_square=frozenset(s.not_square), square=policy,
                        background=(255, 255, 255))
        kept = list(iter_samples(shard_paths(out)))
        assert kept[0]["jpg"] == items[0][1]                          # square: unchanged bytes
        meta = sample_meta(kept[1])
        with Image.open(io.BytesIO(kept[1]["jpg"])) as im:
            assert im.size == (side, side) and meta["square"] == {"policy": policy, "from": [96, 64]}
            assert (np.abs(np.subtract(im.getpixel((side // 2, 2)), (255, 255, 255) if policy == "pad"
                                       else (0, 0, 200))).max() <= 8)
        assert kept[1]["txt"].decode() == "a wide 🐱 picture"


# ---- the stages that need ground truth ----------------------------------------------------------
def test_corpus_is_skipped_for_a_url_list(tmp_path, smoke_cfg):
    ws = Workspace.at(tmp_path)
    m = corpus.run(with_(smoke_cfg, "crawl", url_list="list.csv"), ws)
    assert "crawl.url_list is set" in m["skipped"] and truth.skipped(ws.corpus) == m["skipped"]
    assert [p.name for p in ws.corpus.iterdir()] == [truth.SKIPPED]      # nothing generated


def test_judge_is_skipped_on_shards_without_ground_truth(tmp_path, smoke_cfg):
    from pipeline.stages import run_stage
    ws = Workspace.at(tmp_path)
    _, data = encode("jpeg", 0)
    with ShardSink(ws.filtered, 100) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "jpg": data, "txt": b"a disc", "json": b'{"split": "train"}'})
    m = run_stage("judge", smoke_cfg, ws)
    assert m["skipped"] == truth.NO_TRUTH and truth.skipped(ws.judge) == truth.NO_TRUTH
    assert not (ws.judge / "model.safetensors").exists()
    assert json.loads(ws.metrics_path("judge").read_text())["skipped"] == truth.NO_TRUTH
    assert truth.has_ground_truth(shard_paths(ws.filtered)) is False


def test_the_corpus_carries_ground_truth(data_ws):
    assert truth.has_ground_truth(shard_paths(data_ws.filtered))


# ---- the promotion gate without ground truth ------------------------------------------------------
def unjudged_evaluation(ws, fid: float, clip: float) -> dict:
    figures = {"stage": "evaluate", "ground_truth": False,
               "not_measured": {"why": truth.NO_TRUTH, "figures": list(truth.NOT_MEASURED)},
               "standard": {"metric": "FD-CLIP", "fid": fid, "kid_mean": 0.01, "fid_floor_real_vs_real": 0.02},
               "clip_score": {"decoder": clip - 1, "upsample_1": clip}, "clip_score_final": clip}
    figures["bundle"] = fake_evaluation(ws, seed=0, color=0.0, fid=fid)["bundle"]   # the grids, bundle, report pieces
    ws.metrics_path("evaluate").write_text(json.dumps(figures))
    return figures


@pytest.fixture
def gate_ws(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ws = Workspace.at(tmp_path / "ws")
    for part in ("clip", "prior", "decoder", "upsampler_1"):
        (ws.root / "models" / part).mkdir(parents=True)
        (ws.root / "models" / part / "model.safetensors").write_bytes(b"w")
    return ws


def test_gate_without_ground_truth_uses_its_own_rules(gate_ws, smoke_cfg):
    ws, cfg = gate_ws, smoke_cfg
    unjudged_evaluation(ws, fid=0.10, clip=30.0)
    first = registry.register_and_gate(cfg, ws)
    assert first["promoted"] and first["rule_set"] == "promote.rules_without_ground_truth"
    unjudged_evaluation(ws, fid=0.11, clip=29.5)                 # within both tolerances
    assert registry.register_and_gate(cfg, ws)["promoted"]
    unjudged_evaluation(ws, fid=0.20, clip=29.5)                 # FD-CLIP worse by 0.09 > 0.02
    third = registry.register_and_gate(cfg, ws)
    assert not third["promoted"] and any("standard.fid" in r for r in third["reasons"])


def test_a_rule_on_a_missing_figure_is_a_configuration_error(gate_ws, smoke_cfg):
    ws = gate_ws
    unjudged_evaluation(ws, fid=0.1, clip=30.0)
    rules = [*smoke_cfg.promote.rules_without_ground_truth, registry_rule("quality.single.color")]
    cfg = with_(smoke_cfg, "promote", rules_without_ground_truth=rules)
    with pytest.raises(registry.GateConfigError) as err:           # even with no champion to beat
        registry.register_and_gate(cfg, ws)
    msg = str(err.value)
    assert "promote.rules_without_ground_truth[2]: 'quality.single.color'" in msg and "no ground truth" in msg
    assert "standard.fid" in msg and "clip_score_final" in msg
    assert registry.champion_models(cfg, ws) is None              # nothing was registered
    # the judged rule set on a judged evaluation that lacks one of its figures: the same error
    ev = fake_evaluation(ws, seed=0, color=90.0, fid=1.0)
    del ev["quality"]["pair"]["colors"]
    ws.metrics_path("evaluate").write_text(json.dumps(ev))
    with pytest.raises(registry.GateConfigError, match="promote.rules\\[2\\]: 'quality.pair.colors'"):
        registry.register_and_gate(smoke_cfg, ws)


def registry_rule(metric: str):
    from pipeline.config import GateRule
    return GateRule(metric=metric)


# ---- a pretrained CLIP, actually loaded --------------------------------------------------------------
PRETRAINED_ARCH = "ViT-S-32-alt"          # open_clip's smallest built-in ViT (embed 256, context 77)


def test_pretrained_open_clip_checkpoint_through_embed_into_the_prior(data_ws, smoke_cfg, tmp_path):
    """``clip.pretrained: <arch>:<checkpoint>`` with a checkpoint written here from open_clip's
    own create_model (no download): the CLIP stage loads exactly those weights, embed encodes with
    them, and the prior trains in their embedding space."""
    import shutil
    import open_clip
    import torch
    from safetensors.torch import load_file
    from pipeline.clip import model as clip_model
    from pipeline.data.embedding_shards import load_split
    from pipeline.stages import run_stage
    torch.manual_seed(123)
    model = open_clip.create_model(PRETRAINED_ARCH, pretrained=None)
    ckpt = tmp_path / "vit-s-32-alt.pt"
    torch.save(model.state_dict(), ckpt)
    ws = Workspace.at(tmp_path / "ws")
    shutil.copytree(data_ws.filtered, ws.filtered)
    spec = f"{PRETRAINED_ARCH}:{ckpt}"
    cfg = with_(smoke_cfg, "clip", pretrained=spec)

    m = run_stage("clip", cfg, ws)
    assert m["train"] == {"pretrained": spec} and m["val"]["n_pairs"] > 0
    saved = load_file(str(ws.clip / "model.safetensors"))
    original = model.state_dict()
    assert set(saved) == set(original) and all(torch.equal(saved[k], original[k]) for k in original)
    clip = clip_model.load(ws.clip)
    assert (clip.name, clip.embed_dim, clip.image_size, clip.context_length) == (PRETRAINED_ARCH, 256, 224, 77)

    e = run_stage("embed", cfg, ws)
    assert e["kept"] > 0
    val = load_split(shard_paths(ws.embeddings), "val", image_size=64)
    assert val["z_i"].shape[1] == 256 and val["tokens"].shape[1:] == (77, 256)
    with torch.no_grad():                      # the shards' z_i are this checkpoint's, not a random CLIP's
        z = clip.encode_image(val["images"][:4])
        other = clip_model.Clip(open_clip.create_model(PRETRAINED_ARCH, pretrained=None).eval(),
                                clip.tokenizer, clip.name, clip.config, 224, clip.mean, clip.std)
        z_other = other.encode_image(val["images"][:4])
    assert torch.allclose(z, val["z_i"][:4], atol=2e-3)
    assert not torch.allclose(z_other, val["z_i"][:4], atol=2e-3)

    p = run_stage("prior", cfg, ws)
    meta = json.loads((ws.prior / "model.json").read_text())
    assert meta["arch"]["embed_dim"] == 256 and meta["arch"]["context_length"] == 77
    assert -1 <= p["val"]["cos_pred_image"] <= 1 and p["val"]["n"] == val["n"]

    # a similarity threshold that empties a held-out split stops embed with the knob named, and
    # leaves the last embeddings in place
    before = [p.read_bytes() for p in shard_paths(ws.embeddings)]
    with pytest.raises(StageError, match="embed.min_similarity 0.999 dropped every val and test pair"):
        run_stage("embed", with_(cfg, "embed", min_similarity=0.999), ws)
    assert [p.read_bytes() for p in shard_paths(ws.embeddings)] == before


def test_similarity_filter_biased_against_held_out_pairs_is_reported():
    from pipeline.embed import split_bias
    # the corpus's default run: drop rates agree across splits (planted mismatches only)
    assert split_bias({"train": {"input": 18007, "kept": 17188}, "val": {"input": 991, "kept": 949},
                       "test": {"input": 1000, "kept": 948}}) is None
    # a 2,200-pair own-data list: the CLIP trained on train keeps all of train, drops a quarter of test
    msg = split_bias({"train": {"input": 1494, "kept": 1494}, "val": {"input": 80, "kept": 61},
                      "test": {"input": 96, "kept": 71}})
    assert msg and "24% of val" in msg and "26% of test" in msg and "0% of train" in msg
    assert split_bias({"train": {"input": 10, "kept": 10}}) is None
