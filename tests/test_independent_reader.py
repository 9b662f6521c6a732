"""bench/independent_reader.py: a reader with no learning reads the corpus's own drawings right,
and does not read a blurred blob as a sharp shape (it is stricter than the judge, which is
trained on 16-48 px blurred round trips)."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.bench import load_bench
from pipeline.data import corpus
from pipeline.data import scenes
from pipeline.images import resize, to_model, to_uint8


@pytest.fixture(scope="module")
def reader():
    return load_bench("independent_reader")


def draw(scene: corpus.Scene, jpeg: bool = True) -> np.ndarray:
    """uint8 [3, 64, 64] as the corpus draws it (and, like the crawled images, as a JPEG of quality 95)."""
    img = corpus.render(scene, 64, 4)
    if jpeg:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(img).transpose(2, 0, 1).copy()


def obj(color, shape, size, x, y, rotation=0.0) -> corpus.Obj:
    return corpus.Obj(color=color, shape=shape, size=size, position=scenes.nearest_position(x, y), x=x, y=y,
                      rotation=rotation, rgb=corpus.COLORS[color])


def test_grammar_is_the_corpus_grammar(reader):
    """The reader carries its own copy of CORPUS.md's numbers; they must stay the corpus's."""
    assert reader.BACKGROUNDS == scenes.BACKGROUNDS and reader.PALETTE == corpus.COLORS
    assert reader.SHAPES == scenes.SHAPES and reader.HALF_WIDTHS == scenes.SIZES
    assert reader.GRID == scenes.GRID and reader.POSITIONS == scenes.POSITIONS


def test_reads_every_shape_size_background_and_cell(reader):
    """Each shape x size on each background, the cells cycling (edge and corner cells clip the
    large shapes at the canvas), colors cycling, rotations of +-10 degrees, with the centre jitter."""
    colors, cells = itertools.cycle(corpus.COLORS), itertools.cycle(range(9))
    jitter = itertools.cycle([(0.04, -0.04), (-0.04, 0.04), (0.0, 0.0), (-0.04, -0.04)])
    k = 0
    for background in scenes.BACKGROUNDS:
        for shape in scenes.SHAPES:
            for size in scenes.SIZES:
                cell, (jx, jy), color = next(cells), next(jitter), next(colors)
                x, y = scenes.GRID[cell % 3] + jx, scenes.GRID[cell // 3] + jy
                o = obj(color, shape, size, x, y, rotation=(10.0, -10.0, 4.0)[k % 3])
                o.position = scenes.POSITIONS[cell]
                k += 1
                scene = corpus.Scene(k, background, [o])
                r = reader.read_image(draw(scene, jpeg=k % 2 == 0))
                assert r["background"] == background
                assert r["n_objects"] == 1, (scene, r)
                got = r["objects"][0]
                assert (got["color"], got["shape"], got["size"], got["position"]) == (
                    color, shape, size, o.position), (scene, got)
                assert all(reader.check(r, scene.ground_truth() | {"relation": None}).values())


@pytest.mark.parametrize("relation", scenes.RELATIONS)
def test_reads_two_objects_and_their_relation(reader, relation):
    """Both axes and both orders; two large shapes 0.4 apart touch, and are split by color."""
    for background, (c0, c1), (s0, s1), sep in (("gray", ("red", "blue"), ("circle", "square"), 0.4),
                                                ("white", ("orange", "yellow"), ("triangle", "circle"), 0.5),
                                                ("black", ("purple", "cyan"), ("square", "triangle"), 0.55)):
        lo, hi = 0.5 - sep / 2, 0.5 + sep / 2
        first, second = (lo, hi) if relation in ("left of", "above") else (hi, lo)
        if relation in ("left of", "right of"):
            p0, p1 = (first, 0.45), (second, 0.52)
        else:
            p0, p1 = (0.55, first), (0.47, second)
        size0 = "large"
        size1 = "large" if sep <= 0.45 else "small"
        scene = corpus.Scene(0, background, [obj(c0, s0, size0, *p0, 6.0), obj(c1, s1, size1, *p1, -7.0)], relation)
        r = reader.read_image(draw(scene))
        v = reader.check(r, scene.ground_truth())
        assert v["count"] and v["colors"] and v["relation"], (scene, r)
        if sep > 0.45:                                    # not touching: the shapes are read too
            assert v["shapes"], (scene, r)


def test_a_blurred_blob_is_not_read_as_a_sharp_shape(reader):
    """A real-looking image through 8 px and back (bicubic, as the judge's blur augmentation) is
    a blob: the reader calls its shape unclear, it does not guess the nearest silhouette."""
    scenes = [corpus.Scene(0, bg, [obj(c, s, "large", 0.5, 0.5, 5.0)])
              for bg, c, s in (("white", "red", "square"), ("black", "blue", "square"),
                               ("gray", "yellow", "triangle"), ("white", "green", "circle"))]
    sharp = torch.from_numpy(np.stack([draw(s) for s in scenes]))
    blurred = to_uint8(resize(resize(to_model(sharp), 8), 64)).numpy()
    mild = to_uint8(resize(resize(to_model(sharp), 32), 64)).numpy()    # a softer edge is still a shape
    for scene, img, soft, blob in zip(scenes, sharp.numpy(), mild, blurred):
        assert reader.read_image(img)["objects"][0]["shape"] == scene.objects[0].shape
        assert reader.read_image(soft)["objects"][0]["shape"] == scene.objects[0].shape
        r = reader.read_image(blob)
        assert r["n_objects"] == 1
        assert r["objects"][0]["shape"] == reader.UNCLEAR, (scene.objects[0].shape, r["objects"][0])
        assert r["objects"][0]["color"] == scene.objects[0].color       # its color is still there


def test_figures_have_the_judged_shape(reader):
    scene = corpus.Scene(0, "white", [obj("red", "circle", "small", 0.2, 0.2)])
    pair = corpus.Scene(1, "black", [obj("blue", "square", "small", 0.25, 0.5), obj("pink", "circle", "small", 0.75, 0.5)],
                        "left of")
    reads = [reader.read_image(draw(scene)), reader.read_image(draw(pair))]
    gts = [scene.ground_truth() | {"relation": None}, pair.ground_truth()]
    fig = reader.figures(reads, gts)
    assert fig["quality"]["single"] == {"n": 1, "count": 100.0, "color": 100.0, "shape": 100.0, "size": 100.0,
                                        "position": 100.0, "all": 100.0, "silhouette": 100.0}
    assert fig["quality"]["pair"]["relation"] == 100.0 and fig["standard_error"]["pair"]["relation"] == 0.0
    assert fig["shape_confusion"]["circle"] == {"circle": 1}
    # the caption's order matters: the same image under "right of" is read wrong
    swapped = pair.ground_truth() | {"relation": "right of"}
    assert not reader.check(reads[1], swapped)["relation"] and reader.check(reads[1], swapped)["colors"]
