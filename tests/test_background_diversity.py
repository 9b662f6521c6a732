"""The background read from pixels, its noise, and diversity at a given fidelity (evaluate's
``background`` and ``diversity`` figures), on images the corpus's renderer draws."""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch
import yaml

from helpers.bench import load_bench
from pipeline import background, config, diversity
from pipeline.data.image_shards import decode_images
from pipeline.data.scenes import (BACKGROUNDS, GRID, POSITIONS, caption, encode_jpeg, nearest_position, render,
                                  sample_scene, scene_from_ground_truth)
from pipeline.evaluate import bars, with_se
from pipeline.images import resize, to_model, to_uint8
from pipeline.judge.labels import HEADS, parse_caption, targets


def scenes(n=240, seed=0):
    return [sample_scene(seed, i, 0.4) for i in range(n)]


def as_tensor(imgs) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs])


def real_images(ss, size=64):
    """As the corpus ships them: 64 px JPEGs at quality 95, decoded (and resized) as evaluate loads them."""
    imgs = decode_images([encode_jpeg(render(s, 64, 4), 95) for s in ss], 64)
    return imgs if size == 64 else to_uint8(resize(to_model(imgs), size))


@pytest.fixture(scope="module")
def corpus_scenes():
    ss = scenes()
    assert {s.background for s in ss} == set(BACKGROUNDS) and {len(s.objects) for s in ss} == {1, 2}
    return ss


# ---- the background ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [64, 32])
def test_the_background_is_read_right_on_every_real_image(corpus_scenes, size):
    gts = [s.ground_truth() for s in corpus_scenes]
    seen, medians = background.read(real_images(corpus_scenes, size), gts)
    assert seen == [g["background"] for g in gts]
    for m, g in zip(medians, gts):                          # the median is the background's color itself
        assert (m - torch.tensor(BACKGROUNDS[g["background"]], dtype=torch.float64)).abs().max() <= 2
    fig = background.figures(real_images(corpus_scenes, size), gts, [""] * len(gts), real=True)
    assert fig["read_right"] == 100.0 and fig["n_named"] == 0 and fig["named_right"] is None


def test_the_mask_leaves_out_every_object_pixel(corpus_scenes):
    """Drawn without JPEG, every pixel the mask keeps is exactly the background's color: the boxes
    cover rotated squares, triangles and anti-aliased edges; and a good part of the canvas is left."""
    imgs = as_tensor([render(s, 64, 4) for s in corpus_scenes])
    for img, s in zip(imgs, corpus_scenes):
        m = background.mask(s.ground_truth(), 64)
        assert m.float().mean() > 0.25
        assert (img.permute(1, 2, 0)[m] == torch.tensor(BACKGROUNDS[s.background], dtype=torch.uint8)).all()


def test_captions_that_name_a_background(corpus_scenes):
    rng = np.random.default_rng(0)
    n_named = 0
    for s in corpus_scenes:
        for _ in range(3):
            c = caption(s, rng)
            want = s.background if "background" in c else None
            assert background.named(c) == want, c
            n_named += want is not None
            if want and parse_caption(c):
                assert parse_caption(c)["background"] == want
    assert n_named > 50
    assert background.named("A Photo of a red circle on a GRAY background") == "gray"
    assert background.named("a red circle on the left") is None


def test_named_right_counts_only_captions_that_name_one(corpus_scenes):
    ss = corpus_scenes[:12]
    gts = [s.ground_truth() for s in ss]
    other = {"white": "black", "gray": "white", "black": "gray"}
    caps = [f"a thing on a {s.background if i < 6 else other[s.background]} background" if i % 2 == 0
            else "a thing" for i, s in enumerate(ss)]
    fig = background.figures(real_images(ss), gts, caps)
    assert fig["n_named"] == 6 and fig["named_right"] == 50.0          # 3 of the 6 named ones asked the wrong one
    assert "read_right" not in fig and "noise_ratio" not in fig


def test_noise_of_flat_backgrounds_and_of_noised_ones(corpus_scenes):
    gts = [s.ground_truth() for s in corpus_scenes]
    drawn = as_tensor([render(s, 64, 4) for s in corpus_scenes])
    sd, stray = background.noise(drawn, gts)
    assert sd.max() == 0 and stray.max() == 0                          # the renderer's background is flat
    sd, stray = background.noise(real_images(corpus_scenes), gts)
    assert sd.mean() < 0.6 and sd.max() < 1.5 and stray.max() == 0    # JPEG at quality 95: a fraction of a level
    gray = [i for i, s in enumerate(corpus_scenes) if s.background == "gray"]
    gen = torch.Generator().manual_seed(0)
    for sigma in (3.0, 8.0):
        noised = (drawn[gray].float() + sigma * torch.randn(drawn[gray].shape, generator=gen)).round().clamp(0, 255)
        sd, stray = background.noise(noised.to(torch.uint8), [gts[i] for i in gray])
        assert sd.mean().item() == pytest.approx(sigma, rel=0.05) and stray.mean() < 0.01
    fig = background.figures(noised.to(torch.uint8), [gts[i] for i in gray], [""] * len(gray), real_noise=0.4)
    assert fig["noise_ratio"] == pytest.approx(fig["noise"] / background.NOISE_FLOOR)     # real noise floored
    assert background.figures(noised.to(torch.uint8), [gts[i] for i in gray], [""] * len(gray),
                              real_noise=4.0)["noise_ratio"] == pytest.approx(fig["noise"] / 4.0, abs=1e-3)


def test_speckle_tells_pixel_noise_from_a_smooth_background(corpus_scenes):
    """White noise of sigma reads as about 0.94 sigma of speckle (a pixel minus its 3x3 mean) and
    sigma of noise; a smooth shading across the background reads as noise but not as speckle."""
    gray = [s for s in corpus_scenes if s.background == "gray"]
    gts = [s.ground_truth() for s in gray]
    drawn = as_tensor([render(s, 64, 4) for s in gray])
    assert background.speckle(drawn, gts).max() == 0
    noised = (drawn.float() + 6.0 * torch.randn(drawn.shape, generator=torch.Generator().manual_seed(0)))
    sp = background.speckle(noised.round().clamp(0, 255).to(torch.uint8), gts)
    assert sp.mean().item() == pytest.approx(6.0 * (8 / 9) ** 0.5, rel=0.06)
    ramp = torch.linspace(-12, 12, 64)[None, None, None, :]                       # a left-to-right shading
    shaded = (drawn.float() + ramp).round().clamp(0, 255).to(torch.uint8)
    sd, _ = background.noise(shaded, gts)
    assert sd.mean() > 4 and background.speckle(shaded, gts).max() < 0.5
    assert background.figures(shaded, gts, [""] * len(gts))["speckle"] < 0.5


def test_a_misplaced_object_is_stray_not_noise():
    s = next(s for s in scenes(60) if len(s.objects) == 1 and s.objects[0].position == "center")
    img = as_tensor([render(s, 64, 4)])
    img[0, :, 2:8, 2:8] = torch.tensor([40, 70, 220], dtype=torch.uint8)[:, None, None]   # a blue blob in a corner
    sd, stray = background.noise(img, [s.ground_truth()])
    assert sd.item() == 0 and 0 < stray.item() < 0.1
    assert background.read(img, [s.ground_truth()])[0] == [s.background]


def test_a_misplaced_objects_anti_aliased_rim_is_its_edge_not_noise():
    """A whole drawn object the ground truth does not have (a two-object scene judged against the
    truth of its first object): its core is stray, and its anti-aliased 1 px rim, which lies nearer
    the background than STRAY_LEVELS, is left out of the noise with it (``noise_with_rims`` keeps it)."""
    picked = [s for s in scenes(200) if len(s.objects) == 2][:8]
    img = as_tensor([render(s, 64, 4) for s in picked])
    truth = []
    for s in picked:
        gt = json.loads(s.ground_truth()) if isinstance(s.ground_truth(), str) else dict(s.ground_truth())
        truth.append({**gt, "objects": gt["objects"][:1]})
    sd, stray = background.noise(img, truth)
    rims, stray0 = background.noise(img, truth, edge=0)
    assert (stray > 0).all() and torch.equal(stray, stray0)
    assert rims.mean() > 1 and sd.max() < 0.05                # the rim was all of the "noise"
    fig = background.figures(img, truth, [""] * len(truth))
    assert fig["noise"] < 0.05 and fig["noise_with_rims"] > 1


def test_background_bars():
    q = {"background": {"named_right": 96.0, "noise_ratio": 2.5}}
    b = bars(q | {"single": {k: 100 for k in ("color", "shape", "position", "size")},
                  "pair": {"colors": 100, "relation": 100}, "frechet_distance": 1.0}, 1.0, 40)
    assert b["background named right"] == {"value": 96.0, "bar": 95, "ok": True}
    assert b["background noise within 2x real"] == {"value": 2.5, "bar": 2.0, "ok": False}
    assert b["pair colors"]["se"] is None                          # no image count: no standard error
    judged = {"single": {"color": 100, "shape": 90, "position": 100, "size": 100, "n": 256},
              "pair": {"colors": 83.59, "relation": 100, "n": 256}}
    b = bars(q | judged | {"frechet_distance": 1.0}, 1.0, 40)
    assert b["pair colors"] == {"value": 83.59, "bar": 85, "ok": False, "se": 2.31}   # sqrt(.8359 * .1641 / 256)
    assert b["single shape"]["se"] == 1.88 and b["single color"]["se"] == 0.0
    q = {"background": {"named_right": None, "noise_ratio": 1.5}}
    b = bars(q | {"single": {k: 100 for k in ("color", "shape", "position", "size")},
                  "pair": {"colors": 100, "relation": 100}, "frechet_distance": 1.0}, 1.0, 40)
    assert b["background named right"]["ok"] is False and b["background noise within 2x real"]["ok"] is True


def test_held_out_rows_carry_their_standard_errors():
    """evaluate's phrasings rows: each judged percentage's binomial standard error beside it, the row kept."""
    row = {"single": {"n": 128, "color": 100.0, "shape": 97.66}, "pair": {"n": 128, "relation": 48.44, "colors": None},
           "frechet_distance": 3.0, "example": "red circle, small, at the top"}
    out = with_se(row)
    assert {k: out[k] for k in row} == row
    assert out["se"] == {"single": {"color": 0.0, "shape": 1.34}, "pair": {"relation": 4.42, "colors": None}}


# ---- real images of a ground truth -------------------------------------------------------------------
def test_scene_from_ground_truth_draws_the_same_scene(corpus_scenes):
    for s in corpus_scenes[:40]:
        again = render(scene_from_ground_truth(s.ground_truth()), 64, 4)
        bg = np.array(BACKGROUNDS[s.background])
        drawn = lambda im: (np.asarray(im).astype(int) != bg).any(-1)     # noqa: E731
        assert (drawn(again) == drawn(render(s, 64, 4))).all()            # same shapes in the same places


def test_jittered_draws_keep_the_truth(corpus_scenes):
    for s in corpus_scenes[:80]:
        gt = s.ground_truth()
        rng = np.random.default_rng(1)
        draws = [scene_from_ground_truth(gt, rng) for _ in range(4)]
        for d in draws:
            assert d.background == s.background and d.relation == s.relation
            for o, want in zip(d.objects, s.objects):
                assert (o.color, o.shape, o.size, o.position) == (want.color, want.shape, want.size, want.position)
                assert abs(o.rotation) <= 10
            if len(d.objects) == 1:
                o = d.objects[0]
                assert nearest_position(o.x, o.y) == o.position
                cell = POSITIONS.index(o.position)
                assert abs(o.x - GRID[cell % 3]) <= 0.04 and abs(o.y - GRID[cell // 3]) <= 0.04
            else:
                (a, b), rel = d.objects, d.relation
                assert {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[rel]
        assert len({(d.objects[0].x, d.objects[0].rotation) for d in draws}) == 4


def test_render_real_is_deterministic_and_varies_between_draws(smoke_cfg, corpus_scenes):
    gts = [s.ground_truth() for s in corpus_scenes[:6]]
    a = diversity.render_real(gts, 3, smoke_cfg.corpus, 32, seed=0)
    assert a.shape == (18, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, diversity.render_real(gts, 3, smoke_cfg.corpus, 32, seed=0))
    assert not torch.equal(a, diversity.render_real(gts, 3, smoke_cfg.corpus, 32, seed=1))
    assert all(not torch.equal(a[3 * p], a[3 * p + 1]) for p in range(6))
    assert background.read(a, [g for g in gts for _ in range(3)])[0] == [g["background"] for g in gts for _ in range(3)]


# ---- diversity -----------------------------------------------------------------------------------------
def test_mean_pairwise_distance():
    same = torch.ones(5, 7)
    assert diversity.mean_pairwise_distance(same) == 0
    assert diversity.mean_pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    three = torch.tensor([[0.0], [1.0], [3.0]])                       # pairs 1, 3, 2
    assert diversity.mean_pairwise_distance(three) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        diversity.mean_pairwise_distance(torch.ones(1, 3))
    per = diversity.per_caption_diversity(torch.cat([same[:2], torch.tensor([[0.0] * 7, [1.0] * 7])]), 2)
    assert per[0] == 0 and per[1] == pytest.approx(7 ** 0.5)
    with pytest.raises(ValueError):
        diversity.per_caption_diversity(torch.ones(5, 2), 2)


class PixelJudge:
    """A perfect reader of the truth it is given, whose features are the pixels."""

    def __init__(self, truths):
        self.truths = truths

    def predict(self, images):
        return ([dict(zip(HEADS, targets(g))) for g in self.truths],
                images.flatten(1).double())


def test_diversity_figures_identical_and_distinct(smoke_cfg, corpus_scenes):
    gts = [s.ground_truth() for s in corpus_scenes[:4]]
    k = 3
    truths = [g for g in gts for _ in range(k)]
    real = diversity.render_real(gts, k, smoke_cfg.corpus, 32)
    same = real[::k].repeat_interleave(k, 0)                          # k copies of one image per caption
    fig = diversity.figures(PixelJudge(truths), same, gts, k)
    assert fig["diversity"] == 0 and fig["diversity_max"] == 0
    assert fig["fidelity"] == 100.0 and fig["all_right"] == 100.0
    fig = diversity.figures(PixelJudge(truths), real, gts, k)
    assert fig["diversity"] > 0 and fig["diversity_min"] > 0


def test_fidelity_counts_each_captions_checks():
    single = {"background": "white", "relation": None,
              "objects": [{"color": "red", "shape": "circle", "size": "small", "position": "top left"}]}
    right = dict(zip(HEADS, targets(single)))
    wrong_shape = right | {"shape": (right["shape"] + 1) % 3}
    assert diversity.fidelity([right, wrong_shape], [single, single]) == {"fidelity": 90.0, "all_right": 50.0}
    assert diversity.fidelity([], []) == {"fidelity": None, "all_right": None}


def test_pick_takes_half_of_each_kind(corpus_scenes):
    gts = [s.ground_truth() for s in corpus_scenes[:40]]
    rows = list(range(40))
    got = diversity.pick(rows, gts, 6)
    kinds = [len(gts[i]["objects"]) for i in got]
    assert kinds == [1, 1, 1, 2, 2, 2] and got == sorted(got[:3]) + sorted(got[3:])
    assert len(diversity.pick(rows, gts, 5)) == 5 and diversity.pick(rows, gts, 0) == []


# ---- configuration ------------------------------------------------------------------------------------
def test_diversity_keys_are_validated(params_path):
    raw = yaml.safe_load(params_path.read_text())
    default, smoke = config.resolve(raw, "default").evaluate, config.resolve(raw, "smoke").evaluate
    assert default.diversity_prompts >= 8 and default.diversity_seeds >= 2
    assert smoke.diversity_prompts * smoke.diversity_seeds <= 4 and smoke.diversity_seeds >= 2
    for key, bad in (("diversity_seeds", 1), ("diversity_prompts", -1), ("diversity_seeds", "many")):
        broken = yaml.safe_load(params_path.read_text())
        broken["evaluate"][key] = bad
        with pytest.raises(config.ConfigError, match=f"evaluate.{key}"):
            config.resolve(broken, "default")
    broken = yaml.safe_load(params_path.read_text())
    broken["evaluate"]["diversity_seed"] = 3
    with pytest.raises(config.ConfigError, match="evaluate.diversity_seed: unknown key"):
        config.resolve(broken, "default")


# ---- bench/diversity_sweep.py's table, on a stand-in cascade ------------------------------------------
class StandInUnclip:
    """Draws each caption's k samples as real renders, all alike when z_i is given (the caption-only
    path here) and at guidance >= 3: the trade the bench is to show."""

    def __init__(self, gts, corpus):
        self.gts, self.corpus = gts, corpus
        self.decoder_meta = {"info": {"sampling": {"guidance_scale": 2.0}}}
        self.calls = []

    def encode_text(self, captions):
        return (torch.zeros(len(captions), 8),)

    def generate(self, captions, n=1, seed=0, batch_size=64, guidance=None, z_i=None):
        self.calls.append({"n": n, "guidance": guidance, "z_i": None if z_i is None else tuple(z_i.shape)})
        imgs = diversity.render_real(self.gts, n, self.corpus, 32, seed=seed)
        if z_i is not None or guidance >= 3:
            imgs = imgs[::n].repeat_interleave(n, 0)
        return {"images": imgs, "nfe": {"decoder": 4}}


def test_diversity_sweep_tables_both_paths_at_every_guidance(smoke_cfg, corpus_scenes, tmp_path):
    bench = load_bench("diversity_sweep")
    gts = [s.ground_truth() for s in corpus_scenes[:4]]
    k = 3
    stand_in, lines = StandInUnclip(gts, smoke_cfg.corpus), []
    res = bench.sweep(stand_in, PixelJudge([g for g in gts for _ in range(k)]), ["c"] * 4, gts, k, [1.0, 3.0],
                      0, 8, smoke_cfg.corpus, 32, log=lines.append)
    assert [(p["guidance"], p["path"]) for p in res["points"]] == [
        (1.0, "unclip"), (1.0, "caption_only"), (3.0, "unclip"), (3.0, "caption_only")]
    div = {(p["guidance"], p["path"]): p["diversity"] for p in res["points"]}
    assert div[(1.0, "unclip")] == pytest.approx(res["real_images"]["diversity"]) and div[(1.0, "unclip")] > 0
    assert div[(1.0, "caption_only")] == div[(3.0, "unclip")] == 0
    assert [c["z_i"] for c in stand_in.calls] == [None, (12, 8)] * 2 and {c["n"] for c in stand_in.calls} == {k}
    assert len(lines) == 2 + 4 and all(p["fidelity"] == 100.0 for p in res["points"])
    bench.plot(res, tmp_path / "diversity.png")
    assert (tmp_path / "diversity.png").stat().st_size > 10_000
