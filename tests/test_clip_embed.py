"""The clip and embed stages on the smoke profile, and the pieces they are built from."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.clip import model as clip_model
from pipeline.clip.zeroshot import canonical_caption, recall_at_k
from pipeline.data.shards import count_samples, iter_samples, sample_meta, shard_paths, split_of
from pipeline.stages import StageError, run_stage


@pytest.fixture(scope="module")
def clip_ws(data_ws, smoke_cfg):
    metrics = run_stage("clip", smoke_cfg, data_ws)
    return data_ws, metrics


def test_clip_stage_writes_its_directory_and_figures(clip_ws):
    ws, m = clip_ws
    for f in ("open_clip_config.json", "preprocess.json", "model.safetensors", "run_config.json", "clip_figures.png"):
        assert (ws.clip / f).exists(), f
    val = m["val"]
    assert {"image_to_text_r@1", "image_to_text_r@5", "text_to_image_r@1", "text_to_image_r@5"} <= set(val)
    assert {"color_acc", "shape_acc", "position_acc"} <= set(val["zero_shot"])
    assert {"colors_acc", "binding_acc", "relation_acc", "all_acc"} <= set(val["zero_shot_pairs"])
    assert m["train"]["steps"] == 8
    assert json.loads(ws.metrics_path("clip").read_text())["val"] == val


def test_clip_roundtrip_and_encoder_shapes(clip_ws, smoke_cfg):
    ws, _ = clip_ws
    b = clip_model.load(ws.clip)
    a = clip_model.load(ws.clip)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    tokens = b.tokenize(["a small red circle in the top left", "a blue square", "a red circle above a green square"])
    with torch.no_grad():
        z_i = b.encode_image(images)
        z_t, enc, mask = b.encode_text(tokens)
        assert torch.allclose(z_i, a.encode_image(images))           # loading is deterministic
        # our per-token path matches open_clip's own pooled text embedding
        ref = torch.nn.functional.normalize(b.model.encode_text(tokens), dim=-1)
    m = smoke_cfg.clip.model
    assert z_i.shape == (3, m.embed_dim) and z_t.shape == (3, m.embed_dim)
    assert torch.allclose(z_t, ref, atol=1e-5)
    assert torch.allclose(z_i.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert enc.shape == (3, m.context_length, m.text_width)
    assert mask.dtype == torch.bool and mask[:, 0].all()
    # "a blue square" is 3 words -> [sot, a, blue, square, eot]
    assert mask[1].sum().item() == 5


def test_recall_at_k_on_known_similarities():
    z = torch.eye(4)
    assert recall_at_k(z, z) == {"image_to_text_r@1": 100.0, "image_to_text_r@5": 100.0,
                                 "text_to_image_r@1": 100.0, "text_to_image_r@5": 100.0}
    shuffled = z[[1, 0, 3, 2]]
    r = recall_at_k(z, shuffled, ks=(1,))
    assert r["image_to_text_r@1"] == 0.0


def test_canonical_caption_is_a_corpus_caption():
    assert canonical_caption("red", "circle", "small", "top left") == "a small red circle in the top left"


@pytest.mark.parametrize("spec, message", [
    ("/no/such/dir-or-arch", "expected a CLIP directory"),
    ("NotAnArch:foo", "unknown open_clip architecture"),
    ("ViT-B-32:/no/such/file.bin", "neither a local file nor an open_clip tag"),
])
def test_pretrained_spec_errors_are_clear(data_ws, smoke_cfg, spec, message):
    cfg = smoke_cfg.model_copy(update={"clip": smoke_cfg.clip.model_copy(update={"pretrained": spec})})
    with pytest.raises(StageError, match=message):
        run_stage("clip", cfg, data_ws)


def test_pretrained_clip_directory_is_loaded(clip_ws, smoke_cfg, tmp_path):
    ws, _ = clip_ws
    import shutil
    shutil.copytree(ws.clip, tmp_path / "mine")
    cfg = smoke_cfg.model_copy(update={"clip": smoke_cfg.clip.model_copy(update={"pretrained": str(tmp_path / "mine")})})
    from pipeline.workspace import Workspace
    other = Workspace.at(tmp_path / "ws")
    shutil.copytree(ws.filtered, other.filtered)
    m = run_stage("clip", cfg, other)
    assert m["train"] == {"pretrained": str(tmp_path / "mine")}


@pytest.fixture(scope="module")
def embedded(clip_ws, smoke_cfg):
    ws, _ = clip_ws
    # a whole embed of this CLIP: another module on this worker may have embedded the shared
    # workspace already (tests/test_checkpoints_reliability.py's prior_ws), and embed only adds
    # what is new
    shutil.rmtree(ws.embeddings, ignore_errors=True)
    return ws, run_stage("embed", smoke_cfg, ws)


def load_npy(b):
    return np.load(io.BytesIO(b), allow_pickle=False)


def test_embed_shards_hold_every_field(embedded, smoke_cfg):
    ws, m = embedded
    filt = json.loads(ws.metrics_path("filter").read_text())
    assert m["input"] == filt["kept"] == m["kept"]                 # no threshold in the smoke profile
    assert sum(count_samples(p) for p in shard_paths(ws.embeddings)) == m["kept"]
    mc = smoke_cfg.clip.model
    filtered = {s["__key__"]: sample_meta(s) for s in iter_samples(shard_paths(ws.filtered))}
    n = 0
    for s in iter_samples(shard_paths(ws.embeddings)):
        z_i, z_t = load_npy(s["img_emb.npy"]), load_npy(s["txt_emb.npy"])
        tok, mask = load_npy(s["txt_tokens.npy"]), load_npy(s["txt_mask.npy"])
        assert z_i.shape == z_t.shape == (mc.embed_dim,) and z_i.dtype == np.float32
        assert abs(np.linalg.norm(z_i) - 1) < 1e-4
        assert tok.shape == (mc.context_length, mc.text_width) and tok.dtype == np.float16
        assert mask.dtype == np.bool_ and mask.shape == (mc.context_length,)
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and meta["split"] in {"train", "val", "test"}
        assert meta["gt"] == filtered[meta["key"]]["gt"] and meta["split"] == filtered[meta["key"]]["split"]
        assert meta["gt"]["objects"]                                      # spliced in as an object, not a string
        assert abs(meta["similarity"] - float(z_i @ z_t)) < 1e-3
        assert s["txt"] and s["jpg"][:2] == b"\xff\xd8"
        n += 1
    assert n == m["kept"]


def test_clip_retrieval_layout_is_row_aligned(embedded):
    ws, m = embedded
    img = sorted((ws.embeddings / "img_emb").glob("*.npy"))
    meta = sorted((ws.embeddings / "metadata").glob("*.parquet"))
    assert len(img) == len(meta) == len(shard_paths(ws.embeddings))
    rows = pd.concat([pd.read_parquet(p) for p in meta])
    emb = np.concatenate([np.load(p) for p in img])
    assert len(rows) == len(emb) == m["kept"]
    by_key = {s["__key__"]: load_npy(s["img_emb.npy"]) for s in iter_samples(shard_paths(ws.embeddings))}
    for key, e in zip(rows.key, emb):
        assert np.allclose(by_key[key], e, atol=2e-3)              # float16 in the retrieval layout


def test_similarity_threshold_drops_and_counts(clip_ws, smoke_cfg, tmp_path):
    ws, _ = clip_ws
    from pipeline.embed import embed_shards
    b = clip_model.load(ws.clip)
    figs = embed_shards(b, shard_paths(ws.filtered), tmp_path, batch_size=32, shard_size=50, num_workers=0,
                        min_similarity=2.0, token_dtype="float16")          # cos <= 1: drops everything
    assert figs["kept"] == 0 and figs["dropped_low_similarity"] == figs["input"] > 0
    assert figs["mismatch_filter"]["recall"] == 1.0


def test_clip_batches_are_train_images_with_their_own_captions(data_ws, smoke_cfg):
    """CLIP's batches come from a rolling buffer of decoded shards: every image is a train image
    with PIL's pixels, its tokens and hard negatives are its own caption's, and a buffer smaller
    than the data rolls over the shards."""
    from pipeline.clip.data import train_batches
    from pipeline.clip.negatives import hard_negatives
    from pipeline.data.image_shards import decode_image, resize_uint8
    paths = shard_paths(data_ws.filtered)
    assert len(paths) > 1
    size = smoke_cfg.clip.model.image_size
    captions = {}                                    # pixels (PIL's, at CLIP's size) -> caption, train split only
    for s in iter_samples(paths):
        if split_of(sample_meta(s)) == "train":
            captions[resize_uint8(decode_image(s["jpg"]), size).numpy().tobytes()] = s["txt"].decode("utf-8")
    clip = clip_model.build(smoke_cfg.clip.model)
    kinds = ("relation", "binding")
    one_shard = 3 * size * size * count_samples(paths[0])        # a buffer of one shard: it must roll
    batches = train_batches(paths, clip.tokenize, 16, 0, size, kinds, buffer_bytes=one_shard)
    seen = set()
    for _ in range(3 * sum(count_samples(p) for p in paths) // 16):
        images, tokens, negatives, mask = next(batches)
        assert images.dtype == torch.uint8 and images.shape == (16, 3, size, size)
        for i in range(16):
            caption = captions.get(images[i].numpy().tobytes())
            assert caption is not None, "not a train image"
            assert torch.equal(tokens[i], clip.tokenize([caption])[0])
            texts, m = hard_negatives([caption], kinds)
            assert torch.equal(mask[i], m[0]) and torch.equal(negatives[i], clip.tokenize(texts))
            seen.add(caption)
    assert len(seen) > 0.8 * len(set(captions.values()))         # drawn from every shard, not one


def test_embed_writes_each_train_captions_rewrites_as_clip_encodes_them(embedded, smoke_cfg):
    """With ``embed.rewrites`` k the train samples carry their caption's first k language rewrites
    (CLIP's own, seeded by ``clip.seed``), encoded by the CLIP as the caption is; held-out samples none."""
    from pipeline.clip.rewrites import rewrites
    ws, m = embedded
    k = smoke_cfg.embed.rewrites
    assert k >= 1
    clip = clip_model.load(ws.clip)
    mc = smoke_cfg.clip.model
    train = 0
    for s in iter_samples(shard_paths(ws.embeddings)):
        meta = json.loads(s["json"])
        if meta["split"] != "train":
            assert "rewrites" not in meta and "rw_emb.npy" not in s
            continue
        train += 1
        caption = s["txt"].decode("utf-8")
        assert meta["rewrites"] == rewrites(caption, k, smoke_cfg.clip.seed)
        assert all(r != caption for r in meta["rewrites"])          # the corpus's captions are all read
        emb, tok, mask = (load_npy(s[f"rw_{f}.npy"]) for f in ("emb", "tokens", "mask"))
        assert emb.shape == (k, mc.embed_dim) and tok.shape == (k, mc.context_length, mc.text_width)
        assert mask.shape == (k, mc.context_length) and tok.dtype == np.float16
        if train <= 8:                                  # the CLIP's own encodings of the rewrite's text
            with torch.no_grad():
                z_t, enc, msk = clip.encode_text(clip.tokenize(meta["rewrites"]))
            assert np.allclose(emb, z_t.float().numpy(), atol=1e-4)
            assert np.allclose(tok, enc.float().numpy(), atol=2e-2) and (mask == msk.numpy()).all()
    assert m["rewritten"] == train > 0


def test_train_batches_draw_a_caption_or_its_rewrite_with_every_text_field_alike(embedded):
    """Each sample's z_t, tokens and mask are those of one variant (the caption or a rewrite),
    drawn per sample; both are drawn; with one variant the batches are the captions' alone."""
    from pipeline.data.embedding_shards import read_shard, train_batches
    ws, _ = embedded
    paths = shard_paths(ws.embeddings)
    parts = [read_shard(p, "train", variants=2) for p in paths]
    by_zi = {}                      # z_i -> (z_t [2, D], tokens [2, L, W], mask [2, L])
    for part in parts:
        for j in range(part["n"]):
            by_zi[part["z_i"][j].numpy().tobytes()] = (part["z_t"][j], part["tokens"][j], part["mask"][j])
    drawn = [0, 0]
    it = train_batches(paths, 16, seed=0, variants=2)
    for _ in range(20):
        b = next(it)
        assert b["tokens"].dtype == torch.float32 and b["z_t"].shape == b["z_i"].shape
        for j in range(16):
            z_t, tokens, mask = by_zi[b["z_i"][j].numpy().tobytes()]
            v = [k for k in range(2) if torch.equal(z_t[k], b["z_t"][j])]
            assert v, "z_t is neither the caption's nor its rewrite's"
            assert torch.equal(tokens[v[0]].float(), b["tokens"][j]) and torch.equal(mask[v[0]], b["mask"][j])
            drawn[v[0]] += 1
    assert min(drawn) > 0.3 * sum(drawn)
    plain = next(train_batches(paths, 16, seed=0))
    again = next(train_batches(paths, 16, seed=0, variants=1))
    assert all(torch.equal(plain[f], again[f]) for f in plain)
    caption_only = read_shard(paths[0], "train")
    assert torch.equal(caption_only["z_t"], parts[0]["z_t"][:, 0])


def test_a_caption_the_rewrites_cannot_read_trains_as_it_is(clip_ws, smoke_cfg, tmp_path):
    """A user's own caption (words outside the corpus's grammar) gets no rewrite members, and a
    reader asking for variants repeats its caption's fields."""
    from pipeline.data.embedding_shards import read_shard
    from pipeline.data.shards import ShardSink
    from pipeline.embed import embed_shards
    ws, _ = clip_ws
    src = tmp_path / "own"
    with ShardSink(src, 100) as sink:
        for i, s in enumerate(iter_samples(shard_paths(ws.filtered))):
            meta = json.loads(s["json"]) | {"split": "train"}
            sink.write({"__key__": s["__key__"], "jpg": s["jpg"], "json": json.dumps(meta).encode(),
                        "txt": f"holiday snapshot number {i} from grandma".encode()})
            if i == 20:
                break
    out = tmp_path / "emb"
    figs = embed_shards(clip_model.load(ws.clip), shard_paths(src), out, batch_size=8, shard_size=100,
                        num_workers=0, min_similarity=None, token_dtype="float16", rewrites=2, seed=0)
    assert figs["kept"] == 21 and figs["rewritten"] == 0
    assert not any("rw_emb.npy" in s for s in iter_samples(shard_paths(out)))
    part = read_shard(shard_paths(out)[0], "train", variants=3)
    assert part["tokens"].shape[1] == 3 and all(torch.equal(part["z_t"][:, 0], part["z_t"][:, v]) for v in (1, 2))
