"""The `filter` stage: per-sample rules, then exact and near-duplicate removal.

Two streaming passes over ``data/raw/*.tar`` (memory grows only by a few hundred bytes per
surviving sample: a pixel hash, a pHash, an 8x8 color thumbnail):

1. *Scan* (pipeline/data/dedup.py): a map over shards decodes every image and applies the
   per-sample rules in :data:`REASONS` order, recording the first that fails, and fingerprints
   every survivor; then exact duplicates are a group-by over pixel hashes (the first in input
   order wins) and near duplicates come from banded pHash candidates (LSH: the same pairs as an
   all-pairs search, without its N^2), confirmed by color and decided greedily in input order.
   With ``cluster.engine: spark`` the map runs as Spark tasks and the group-by and the band join
   as Spark DataFrame jobs (pipeline/data/dedup_spark.py), and pass 2 as a task per output shard
   (:func:`write_output_shard`); the outputs are the same bytes.
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

import functools
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from PIL import Image

from .. import cluster, storage
from . import incremental
from ..progress import progress, say
from ..errors import StageError
from ..workspace import human_bytes
from . import dedup
from .shards import ShardError, ShardSink, iter_samples, shard_names, shard_paths

from .rules import IMAGE_EXTS, REASONS, THUMB_GRID, check, phash64, pixel_sha256, thumbnail  # noqa: F401  (filter.check etc.)


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


# ---- near duplicates (pipeline/data/dedup.py) ---------------------------------------------------
thumb_distance = dedup.thumb_distance
near_duplicates = dedup.near_duplicates          # banded pHash candidates (LSH), color check, greedy


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
    phash: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))     # (survivors,)
    thumbs: np.ndarray = field(default_factory=lambda: np.zeros((0, THUMB_GRID, THUMB_GRID, 3), np.uint8))
    seen: set[str] = field(default_factory=set)
    sizes: list[int] = field(default_factory=list)                  # samples per input shard, in order

    def drop(self, key: str, shard: str, reason: str, duplicate_of: Optional[str] = None) -> None:
        self.drops.append({"key": key, "shard": shard, "reason": reason, "duplicate_of": duplicate_of})


def scan(paths: list[Path], f, keep_keys: bool, seen_pixels: Optional[dict[bytes, str]] = None,
         spark=None) -> Scan:
    """Pass 1: rules and fingerprints (a map over shards), exact dedup (a group-by: the first
    occurrence of a pixel hash wins). ``seen_pixels``: the pixel hashes of an earlier run's
    survivors (incremental), matched first. ``spark``: run the map and the group-by on Spark."""
    fingerprint = functools.partial(dedup.fingerprint_shard, f=f)
    if spark is not None:
        from . import dedup_spark
        table = dedup_spark.fingerprints(spark, fingerprint, paths)
    else:
        table = pd.concat(cluster.map_items(None, fingerprint, paths, desc="filter: scan"), ignore_index=True)
    out = Scan(n=len(table))
    per_shard = table["shard"].value_counts()
    out.sizes = [int(per_shard.get(Path(p).name, 0)) for p in paths]
    reason = table["reason"].copy()
    duplicate_of = pd.Series([None] * len(table), dtype=object)
    survivor = reason.isna()
    if f.exact_dedup and survivor.any():
        if spark is not None:
            dup = dedup_spark.exact_duplicates(spark, table[survivor], seen_pixels or {})
        else:
            dup = dedup.exact_duplicates(table.loc[survivor, "digest"], table.loc[survivor, "key"], seen_pixels or {})
        duplicate_of[survivor] = dup
        reason[survivor & duplicate_of.notna()] = "exact_duplicate"
    for row in table.loc[reason.notna()].assign(reason=reason, duplicate_of=duplicate_of).itertuples():
        out.drop(row.key, row.shard, row.reason, row.duplicate_of)     # input order, as the scan met them
    kept = table[reason.isna()]
    out.index = np.flatnonzero(reason.isna().to_numpy()).tolist()
    out.where = list(zip(kept["key"], kept["shard"]))
    out.not_square = set(np.flatnonzero((reason.isna() & table["square"]).to_numpy()).tolist())
    if f.exact_dedup:
        out.pixels = dict(zip(kept["digest"], kept["key"]))      # the first key of each new pixel hash
    if f.near_dedup and len(kept):
        out.phash = kept["phash"].to_numpy(np.int64).view(np.uint64)
        out.thumbs = dedup.thumbs_of(kept["thumb"])
    if keep_keys:
        out.seen = set(table["key"])
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


def output_jobs(paths: list[Path], sizes: list[int], keep: np.ndarray, shard_size: int, prefix: str,
                not_square: frozenset, square: str, background) -> list[dict]:
    """Pass 2 cut into one job per output shard (:func:`write_output_shard`): output shard k holds
    the kept samples k*shard_size ... (k+1)*shard_size - 1 in input order, so each job names the
    input shards it reads and the positions to keep in each. ``sizes``: samples per input shard."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    jobs = []
    for k, first in enumerate(range(0, len(keep), shard_size)):
        chunk = keep[first:first + shard_size]
        shard_no = np.searchsorted(starts, chunk, side="right") - 1
        reads = [(str(paths[i]), (chunk[shard_no == i] - starts[i]).tolist(),
                  [int(g) in not_square for g in chunk[shard_no == i]]) for i in np.unique(shard_no)]
        jobs.append({"out": None, "prefix": prefix, "index": k, "reads": reads, "square": square,
                     "background": tuple(background)})
    return jobs


def write_output_shard(job: dict) -> int:
    """One output shard of pass 2 (a Spark task under ``engine: spark``): the kept samples of its
    input shards' positions, in order, squared where flagged; the bytes :func:`write_kept` writes."""
    from .shards import iter_shard
    name = f"{job['prefix']}{job['index']:05d}.tar"
    scratch = Path(job["out"]) / f".task-{name}"          # a retried task starts over
    shutil.rmtree(scratch, ignore_errors=True)
    with ShardSink(scratch, 1 << 62) as sink:
        for path, positions, squares in job["reads"]:
            wanted = dict(zip(positions, squares))
            for pos, sample in enumerate(iter_shard(Path(path))):
                if pos in wanted:
                    fields = {k: v for k, v in sample.items() if not k.startswith("__")}
                    if wanted[pos]:
                        fields = squared_sample(fields, job["square"], job["background"])
                    sink.write({"__key__": sample["__key__"], **fields})
    if sink.count:
        (scratch / "00000.tar").replace(Path(job["out"]) / name)
    shutil.rmtree(scratch)
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
    f = cfg.filter
    if not shard_names(ws.raw):
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
                "shards_out": len(shard_names(ws.filtered)), "totals": state["totals"],
                "incremental": {"part": None, "new_raw_shards": 0, "why": why}}

    with cluster.session(cfg.cluster) as spark:
        try:
            s = scan(paths, f, keep_keys=truth is not None, seen_pixels=earlier.pixels, spark=spark)
        except ShardError as err:
            raise StageError(str(err)) from err
        return finish(cfg, ws, s, earlier, state, why, paths, inputs, part, rec, truth, spark)


def finish(cfg, ws, s: Scan, earlier: Earlier, state, why, paths, inputs, part, rec, truth, spark) -> dict:
    """Near dedup over the scan's survivors, then pass 2 (write) and the figures."""
    kept = dedup_and_count(s, earlier, cfg.filter, part, spark)
    squared = write_output(cfg, ws, paths, s.sizes, kept, state, {"recipe": rec, "inputs": inputs, "part": part},
                           spark)
    metrics = {"input": s.n, "kept": len(kept.index), "dropped_by_reason": kept.dropped,
               "squared": {cfg.filter.square: squared}, "shards_in": len(paths),
               "shards_out": len(shard_names(ws.filtered)), "near_dedup": kept.near_stats, "totals": kept.totals,
               "incremental": {"part": part, "new_raw_shards": len(paths), "why": why}}
    if truth is not None:
        seen = s.seen | set(earlier.keys.tolist()) | set(earlier.drops.key)
        metrics["dedup_vs_truth"] = score_against_truth(kept.now.drops, truth, seen)
    nonzero = ", ".join(f"{r} {n}" for r, n in kept.dropped.items() if n) or "none"
    say("filter", f"kept {len(kept.index)} of {s.n} samples (dropped: {nonzero}) -> "
                  f"{ws.filtered.relative_to(ws.root)}/ ({metrics['shards_out']} shards, "
                  f"{human_bytes(storage.output_bytes(ws.filtered))}; {DROPPED} lists every drop)")
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


def near_dedup(s: Scan, earlier: Earlier, f, spark) -> tuple[np.ndarray, dict]:
    """Drop (in ``s``) the survivors that nearly duplicate an earlier kept sample or one before
    them; returns which survivors stay (bool, scan order) and the search's figures."""
    n_old = len(earlier.keys)
    # The earlier kept samples come first, as they came first in the data.
    phash, thumbs = np.concatenate([earlier.phash, s.phash]), np.concatenate([earlier.thumbs, s.thumbs])
    if spark is not None:
        from . import dedup_spark
        match, near_stats = dedup_spark.near_duplicates(spark, phash, thumbs, f.phash_max_distance,
                                                        f.thumb_max_cell_rmse, first=n_old)
    else:
        match, near_stats = near_duplicates(phash, thumbs, f.phash_max_distance, f.thumb_max_cell_rmse,
                                            first=n_old)
    match = match[n_old:]
    for a in np.flatnonzero(match >= 0):
        b = match[a]
        s.drop(*s.where[a], "near_duplicate", earlier.keys[b] if b < n_old else s.where[b - n_old][0])
    return match < 0, near_stats


def dedup_and_count(s: Scan, earlier: Earlier, f, part: int, spark) -> Kept:
    """Near-duplicate removal of the scanned samples ``s`` against each other and the earlier
    kept ones; checks that input = kept + dropped."""
    index = np.asarray(s.index, np.int64)
    near_stats = {"band_candidates": 0, "phash_candidates": 0, "color_confirmed": 0, "color_rejected": 0}
    near_kept = np.ones(len(index), bool)
    if f.near_dedup and len(index):
        near_kept, near_stats = near_dedup(s, earlier, f, spark)
        index = index[near_kept]
    drops = pd.DataFrame(s.drops, columns=["key", "shard", "reason", "duplicate_of"])
    dropped = {r: int((drops.reason == r).sum()) for r in REASONS}
    if s.n != len(index) + sum(dropped.values()):
        raise StageError(f"filter counts do not reconcile: input {s.n} != kept {len(index)} "
                         f"+ dropped {sum(dropped.values())}")
    all_drops = pd.concat([earlier.drops, drops], ignore_index=True) if len(earlier.drops) else drops
    kept_keys = np.array([k for (k, _), ok in zip(s.where, near_kept) if ok], object)
    now = Earlier({**earlier.pixels, **s.pixels}, np.concatenate([earlier.keys, kept_keys]),
                  np.concatenate([earlier.phash, s.phash[near_kept]]) if f.near_dedup else earlier.phash,
                  np.concatenate([earlier.thumbs, s.thumbs[near_kept]]) if f.near_dedup else earlier.thumbs,
                  all_drops, earlier.inputs + s.n)
    totals = {"input": now.inputs, "kept": len(now.keys),
              "dropped_by_reason": {r: int((all_drops.reason == r).sum()) for r in REASONS}, "parts": part + 1}
    return Kept(index, s.not_square, dropped, near_stats, now, totals)


def write_output(cfg, ws, paths: list[Path], sizes: list[int], kept: Kept, state: Optional[dict], run: dict,
                 spark) -> int:
    """Replace data/filtered atomically: the earlier parts' shards linked, this part's kept samples
    written (a Spark task per output shard with a session, the same bytes), the drops,
    fingerprints and incremental state beside them; returns how many written images were made square."""
    f, part, index = cfg.filter, run["part"], kept.index
    prefix = incremental.part_prefix(part)
    try:
        with storage.stage_output(cfg.cluster.storage, ws, ws.filtered) as out:
            if state is not None:
                incremental.link_outputs(state, ws.filtered, out)
            squared = kept.not_square & set(index.tolist())
            if spark is not None:          # a task per output shard; the same bytes as write_kept
                jobs = output_jobs(paths, sizes, index, f.shard_size, prefix, frozenset(squared), f.square,
                                   cfg.crawl.background)
                written = sum(cluster.map_items(spark, write_output_shard,
                                                [j | {"out": str(out)} for j in jobs], unit="shard"))
            else:
                written = write_kept(paths, index, out, f.shard_size, prefix, frozenset(squared), f.square,
                                     tuple(cfg.crawl.background))
            if written != len(index):
                raise StageError(f"raw shards changed while filtering: wrote {written}, expected {len(index)}")
            kept.now.drops.to_parquet(out / DROPPED, index=False)
            kept.now.save(out)
            incremental.write_state(out, {
                "recipe": run["recipe"], "inputs": run["inputs"], "totals": kept.totals,
                "parts": [*(state["parts"] if state else []),
                          {"part": part, "raw_shards": [p.name for p in paths], "kept": len(index),
                           "outputs": incremental.part_outputs(out, part)}]})
    except ShardError as err:
        raise StageError(str(err)) from err
    return len(squared)
