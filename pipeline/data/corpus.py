"""The `corpus` stage: the embedded compositional image-caption data set of CORPUS.md.

Scenes of one or two colored shapes on a plain background, drawn anti-aliased (render at
``image_size * render_scale``, box-downsample), with paraphrased captions and full ground truth.
Everything is a deterministic function of ``corpus.seed``: scene ``i`` draws from its own RNG
``default_rng([seed, i])``, so the output does not depend on the number of workers.

New data arriving (``corpus.additions``): each entry appends a block of that many new scenes,
ids running on after the earlier blocks, with its own splits, mismatched captions and faults
(keys ``a<b>f...``), and exact and near duplicates (``a<b>d...``, ``a<b>n...``) of any scene so
far, older blocks included, as re-posts of old images are. Each block draws from RNGs of its
own and its rows are appended after the earlier blocks', so appending an entry never changes an
earlier row or image: the pairs of ``[a]`` are a prefix of those of ``[a, b]``, and block 0 is
the corpus without additions.

Output (``data/corpus/``)::

    images.zip              one member images/<key>.jpg per URL (exact and near duplicates are members
                            of their own), stored uncompressed: one file, not 20,000 (DVC hashes and
                            links each file of an output: 7-8 s for the loose files; CorpusImages reads it)
    faults/                 bodies the crawl's fault server returns (truncated JPEG, oversized...)
    pairs.parquet           url (relative to the corpus root), caption, split, ground truth
    samples.png             a grid of the first scenes, for eyes and MLflow
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..progress import progress, say
from ..workspace import atomic_dir
from .corpus_images import IMAGES
from .scenes import COLORS, FAULT_KINDS, Obj, Scene, caption, encode_jpeg, render, sample_scene


ARCHIVE_TIME = (2020, 1, 1, 0, 0, 0)    # every member's timestamp: the archive is a function of the seed


def _render_chunk(args) -> list[tuple[str, bytes]]:
    """The JPEGs of a chunk of scenes (and of their near re-posts): [(member name, bytes)]."""
    scenes, image_size, render_scale, quality, near_keys = args
    out = []
    for key, scene in scenes:
        img = render(scene, image_size, render_scale)
        out.append((f"images/{key}.jpg", encode_jpeg(img, quality)))
        for near_key in near_keys.get(key, ()):
            # A re-upload: resized by a quarter and re-encoded at lower quality.
            resized = img.resize((round(image_size * 1.25),) * 2, Image.BICUBIC)
            out.append((f"images/{near_key}.jpg", encode_jpeg(resized, 80)))
    return out


# ---- the stage ----------------------------------------------------------------------------------
# The stage-wide draws of a block (scene-level draws use the scene's own streams [seed, scene_id, k]).
SPLIT_DRAW, EXACT_DRAW, NEAR_DRAW, FAULT_DRAW, ORDER_DRAW = 1, 2, 3, 4, 5
ADDITIONS_SALT = 1_000_003    # block 0's split salt, far above any scene id: the added blocks' namespace


def _block_rng(seed: int, block: int, draw: int) -> np.random.Generator:
    """The RNG of one stage-wide draw of a block.

    Block 0 keeps the seeds the corpus has always had, so its rows do not move. An added block
    draws from ``[seed, ADDITIONS_SALT, block, draw]``: four words, so it can meet neither the
    per-scene streams ``[seed, i]`` and ``[seed, i, k]`` nor the other blocks' draws.
    """
    if block == 0:
        return np.random.default_rng([seed, ADDITIONS_SALT] if draw == SPLIT_DRAW else [seed, draw])
    return np.random.default_rng([seed, ADDITIONS_SALT, block, draw])


def _block_pairs(corpus, block: int, new: list[Scene], seen: list[Scene]) -> pd.DataFrame:
    """The rows of one block, in URL-list order. ``new`` are the block's scenes; ``seen`` are all
    scenes so far (earlier blocks and this one), which the block's duplicates re-post."""
    # Key prefix of the block's extra URLs; block 0 keeps its historical keys ("d000000", ...).
    prefix = "" if block == 0 else f"a{block}"
    # Splits by scene, so no scene (nor its duplicates, in any block) leaks across splits.
    u = _block_rng(corpus.seed, block, SPLIT_DRAW).random(len(new))
    for s, ui in zip(new, u):
        s.split = "test" if ui < corpus.split.test else "val" if ui < corpus.split.test + corpus.split.val else "train"

    rows = [*_scene_rows(corpus, new), *_extra_rows(corpus, block, prefix, new, seen)]
    df = pd.DataFrame(rows)
    # Interleave the extra URLs with the scenes, as a real URL list would be (deterministic).
    order = _block_rng(corpus.seed, block, ORDER_DRAW).permutation(len(df))
    return df.iloc[order].reset_index(drop=True)


def pair_row(key, url, scene, text, *, mismatched=False, caption_scene=None, dup_of=None, dup_kind=None,
             fault=None) -> dict:
    """One row of the pairs table: a URL, its caption and the ground truth of what it shows."""
    gt = scene.ground_truth() if scene is not None else None
    if gt is not None:
        gt.update(mismatched=mismatched, caption_scene_id=caption_scene)
    objs = scene.objects if scene is not None else []
    flat = {}
    for i in range(2):
        o = objs[i] if i < len(objs) else None
        for attr in ("color", "shape", "size", "position"):
            flat[f"{attr}{i}"] = getattr(o, attr) if o else None
    return {"key": key, "url": url, "caption": text, "split": scene.split if scene else "train",
            "scene_id": scene.scene_id if scene else -1, "n_objects": len(objs),
            "background": scene.background if scene else None, **flat,
            "relation": scene.relation if scene else None, "mismatched": mismatched,
            "duplicate_of": dup_of, "duplicate_kind": dup_kind, "fault": fault,
            "gt": json.dumps(gt) if gt else None}


def _scene_rows(corpus, new: list[Scene]) -> list[dict]:
    """A row per scene of the block, its caption drawn from the scene's own stream (a few borrow
    another scene's caption: web-data noise)."""
    rows = []
    by_split: dict[str, list[Scene]] = {}
    for s in new:
        by_split.setdefault(s.split, []).append(s)
    for s in new:
        r = np.random.default_rng([corpus.seed, s.scene_id, 1])
        key = f"{s.scene_id:07d}"
        if r.random() < corpus.mismatch_fraction and len(by_split[s.split]) > 1:
            # Web-data noise: the caption of another scene of the same split (and block).
            other = by_split[s.split][int(r.integers(len(by_split[s.split])))]
            while other.scene_id == s.scene_id:
                other = by_split[s.split][int(r.integers(len(by_split[s.split])))]
            rows.append(pair_row(key, f"images/{key}.jpg", s, caption(other, r), mismatched=True,
                                 caption_scene=other.scene_id))
        else:
            rows.append(pair_row(key, f"images/{key}.jpg", s, caption(s, r), caption_scene=s.scene_id))
    return rows


def _extra_rows(corpus, block: int, prefix: str, new: list[Scene], seen: list[Scene]) -> list[dict]:
    """The block's exact and near re-posts (of any scene so far) and its fault URLs."""
    rows = []

    def pick(n, draw):
        # Re-posts come from any scene so far, older blocks included: an incremental filter
        # must catch them against data it has already kept.
        r = _block_rng(corpus.seed, block, draw)
        return r.choice(len(seen), size=min(n, len(seen)), replace=False)

    def caption_rng(s, k):
        # Block 0: the scene's historical stream. A later re-post of the same scene gets a
        # caption of its own, not a copy of an earlier re-post's.
        return np.random.default_rng([corpus.seed, s.scene_id, k] if block == 0 else [corpus.seed, s.scene_id, k, block])

    n = len(new)
    for kind, letter, k, fraction, draw in (("exact", "d", 2, corpus.duplicate_fraction, EXACT_DRAW),
                                            ("near", "n", 3, corpus.near_duplicate_fraction, NEAR_DRAW)):
        for j, i in enumerate(pick(round(n * fraction), draw)):
            s = seen[int(i)]
            key = f"{prefix}{letter}{j:06d}"
            rows.append(pair_row(key, f"images/{key}.jpg", s, caption(s, caption_rng(s, k)), caption_scene=s.scene_id,
                                 dup_of=f"{s.scene_id:07d}", dup_kind=kind))
    n_faults = round(n * corpus.fault_fraction)
    r = _block_rng(corpus.seed, block, FAULT_DRAW)
    for j in range(n_faults):
        kind = FAULT_KINDS[j % len(FAULT_KINDS)]
        donor = new[int(r.integers(len(new)))]
        # The fault server answers by <kind> alone (fault/<kind>/<anything>), so the last part
        # only has to be unique: "a1-0.jpg" for an added block.
        name = f"{j}" if block == 0 else f"{prefix}-{j}"
        rows.append(pair_row(f"{prefix}f{j:06d}", f"fault/{kind}/{name}.jpg", None, caption(donor, r), fault=kind))
    return rows


def build_blocks(cfg) -> tuple[list[Scene], list[pd.DataFrame]]:
    """All scenes, and the pairs of each block: the base ``n_scenes``, then one per ``additions`` entry."""
    corpus = cfg.corpus
    scenes: list[Scene] = []
    blocks = []
    for block, n in enumerate([corpus.n_scenes, *corpus.additions]):
        # Scene ids run on across blocks; scene i is drawn the same whichever block holds it.
        new = [sample_scene(corpus.seed, i, corpus.two_object_fraction) for i in range(len(scenes), len(scenes) + n)]
        scenes.extend(new)
        blocks.append(_block_pairs(corpus, block, new, scenes))
    return scenes, blocks


def build_pairs(cfg) -> tuple[list[Scene], pd.DataFrame]:
    """All scenes and the pairs table (one row per URL), without touching the disk.

    The blocks are appended in order, so appending an entry to ``additions`` never changes a row
    that was there before.
    """
    scenes, blocks = build_blocks(cfg)
    return scenes, pd.concat(blocks, ignore_index=True)


def write_fault_bodies(out: Path, image_size: int) -> None:
    """What the crawl's fault server returns for the fault URLs that need a body."""
    out.mkdir(parents=True, exist_ok=True)
    sample = Scene(0, "white", [Obj("red", "circle", "large", "center", 0.5, 0.5, 0.0, COLORS["red"])])
    jpeg = encode_jpeg(render(sample, image_size, 2), 95)
    (out / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 6 // 10])      # cut mid-scan
    (out / "opted_out.jpg").write_bytes(jpeg)
    (out / "not_an_image.html").write_bytes(b"<!doctype html><html><body>404-ish soft error page</body></html>")
    big = io.BytesIO()
    Image.new("RGB", (4096, 4096), (200, 30, 30)).save(big, format="PNG")   # 16 Mpx, ~50 KB
    (out / "too_large.png").write_bytes(big.getvalue())


def sample_grid(images: list[Image.Image], cols: int = 8) -> Image.Image:
    imgs = [im.convert("RGB") for im in images]
    size = imgs[0].size[0]
    rows = math.ceil(len(imgs) / cols)
    grid = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    for i, im in enumerate(imgs):
        grid.paste(im.resize((size, size)), ((i % cols) * size, (i // cols) * size))
    return grid


def write_corpus(corpus, scenes: list[Scene], pairs: pd.DataFrame, near_keys: dict[str, list[str]], out: Path) -> None:
    """Render every scene (and its near re-posts) into ``out/images.zip``, add the exact re-posts
    (the very same bytes under their own names), and write the fault bodies, ``pairs.parquet`` and
    the sample grid."""
    items = [(f"{s.scene_id:07d}", s) for s in scenes]
    chunk = 250
    jobs = [(items[i:i + chunk], corpus.image_size, corpus.render_scale, corpus.jpeg_quality,
             {k: near_keys[k] for k, _ in items[i:i + chunk] if k in near_keys})
            for i in range(0, len(items), chunk)]
    bar = progress(total=len(items), desc="corpus: render", unit="img")
    first: list[bytes] = []
    exact = pairs[pairs.duplicate_kind == "exact"]
    reposts: dict[str, list[str]] = {}
    for k, src in zip(exact.key, exact.duplicate_of):
        reposts.setdefault(f"images/{src}.jpg", []).append(f"images/{k}.jpg")
    # members in chunk order (the archive's bytes do not depend on corpus.workers); uncompressed:
    # JPEGs do not deflate, and a stored member is read without a decompressor
    with zipfile.ZipFile(out / IMAGES, "w", zipfile.ZIP_STORED) as archive:
        with (ProcessPoolExecutor(corpus.workers) if corpus.workers > 1 else contextlib.nullcontext()) as pool:
            for job, rendered in zip(jobs, pool.map(_render_chunk, jobs) if pool else map(_render_chunk, jobs)):
                for name, data in rendered:
                    archive.writestr(zipfile.ZipInfo(name, date_time=ARCHIVE_TIME), data)
                    for repost in reposts.get(name, ()):    # a re-post: the very same bytes
                        archive.writestr(zipfile.ZipInfo(repost, date_time=ARCHIVE_TIME), data)
                    if len(first) < 64 and name.removeprefix("images/")[0].isdigit():   # a scene, not a re-post
                        first.append(data)
                bar.update(len(job[0]))
    bar.close()
    write_fault_bodies(out / "faults", corpus.image_size)
    pairs.to_parquet(out / "pairs.parquet", index=False)
    sample_grid([Image.open(io.BytesIO(b)) for b in first]).save(out / "samples.png")


def corpus_metrics(corpus, scenes: list[Scene], pairs: pd.DataFrame, blocks: list[pd.DataFrame]) -> dict:
    real = pairs[pairs.fault.isna()]
    metrics = {
        "scenes": len(scenes),
        "urls": len(pairs),
        "pairs_by_split": {k: int(v) for k, v in real.split.value_counts().items()},
        "single_object": int((real.n_objects == 1).sum()),
        "two_object": int((real.n_objects == 2).sum()),
        "mismatched_captions": int(real.mismatched.sum()),
        "exact_duplicates": int((pairs.duplicate_kind == "exact").sum()),
        "near_duplicates": int((pairs.duplicate_kind == "near").sum()),
        "faults": {k: int(v) for k, v in pairs.fault.value_counts().items()},
        "image_size": corpus.image_size,
    }
    if corpus.additions:   # only then, so the metrics of a corpus without additions stay as they were
        metrics["additions"] = {"blocks": len(corpus.additions), "scenes": sum(corpus.additions),
                                "urls": sum(len(b) for b in blocks[1:])}
    return metrics


def run(cfg, ws) -> dict:
    corpus = cfg.corpus
    if cfg.crawl.url_list is not None:
        # The user's list replaces the embedded corpus: nothing is generated, and the output says why.
        from ..truth import write_skipped
        reason = f"crawl.url_list is set ({cfg.crawl.url_list}): your own data replaces the embedded corpus"
        with atomic_dir(ws.corpus) as out:
            figures = write_skipped(out, "corpus", reason)
        say("corpus", f"skipped: {reason}")
        return figures
    scenes, blocks = build_blocks(cfg)
    pairs = pd.concat(blocks, ignore_index=True)
    # A near duplicate is rendered with its source scene, whichever block the source is in.
    near = pairs[pairs.duplicate_kind == "near"]
    near_keys: dict[str, list[str]] = {}
    for k, src in zip(near.key, near.duplicate_of):
        near_keys.setdefault(src, []).append(k)

    with atomic_dir(ws.corpus) as out:
        write_corpus(corpus, scenes, pairs, near_keys, out)
    from ..tracking import log_artifact
    log_artifact(ws.corpus / "samples.png", "corpus")
    metrics = corpus_metrics(corpus, scenes, pairs, blocks)
    say("corpus", f"{len(scenes)} scenes, {len(pairs)} URLs ({sum(metrics['faults'].values())} faults) "
                  f"-> {ws.corpus.relative_to(ws.root)}/ (pairs.parquet, images.zip, samples.png)")
    return metrics
