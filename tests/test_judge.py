"""The judge's labels, its caption checks, the caption parser, and the Frechet distance."""
import json

import numpy as np
import pytest
import torch

from pipeline.data.scenes import caption, sample_scene
from pipeline.judge.labels import HEADS, IGNORE, VOCAB, accuracy, canonical_pair, check, parse_caption, targets
from pipeline.quality import frechet_distance


def scenes(n=300):
    return [sample_scene(0, i, 0.4) for i in range(n)]


def pred_from(gt) -> dict:
    """What a perfect judge outputs for this truth (heads that do not apply: 0)."""
    return {h: (v if v != IGNORE else 0) for h, v in zip(HEADS, targets(gt))}


def test_targets_cover_every_head_that_applies():
    for s in scenes(50):
        t = dict(zip(HEADS, targets(s.ground_truth())))
        assert t["count"] == len(s.objects) - 1
        applies = ("color", "shape", "size", "position") if len(s.objects) == 1 else (
            "axis", "color_a", "shape_a", "size_a", "color_b", "shape_b", "size_b")
        for h in HEADS:
            assert (t[h] != IGNORE) == (h in applies or h in ("count", "background")), h
            assert t[h] == IGNORE or 0 <= t[h] < len(VOCAB[h])


def test_canonical_order_is_left_then_right_or_top_then_bottom():
    for s in scenes():
        if len(s.objects) == 2:
            axis, a, b = canonical_pair(s.ground_truth())
            key = "x" if axis == "horizontal" else "y"
            assert a[key] < b[key]


def test_a_perfect_reading_passes_every_check_and_single_mistakes_fail_their_check():
    gts = [s.ground_truth() for s in scenes()]
    preds = [pred_from(g) for g in gts]
    acc = accuracy(preds, gts)
    assert all(v == 100.0 for kind in acc.values() for k, v in kind.items() if k != "n")
    pair = next(g for g in gts if len(g["objects"]) == 2)
    p = pred_from(pair)
    swapped = p | {"color_a": p["color_b"], "color_b": p["color_a"], "shape_a": p["shape_b"], "shape_b": p["shape_a"]}
    v = check(swapped, pair)
    assert v["colors"] and v["shapes"] and not v["relation"]         # right objects, wrong order
    v = check(p | {"axis": 1 - p["axis"]}, pair)
    assert v["colors"] and not v["relation"]
    v = check(p | {"shape_a": (p["shape_a"] + 1) % 3}, pair)
    assert v["colors"] and not v["shapes"] and v["relation"] and not v["all"]
    v = check(p | {"color_b": p["color_a"]}, pair)                      # one color twice
    assert not v["colors"] and not v["relation"]
    single = next(g for g in gts if len(g["objects"]) == 1)
    p = pred_from(single)
    assert check(p | {"shape": (p["shape"] + 1) % 3}, single) == {
        "count": True, "color": True, "shape": False, "size": True, "position": True, "all": False}
    # one object seen as two: nothing of the one-object caption counts as right
    assert not any(check(p | {"count": 1}, single).values())


def test_parse_caption_recovers_the_truth_of_every_corpus_caption():
    rng = np.random.default_rng(0)
    for s in scenes(400):
        gt = s.ground_truth()
        text = caption(s, rng)
        parsed = parse_caption(text)
        assert parsed is not None, text
        if len(gt["objects"]) == 1:
            assert parsed["relation"] is None, text
            got, want = parsed["objects"][0], gt["objects"][0]
            assert [got[k] for k in ("color", "shape", "size", "position")] == \
                [want[k] for k in ("color", "shape", "size", "position")], text
        else:       # the same scene, whichever object the caption names first ("a above b" = "b below a")
            (axis, a, b), (want_axis, want_a, want_b) = canonical_pair(parsed), canonical_pair(gt)
            assert axis == want_axis, text
            assert [(o["color"], o["shape"]) for o in (a, b)] == [(o["color"], o["shape"]) for o in (want_a, want_b)], text
        # and the checks the caption names agree with the true scene's
        assert check(pred_from(gt), parsed)["all"], text
    assert parse_caption("a photo of a dog") is None
    right = parse_caption("a blue square on the right and a red circle on the left")     # places, the right one first
    assert canonical_pair(right)[0] == "horizontal" and canonical_pair(right)[1]["color"] == "red"
    assert parse_caption("a red circle at the top left, large in size")["objects"][0]["size"] == "large"
    it = parse_caption("a blue square, and a red circle above it")                         # the pronoun's object
    assert it["relation"] == "above" and it["objects"][0]["color"] == "red"


def test_frechet_distance_matches_an_independent_computation():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = np.random.default_rng(0)
    a = g.normal(size=(200, 8))
    b = g.normal(size=(150, 8)) @ g.normal(size=(8, 8)) * 0.5 + 0.3
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy_linalg.sqrtm(s_a @ s_b).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)


def test_judge_cli_reads_a_grid_and_scores_captions(tmp_path):
    """A tiny untrained judge's directory: the CLI's plumbing (grid cutting, captions, JSON), not accuracy."""
    from click.testing import CliRunner

    from pipeline import bundle
    from pipeline.cli import main
    from pipeline.images import grid, save_png
    from pipeline.judge.network import JudgeNet
    arch = {"image_size": 64, "channels": [8, 8, 8, 8], "feature_dim": 16}
    bundle.save_model(tmp_path / "judge", JudgeNet(**arch), kind="judge", arch=arch, run_config={})
    images = torch.randint(0, 255, (6, 3, 64, 64), dtype=torch.uint8)
    caps = ["a small red circle in the top left", "a blue square to the left of a green triangle"]
    save_png(grid(images, 3, row_labels=caps), tmp_path / "grid.png")
    res = CliRunner().invoke(main, ["judge", str(tmp_path / "grid.png"), "--tile", "64", "--cols", "3",
                                    "--judge", str(tmp_path / "judge"), "--json",
                                    "--caption", caps[0], "--caption", caps[1]])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert len(out["images"]) == 6 and out["accuracy"]["single"]["n"] == 3 and out["accuracy"]["pair"]["n"] == 3
    assert [e["caption"] for e in out["images"]] == [caps[0]] * 3 + [caps[1]] * 3
    bad = CliRunner().invoke(main, ["judge", str(tmp_path / "grid.png"), "--tile", "64", "--cols", "3",
                                    "--judge", str(tmp_path / "judge"), "--caption", "a photo of a dog"])
    assert bad.exit_code == 2 and "grammar" in bad.output
    missing = CliRunner().invoke(main, ["judge", str(tmp_path / "grid.png"), "--judge", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "unclip stage judge" in missing.output


def test_judge_batches_are_train_images_with_their_own_truth_from_a_rolling_buffer(data_ws, smoke_cfg):
    """The judge trains from a rolling buffer of decoded shards, as CLIP does (it held the whole
    train split in memory before): every image is a train image with PIL's pixels and its own
    ground truth's targets, and a buffer of one shard rolls over all of them."""
    from pipeline.data.image_shards import decode_image, resize_uint8
    from pipeline.data.shards import count_samples, iter_samples, sample_meta, shard_paths, split_of
    from pipeline.judge import stage as judge_stage
    from pipeline.judge.labels import parse_gt, target_tensor
    from pipeline.images import to_uint8
    paths = shard_paths(data_ws.filtered)
    assert len(paths) > 1
    size = smoke_cfg.corpus.image_size
    truth = {}                                        # pixels -> targets, train split with ground truth only
    for s in iter_samples(paths):
        meta = sample_meta(s)
        if split_of(meta) == "train" and parse_gt(meta.get("gt")):
            truth[resize_uint8(decode_image(s["jpg"]), size).numpy().tobytes()] = target_tensor([meta["gt"]])[0]
    one_shard = 3 * size * size * count_samples(paths[0])        # a buffer of one shard: it must roll
    batches = judge_stage.batches(paths, size, 16, seed=0, p_degrade=0.0, buffer_bytes=one_shard)
    seen = set()
    for _ in range(3 * len(truth) // 16):
        x, t = next(batches)
        assert x.shape == (16, 3, size, size) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
        for i in range(16):
            key = to_uint8(x[i:i + 1])[0].numpy().tobytes()
            assert key in truth, "not a train image with ground truth"
            assert torch.equal(t[i], truth[key])
            seen.add(key)
    assert len(seen) > 0.8 * len(truth)                          # drawn from every shard, not one
    # degraded half the time as configured: some batches differ from every clean image
    x, _ = next(judge_stage.batches(paths, size, 16, seed=0, p_degrade=1.0))
    assert any(to_uint8(x[i:i + 1])[0].numpy().tobytes() not in truth for i in range(16))


def test_the_judge_body_runs_channels_last_and_reads_as_in_nchw():
    """JudgeNet.embed lays the body out channels-last (faster on oneDNN); features, gradients and the
    layout of every convolution's output are checked against the plain NCHW computation."""
    from pipeline.judge.network import JudgeNet
    torch.manual_seed(0)
    net = JudgeNet(image_size=32, channels=(8, 16), feature_dim=16)
    x = torch.randn(4, 3, 32, 32)
    layouts = []
    hooks = [m.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
             for m in net.body.modules() if isinstance(m, torch.nn.Conv2d)]
    f = net.embed(x)
    for h in hooks:
        h.remove()
    assert layouts and all(layouts)
    f.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert len(grads) > 8                               # the body's and the features' (not the heads')
    net.zero_grad()
    nchw = torch.cat([x, net.coords.expand(4, -1, -1, -1)], dim=1)
    assert nchw.is_contiguous()
    ref = net.features(net.body(nchw))
    assert torch.allclose(f, ref, atol=1e-5)
    ref.square().sum().backward()
    for n, g in grads.items():
        assert (dict(net.named_parameters())[n].grad - g).abs().max() <= 1e-4 * g.abs().max(), n   # rounding
