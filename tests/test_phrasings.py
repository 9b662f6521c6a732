"""pipeline/phrasings.py: the held-out phrasings name the truth of the scene they rewrite, and none
of them is a template the corpus trains on."""
from __future__ import annotations

from helpers.bench import load_bench
from pipeline import phrasings
from pipeline.data import scenes
from pipeline.judge.labels import canonical_pair, parse_caption


def test_every_held_out_phrasing_names_its_scene_and_is_no_corpus_template():
    corpus = set(scenes.SINGLE_TEMPLATES) | set(scenes.PAIR_TEMPLATES)
    assert all(t in corpus for t in (*phrasings.SINGLE["original"], *phrasings.PAIR["original"]))
    assert phrasings.trained_on() == []
    for family in phrasings.UNTRAINED:
        assert not any(t in corpus for t in (*phrasings.SINGLE[family], *phrasings.PAIR[family])), family
    n = len(phrasings.SINGLE["reordered"]) * len(phrasings.PAIR["reordered"]) * 4
    for i in range(n):
        gt = scenes.sample_scene(0, i, 0.5).ground_truth()
        for family in ("original", *phrasings.UNTRAINED):
            template, text = phrasings.phrase(gt, family, i)
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
    assert "an orange" in phrasings.phrase({"background": "white", "relation": None, "objects": [
        {"color": "orange", "shape": "circle", "size": "small", "position": "top"}]}, "reordered", 2)[1]
    assert phrasings.new_words("draw a {size} {color} {shape} {pos}") == ["draw"]
    assert phrasings.new_words(scenes.PAIR_TEMPLATES[-1]) == []
    assert {"red", "circle", "photo", "an", "the", "left"} <= phrasings.corpus_words()
    assert load_bench("novel_captions").phrase is phrasings.phrase        # the bench judges these phrasings
    original = scenes.SINGLE_TEMPLATES
    try:                                  # a corpus that came to train on a held-out phrasing is named
        scenes.SINGLE_TEMPLATES = (*original, phrasings.SINGLE["reordered"][0])
        assert phrasings.trained_on() == [phrasings.SINGLE["reordered"][0]]
    finally:
        scenes.SINGLE_TEMPLATES = original
