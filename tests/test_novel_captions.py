"""bench/novel_captions.py: its held-out phrasings name the truth of the scene they rewrite, and none
of them is a template the corpus trains on."""
from __future__ import annotations

import numpy as np

from helpers.bench import load_bench
from pipeline.data import scenes
from pipeline.judge.labels import canonical_pair, parse_caption


def test_every_held_out_phrasing_names_its_scene_and_is_no_corpus_template():
    bench = load_bench("novel_captions")
    corpus = set(scenes.SINGLE_TEMPLATES) | set(scenes.PAIR_TEMPLATES)
    for family in ("original", *bench.HELD_OUT):
        held = (*bench.SINGLE[family], *bench.PAIR[family])
        assert (family == "original") == all(t in corpus for t in held), family
        assert family == "original" or not any(t in corpus for t in held), family
    n = len(bench.SINGLE["reordered"]) * len(bench.PAIR["reordered"]) * 4
    for i in range(n):
        gt = scenes.sample_scene(0, i, 0.5).ground_truth()
        for family in ("original", *bench.HELD_OUT):
            template, text = bench.phrase(gt, family, i)
            parsed = parse_caption(text)
            assert parsed is not None, text
            if len(gt["objects"]) == 1:
                got, want = parsed["objects"][0], gt["objects"][0]
                assert [got[k] for k in ("color", "shape", "size", "position")] == \
                    [want[k] for k in ("color", "shape", "size", "position")], text
            else:
                (axis, a, b), (want_axis, wa, wb) = canonical_pair(parsed), canonical_pair(gt)
                assert axis == want_axis and [(o["color"], o["shape"]) for o in (a, b)] == \
                    [(o["color"], o["shape"]) for o in (wa, wb)], text
    assert "an orange" in bench.phrase({"background": "white", "relation": None, "objects": [
        {"color": "orange", "shape": "circle", "size": "small", "position": "top"}]}, "reordered", 2)[1]
    assert bench.new_words("draw a {size} {color} {shape} {pos}") == ["draw"]
    assert bench.new_words(scenes.PAIR_TEMPLATES[-1]) == []
    assert np.isfinite(len(bench.corpus_words()))
