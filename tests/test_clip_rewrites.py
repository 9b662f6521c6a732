"""CLIP's language rewrites (pipeline/clip/rewrites.py): each names what its caption names, none is a
held-out phrasing that evaluate judges, and CLIP's batches draw them with their own hard negatives."""
from __future__ import annotations

import json
import re

import numpy as np
import torch

from pipeline import phrasings
from pipeline.clip import model as clip_model
from pipeline.clip import rewrites, vocab
from pipeline.clip.data import caption_variants, switching_batches, train_batches
from pipeline.clip.negatives import hard_negatives
from pipeline.clip.vocab import used_token_ids
from pipeline.data import scenes
from pipeline.data.shards import ShardSink

CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def corpus_captions(scene: scenes.Scene, draws: int = 40) -> set[str]:
    """The corpus's captions of ``scene`` (its templates and word choices, drawn ``draws`` times)."""
    return {scenes.caption(scene, np.random.default_rng(j)) for j in range(draws)}


def sample_scenes() -> list[scenes.Scene]:
    return [scenes.sample_scene(7, i, two_object_fraction=0.5) for i in range(40)]


def named_objects(text: str) -> list[tuple]:
    """(size or None, color, shape) of each object ``text`` names, in order: "a small red circle",
    "the red circle that is small"."""
    sizes = "|".join(w for ws in scenes.SIZE_WORDS.values() for w in ws)
    found = re.finditer(rf"(?:\b({sizes}) )?\b({'|'.join(scenes.COLORS)}) ({'|'.join(scenes.SHAPES)})\b"
                        rf"(?: that is ({sizes})\b)?", text)
    size_of = {w: s for s, ws in scenes.SIZE_WORDS.items() for w in ws}
    return [(size_of.get(m.group(1) or m.group(4) or ""), m.group(2), m.group(3)) for m in found]


def relation_said(text: str) -> tuple[str, str, str]:
    """(first color, relation, second color) that ``text`` says, read here apart from the rewrites'
    frames: a pronoun ("X and Y left of it": Y left of X), a fronted relation ("left of X is Y": Y left
    of X), two places ("X on the left and Y on the right"), else the order of the words."""
    colors = [o[1] for o in named_objects(text)]
    places = {"on the left": ("left of", 0), "on the right": ("right of", 0), "at the top": ("above", 0),
              "at the bottom": ("below", 0)}
    rel = next(r for r, p in scenes.RELATION_PHRASES.items() if p in text) if any(
        p in text for p in scenes.RELATION_PHRASES.values()) else None
    if rel is None:
        first_place = min((text.index(p), places[p][0]) for p in places if p in text)[1]
        return colors[0], first_place, colors[1]
    phrase = scenes.RELATION_PHRASES[rel]
    if text.rstrip().endswith(f"{phrase} it") or f"{phrase} it " in text:
        return colors[1], rel, colors[0]
    if text.split(", ")[-1].startswith(phrase) or re.search(rf"(^|, ){re.escape(phrase)} ", text):
        return colors[1], rel, colors[0]                  # fronted: "to the left of X is Y"
    return colors[0], rel, colors[1]


def same_relation(a: tuple, b: tuple) -> bool:
    return a == b or a == (b[2], CONVERSE[b[1]], b[0])


def test_every_corpus_caption_is_read_and_others_are_left_as_they_are():
    for scene in sample_scenes():
        for c in corpus_captions(scene):
            named = rewrites.read(c)
            assert named is not None, c
            assert [(o.color, o.shape) for o in named.objects] == [(o.color, o.shape) for o in scene.objects]
    for user in ("a red circle next to a dog", "a photo of my cat", "a red circle and a blue square",
                 "a red circle to the left of a blue square to the left of a green circle"):
        assert rewrites.read(user) is None
        assert rewrites.rewrites(user, 3) == [user] * 3


def test_a_rewrite_names_what_its_caption_names_and_nothing_more():
    """Objects (with a size only where the caption gives one), the relation (or its converse), the
    one object's place among the corpus's words for it, the background only where named."""
    checked = 0
    for scene in sample_scenes():
        for c in corpus_captions(scene, draws=12):
            truth = named_objects(c)
            for r in rewrites.every_rewrite(rewrites.read(c)):
                assert sorted(named_objects(r)) == sorted(truth), (c, r)
                assert ("background" in r) == ("background" in c), (c, r)
                if "background" in c:
                    assert f"{scene.background} background" in r, (c, r)
                if len(scene.objects) == 2:
                    said = relation_said(r)
                    named = (scene.objects[0].color, scene.relation, scene.objects[1].color)
                    assert same_relation(said, named), (c, r, said)
                else:
                    phrases = scenes.POSITION_PHRASES[scene.objects[0].position][:2]
                    assert any(p in r for p in phrases), (c, r)
                checked += 1
    assert checked > 5000


def untrained_phrasings(scene: scenes.Scene) -> set[str]:
    """Every phrasing of ``scene`` in the held-out and probe families (each template, in turn)."""
    gt = json.loads(json.dumps(scene.ground_truth()))
    return {phrasings.phrase(gt, f, i)[1] for f in phrasings.UNTRAINED for i in range(12)}


def test_no_rewrite_is_a_held_out_phrasing():
    """The phrasings evaluate judges as captions a user would write stay held out: every rewrite of every
    corpus caption of a scene (all of them, walked) against its held-out phrasings."""
    for scene in sample_scenes():
        held = untrained_phrasings(scene)
        for c in corpus_captions(scene):
            assert not held & rewrites.every_rewrite(rewrites.read(c)), c


def test_pronoun_first_adds_the_pronouns_phrase_before_its_object_and_nothing_else():
    """clip.rewrites_pronoun_first: the default's rewrites and the pronoun's phrase before its object
    ("a blue square and to the left of it a red circle"), each naming the caption's relation, none held out."""
    scene = next(s for s in sample_scenes() if len(s.objects) == 2)
    held = untrained_phrasings(scene)
    named_truth = (scene.objects[0].color, scene.relation, scene.objects[1].color)
    rel = scenes.RELATION_PHRASES[scene.relation]
    for c in corpus_captions(scene, draws=12):
        default, first = (rewrites.every_rewrite(rewrites.read(c), pronoun_first=p) for p in (False, True))
        added = first - default
        assert default < first and added and not held & first, c
        assert all(f" and {rel} it " in r for r in added), c
        assert all(same_relation(relation_said(r), named_truth) for r in added), c
        assert not any(f" and {rel} it " in r for r in default), c
    c = "a small orange triangle to the right of a tiny cyan triangle"
    assert rewrites.rewrites(c, 3, pronoun_first=True) != rewrites.rewrites(c, 3)     # another draw of the three
    assert caption_variants([c], 3, 0, pronoun_first=True)[1:] == rewrites.rewrites(c, 3, pronoun_first=True)


def test_rewrites_are_fixed_distinct_and_seeded():
    c = "a small orange triangle to the right of a tiny cyan triangle"
    three = rewrites.rewrites(c, 3)
    assert three == rewrites.rewrites(c, 3) and len(set(three)) == 3 and c not in three
    assert rewrites.rewrites(c, 3, seed=1) != three
    assert caption_variants([c, "a purple hexagon"], 2, 0) == [c, *three[:2], "a purple hexagon", "a purple hexagon",
                                                                "a purple hexagon"]


def shards(tmp_path, captions: list[str]):
    """One train shard of 16 px images, each a color of its own, with ``captions``."""
    from PIL import Image
    from pipeline.data.scenes import encode_jpeg
    with ShardSink(tmp_path, shard_size=len(captions)) as sink:
        for i, c in enumerate(captions):
            img = Image.new("RGB", (16, 16), (10 * i, 255 - 10 * i, 128))
            sink.write({"__key__": f"{i:04d}", "jpg": encode_jpeg(img, 95), "txt": c,
                        "json": json.dumps({"split": "train"})})
    return sorted(tmp_path.glob("*.tar"))


def held_variants(clip, captions: list[str], k: int = 3) -> dict[str, list[str]]:
    """Each caption's texts as the batches hold them: itself, then its ``k`` rewrites, a rewrite that fills
    the context (it might be cut) replaced by its caption."""
    fits = lambda t: int(clip.tokenize([t])[0, -1]) == 0           # noqa: E731
    return {c: [c, *(t if fits(t) else c for t in rewrites.rewrites(c, k))] for c in captions}


def test_batches_draw_the_caption_or_a_rewrite_with_its_own_negatives(tmp_path, smoke_cfg):
    captions = ["a red circle to the left of a blue square", "a small green triangle in the top left",
                "a purple hexagon", "a photo of a large yellow square at the lower right on a gray background"]
    paths = shards(tmp_path, captions)
    clip = clip_model.build(smoke_cfg.clip.model)
    kinds = ("relation", "binding")
    variants = held_variants(clip, captions)
    stats: dict = {}
    batches = train_batches(paths, clip.tokenize, 8, 0, 16, kinds, rewrites=3, stats=stats)
    drawn = {c: set() for c in captions}
    by_tokens = {tuple(clip.tokenize([t])[0].tolist()): (c, t) for c, ts in variants.items() for t in ts}
    for _ in range(40):
        _, tokens, negatives, mask = next(batches)
        for i in range(len(tokens)):
            caption, text = by_tokens[tuple(tokens[i].tolist())]     # one of its own caption's variants
            drawn[caption].add(text)
            found, m = hard_negatives([text], kinds)
            assert torch.equal(mask[i], m[0]) and torch.equal(negatives[i], clip.tokenize(found))
    assert drawn["a purple hexagon"] == {"a purple hexagon"}
    assert all(drawn[c] == set(variants[c]) for c in captions)     # the caption and its rewrites, each drawn
    assert sum(len(set(v)) for v in variants.values()) >= 9
    assert stats["rewritten"] / stats["captions"] == 0.75
    # every token a batch can hold is among the rows CLIP trains
    ids = set(used_token_ids(paths, clip.tokenize, kinds, rewrites=3).tolist())
    texts = [t for ts in variants.values() for t in ts]
    found, m = hard_negatives(texts, kinds)
    assert set(clip.tokenize(texts + [f for f, k in zip(found, m.flatten().tolist()) if k]).flatten().tolist()) <= ids


def test_with_captions_each_batch_ends_with_the_caption_its_text_was_drawn_for(tmp_path, smoke_cfg):
    """``clip.rewrites_align``'s batches: the same draws as without it, and each sample's caption's tokens last."""
    captions = ["a red circle to the left of a blue square", "a small green triangle in the top left",
                "a purple hexagon", "a yellow square above a cyan circle"]
    paths = shards(tmp_path, captions)
    clip = clip_model.build(smoke_cfg.clip.model)
    kinds = ("relation", "binding")
    caption_of = {tuple(clip.tokenize([t])[0].tolist()): c for c, ts in held_variants(clip, captions).items() for t in ts}
    plain = train_batches(paths, clip.tokenize, 8, 0, 16, kinds, rewrites=3)
    aligned = train_batches(paths, clip.tokenize, 8, 0, 16, kinds, rewrites=3, with_captions=True)
    rewritten = 0
    for _ in range(10):
        a, b = next(plain), next(aligned)
        assert len(b) == len(a) + 1 and all(torch.equal(x, y) for x, y in zip(a, b))
        for text, caption in zip(b[1], b[-1]):
            assert torch.equal(caption, clip.tokenize([caption_of[tuple(text.tolist())]])[0])
            rewritten += not torch.equal(caption, text)
    assert rewritten > 0


def test_pronoun_first_rewrites_enter_at_their_step(tmp_path, smoke_cfg, monkeypatch):
    """clip.rewrites_pronoun_first_after: the batches hold the default's rewrites until the step it names, then
    the rewrites with the pronoun's phrase before its object; a run resumed past it opens only the second stream."""
    # the first two captions' three pronoun-first rewrites include the phrase before its object
    captions = ["a red circle to the right of a green square", "a blue circle above a red square",
                "a red circle to the left of a blue square", "a yellow square above a cyan circle"]
    paths = shards(tmp_path, captions)
    clip = clip_model.build(smoke_cfg.clip.model)
    kinds = ("relation", "binding")
    text_of = {tuple(clip.tokenize([t])[0].tolist()): t for c in captions
               for t in (c, *rewrites.rewrites(c, 3), *rewrites.rewrites(c, 3, pronoun_first=True))}
    phrase_first = re.compile(r" and (" + "|".join(scenes.RELATION_PHRASES.values()) + r") it ")
    opened, done = [], [0]

    def stream(pronoun_first: bool):
        opened.append(pronoun_first)
        return train_batches(paths, clip.tokenize, 8, 0, 16, kinds, rewrites=3, pronoun_first=pronoun_first)

    batches = switching_batches(stream, 6, lambda: done[0])
    before, after = 0, 0
    for step in range(30):
        texts = [text_of[tuple(t.tolist())] for t in next(batches)[1]]
        said = sum(bool(phrase_first.search(t)) for t in texts)
        if step < 6:
            before += said
        else:
            after += said
        done[0] = step + 1
    assert before == 0 and after > 0 and opened == [False, True]
    opened.clear()
    resumed = switching_batches(stream, 6, lambda: 7)
    next(resumed)
    assert opened == [True]
    on = smoke_cfg.clip.model_copy(update={"steps": 1800, "rewrites_pronoun_first": True})
    assert on.model_copy(update={"rewrites_pronoun_first": False}).pronoun_first_from == 1800     # off: never
    assert on.model_copy(update={"rewrites_pronoun_first_after": 0.0}).pronoun_first_from == 0
    assert on.model_copy(update={"rewrites_pronoun_first_after": 0.5}).pronoun_first_from == 900
    # the token rows CLIP trains cover both streams, read in one pass
    assert on.model_copy(update={"rewrites_pronoun_first": False}).pronoun_first_sets == (False,)
    assert on.model_copy(update={"rewrites_pronoun_first_after": 0.0}).pronoun_first_sets == (True,)
    assert on.pronoun_first_sets == (False, True)
    rows = [set(used_token_ids(paths, clip.tokenize, kinds, rewrites=3, pronoun_first=p).tolist())
            for p in (False, True)]
    drawn = []
    monkeypatch.setattr(vocab, "caption_variants", lambda *a: drawn.append(a[3]) or caption_variants(*a))
    both = set(used_token_ids(paths, clip.tokenize, kinds, rewrites=3, pronoun_first=(False, True)).tolist())
    assert both == rows[0] | rows[1] and drawn == [False, True]


def test_without_rewrites_the_batches_are_the_captions(tmp_path, smoke_cfg):
    captions = [f"a red circle to the left of a {c} square" for c in ("blue", "green", "cyan", "pink")]
    paths = shards(tmp_path, captions)
    clip = clip_model.build(smoke_cfg.clip.model)
    _, tokens = next(train_batches(paths, clip.tokenize, 8, 0, 16))
    allowed = {tuple(t.tolist()) for t in clip.tokenize(captions)}
    assert tokens.shape == (8, clip.tokenize(captions).shape[1])
    assert all(tuple(t.tolist()) in allowed for t in tokens)


def test_clip_phrasings_bench_reads_every_family(data_ws, smoke_cfg, tmp_path, monkeypatch):
    """bench/clip_phrasings.py on a smoke CLIP: every family's twin preferences and recall, per template."""
    import sys
    from helpers.bench import load_bench
    from pipeline.stages import run_stage
    run_stage("clip", smoke_cfg, data_ws)
    bench = load_bench("clip_phrasings")
    out = tmp_path / "clip_phrasings.json"
    monkeypatch.setattr(sys, "argv", ["clip_phrasings.py", "--workspace", str(data_ws.root),
                                      "--load", str(data_ws.clip), "--threads", "1", "--out", str(out)])
    bench.main()
    families = json.loads(out.read_text())["families"]
    assert set(families) == {"test_split", "original", *phrasings.UNTRAINED}
    for name, fig in families.items():
        assert 0 <= fig["relation"] <= 100 and len(fig["r@1"]) == 2
        assert bool(fig["by_template"]) == (name != "test_split")          # the test split has no templates
        assert 0 <= fig["pairs"]["relation"] <= 100 and 0 <= fig["to_canonical_pairs"]["relation"] <= 100
    # a test caption's z_t is nearest itself: the canonical caption, over its twins
    assert families["test_split"]["to_canonical"] == {"relation": 100.0, "binding": 100.0}
    assert set(families["reordered"]["by_template"]) <= {*phrasings.SINGLE["reordered"], *phrasings.PAIR["reordered"]}
    z = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    assert bench.recall_at_1(z, z, [range(0, 3), range(3, 6), range(6, 6)]) == [100.0, 100.0, None]
    assert bench.recall_at_1(z, z.roll(1, 0), [range(0, 6)]) == [0.0]
