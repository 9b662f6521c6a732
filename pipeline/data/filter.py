"""The `filter` stage: per-sample rules, then exact and near-duplicate removal.

Two streaming passes over ``data/raw/*.tar`` (memory grows only by a few hundred bytes per
surviving sample: a pixel hash, a pHash, an 8x8 color thumbnail):

1. *Scan*: decode every image and apply the per-sample rules in :data:`REASONS` order, recording
   the first that fails. A survivor is fingerprinted; if its pixels were already seen it is an
   exact duplicate. After the scan, near duplicates are found among the remaining survivors.
2. *Write*: kept samples go unchanged (same bytes, same keys) to ``data/filtered/`` via
   ``atomic_dir``, so a failed run leaves the previous output (or none) in place; a kept image
   that is not square is made square first (``filter.square``: center crop, or pad with
   ``crawl.background``) and counted (``squared``), since every model downstream sees squares.

Incremental (pipeline/data/incremental.py): a rerun on an addition scans only the new raw shards; its
samples are deduplicated against the earlier run's survivors (their pixel hashes, pHashes and
thumbnails are kept in ``fingerprints.npz``), so the result equals a full filter of all shards.

Every input sample is either kept or dropped for exactly one reason, and the stage asserts that
the counts reconcile. ``dropped.parquet`` beside the shards lists each dropped sample with its
reason and, for duplicates, the key of the earlier sample it matched, so any drop can be audited.

Near duplicates need two signals. pHash (DCT of a 32x32 grayscale image) survives re-encoding and
resizing, but it is blind to hue: a red and a blue circle at the same spot share a pHash. So a
pHash candidate must also agree in color, region by region: in an 8x8 thumbnail (cell means), no
cell may differ by more than ``thumb_max_cell_rmse`` (RMSE over R, G, B on the 0-255 scale). One RMSE
over a whole 16x16 thumbnail dilutes a small object's color change by the background: on the 20k
default corpus it drops ~170 distinct look-alike scenes at 98.5% near-duplicate recall, where the
largest cell difference drops 4 at 99% (those 4 differ by < 0.4 px and < 7 color levels).
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from . import incremental
from ..progress import progress, say
from ..errors import StageError
from ..workspace import atomic_dir, dir_size, human_bytes
from .shards import ShardError, ShardSink, count_samples, iter_samples, shard_paths

# Reasons in the order they are checked; a sample is counted under the first it fails.
REASONS = ("unreadable", "too_small", "aspect_ratio", "caption_empty", "caption_too_short", "caption_too_long",
           "exact_duplicate", "near_duplicate")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")   # the first present is the sample's image
THUMB_GRID = 8        # thumbnail cells per side; 8x8 averages out re-encoding noise per cell
# Near-duplicate search compares chunks of rows against all earlier samples; this bounds the
# (rows x samples) uint64 XOR matrix to 32 MiB, and PAIR_BATCH the candidate pairs scored at once.
PAIR_BUDGET = 1 << 22
PAIR_BATCH = 8192


# ---- per-sample rules and fingerprints ----------------------------------------------------------
def check(sample: dict, f) -> tuple[Optional[str], Optional[Image.Image]]:
    """The first per-sample rule ``sample`` fails (None if none) and its decoded RGB image.

    ``f`` is the ``filter`` section of the config.
    """
    data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    if data is None:
        return "unreadable", None
    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("RGB")          # forces a full decode: a truncated JPEG fails here
        caption = sample.get("txt", b"").decode("utf-8")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        # OSError covers PIL's UnidentifiedImageError; UnicodeDecodeError is a ValueError.
        return "unreadable", None
    w, h = img.size
    if min(w, h) < f.min_size:
        return "too_small", img
    if max(w, h) / min(w, h) > f.max_aspect_ratio:
        return "aspect_ratio", img
    words = len(caption.split())
    if not words:
        return "caption_empty", img
    if words < f.min_caption_words:
        return "caption_too_short", img
    if words > f.max_caption_words:
        return "caption_too_long", img
    return None, img


def pixel_sha256(img: Image.Image) -> bytes:
    """Hash of the decoded pixels (and size): equal for byte-different encodings of one image."""
    return hashlib.sha256(f"{img.width}x{img.height}:".encode() + img.tobytes()).digest()


def phash64(img: Image.Image) -> int:
    """imagehash's 64-bit pHash as an integer (bit 63 = first DCT coefficient)."""
    return int(np.packbits(imagehash.phash(img).hash.ravel()).view(">u8")[0])


def thumbnail(img: Image.Image) -> np.ndarray:
    """(THUMB_GRID, THUMB_GRID, 3) uint8 cell means; BOX averages, so it hardly depends on input size."""
    return np.asarray(img.resize((THUMB_GRID, THUMB_GRID), Image.BOX), dtype=np.uint8)


def make_square(img: Image.Image, policy: str, background: tuple[int, int, int]) -> Image.Image:
    """A non-square image made square by ``filter.square``: center_crop keeps the middle square
    of side min(w, h); pad centres the image on a square of side max(w, h) filled with
    ``background``."""
    w, h = img.size
    if w == h:
        return img
    if policy == "center_crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return img.crop((left, top, left + side, top + side))
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(background))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def squared_sample(fields: dict, policy: str, background: tuple[int, int, int]) -> dict:
    """A kept sample whose image is not square, with its image made square (a JPEG, as the crawl
    writes them) and its json saying so (``square``: the policy and the size it came in)."""
    ext = next(e for e in IMAGE_EXTS if e in fields)
    with Image.open(io.BytesIO(fields[ext])) as im:
        img = im.convert("RGB")
    out = make_square(img, policy, background)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=SQUARE_JPEG_QUALITY)
    meta = json.loads(fields["json"]) if fields.get("json") else {}
    meta.update(square={"policy": policy, "from": list(img.size)}, width=out.width, height=out.height)
    fields = {k: v for k, v in fields.items() if k not in IMAGE_EXTS}
    return {"jpg": buf.getvalue(), **fields, "json": json.dumps(meta).encode()}


SQUARE_JPEG_QUALITY = 95


# ---- near duplicates ----------------------------------------------------------------------------
def thumb_distance(thumbs: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Largest per-cell RGB RMSE (0-255) between the thumbnails of pairs ``(i[k], j[k])``.

    thumbs: (N, G, G, 3) uint8; returns float32 (len(i),).
    """
    out = np.empty(len(i), np.float32)
    for s in range(0, len(i), PAIR_BATCH):
        d = thumbs[i[s:s + PAIR_BATCH]].astype(np.int32) - thumbs[j[s:s + PAIR_BATCH]]
        out[s:s + PAIR_BATCH] = np.sqrt((d * d).mean(axis=-1)).max(axis=(1, 2))
    return out


def near_duplicates(phash: np.ndarray, thumbs: np.ndarray, max_distance: int,
                    max_rmse: float, first: int = 0) -> tuple[np.ndarray, dict]:
    """For each sample, the index of the earlier kept sample it nearly duplicates, else -1.

    Samples before ``first`` are an earlier run's kept samples (incremental): compared against,
    never dropped.

    phash: (N,) uint64; thumbs: (N, G, G, 3) uint8. A pair is a candidate when the pHash Hamming
    distance is <= ``max_distance`` and confirmed when no thumbnail cell differs by more than
    ``max_rmse`` (:func:`thumb_distance`).
    Greedy in input order: sample i is dropped only for matching an earlier sample that was itself
    kept, so a chain a~b~c with a !~ c keeps a and c (union-find groups would drop c too).
    All-pairs: N^2/2 popcounts, 1.3 s at 20k samples on one core; far beyond 10^5 samples a
    multi-index hash or a binary ANN index should propose the candidates instead.
    """
    n = len(phash)
    match = np.full(n, -1, np.int64)
    kept = np.ones(n, bool)
    candidates = confirmed = 0
    rows = max(1, PAIR_BUDGET // max(n, 1))
    for start in range(first, n, rows):
        stop = min(n, start + rows)
        dist = np.bitwise_count(phash[start:stop, None] ^ phash[None, :stop])        # (rows, stop)
        earlier = np.arange(stop)[None, :] < np.arange(start, stop)[:, None]
        i, j = np.nonzero((dist <= max_distance) & earlier)      # row-major: sorted by i, then j
        i += start
        ok = thumb_distance(thumbs, i, j) <= max_rmse
        candidates += len(i)
        confirmed += int(ok.sum())
        # Rows are visited in order, so kept[b] (b < a) is final when a is decided.
        for a, b in zip(i[ok].tolist(), j[ok].tolist()):
            if match[a] < 0 and kept[b]:
                match[a] = b
                kept[a] = False
    return match, {"phash_candidates": candidates, "color_confirmed": confirmed,
                   "color_rejected": candidates - confirmed}


# ---- scoring against the embedded corpus' planted duplicates -------------------------------------
def score_against_truth(drops: pd.DataFrame, pairs: pd.DataFrame, seen: set[str]) -> dict:
    """Recall and false positives of exact and near dedup vs ``pairs.parquet``'s planted copies.

    Order decides which copy of a scene is kept, so a drop is *correct* when the dropped sample and
    the sample it matched are copies of one scene, whichever came first. A planted copy counts as
    caught when a correct drop of its kind involves it (as dropped or as matched sample).
    ``seen`` (the input keys) limits the planted pairs to those whose both members were crawled.
    """
    planted = pairs[pairs.duplicate_kind.notna() & pairs.key.isin(seen) & pairs.duplicate_of.isin(seen)]
    root = dict(zip(planted.key, planted.duplicate_of))
    out = {}
    for kind in ("exact", "near"):
        d = drops[drops.reason == f"{kind}_duplicate"]
        correct = [a for a, b in zip(d.key, d.duplicate_of) if root.get(a, a) == root.get(b, b)]
        involved = set(correct) | set(d.duplicate_of[d.key.isin(correct)])
        copies = planted.key[planted.duplicate_kind == kind]
        caught = int(copies.isin(involved).sum())
        out[kind] = {"planted": len(copies), "dropped": caught,
                     "recall": round(caught / len(copies), 4) if len(copies) else None,
                     "false_positives": len(d) - len(correct)}
    return out


# ---- the stage ----------------------------------------------------------------------------------
@dataclass
class Scan:
    """What pass 1 keeps: the drops so far, and fingerprints of the survivors (in input order)."""
    n: int = 0
    drops: list[dict] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    where: list[tuple[str, str]] = field(default_factory=list)     # (key, shard)
    not_square: set[int] = field(default_factory=set)               # input indices of survivors to square
    pixels: dict[bytes, str] = field(default_factory=dict)          # pixel hash -> first key (survivors)
    phash: list[int] = field(default_factory=list)
    thumbs: list[np.ndarray] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def drop(self, key: str, shard: str, reason: str, duplicate_of: Optional[str] = None) -> None:
        self.drops.append({"key": key, "shard": shard, "reason": reason, "duplicate_of": duplicate_of})


def count_all(paths: list[Path]) -> int:
    """Samples in all shards (tar headers only), for the scan's rate and ETA."""
    return sum(count_samples(p) for p in paths)


def scan(paths: list[Path], f, total: int, keep_keys: bool, seen_pixels: Optional[dict[bytes, str]] = None) -> Scan:
    """Pass 1: rules, exact dedup (first occurrence of a pixel hash wins), fingerprints.

    ``seen_pixels``: the pixel hashes of an earlier run's survivors (incremental), matched first.
    """
    out = Scan()
    first_by_pixels: dict[bytes, str] = dict(seen_pixels or {})
    for sample in progress(iter_samples(paths), total=total, desc="filter: scan", unit="img"):
        out.n += 1
        key, shard = sample["__key__"], sample["__shard__"]
        if keep_keys:
            out.seen.add(key)
        reason, img = check(sample, f)
        if reason:
            out.drop(key, shard, reason)
            continue
        if f.exact_dedup:
            digest = pixel_sha256(img)
            if digest in first_by_pixels:
                out.drop(key, shard, "exact_duplicate", first_by_pixels[digest])
                continue
            first_by_pixels[digest] = out.pixels[digest] = key
        out.index.append(out.n - 1)
        out.where.append((key, shard))
        if img.width != img.height:
            out.not_square.add(out.n - 1)
        if f.near_dedup:
            out.phash.append(phash64(img))
            out.thumbs.append(thumbnail(img))
    return out


def write_kept(paths: list[Path], keep: np.ndarray, out_dir: Path, shard_size: int, prefix: str = "",
               not_square: frozenset = frozenset(), square: str = "center_crop",
               background: tuple[int, int, int] = (255, 255, 255)) -> int:
    """Pass 2: copy the samples whose input index is in ``keep`` unchanged (those in
    ``not_square`` made square by :func:`squared_sample`); returns the count."""
    keep_set = set(keep.tolist())
    with ShardSink(out_dir, shard_size, prefix) as sink:
        bar = progress(total=len(keep), desc="filter: write", unit="img")
        for idx, sample in enumerate(iter_samples(paths)):
            if idx in keep_set:
                # Meta fields (__url__, __shard__, ...) describe where it was read, not the sample.
                fields = {k: v for k, v in sample.items() if not k.startswith("__")}
                if idx in not_square:
                    fields = squared_sample(fields, square, background)
                sink.write({"__key__": sample["__key__"], **fields})
                bar.update()
        bar.close()
    return sink.count


# ---- incremental: the fingerprints an addition is deduplicated against --------------------------
FINGERPRINTS = "fingerprints.npz"
DROPPED = "dropped.parquet"


@dataclass
class Earlier:
    """What an earlier run kept, for deduplicating new samples against it (``fingerprints.npz``)."""
    pixels: dict[bytes, str]         # pixel hash -> key, of every sample that passed exact dedup
    keys: np.ndarray                 # kept samples, in output order: key, pHash, thumbnail
    phash: np.ndarray
    thumbs: np.ndarray
    drops: pd.DataFrame
    inputs: int

    @classmethod
    def empty(cls) -> "Earlier":
        return cls({}, np.array([], object), np.array([], np.uint64),
                   np.zeros((0, THUMB_GRID, THUMB_GRID, 3), np.uint8),
                   pd.DataFrame(columns=["key", "shard", "reason", "duplicate_of"]), 0)

    @classmethod
    def load(cls, directory: Path, state: dict) -> "Earlier":
        z = np.load(directory / FINGERPRINTS, allow_pickle=False)
        pixels = dict(zip((bytes(d) for d in z["pixel_digest"]), z["pixel_key"].tolist()))
        return cls(pixels, z["kept_key"].astype(object), z["phash"], z["thumbs"],
                   pd.read_parquet(directory / DROPPED), int(state["totals"]["input"]))

    def save(self, directory: Path) -> None:
        digests = np.frombuffer(b"".join(self.pixels), np.uint8).reshape(len(self.pixels), 32)
        np.savez(directory / FINGERPRINTS, pixel_digest=digests,
                 pixel_key=np.array(list(self.pixels.values()), dtype=str),
                 kept_key=np.array(self.keys.tolist(), dtype=str), phash=self.phash, thumbs=self.thumbs)


def filter_recipe(cfg) -> str:
    return incremental.recipe({"filter": cfg.filter.model_dump(mode="json"), "background": list(cfg.crawl.background)},
                              __name__)


def run(cfg, ws) -> dict:
    """Filter the raw shards not filtered before (all of them the first time, or when the
    filter's config or code changed); new samples are deduplicated against the earlier ones."""
    if not shard_paths(ws.raw):
        raise StageError(f"no shards in {ws.raw} (run the crawl stage first)")
    # Ground truth only describes the embedded corpus, not a user's URL list.
    truth_path = ws.corpus / "pairs.parquet"
    truth = (pd.read_parquet(truth_path, columns=["key", "duplicate_of", "duplicate_kind"])
             if cfg.crawl.url_list is None and truth_path.exists() else None)

    rec = filter_recipe(cfg)
    state, why = incremental.previous(ws.filtered, rec, cfg.retrain.incremental_data,
                                      required=(FINGERPRINTS, DROPPED))
    paths, inputs, changed = incremental.new_inputs(state, ws.raw)
    if paths is None:
        state, why, paths = None, changed or why, shard_paths(ws.raw)
    earlier = Earlier.load(ws.filtered, state) if state else Earlier.empty()
    part = incremental.next_part(state)
    say("filter", f"{len(paths)} new raw shard(s) of {len(inputs)}" + (f"; {why}" if why else ""))
    if state is not None and not paths:
        say("filter", f"nothing new to filter: {ws.filtered.relative_to(ws.root)}/ is kept as it is")
        return {"input": 0, "kept": 0, "dropped_by_reason": {r: 0 for r in REASONS}, "shards_in": 0,
                "shards_out": len(shard_paths(ws.filtered)), "totals": state["totals"],
                "incremental": {"part": None, "new_raw_shards": 0, "why": why}}

    try:
        s = scan(paths, cfg.filter, count_all(paths), keep_keys=truth is not None, seen_pixels=earlier.pixels)
    except ShardError as err:
        raise StageError(str(err)) from err
    kept = dedup_and_count(s, earlier, cfg.filter, part)
    squared = write_output(cfg, ws, paths, kept, state, {"recipe": rec, "inputs": inputs, "part": part})

    metrics = {"input": s.n, "kept": len(kept.index), "dropped_by_reason": kept.dropped,
               "squared": {cfg.filter.square: squared}, "shards_in": len(paths),
               "shards_out": len(shard_paths(ws.filtered)), "near_dedup": kept.near_stats, "totals": kept.totals,
               "incremental": {"part": part, "new_raw_shards": len(paths), "why": why}}
    if truth is not None:
        seen = s.seen | set(earlier.keys.tolist()) | set(earlier.drops.key)
        metrics["dedup_vs_truth"] = score_against_truth(kept.now.drops, truth, seen)
    nonzero = ", ".join(f"{r} {n}" for r, n in kept.dropped.items() if n) or "none"
    say("filter", f"kept {len(kept.index)} of {s.n} samples (dropped: {nonzero}) -> "
                  f"{ws.filtered.relative_to(ws.root)}/ ({metrics['shards_out']} shards, "
                  f"{human_bytes(dir_size(ws.filtered))}; {DROPPED} lists every drop)")
    return metrics


@dataclass
class Kept:
    """What this run keeps of the scanned samples, after near-duplicate removal."""
    index: np.ndarray                # positions (in scan order) of the samples to write
    not_square: set                  # of those and the others: positions of non-square images
    dropped: dict[str, int]          # this run's drops by reason
    near_stats: dict
    now: Earlier                     # the earlier kept samples and these: what the next run dedups against
    totals: dict                     # over every part


def dedup_and_count(s, earlier: Earlier, f, part: int) -> Kept:
    """Near-duplicate removal of the scanned samples ``s`` against each other and the earlier
    kept ones; checks that input = kept + dropped."""
    index = np.asarray(s.index, np.int64)
    n_old = len(earlier.keys)
    new_phash = np.asarray(s.phash, np.uint64)
    new_thumbs = np.stack(s.thumbs) if s.thumbs else np.zeros((0, THUMB_GRID, THUMB_GRID, 3), np.uint8)
    near_stats = {"phash_candidates": 0, "color_confirmed": 0, "color_rejected": 0}
    near_kept = np.ones(len(index), bool)
    if f.near_dedup and len(index):
        # The earlier kept samples come first, as they came first in the data.
        match, near_stats = near_duplicates(np.concatenate([earlier.phash, new_phash]),
                                            np.concatenate([earlier.thumbs, new_thumbs]),
                                            f.phash_max_distance, f.thumb_max_cell_rmse, first=n_old)
        match = match[n_old:]
        for a in np.flatnonzero(match >= 0):
            b = match[a]
            s.drop(*s.where[a], "near_duplicate", earlier.keys[b] if b < n_old else s.where[b - n_old][0])
        near_kept = match < 0
        index = index[near_kept]

    drops = pd.DataFrame(s.drops, columns=["key", "shard", "reason", "duplicate_of"])
    dropped = {r: int((drops.reason == r).sum()) for r in REASONS}
    if s.n != len(index) + sum(dropped.values()):
        raise StageError(f"filter counts do not reconcile: input {s.n} != kept {len(index)} "
                         f"+ dropped {sum(dropped.values())}")

    all_drops = pd.concat([earlier.drops, drops], ignore_index=True) if len(earlier.drops) else drops
    kept_keys = np.array([k for (k, _), ok in zip(s.where, near_kept) if ok], object)
    now = Earlier({**earlier.pixels, **s.pixels}, np.concatenate([earlier.keys, kept_keys]),
                  np.concatenate([earlier.phash, new_phash[near_kept]]) if f.near_dedup else earlier.phash,
                  np.concatenate([earlier.thumbs, new_thumbs[near_kept]]) if f.near_dedup else earlier.thumbs,
                  all_drops, earlier.inputs + s.n)
    totals = {"input": now.inputs, "kept": len(now.keys),
              "dropped_by_reason": {r: int((all_drops.reason == r).sum()) for r in REASONS},
              "parts": part + 1}
    return Kept(index, s.not_square, dropped, near_stats, now, totals)


def write_output(cfg, ws, paths: list[Path], kept: Kept, state: Optional[dict], run: dict) -> int:
    """Replace data/filtered atomically: the earlier parts' shards linked, this part's kept samples
    written, the drops, fingerprints and incremental state beside them; returns how many written
    images were made square."""
    f, part = cfg.filter, run["part"]
    try:
        with atomic_dir(ws.filtered) as out:
            if state is not None:
                incremental.link_outputs(state, ws.filtered, out)
            squared = kept.not_square & set(kept.index.tolist())
            written = write_kept(paths, kept.index, out, f.shard_size, incremental.part_prefix(part),
                                 frozenset(squared), f.square, tuple(cfg.crawl.background))
            if written != len(kept.index):
                raise StageError(f"raw shards changed while filtering: wrote {written}, "
                                 f"expected {len(kept.index)}")
            kept.now.drops.to_parquet(out / DROPPED, index=False)
            kept.now.save(out)
            outputs = incremental.part_outputs(out, part)
            incremental.write_state(out, {
                "recipe": run["recipe"], "inputs": run["inputs"], "totals": kept.totals,
                "parts": [*(state["parts"] if state else []),
                          {"part": part, "raw_shards": [p.name for p in paths], "kept": len(kept.index),
                           "outputs": outputs}]})
    except ShardError as err:
        raise StageError(str(err)) from err
    return len(squared)
