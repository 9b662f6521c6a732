"""The `embed` stage: the frozen CLIP over the filtered shards, once, for every later stage.

Per sample, the output shards (``data/embeddings/NNNNN.tar``) hold::

    jpg            the image bytes, unchanged
    txt            the caption
    json           key, split, ground truth, image-text cosine
    img_emb.npy    z_i, float32 [D], unit norm       (the prior's target, the decoder's condition)
    txt_emb.npy    z_t, float32 [D], unit norm       (the prior's condition)
    txt_tokens.npy per-token text encodings, [L, W] in ``embed.token_dtype``
    txt_mask.npy   bool [L], True for real tokens (start .. end-of-text)

and, with ``embed.rewrites`` k > 0, for each train-split sample whose caption the language rewrites
read (:mod:`pipeline.clip.rewrites`: the first k of the rewrites CLIP trained on, seeded by
``clip.seed``), the same three arrays for its k rewrites, their texts in the JSON's ``rewrites``::

    rw_emb.npy     float32 [k, D]      rw_tokens.npy  [k, L, W]      rw_mask.npy  bool [k, L]

The prior and the decoder train on the caption or one of its rewrites, drawn per sample
(:func:`pipeline.data.embedding_shards.train_batches`): they learn what CLIP's encodings of other
wordings mean, not only of the corpus's templates. A caption the rewrites cannot read (a user's
own data) has none, and trains as it is.

Beside them, the clip-retrieval layout that embedding-reader and other unCLIP trainers read:
``img_emb/img_emb_N.npy`` and ``text_emb/text_emb_N.npy`` (float16 [n, D], row-aligned with)
``metadata/metadata_N.parquet`` (key, caption, split), one triple per output shard.

With ``embed.min_similarity`` set, pairs whose cos(z_i, z_t) falls below it are dropped and
counted; on the embedded corpus the drop is scored against the known mismatched captions.

With ``cluster.engine: spark`` the filtered shards are cut into disjoint groups
(``cluster.groups_per_task`` shards each), one Spark task per group (one GPU each with
``cluster.spark.task_gpus: 1``; clip-retrieval's pattern): each task embeds its shards into
outputs named after them (``<input shard>.tar`` and the retrieval triple numbered by the input's
position), and the driver alone merges the tasks' tallies into the figures and writes the manifest
(``incremental.json``). The samples and their bytes are the local engine's; only the cut into
output shards differs (tests/test_cluster.py).
"""
from __future__ import annotations

import functools
import io
import json
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd
import torch

from . import bundle, cluster, storage, tracking
from .clip import model as clip_model
from .data import incremental
from .data.image_shards import decode_images, single_thread
from .device import device_of
from .clip.rewrites import rewrites as rewrite_caption
from .clip.tokenize import truncated
from .data.shards import ShardError, ShardSink, iter_samples, loads_json, shard_names, shard_paths, split_of
from .progress import progress, say
from .errors import StageError


def npy_rows(arr: np.ndarray) -> list[bytes]:
    """``np.save`` output of each row of ``arr`` (one .npy member per sample), the header built
    once per batch: 4 arrays per sample add up."""
    arr = np.ascontiguousarray(arr)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(arr.dtype),
                                               "fortran_order": False, "shape": arr.shape[1:]})
    header = buf.getvalue()
    return [header + row.tobytes() for row in arr]


def read_meta(sample: dict) -> dict:
    """A filtered sample's split, ground truth and the ground truth's JSON text (``null`` if none).

    The crawl stores the ground truth as a JSON string inside the sample's JSON; the text is kept
    so that :func:`meta_json` writes it back as it came, without re-encoding its floats."""
    meta = loads_json(sample["json"]) if sample.get("json") else {}
    gt = meta.get("gt")
    text = gt if isinstance(gt, str) else json.dumps(gt)
    return {"split": split_of(meta), "gt": loads_json(gt) if isinstance(gt, str) else gt, "gt_text": text}


def meta_json(key: str, split: str, gt_text: str, similarity: float, rewrites: Optional[list[str]] = None) -> bytes:
    """``json.dumps({"key", "split", "gt", "similarity"[, "rewrites"]})`` with the ground truth
    spliced in as text: re-encoding its dict was 15 us per sample, a tenth of the stage's overhead."""
    extra = f', "rewrites": {json.dumps(rewrites)}' if rewrites else ""
    return (f'{{"key": {json.dumps(key)}, "split": {json.dumps(split)}, "gt": {gt_text}, '
            f'"similarity": {json.dumps(round(similarity, 5))}{extra}}}').encode()


class ShardBatches(torch.utils.data.IterableDataset):
    """Decoded, tokenised batches of whole shards; DataLoader workers take disjoint shards. With
    ``rewrites`` k > 0 a batch also holds ``rw_tokens`` [m * k, L]: the k rewrites of each of the
    m train-split items whose caption is read (``rw_items``: their indices in the batch)."""

    def __init__(self, paths: list[Path], tokenize, image_size: int, batch_size: int, rewrites: int = 0,
                 seed: int = 0):
        self.paths, self.tokenize, self.image_size, self.batch_size = paths, tokenize, image_size, batch_size
        self.rewrites, self.seed = rewrites, seed

    def collate(self, samples: list[dict]) -> dict:
        items = [{"key": s["__key__"], "jpg": s["jpg"], "txt": s["txt"].decode("utf-8"), **read_meta(s)}
                 for s in samples]
        tokens = self.tokenize([it["txt"] for it in items])
        return {"items": items, "images": decode_images([it["jpg"] for it in items], self.image_size),
                "tokens": tokens} | self.rewritten(items, tokens)

    def rewritten(self, items: list[dict], tokens: torch.Tensor) -> dict:
        """The train items' rewrites, tokenized; each item's ``rewrites`` texts set. A rewrite that
        fills the whole context (it might be cut) is replaced by its caption, as in CLIP's batches."""
        k = self.rewrites
        if not k:
            return {}
        rw_items, texts = [], []
        for j, it in enumerate(items):
            if it["split"] != "train":
                continue
            drawn = rewrite_caption(it["txt"], k, self.seed)
            if all(t == it["txt"] for t in drawn):        # not read: a user's own caption trains as it is
                continue
            rw_items.append(j)
            texts += drawn
        if not rw_items:
            return {}
        rw_tokens = self.tokenize(texts)                                        # [m * k, L]
        owner = torch.tensor(rw_items).repeat_interleave(k)
        cut = rw_tokens[:, -1] != 0
        rw_tokens[cut] = tokens[owner[cut]]
        for r in cut.nonzero().flatten().tolist():
            texts[r] = items[int(owner[r])]["txt"]
        for i, j in enumerate(rw_items):
            items[j]["rewrites"] = texts[i * k:(i + 1) * k]
        return {"rw_items": rw_items, "rw_tokens": rw_tokens}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        mine = self.paths[info.id::info.num_workers] if info else self.paths
        pending: list[dict] = []
        for sample in iter_samples(mine):
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self.collate(pending)
                pending = []
        if pending:
            yield self.collate(pending)


def batches(paths: list[Path], tokenize, image_size: int, batch_size: int, num_workers: int,
            rewrites: int = 0, seed: int = 0) -> Iterator[dict]:
    """Batches in shard order (with workers: interleaved by shard; outputs are keyed, so the
    order does not matter). On the 2-core CPU machines in-process is fastest (bench/embed.py):
    a worker competes with the model's threads."""
    ds = ShardBatches(paths, tokenize, image_size, batch_size, rewrites, seed)
    if num_workers == 0:
        yield from ds
        return
    yield from torch.utils.data.DataLoader(ds, batch_size=None, num_workers=min(num_workers, len(paths)),
                                           worker_init_fn=single_thread, collate_fn=_as_is)


def _as_is(batch):
    # Batches are already collated; DataLoader's default_convert would walk every item again.
    return batch


@torch.no_grad()
def encode_batch(clip, images: torch.Tensor, tokens: torch.Tensor):
    """(z_i [B,D], z_t [B,D], token encodings [B,L,W], mask [B,L]) on CPU."""
    device = next(clip.model.parameters()).device
    z_i = clip.encode_image(images.to(device))
    z_t, enc, mask = clip.encode_text(tokens.to(device))
    return z_i.float().cpu(), z_t.float().cpu(), enc.float().cpu(), mask.cpu()


def retrieval_files(directory: Path) -> list[str]:
    """The clip-retrieval ``img_emb/*.npy`` of an embed output, local or named by its manifest."""
    local = {f"img_emb/{p.name}" for p in (Path(directory) / "img_emb").glob("*.npy")}
    return sorted(local | {n for n in storage.stored_names(directory) if n.startswith("img_emb/")})


class RetrievalWriter:
    """clip-retrieval's embedding folders, one .npy/.parquet triple per ``flush``."""

    def __init__(self, root: Path, first_part: int = 0):
        self.root = root
        for sub in ("img_emb", "text_emb", "metadata"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.part, self.rows, self.img, self.txt = first_part, [], [], []
        self.written: list[str] = []

    def files(self, part: int) -> list[str]:
        return [f"img_emb/img_emb_{part}.npy", f"text_emb/text_emb_{part}.npy", f"metadata/metadata_{part}.parquet"]

    def add(self, z_i: np.ndarray, z_t: np.ndarray, row: dict) -> None:
        self.img.append(z_i)
        self.txt.append(z_t)
        self.rows.append(row)

    def flush(self) -> None:
        if not self.rows:
            return
        np.save(self.root / "img_emb" / f"img_emb_{self.part}.npy", np.stack(self.img).astype(np.float16))
        np.save(self.root / "text_emb" / f"text_emb_{self.part}.npy", np.stack(self.txt).astype(np.float16))
        pd.DataFrame(self.rows).to_parquet(self.root / "metadata" / f"metadata_{self.part}.parquet", index=False)
        self.written += self.files(self.part)
        self.part, self.rows, self.img, self.txt = self.part + 1, [], [], []


def embed_shards(clip, paths: list[Path], out: Path, *, batch_size: int, shard_size: int, num_workers: int,
                 min_similarity: Optional[float], token_dtype: str, rewrites: int = 0, seed: int = 0,
                 total: Optional[int] = None, prefix: str = "", retrieval_part: int = 0) -> dict:
    """Write embedding shards for ``paths`` into ``out`` (names ``{prefix}00000.tar``..., the
    retrieval files from number ``retrieval_part``); returns counts, similarity figures and
    ``files``, what it wrote. ``rewrites``: how many of each train caption's language rewrites
    (drawn with CLIP's ``seed``) are embedded beside it."""
    tally = embed_tally(clip, paths, out, batch_size=batch_size, shard_size=shard_size, num_workers=num_workers,
                        min_similarity=min_similarity, token_dtype=token_dtype, rewrites=rewrites, seed=seed,
                        total=total, prefix=prefix, retrieval_part=retrieval_part)
    return summarize(tally, min_similarity)


def rewrite_members(clip, batch: dict, dtype: torch.dtype) -> dict[int, dict]:
    """{index in the batch: its ``rw_*.npy`` members} for the batch's rewritten train items."""
    if "rw_items" not in batch:
        return {}
    k = len(batch["rw_tokens"]) // len(batch["rw_items"])
    with torch.no_grad():
        z_t, enc, mask = clip.encode_text(batch["rw_tokens"].to(next(clip.model.parameters()).device))
    z_t, enc, mask = (t.cpu().view(len(batch["rw_items"]), k, *t.shape[1:]) for t in (z_t.float(), enc.float(), mask))
    emb, tok, msk = npy_rows(z_t.numpy()), npy_rows(enc.to(dtype).numpy()), npy_rows(mask.numpy())
    return {j: {"rw_emb.npy": emb[i], "rw_tokens.npy": tok[i], "rw_mask.npy": msk[i]}
            for i, j in enumerate(batch["rw_items"])}


def embed_tally(clip, paths: list[Path], out: Path, *, batch_size: int, shard_size: int, num_workers: int,
                min_similarity: Optional[float], token_dtype: str, rewrites: int = 0, seed: int = 0,
                total: Optional[int] = None, prefix: str = "", retrieval_part: int = 0) -> dict:
    """:func:`embed_shards`' work: the raw tallies (counts, every cosine by truth, files) that
    :func:`summarize` turns into figures, and that the Spark engine adds up across tasks."""
    dtype = torch.float16 if token_dtype == "float16" else torch.float32     # torch casts with SIMD; numpy does not
    retrieval = RetrievalWriter(out, retrieval_part)
    kept = dropped = 0
    sims: dict[str, list[float]] = {"matched": [], "mismatched": [], "unknown": []}
    dropped_mismatched = cut = rewritten = 0
    split_in: dict[str, int] = {}
    split_kept: dict[str, int] = {}
    bar = progress(total=total, desc="embed", unit="img")
    t0 = time.perf_counter()
    with ShardSink(out, shard_size, prefix) as sink:
        for batch in batches(paths, clip.tokenize, clip.image_size, batch_size, num_workers, rewrites, seed):
            z_i, z_t, enc, mask = encode_batch(clip, batch["images"], batch["tokens"])
            rw = rewrite_members(clip, batch, dtype)
            cut += sum(truncated(clip.tokenize, [it["txt"] for it in batch["items"]], batch["tokens"]))
            # Per-sample values as Python floats and numpy rows: indexing torch tensors costs ~us each.
            cos = (z_i * z_t).sum(-1).tolist()
            z_i, z_t = z_i.numpy(), z_t.numpy()
            img_npy, txt_npy = npy_rows(z_i), npy_rows(z_t)
            tok_npy, mask_npy = npy_rows(enc.to(dtype).numpy()), npy_rows(mask.numpy())
            for j, it in enumerate(batch["items"]):
                gt = it["gt"]
                truth = "unknown" if not gt else "mismatched" if gt.get("mismatched") else "matched"
                sims[truth].append(cos[j])
                split_in[it["split"]] = split_in.get(it["split"], 0) + 1
                if min_similarity is not None and cos[j] < min_similarity:
                    dropped += 1
                    dropped_mismatched += truth == "mismatched"
                    continue
                sink.write({"__key__": it["key"], "jpg": it["jpg"], "txt": it["txt"].encode(),
                            "json": meta_json(it["key"], it["split"], it["gt_text"], cos[j], it.get("rewrites")),
                            "img_emb.npy": img_npy[j], "txt_emb.npy": txt_npy[j],
                            "txt_tokens.npy": tok_npy[j], "txt_mask.npy": mask_npy[j], **rw.get(j, {})})
                rewritten += j in rw
                retrieval.add(z_i[j], z_t[j], {"key": it["key"], "caption": it["txt"], "split": it["split"]})
                kept += 1
                split_kept[it["split"]] = split_kept.get(it["split"], 0) + 1
                if kept % shard_size == 0:
                    retrieval.flush()     # keep the npy parts aligned with the tar shards
            bar.update(len(batch["items"]))
    retrieval.flush()
    bar.close()
    return {"kept": kept, "dropped": dropped, "dropped_mismatched": dropped_mismatched, "cut": cut,
            "rewritten": rewritten, "split_in": split_in, "split_kept": split_kept, "sims": sims,
            "seconds": time.perf_counter() - t0,
            "files": [f"{prefix}{i:05d}.tar" for i in range(sink.shards)] + retrieval.written}


def merge_tallies(tallies: list[dict]) -> dict:
    """The tallies of disjoint groups of shards as one (sums; cosines concatenated in order)."""
    out = {"kept": 0, "dropped": 0, "dropped_mismatched": 0, "cut": 0, "rewritten": 0, "split_in": {},
           "split_kept": {}, "sims": {"matched": [], "mismatched": [], "unknown": []}, "seconds": 0.0, "files": []}
    for t in tallies:
        for k in ("kept", "dropped", "dropped_mismatched", "cut", "rewritten", "seconds"):
            out[k] += t[k]
        for k in ("split_in", "split_kept"):
            for split, n in t[k].items():
                out[k][split] = out[k].get(split, 0) + n
        for k, v in t["sims"].items():
            out["sims"][k] += v
        out["files"] += t["files"]
    return out


def summarize(tally: dict, min_similarity: Optional[float], seconds: Optional[float] = None) -> dict:
    """The stage's figures from a tally (``seconds``: the wall time, when not the tally's own)."""
    kept, dropped, sims, split_in, split_kept = (tally[k] for k in ("kept", "dropped", "sims", "split_in",
                                                                   "split_kept"))
    dropped_mismatched = tally["dropped_mismatched"]
    seconds = seconds if seconds is not None else tally["seconds"]
    n_mis = len(sims["mismatched"])
    out_figs = {"input": kept + dropped, "kept": kept, "dropped_low_similarity": dropped,
                "images_per_s": round((kept + dropped) / seconds, 1), "seconds": round(seconds, 2),
                # captions longer than CLIP's context: their tokens are cut there (open_clip's rule)
                "captions_truncated": tally["cut"],
                # train samples embedded with their language rewrites (the prior and the decoder draw among them)
                "rewritten": tally["rewritten"],
                "kept_by_split": {k: {"input": n, "kept": split_kept.get(k, 0)} for k, n in sorted(split_in.items())},
                "similarity": {k: {"n": len(v), "mean": round(float(np.mean(v)), 4)} for k, v in sims.items() if v},
                "files": tally["files"]}
    if n_mis and min_similarity is not None:
        out_figs["mismatch_filter"] = {
            "threshold": min_similarity, "mismatched_total": n_mis, "dropped_mismatched": dropped_mismatched,
            "precision": round(dropped_mismatched / dropped, 4) if dropped else None,
            "recall": round(dropped_mismatched / n_mis, 4)}
    if sims["matched"] and n_mis:
        # How separable the two populations are, whatever the threshold: AUROC.
        m, x = np.array(sims["matched"]), np.array(sims["mismatched"])
        ranks = pd.Series(np.concatenate([m, x])).rank().to_numpy()
        out_figs["mismatch_auroc"] = round(float((ranks[:len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(x))), 4)
    return out_figs


@functools.lru_cache(maxsize=2)
def _task_clip(clip_dir: str):
    """The CLIP, loaded once per Spark Python worker (workers are reused across tasks)."""
    return clip_model.load(Path(clip_dir), device_of())


def embed_group(job: dict) -> dict:
    """One Spark task: embed a disjoint group of filtered shards, each into ``<its name>.tar``
    and the retrieval triple numbered ``job["parts"][k]``, in ``job["out"]``; returns the tally.

    job: {clip, out, shards: [path], parts: [int], settings: embed_tally's keywords}. Each shard goes
    through a scratch folder of its own, so a retried task overwrites rather than adds.
    """
    single_thread(0)             # one torch thread per task: Spark runs a task per core
    clip = _task_clip(job["clip"])
    out = Path(job["out"])
    tallies = []
    for path, part in zip(job["shards"], job["parts"]):
        name = Path(path).name
        scratch = out / f".task-{Path(path).stem}"
        shutil.rmtree(scratch, ignore_errors=True)
        t = embed_tally(clip, [Path(path)], scratch, shard_size=1 << 62, num_workers=0, prefix="",
                        retrieval_part=part, **job["settings"])
        files = []
        for f in t["files"]:
            target = name if f.endswith(".tar") else f
            (out / target).parent.mkdir(parents=True, exist_ok=True)
            (scratch / f).replace(out / target)
            files.append(target)
        shutil.rmtree(scratch)
        tallies.append(t | {"files": files})
    return merge_tallies(tallies)


def embed_on_spark(spark, clip_dir: Path, paths: list[Path], out: Path, groups_per_task: int, settings: dict,
                   retrieval_part: int) -> dict:
    """The filtered shards in disjoint groups, a Spark task each (:func:`embed_group`); the
    figures and the list of files from the driver alone."""
    t0 = time.perf_counter()
    jobs = [{"clip": str(clip_dir), "out": str(out), "settings": settings,
             "shards": [str(p) for p in paths[i:i + groups_per_task]],
             "parts": list(range(retrieval_part + i, retrieval_part + i + len(paths[i:i + groups_per_task])))}
            for i in range(0, len(paths), groups_per_task)]
    tally = merge_tallies(cluster.map_items(spark, embed_group, jobs, desc="embed", unit="group"))
    return summarize(tally, settings["min_similarity"], seconds=time.perf_counter() - t0)




def embed_recipe(cfg, ws) -> str:
    """The embed config (bar the worker count), its code and the CLIP's weights: another CLIP
    is another embedding space, and every shard is embedded again."""
    section = {k: v for k, v in cfg.embed.model_dump(mode="json").items() if k != "num_workers"}
    if cfg.embed.rewrites:                  # the rewrites drawn are CLIP's, seeded by its seed
        section["rewrite_seed"] = cfg.clip.seed
    return incremental.recipe({"embed": section}, __name__, extra={"clip": bundle.clip_identity(ws.clip)["sha256"]})


def split_bias(kept_by_split: dict, max_gap: float = 0.05) -> str | None:
    """A warning when the similarity filter drops held-out pairs far more often than train pairs.

    The CLIP that scores similarity was trained on the train split, so its train pairs score
    higher than equally good held-out ones (on the corpus the drop rates agree: 4.5 % train, 4.2 %
    val, 5.2 % test, nearly all of them planted mismatches; on a 2,200-pair own-data list with
    no mismatches they were 0 % train and 24-26 % val/test). Then the held-out figures downstream
    are measured on the pairs CLIP found easy. ``kept_by_split``: {split: {input, kept}}."""
    def rate(k):
        d = kept_by_split.get(k) or {}
        return 1 - d["kept"] / d["input"] if d.get("input") else None
    train = rate("train")
    if train is None:
        return None
    gaps = {k: r for k in ("val", "test") if (r := rate(k)) is not None and r - train > max_gap}
    if not gaps:
        return None
    held = ", ".join(f"{r:.0%} of {k}" for k, r in gaps.items())
    return (f"embed.min_similarity dropped {held} pairs but {train:.0%} of train: the CLIP judging similarity "
            f"was trained on the train pairs, so the held-out figures are measured on the pairs it found easy; "
            f"on data without planted mismatches set embed.min_similarity lower, or null")


def embed_part(cfg, ws, paths: list[Path], out: Path, total: Optional[int], part: int, retrieval_part: int) -> dict:
    """This part's shards embedded into ``out``: in this process, or as Spark tasks over disjoint
    groups of shards (``cluster.engine: spark``); the figures, with the files written."""
    embed = cfg.embed
    if cfg.cluster.engine == "spark":
        with cluster.session(cfg.cluster) as spark:
            return embed_on_spark(spark, ws.clip, paths, out, cfg.cluster.groups_per_task,
                                  {"batch_size": embed.batch_size, "min_similarity": embed.min_similarity,
                                   "token_dtype": embed.token_dtype, "rewrites": embed.rewrites,
                                   "seed": cfg.clip.seed}, retrieval_part)
    clip = clip_model.load(ws.clip, device_of())
    return embed_shards(clip, paths, out, batch_size=embed.batch_size, shard_size=embed.shard_size,
                        num_workers=embed.num_workers, min_similarity=embed.min_similarity,
                        token_dtype=embed.token_dtype, rewrites=embed.rewrites, seed=cfg.clip.seed,
                        total=total, prefix=incremental.part_prefix(part), retrieval_part=retrieval_part)


def run(cfg, ws) -> dict:
    """Embed the filtered shards not embedded before (all of them the first time, or when the
    CLIP, the embed config or its code changed)."""
    embed = cfg.embed
    if not shard_names(ws.filtered):
        raise StageError(f"no shards in {ws.filtered}: run the filter stage first")
    rec = embed_recipe(cfg, ws)
    state, why = incremental.previous(ws.embeddings, rec, cfg.retrain.incremental_data)
    paths, inputs, changed = incremental.new_inputs(state, ws.filtered)
    if paths is None:
        state, why, paths = None, changed or why, shard_paths(ws.filtered)
    part = incremental.next_part(state)
    say("embed", f"{len(paths)} new filtered shard(s) of {len(inputs)}" + (f"; {why}" if why else ""))
    if state is not None and not paths:
        say("embed", f"nothing new to embed: {ws.embeddings.relative_to(ws.root)}/ is kept as it is")
        return {"input": 0, "kept": 0, "dropped_low_similarity": 0, "shards": len(shard_names(ws.embeddings)),
                "totals": state["totals"], "incremental": {"part": None, "new_filtered_shards": 0, "why": why}}

    filter_metrics = ws.metrics_path("filter")
    total = json.loads(filter_metrics.read_text()).get("kept") if filter_metrics.exists() else None
    # The clip-retrieval files are numbered on from the earlier parts' (one triple per shard).
    retrieval_part = len(retrieval_files(ws.embeddings)) if state else 0
    try:
        with storage.stage_output(cfg.cluster.storage, ws, ws.embeddings) as out:
            if state is not None:
                incremental.link_outputs(state, ws.embeddings, out)
            figures = embed_part(cfg, ws, paths, out, total, part, retrieval_part)
            before = state["totals"] if state else {"input": 0, "kept": 0}
            totals = {"input": before["input"] + figures["input"], "kept": before["kept"] + figures["kept"],
                      "parts": part + 1}
            incremental.write_state(out, {
                "recipe": rec, "inputs": inputs, "totals": totals,
                "parts": [*(state["parts"] if state else []),
                          {"part": part, "filtered_shards": [p.name for p in paths], "kept": figures["kept"],
                           "outputs": figures.pop("files")}]})
            lost = [k for k in ("val", "test") if state is None and figures["kept_by_split"].get(k, {}).get("input")
                    and not figures["kept_by_split"][k]["kept"]]
            if lost:         # the stages after would stop on an empty split; say which knob did it
                raise StageError(f"embed.min_similarity {embed.min_similarity} dropped every {' and '.join(lost)} pair "
                                 f"({figures['kept_by_split']}); the threshold suits the CLIP it was chosen for: "
                                 f"on your own data set it lower, or null to keep every pair")
    except ShardError as err:
        raise StageError(str(err)) from None
    bias = split_bias(figures["kept_by_split"])
    if bias:
        figures["warnings"] = [bias]
        say("embed", f"warning: {bias}")
    figures.update(shards=len(shard_names(ws.embeddings)), totals=totals,
                   incremental={"part": part, "new_filtered_shards": len(paths), "why": why})
    tracking.log_metrics({"images_per_s": figures["images_per_s"]})
    say("embed", f"{figures['kept']} samples ({figures['dropped_low_similarity']} dropped below similarity "
                 f"{embed.min_similarity}) at {figures['images_per_s']} img/s -> "
                 f"{ws.embeddings.relative_to(ws.root)}/ ({figures['shards']} shards + img_emb/ text_emb/ metadata/)")
    return figures
