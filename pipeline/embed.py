"""The `embed` stage: the frozen CLIP over the filtered shards, once, for every later stage.

Per sample, the output shards (``data/embeddings/NNNNN.tar``) hold::

    jpg            the image bytes, unchanged
    txt            the caption
    json           key, split, ground truth, image-text cosine
    img_emb.npy    z_i, float32 [D], unit norm       (the prior's target, the decoder's condition)
    txt_emb.npy    z_t, float32 [D], unit norm       (the prior's condition)
    txt_tokens.npy per-token text encodings, [L, W] in ``embed.token_dtype``
    txt_mask.npy   bool [L], True for real tokens (start .. end-of-text)

Beside them, the clip-retrieval layout that embedding-reader and other unCLIP trainers read:
``img_emb/img_emb_N.npy`` and ``text_emb/text_emb_N.npy`` (float16 [n, D], row-aligned with)
``metadata/metadata_N.parquet`` (key, caption, split), one triple per output shard.

With ``embed.min_similarity`` set, pairs whose cos(z_i, z_t) falls below it are dropped and
counted; on the embedded corpus the drop is scored against the known mismatched captions.
"""
from __future__ import annotations

import functools
import io
import json
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd
import torch

from . import tracking
from .clip import model as clip_model
from .clip.data import decode_images, single_thread
from .data.shards import ShardError, ShardSink, iter_samples, sample_meta, shard_paths, split_of
from .progress import progress, say
from .stages import StageError
from .workspace import atomic_dir


@functools.lru_cache(maxsize=64)
def _npy_header(dtype: str, shape: tuple) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    """``np.save`` output, with the header cached per (dtype, shape): 4 arrays per sample add up."""
    arr = np.ascontiguousarray(arr)
    return _npy_header(np.lib.format.dtype_to_descr(arr.dtype), arr.shape) + arr.tobytes()


class ShardBatches(torch.utils.data.IterableDataset):
    """Decoded, tokenised batches of whole shards; DataLoader workers take disjoint shards."""

    def __init__(self, paths: list[Path], tokenize, image_size: int, batch_size: int):
        self.paths, self.tokenize, self.image_size, self.batch_size = paths, tokenize, image_size, batch_size

    def collate(self, samples: list[dict]) -> dict:
        items = [{"key": s["__key__"], "jpg": s["jpg"], "txt": s["txt"].decode("utf-8"), "meta": sample_meta(s)}
                 for s in samples]
        return {"items": items, "images": decode_images([it["jpg"] for it in items], self.image_size),
                "tokens": self.tokenize([it["txt"] for it in items])}

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


def batches(paths: list[Path], tokenize, image_size: int, batch_size: int, num_workers: int) -> Iterator[dict]:
    """Batches in shard order (with workers: interleaved by shard; outputs are keyed, so the
    order does not matter). On the 2-core CPU machines in-process is fastest (bench/embed.py):
    a worker competes with the model's threads."""
    ds = ShardBatches(paths, tokenize, image_size, batch_size)
    if num_workers == 0:
        yield from ds
        return
    yield from torch.utils.data.DataLoader(ds, batch_size=None, num_workers=min(num_workers, len(paths)),
                                           worker_init_fn=single_thread, collate_fn=_as_is)


def _as_is(batch):
    # Batches are already collated; DataLoader's default_convert would walk every item again.
    return batch


@torch.no_grad()
def encode_batch(bundle, images: torch.Tensor, tokens: torch.Tensor):
    """(z_i [B,D], z_t [B,D], token encodings [B,L,W], mask [B,L]) on CPU."""
    device = next(bundle.model.parameters()).device
    z_i = bundle.encode_image(images.to(device))
    z_t, enc, mask = bundle.encode_text(tokens.to(device))
    return z_i.float().cpu(), z_t.float().cpu(), enc.float().cpu(), mask.cpu()


class RetrievalWriter:
    """clip-retrieval's embedding folders, one .npy/.parquet triple per ``flush``."""

    def __init__(self, root: Path):
        self.root = root
        for sub in ("img_emb", "text_emb", "metadata"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.part, self.rows, self.img, self.txt = 0, [], [], []

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
        self.part, self.rows, self.img, self.txt = self.part + 1, [], [], []


def embed_shards(bundle, paths: list[Path], out: Path, *, batch_size: int, shard_size: int, num_workers: int,
                 min_similarity: Optional[float], token_dtype: str, total: Optional[int] = None) -> dict:
    """Write embedding shards for ``paths`` into ``out``; returns counts and similarity figures."""
    dtype = np.float16 if token_dtype == "float16" else np.float32
    retrieval = RetrievalWriter(out)
    kept = dropped = 0
    sims: dict[str, list[float]] = {"matched": [], "mismatched": [], "unknown": []}
    dropped_mismatched = 0
    bar = progress(total=total, desc="embed", unit="img")
    t0 = time.perf_counter()
    with ShardSink(out, shard_size) as sink:
        for batch in batches(paths, bundle.tokenize, bundle.image_size, batch_size, num_workers):
            z_i, z_t, enc, mask = encode_batch(bundle, batch["images"], batch["tokens"])
            cos = (z_i * z_t).sum(-1)
            z_i, z_t, enc, mask = z_i.numpy(), z_t.numpy(), enc.numpy().astype(dtype), mask.numpy()
            for j, it in enumerate(batch["items"]):
                gt = it["meta"].get("gt")
                truth = "unknown" if not gt else "mismatched" if gt.get("mismatched") else "matched"
                sims[truth].append(float(cos[j]))
                if min_similarity is not None and cos[j] < min_similarity:
                    dropped += 1
                    dropped_mismatched += truth == "mismatched"
                    continue
                meta = {"key": it["key"], "split": split_of(it["meta"]), "gt": gt,
                        "similarity": round(float(cos[j]), 5)}
                sink.write({"__key__": it["key"], "jpg": it["jpg"], "txt": it["txt"].encode(),
                            "json": json.dumps(meta).encode(), "img_emb.npy": npy_bytes(z_i[j]),
                            "txt_emb.npy": npy_bytes(z_t[j]), "txt_tokens.npy": npy_bytes(enc[j]),
                            "txt_mask.npy": npy_bytes(mask[j])})
                retrieval.add(z_i[j], z_t[j], {"key": it["key"], "caption": it["txt"], "split": meta["split"]})
                kept += 1
                if kept % shard_size == 0:
                    retrieval.flush()     # keep the npy parts aligned with the tar shards
            bar.update(len(batch["items"]))
    retrieval.flush()
    bar.close()
    seconds = time.perf_counter() - t0
    n_mis = len(sims["mismatched"])
    out_figs = {"input": kept + dropped, "kept": kept, "dropped_low_similarity": dropped,
                "images_per_s": round((kept + dropped) / seconds, 1), "seconds": round(seconds, 2),
                "similarity": {k: {"n": len(v), "mean": round(float(np.mean(v)), 4)} for k, v in sims.items() if v}}
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


def run(cfg, ws) -> dict:
    e = cfg.embed
    paths = shard_paths(ws.filtered)
    if not paths:
        raise StageError(f"no shards in {ws.filtered}: run the filter stage first")
    bundle = clip_model.load(ws.clip, clip_model.device_of())
    filter_metrics = ws.metrics_path("filter")
    total = json.loads(filter_metrics.read_text()).get("kept") if filter_metrics.exists() else None
    try:
        with atomic_dir(ws.embeddings) as out:
            figures = embed_shards(bundle, paths, out, batch_size=e.batch_size, shard_size=e.shard_size,
                                   num_workers=e.num_workers, min_similarity=e.min_similarity,
                                   token_dtype=e.token_dtype, total=total)
    except ShardError as err:
        raise StageError(str(err)) from None
    figures["shards"] = len(shard_paths(ws.embeddings))
    tracking.log_metrics({"images_per_s": figures["images_per_s"]})
    say("embed", f"{figures['kept']} samples ({figures['dropped_low_similarity']} dropped below similarity "
                 f"{e.min_similarity}) at {figures['images_per_s']} img/s -> "
                 f"{ws.embeddings.relative_to(ws.root)}/ ({figures['shards']} shards + img_emb/ text_emb/ metadata/)")
    return figures
