"""The `crawl` stage: a URL list -> WebDataset shards of verified images, with every failure counted.

The URL list is the embedded corpus (``data/corpus/pairs.parquet``, served over loopback HTTP by
:mod:`pipeline.data.server`, faults included) or a user's parquet/CSV (``crawl.url_list``) with
``url`` and ``caption`` columns (a relative path is relative to the workspace). A user's list is
split by its ``split`` column where a row has one, else by a stable hash of the row's key (or URL)
with ``crawl.split``'s fractions (:func:`hash_split`). img2dataset does the downloading,
in-process; a plain RGB JPEG is kept byte for byte, any other image (PNG with alpha or a palette,
WebP, GIF, grayscale/CMYK or EXIF-rotated JPEG) is made an upright RGB JPEG, transparency
composited onto ``crawl.background`` (:class:`NormalizingResizer`). Then a verification pass
decodes every image strictly with PIL, the decoder of the stages downstream: img2dataset judges
images with OpenCV, whose tolerance of damaged JPEGs depends on its build (older ones decode a
truncated file with a warning), and with ``skip_reencode`` it keeps the bytes exactly as downloaded.

Output (``data/raw/``)::

    00000.tar, ...        samples in URL-list order: jpg, txt (caption), json (img2dataset's
                          metadata: url, caption, width, height, sha256, ...; plus url_index and
                          the list's key, split, gt where it has them). ``__key__`` (= json key)
                          is the list's key if it has one (img2dataset's is then kept as
                          crawl_key), else img2dataset's
    crawl_log.parquet     one row per URL: url_index, key, url, status, reason, error_message,
                          part, attempts (how many crawls have tried it)
    img2dataset/          img2dataset's own per-shard parquet and stats json, as it wrote them
                          (its shard numbering, before verification: the log is authoritative)
    incremental.json      the parts crawled so far (pipeline/data/incremental.py)

Incremental: a rerun crawls only the URLs its log has not seen (a URL list that grew, a new file
in a ``url_list`` folder, ``corpus.additions``) into part k's shards ``partNNN-00000.tar``...,
links the earlier shards into the new output unchanged, and appends to the log (column ``part``).
A URL that failed transiently (timeout, 5xx, other: :data:`TRANSIENT`) is tried again by the next
crawl, up to ``crawl.max_attempts`` crawls; its log row is replaced by the latest attempt's. A crawl
in which img2dataset lost URLs (a download shard that failed: no record) fails as a whole.

With ``cluster.engine: spark`` img2dataset runs its ``pyspark`` distributor on the stage's
SparkSession (one Spark task per download shard; a failed shard is retried), and the per-URL work
after it is Spark's (:mod:`pipeline.data.crawl_spark`): the incremental diff an anti-join with
the earlier log, the verification's decoding a task per downloaded shard, the copy into URL-list
order a task per output shard, the log joins of img2dataset's records, the drops and the written
keys. The shards are the same bytes and the log the same rows as the local engine's; where the
work ran is the only difference (tests/test_cluster.py).

Every URL is fetched under :mod:`pipeline.data.fetch`'s rules (http/https to public hosts, redirects
checked, a byte cap and a deadline per URL, X-Robots-Tag opt-outs) and every image's size is judged
from its header before anything decodes it (:class:`NormalizingResizer`); see SECURITY.md.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from .. import cluster, storage
from . import incremental
from ..progress import progress, say
from ..errors import StageError
from ..tracking import redact_urls_in
from . import fetch
from .server import serve_corpus
from .crawl_records import (ERROR_RULES, INDEX, KEPT_COLUMNS, LOG_COLUMNS, NO_RECORD,  # noqa: F401 -- the stage's names
                            OTHER_MESSAGES_SHOWN, REASONS, SOURCE_KEY, TRANSIENT, classify, decode_error,
                            decode_errors, log_rows, lost_message, write_sample)
from .shards import ShardSink, iter_shard, key_problem, shard_names, shard_paths

# ---- the URL list -------------------------------------------------------------------------------
def read_url_list(cfg, ws) -> tuple[pd.DataFrame, Optional[pd.Series]]:
    """(urls, faults): ``urls`` holds url, caption, url_index, split and the columns worth
    keeping; ``faults`` is the corpus's fault kind per row (None for a user's list)."""
    if cfg.crawl.url_list is None:
        path = ws.corpus / "pairs.parquet"
        if not path.exists():
            raise StageError(f"{path} not found (run the corpus stage first)")
        table = pd.read_parquet(path)
        return _url_frame(table, path), table["fault"]
    path = Path(cfg.crawl.url_list)
    path = path if path.is_absolute() else ws.root / path
    if not path.exists():
        raise StageError(f"crawl.url_list: {path}: no such file or directory")
    if path.is_dir():
        # A folder of lists: new pairs arrive as a new file (named to sort after the earlier ones).
        files = sorted(p for p in path.iterdir() if p.name.endswith(LIST_SUFFIXES))
        if not files:
            raise StageError(f"crawl.url_list: {path}: the folder holds no .parquet or .csv URL list")
        table = pd.concat([_read_list(p) for p in files], ignore_index=True)
    else:
        table = _read_list(path)
    missing = [c for c in ("url", "caption") if c not in table.columns]
    if missing:
        raise StageError(f"crawl.url_list: {path} has no column {', '.join(map(repr, missing))} "
                         f"(a URL list needs 'url' and 'caption'; it has {', '.join(map(str, table.columns))})")
    no_url = table["url"].isna() | (table["url"].astype(str).str.strip() == "")
    if no_url.any():
        raise StageError(f"crawl.url_list: {path}: {int(no_url.sum())} row(s) have no url "
                         f"(the first is row {int(np.flatnonzero(no_url.values)[0])})")
    # A missing caption is an empty one (the filter drops and counts it), never the text "nan".
    table = table.assign(caption=table["caption"].fillna("").astype(str))
    return _url_frame(table.assign(split=list_splits(table, path, cfg.crawl.split)), path), None


LIST_SUFFIXES = (".parquet", ".csv", ".csv.gz")
SPLITS = ("train", "val", "test")


def hash_split(ids: pd.Series, fractions) -> np.ndarray:
    """train / val / test per id (a row's key, else its URL) by a stable hash: u = the first 8
    bytes of sha256(id) / 2^64 is test below ``fractions.test``, val below test + val, else train.
    The same id gets the same split in any list, in any order, however the list grows."""
    u = np.array([int.from_bytes(hashlib.sha256(str(i).encode("utf-8")).digest()[:8], "big") / 2 ** 64
                  for i in ids])
    return np.where(u < fractions.test, "test", np.where(u < fractions.test + fractions.val, "val", "train"))


def list_splits(table: pd.DataFrame, path: Path, fractions) -> np.ndarray:
    """A user's list's split per row: its ``split`` column where the row has one, else
    :func:`hash_split` of its key (or URL) with ``crawl.split``'s fractions."""
    ids = table["key"].astype(str) if "key" in table.columns else table["url"].astype(str)
    hashed = hash_split(ids, fractions)
    if "split" not in table.columns:
        return hashed
    given = table["split"].astype("string").str.strip()
    present = given.notna() & (given != "")
    bad = given[present & ~given.isin(SPLITS)]
    if len(bad):
        raise StageError(f"crawl.url_list: {path}: column 'split' holds {bad.iloc[0]!r} ({len(bad)} row(s)); "
                         f"expected one of {', '.join(SPLITS)}, or empty for a split by hash")
    return np.where(present.fillna(False).to_numpy(bool), given.fillna("").to_numpy(str), hashed)


def _read_list(path: Path) -> pd.DataFrame:
    if path.name.endswith(".parquet"):
        return pd.read_parquet(path)
    if path.name.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path, dtype={"key": str})        # keys like "000123" must stay strings
    raise StageError(f"crawl.url_list: {path}: expected a .parquet or .csv file (or a folder of them)")


def _url_frame(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    if table.empty:
        raise StageError(f"{path}: the URL list is empty")
    urls = pd.DataFrame({"url": table["url"], "caption": table["caption"], INDEX: np.arange(len(table))})
    for col in KEPT_COLUMNS:
        if col in table.columns:
            urls[col] = table[col]
    if "key" in table.columns:
        keys = table["key"].astype(str)
        # The key becomes the WebDataset __key__ and the stem of every tar member name of the
        # sample, in every stage (shards.key_problem: no '.', '/', NUL or control characters,
        # short enough for the longest member name the embed stage writes).
        dup = keys[keys.duplicated()]
        if len(dup):
            raise StageError(f"{path}: column 'key' must be unique ({len(dup)} repeated, e.g. {dup.iloc[0]!r})")
        for row, key in enumerate(keys):
            why = key_problem(key)
            if why:
                raise StageError(f"{path}: column 'key', row {row}: {key[:40]!r}{'...' if len(key) > 40 else ''} "
                                 f"is not a usable sample key: {why}")
        urls[SOURCE_KEY] = keys.values
    return urls


# ---- img2dataset --------------------------------------------------------------------------------
JPEG_QUALITY = 95     # of a converted image (img2dataset's own default)


def is_plain_jpeg(im: Image.Image) -> bool:
    """An RGB JPEG without an EXIF rotation: what the stages downstream read as it is."""
    return im.format == "JPEG" and im.mode == "RGB" and im.getexif().get(ORIENTATION, 1) == 1


ORIENTATION = 0x0112


def to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """An image as the pipeline reads it: the first frame (animated GIF/WebP), turned upright by
    its EXIF orientation, transparency (RGBA, LA, PA, palette or RGB with a transparent color)
    composited onto ``background``, grayscale/CMYK converted: RGB."""
    im.seek(0)
    im = ImageOps.exif_transpose(im)        # also loads the pixels: a truncated file fails here
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


class NormalizingResizer:
    """img2dataset's Resizer for plain RGB JPEGs (kept byte for byte); every other image is made
    one here, so the raw shards hold only RGB JPEGs (:func:`to_rgb`; PNG, WebP, GIF, grayscale
    and CMYK JPEG, EXIF-rotated JPEG), with the Resizer's size rules and messages.

    Also splits img2dataset's "Image decoding error" in two: OpenCV (4.14 here) refuses a
    truncated JPEG outright, so img2dataset reports the same error for an HTML error page and
    for a damaged image. Bytes that PIL identifies as an image format (from the header alone)
    are a corrupt image, not a non-image. Built by img2dataset in place of its Resizer (see
    ``download``) and pickled to its spawned workers.
    """

    def __init__(self, background=(255, 255, 255), **kwargs):
        from img2dataset.resizer import Resizer
        self.resizer = Resizer(**kwargs)
        self.background = tuple(int(c) for c in background)

    def __setstate__(self, state):
        # Unpickled in img2dataset's worker: PIL's own cap there is the crawl's (a decode that
        # gets past the header check below still stops at 2 x max_image_area, as PIL's
        # DecompressionBombError). OpenCV's is set by ``download`` through the environment.
        self.__dict__.update(state)
        Image.MAX_IMAGE_PIXELS = self.resizer.max_image_area

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        data = img_stream.read()
        img_stream.seek(0)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            return None, None, None, None, None, "image area too large"
        except Exception:  # noqa: BLE001 -- unidentifiable: img2dataset's path says so
            im = None
        if im is not None and not is_plain_jpeg(im):
            return self.convert(im)
        if im is not None:
            # The size from the header, before OpenCV decodes the whole image (img2dataset's
            # Resizer checks max_image_area only after decoding: a small file that declares a
            # huge image would cost gigabytes first).
            refused = self.size_refusal(*im.size)
            if refused:
                return (None,) * 5 + (refused,)
        return self.diagnose(img_stream, blurring_bbox_list)

    def size_refusal(self, w: int, h: int) -> Optional[str]:
        """img2dataset's size messages, judged on the header's size."""
        if min(w, h) < self.resizer.min_image_size:
            return "image too small"
        if w * h > self.resizer.max_image_area:
            return "image area too large"
        return None

    def convert(self, im: Image.Image):
        """(JPEG bytes, width, height, original width, original height, None), or img2dataset's
        tuple of Nones with the reason."""
        fail = (None,) * 5
        w, h = im.size                                  # from the header: nothing decoded yet
        refused = self.size_refusal(w, h)
        if refused:
            return (*fail, refused)
        try:
            rgb = to_rgb(im, self.background)
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
        except Exception:  # noqa: BLE001 -- any failure to decode means the image is unusable
            return (*fail, f"Image decoding error: corrupt or truncated {im.format}")
        return buf.getvalue(), rgb.width, rgb.height, w, h, None

    def diagnose(self, img_stream, blurring_bbox_list=None):
        result = self.resizer(img_stream, blurring_bbox_list)
        if result[-1] == "Image decoding error":
            img_stream.seek(0)
            try:
                with Image.open(img_stream) as im:
                    result = (*result[:-1], f"Image decoding error: corrupt or truncated {im.format}")
            except Exception:  # noqa: BLE001 -- unidentifiable: not an image at all
                pass
        return result


def fetch_policy(cfg, corpus_origin: Optional[str] = None) -> fetch.FetchPolicy:
    """What the crawl may fetch (pipeline/data/fetch.py): ``corpus_origin`` is the embedded
    corpus's own loopback server (``http://127.0.0.1:PORT``), the one inside host always allowed."""
    crawl = cfg.crawl
    origins = frozenset()
    if corpus_origin:
        parts = urllib.parse.urlsplit(corpus_origin)
        origins = frozenset({(parts.hostname, parts.port)})
    return fetch.FetchPolicy(timeout_s=crawl.timeout_s, deadline_s=crawl.deadline_s, max_bytes=crawl.max_bytes,
                             allow_private_hosts=crawl.allow_private_hosts, allowed_origins=origins)


def download(urls_file: Path, output_folder: Path, cfg, columns: list[str],
             corpus_origin: Optional[str] = None, spark=None) -> None:
    """img2dataset in-process. It makes its own spawn pool (``crawl.processes`` downloaders with
    ``crawl.threads`` threads each) and a logger process, or with ``spark`` (a SparkSession) its
    pyspark distributor runs each download shard as a task of that session. Its downloads go
    through :mod:`pipeline.data.fetch` (``fetch_policy``), its images through :class:`NormalizingResizer`."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")   # albumentations phones home on import
    from img2dataset.logger import LoggerProcess
    # The module, not the package attribute: img2dataset/__init__ rebinds ``main`` to a function.
    i2d_main = importlib.import_module("img2dataset.main")

    crawl = cfg.crawl
    previous_sigint = signal.getsignal(signal.SIGINT)
    # download() builds its Resizer and Downloader from these module globals; swapped for the call only.
    resizer = functools.partial(NormalizingResizer, tuple(crawl.background))
    i2d_main.Resizer, original_resizer = resizer, i2d_main.Resizer
    downloader = functools.partial(fetch.guarded_downloader, fetch_policy(cfg, corpus_origin), i2d_main.Downloader)
    i2d_main.Downloader, original_downloader = downloader, i2d_main.Downloader
    # OpenCV reads its pixel cap once, when it loads: in the spawned workers, from this environment.
    previous_cv_cap = os.environ.get(CV_CAP)
    os.environ[CV_CAP] = str(crawl.max_image_area)
    try:
        i2d_main.download(
            url_list=str(urls_file), input_format="parquet", url_col="url", caption_col="caption",
            save_additional_columns=columns, output_folder=str(output_folder), output_format="webdataset",
            resize_mode="no", skip_reencode=True, encode_format="jpg",
            processes_count=crawl.processes, thread_count=crawl.threads, number_sample_per_shard=crawl.shard_size,
            timeout=crawl.timeout_s, retries=crawl.retries, max_image_area=crawl.max_image_area,
            min_image_size=crawl.min_image_size, enable_wandb=False,
            distributor="pyspark" if spark is not None else "multiprocessing",
            user_agent_token=fetch.USER_AGENT_TOKENS[0], disallowed_header_directives=list(fetch.DISALLOWED_DIRECTIVES),
            # Not "overwrite": in 1.47.0 it deletes the output folder *after* creating its _tmp
            # inside it, and every shard then fails on a missing file (retried for minutes).
            # The folder is always a fresh temp dir, where "incremental" has nothing to skip.
            incremental_mode="incremental")
    except SystemExit as err:
        # img2dataset's SIGINT handler calls sys.exit(0): an interrupted crawl would look like a
        # finished one to DVC. Report it as the interrupt it was.
        raise KeyboardInterrupt("crawl interrupted") from err
    except BaseException:
        # img2dataset starts its (non-daemon) logger process before reading the list and only
        # stops it on success; left running it would keep this process from ever exiting.
        for child in multiprocessing.active_children():
            if isinstance(child, LoggerProcess):
                child.terminate()
                child.join()
        raise
    finally:
        i2d_main.Resizer = original_resizer
        i2d_main.Downloader = original_downloader
        if previous_cv_cap is None:
            os.environ.pop(CV_CAP, None)
        else:
            os.environ[CV_CAP] = previous_cv_cap
        signal.signal(signal.SIGINT, previous_sigint)   # its handler outlives the call otherwise


CV_CAP = "OPENCV_IO_MAX_IMAGE_PIXELS"


# ---- verification -------------------------------------------------------------------------------
def verify_and_rewrite(src: Path, out: Path, shard_size: int, expected: int,
                       prefix: str = "") -> tuple[dict[int, str], dict[int, str]]:
    """Copy the samples of img2dataset's shards in ``src`` that decode strictly into ``out``.

    Returns ({url_index: key} written, {url_index: error} dropped). The decoding is a map over the
    shards (:func:`decode_errors`; crawl_spark.verify_and_rewrite makes the copy a map too). img2dataset
    writes a shard's samples in completion order; we sort each shard (its samples only, so memory
    stays bounded) back into URL-list order, so the output and the filter's "first copy wins" are
    reproducible, whoever downloaded and decoded them.
    """
    written: dict[int, str] = {}
    dropped: dict[int, str] = {}
    paths = shard_paths(src)
    errors = cluster.map_items(None, decode_errors, [str(p) for p in paths], desc="crawl: verify")
    with ShardSink(out, shard_size, prefix) as sink, \
            progress(total=expected, desc="crawl: copy", unit="img") as bar:
        for path, bad in zip(paths, errors):
            good = []
            for sample in iter_shard(path):
                meta = json.loads(sample["json"])
                if meta[INDEX] in bad:
                    dropped[meta[INDEX]] = bad[meta[INDEX]]
                else:
                    good.append((meta[INDEX], sample, meta))
                bar.update()
            for index, sample, meta in sorted(good, key=lambda t: t[0]):
                written[index] = write_sample(sink, sample, meta, prefix)
    return written, dropped


# ---- accounting ---------------------------------------------------------------------------------
def read_records(i2d: Path) -> pd.DataFrame:
    """img2dataset's per-URL records (one parquet per shard; none for a shard that failed)."""
    columns = [INDEX, "status", "error_message"]
    frames = [pd.read_parquet(p, columns=columns) for p in sorted(i2d.glob("*.parquet"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def crawl_log(urls: pd.DataFrame, records: pd.DataFrame, written: dict[int, str],
              dropped: dict[int, str]) -> pd.DataFrame:
    """One row per URL: status success/failed and, for failures, our reason and the raw message."""
    if not records[INDEX].is_unique:
        raise StageError("img2dataset recorded some URLs twice; cannot account for the crawl")
    rec = records.set_index(INDEX).reindex(urls[INDEX])
    keys = urls[SOURCE_KEY] if SOURCE_KEY in urls else pd.Series([None] * len(urls))
    log = log_rows(pd.DataFrame({
        INDEX: urls[INDEX].values, "key": keys.values, "url": urls["url"].values,
        "rec_status": rec["status"].values, "rec_message": rec["error_message"].values,
        "drop_error": [dropped.get(i) for i in urls[INDEX]], "written_key": [written.get(i) for i in urls[INDEX]]}))
    success = set(log.loc[log.status == "success", INDEX])
    if success != set(written):
        raise StageError(f"crawl does not reconcile: img2dataset reports {len(success)} successes, "
                         f"the verified shards hold {len(written)} samples "
                         f"({len(success ^ set(written))} differ)")
    return log


def retry_due(log: pd.DataFrame, max_attempts: int) -> set:
    """The URLs of ``log`` whose last attempt failed transiently (:data:`TRANSIENT`) and that
    have been tried fewer than ``max_attempts`` times."""
    due = (log["status"] == "failed") & log["reason"].isin(TRANSIENT) & (log["attempts"] < max_attempts)
    return set(log.loc[due, "url"])


TALLY = ("status", "reason", "fault", "split")     # the figures' group-by: rows per combination, n


def tally(log: pd.DataFrame, todo: pd.DataFrame, faults: Optional[pd.Series]) -> tuple[pd.DataFrame, dict]:
    """(rows of this part's log per status, reason, planted fault and split, column n; the most
    frequent "other" messages): what the figures read (crawl_spark.tally under Spark)."""
    none = [None] * len(log)
    frame = pd.DataFrame({"status": log["status"].values, "reason": log["reason"].values,
                          "fault": faults.loc[todo.index].values if faults is not None else none,
                          "split": todo["split"].values if "split" in todo else none})
    counts = frame.groupby(list(TALLY), dropna=False).size().reset_index(name="n")
    failed = log[log.status == "failed"]
    other = Counter(redact_urls_in(m) for m in failed.loc[failed.reason == "other", "error_message"])
    return counts, dict(other.most_common(OTHER_MESSAGES_SHOWN))


NO_TALLY = (pd.DataFrame(columns=[*TALLY, "n"]), {})


def failure_metrics(counts: pd.DataFrame, others: dict) -> dict:
    by_reason = counts[counts.status == "failed"].groupby("reason")["n"].sum()
    return {"failed_by_reason": {r: int(by_reason.get(r, 0)) for r in REASONS}, "other_messages": others}


def fault_metrics(counts: pd.DataFrame) -> dict:
    """The corpus's planted faults against what the crawl made of them (must never be 'kept')."""
    planted = counts[counts.fault.notna()]
    outcome = planted.assign(outcome=planted.reason.fillna("kept")).groupby(["fault", "outcome"])["n"].sum()
    table: dict[str, dict[str, int]] = {}
    for (kind, reason), n in outcome.items():          # sorted by kind, then reason
        if n:
            table.setdefault(kind, {})[reason] = int(n)
    return {"fault_urls_in_shards": int(planted.loc[planted.status == "success", "n"].sum()),
            "faults_by_kind_vs_reason": table}


# ---- the stage ----------------------------------------------------------------------------------
LOG = "crawl_log.parquet"


def crawl_recipe(cfg) -> str:
    """What makes crawled shards differ, beside the URLs: a change re-crawls everything. (Speed
    knobs, timeouts and the list's location do not: the diff by URL covers a new list.)"""
    crawl = cfg.crawl
    return incremental.recipe({"shard_size": crawl.shard_size, "max_image_area": crawl.max_image_area,
                               "min_image_size": crawl.min_image_size}, __name__)


def previous_crawl(cfg, ws, rec: str, spark=None):
    """(the earlier output's state, its log, why): the log as pandas, or under Spark a DataFrame
    the driver never reads (crawl_spark.previous_log); with ``attempts`` either way."""
    state, why = incremental.previous(ws.raw, rec, cfg.retrain.incremental_data, required=(LOG,))
    if state is None:
        return None, None, why
    if spark is not None:
        from . import crawl_spark
        return state, crawl_spark.previous_log(spark, ws.raw / LOG), why
    old_log = pd.read_parquet(ws.raw / LOG)
    if "attempts" not in old_log:
        old_log = old_log.assign(attempts=1)                         # a log from before retries
    return state, old_log, why


def crawl_part(cfg, ws, out: Path, urls: pd.DataFrame, faults: Optional[pd.Series], part: int,
               columns: list[str], spark=None) -> tuple[pd.DataFrame, int, dict, Path]:
    """img2dataset over ``urls``, verified into part ``part``'s shards in ``out``; returns the
    part's crawl log (pandas, or under Spark a DataFrame with fault and split columns), how many
    samples were written, timings, and the scratch folder, which :func:`keep_records` empties
    once the log is written (a Spark log is read from it until then)."""
    # The embedded corpus is served for the duration of the download, and not a moment longer.
    server = serve_corpus(ws.corpus, cfg.crawl.timeout_s) if faults is not None else contextlib.nullcontext()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    i2d = work / "img2dataset"
    with server as base_url:
        # Corpus URLs are relative to the server; the log keeps them so (the port is ephemeral).
        served = urls.assign(url=base_url + "/" + urls["url"]) if base_url else urls
        served.to_parquet(work / "urls.parquet", index=False)
        download(work / "urls.parquet", i2d, cfg, columns, corpus_origin=base_url, spark=spark)
    t_download = time.perf_counter()
    prefix = incremental.part_prefix(part)
    if spark is None:
        log, written = account(urls, i2d, out, cfg.crawl.shard_size, prefix)
    else:
        from . import crawl_spark
        crawl_spark.write_todo(urls, faults, work / "todo.parquet")
        written, dropped = crawl_spark.verify_and_rewrite(spark, i2d, out, work, cfg.crawl.shard_size, prefix)
        log = crawl_spark.crawl_log(spark, work, i2d, dropped, written)
    return log, written, {"download_s": round(t_download - t0, 2),
                          "verify_s": round(time.perf_counter() - t_download, 2)}, work


def account(urls: pd.DataFrame, i2d: Path, out: Path, shard_size: int, prefix: str) -> tuple[pd.DataFrame, int]:
    """The local engine's verification, copy and log: (this part's log, samples written)."""
    records = read_records(i2d)
    lost = len(urls) - int(urls[INDEX].isin(records[INDEX]).sum())
    if lost:
        raise StageError(lost_message(lost, len(urls)))
    written, dropped = verify_and_rewrite(i2d, out, shard_size, int((records.status == "success").sum()),
                                          prefix=prefix)
    return crawl_log(urls, records, written, dropped), len(written)


def keep_records(work: Path, out: Path, part: int) -> None:
    """img2dataset's records into ``img2dataset/`` (part 0) or ``img2dataset/partNNN/``; the
    scratch folder removed."""
    records_dir = out / "img2dataset" / (f"part{part:03d}" if part else "")
    records_dir.mkdir(parents=True, exist_ok=True)
    for p in [*(work / "img2dataset").glob("*.parquet"), *(work / "img2dataset").glob("*_stats.json")]:
        shutil.move(p, records_dir / p.name)
    shutil.rmtree(work)


def write_log(log, old_log, out: Path, part: int, spark=None) -> dict:
    """The whole log, ``out/crawl_log.parquet``: the earlier rows of URLs not fetched again, then
    this part's with their attempts; returns the totals. Nothing is written without a success."""
    if spark is not None:
        from . import crawl_spark
        urls, crawled = crawl_spark.write_full_log(spark, log, old_log, part, out / LOG)
    else:
        log["part"] = part
        earlier = {} if old_log is None else dict(zip(old_log["url"], old_log["attempts"]))
        log["attempts"] = [int(earlier.get(u, 0)) + 1 for u in log["url"]]
        full_log = log if old_log is None else pd.concat([old_log[~old_log["url"].isin(set(log["url"]))], log],
                                                         ignore_index=True)
        urls, crawled = len(full_log), int((full_log.status == "success").sum())
        if crawled:
            full_log.to_parquet(out / LOG, index=False)
    return {"urls": urls, "crawled": crawled, "parts": part + 1}


def part_metrics(attempted: int, written: int, figures: tuple[pd.DataFrame, dict], corpus: bool) -> dict:
    """This part's figures from its :func:`tally`, checked: every URL attempted is a success or
    a failure by reason, and (on the corpus) no planted fault URL was crawled as an image."""
    counts, others = figures
    metrics = {"attempted": attempted, "succeeded": written, "failed": attempted - written,
               **failure_metrics(counts, others)}
    if not corpus:      # a user's list: its split column, else crawl.split's hash (read_url_list)
        metrics["split_by_url"] = {k: int(counts.loc[counts.split == k, "n"].sum()) for k in SPLITS}
    if metrics["attempted"] != metrics["succeeded"] + sum(metrics["failed_by_reason"].values()):
        raise StageError(f"crawl counts do not reconcile: attempted {metrics['attempted']} != "
                         f"succeeded {metrics['succeeded']} + failed {metrics['failed_by_reason']}")
    if corpus:
        metrics.update(fault_metrics(counts))
        if metrics["fault_urls_in_shards"]:
            raise StageError(f"{metrics['fault_urls_in_shards']} fault URLs were crawled as images: "
                             f"{metrics['faults_by_kind_vs_reason']}")
    return metrics


def to_crawl(cfg, urls: pd.DataFrame, faults, old_log, spark=None) -> tuple[pd.DataFrame, int, int]:
    """(the URLs to fetch now, how many old rows are reused, how many are retried).

    A URL crawled before, or failed for good, is not fetched again: the diff is by URL, as a URL
    list's identity for img2dataset (whose own incremental mode only resumes shards of one list).
    A transient failure (retry_due) is fetched again, its log row replaced by the new attempt's.
    Under Spark an anti-join with the earlier log (crawl_spark.to_crawl)."""
    max_attempts = cfg.crawl.max_attempts if faults is None else 1    # the corpus's faults are planted
    if old_log is None:
        return urls, 0, 0
    if spark is not None:
        from . import crawl_spark
        return crawl_spark.to_crawl(spark, urls, old_log, max_attempts)
    retry = retry_due(old_log, max_attempts)
    todo = urls[~urls["url"].isin(set(old_log["url"]) - retry)]
    retried = len(retry & set(todo["url"]))
    return todo, len(old_log) - retried, retried


def run(cfg, ws) -> dict:
    """Crawl the URLs not crawled before (all of them the first time, or when the recipe changed)."""
    t0 = time.perf_counter()
    urls, faults = read_url_list(cfg, ws)
    # OpenCV reads its pixel cap when it loads: Spark's Python workers take it from executorEnv.
    spark_conf = {"spark.executorEnv." + CV_CAP: str(cfg.crawl.max_image_area),
                  "spark.executorEnv.NO_ALBUMENTATIONS_UPDATE": "1"}
    with cluster.session(cfg.cluster, extra_conf=spark_conf) as spark:
        rec = crawl_recipe(cfg)
        state, old_log, why = previous_crawl(cfg, ws, rec, spark)
        todo, reused, retried = to_crawl(cfg, urls, faults, old_log, spark)
        say("crawl", f"{len(todo) - retried} new URLs of {len(urls)}"
                     + (f", {retried} failed transiently before and tried again" if retried else "")
                     + (f"; {why}" if why else ""))
        if state is not None and todo.empty:
            say("crawl", f"nothing new to crawl: {ws.raw.relative_to(ws.root)}/ is kept as it is")
            return {"attempted": 0, "succeeded": 0, "failed": 0, **failure_metrics(*NO_TALLY),
                    "shards": len(shard_names(ws.raw)), "totals": state["totals"],
                    "incremental": {"part": None, "reused_urls": reused, "new_urls": 0, "why": why}}
        metrics = crawl_new(cfg, ws, urls, todo, faults, state, old_log, rec, spark)
    metrics["incremental"].update(reused_urls=reused, new_urls=len(todo) - retried, retried_urls=retried, why=why)
    # images_per_s: good images per second of the whole stage
    metrics["images_per_s"] = round(metrics["succeeded"] / (time.perf_counter() - t0), 1)
    failed = ", ".join(f"{r} {n}" for r, n in metrics["failed_by_reason"].items() if n) or "none"
    say("crawl", f"{metrics['succeeded']} of {metrics['attempted']} URLs crawled (failed: {failed}) -> "
                 f"{ws.raw.relative_to(ws.root)}/ ({metrics['shards']} shards; {LOG} lists every URL)")
    return metrics


def crawl_new(cfg, ws, urls: pd.DataFrame, todo: pd.DataFrame, faults, state: Optional[dict], old_log,
              rec: str, spark) -> dict:
    """Part k of ``data/raw``: ``todo`` crawled into new shards beside the earlier parts' (linked),
    the log, ``incremental.json``; replaced atomically. Returns the part's figures."""
    part = incremental.next_part(state)
    columns = [c for c in (INDEX, SOURCE_KEY, *KEPT_COLUMNS) if c in urls.columns]
    with storage.stage_output(cfg.cluster.storage, ws, ws.raw) as out:
        if state is not None:
            old_records = [str(p.relative_to(ws.raw)) for p in (ws.raw / "img2dataset").rglob("*") if p.is_file()]
            incremental.link_outputs(state, ws.raw, out, extra=old_records)
        log, written, times, work = crawl_part(cfg, ws, out, todo, faults, part, columns, spark=spark)
        if spark is not None:
            from . import crawl_spark
            figures = crawl_spark.tally(log)
        else:
            figures = tally(log, todo, faults)
        metrics = part_metrics(len(todo), written, figures, corpus=faults is not None)
        totals = write_log(log, old_log, out, part, spark)
        if not totals["crawled"]:
            raise StageError(f"no URL was crawled successfully (failures: {metrics['failed_by_reason']}; "
                             f"see the messages under other_messages: {metrics['other_messages']})")
        keep_records(work, out, part)
        incremental.write_state(out, {
            "recipe": rec, "totals": totals,
            "parts": [*(state["parts"] if state else []),
                      {"part": part, "urls": len(todo), "succeeded": written,
                       "outputs": incremental.part_outputs(out, part)}]})
        n_shards = len(shard_names(out))
    return {**metrics, "shards": n_shards, **times, "images_per_s": None,     # set by run
            "totals": totals, "incremental": {"part": part}}
