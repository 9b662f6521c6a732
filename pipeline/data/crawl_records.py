"""What the crawl makes of each URL, shared by its two engines (pipeline/data/crawl.py, the
stage; pipeline/data/crawl_spark.py, its Spark jobs): the failure reasons and their rules, the
strict decode check, a verified sample written under the key it keeps, a log row from a URL joined
to what became of it."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Optional

import pandas as pd
from PIL import Image, ImageFile

from ..tracking import redact_urls_in
from . import fetch
from .shards import ShardSink, iter_shard

REASONS = ("refused_url", "http_404", "http_5xx", "timeout", "not_an_image", "too_large", "opted_out", "too_small",
           "corrupt_image", "other")
# Failures the next crawl tries again (up to crawl.max_attempts): the same request may well work
# then. The others are answers about the URL or its image, which a retry would only repeat.
TRANSIENT = ("http_5xx", "timeout", "other")
# img2dataset's per-sample error_message -> our reason; first match wins, anything else is "other".
ERROR_RULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p, re.I), r) for p, r in (
    (re.escape(fetch.REFUSED), "refused_url"),        # pipeline/data/fetch.py: scheme, host, redirect
    (re.escape(fetch.TOO_LARGE), "too_large"),        # a body over crawl.max_bytes
    (r"HTTP Error 404\b", "http_404"),
    (r"HTTP Error 5\d\d\b", "http_5xx"),
    (r"timed out", "timeout"),
    (r"X-Robots-Tag", "opted_out"),
    (r"image area too large", "too_large"),
    (r"image too small", "too_small"),
    (r"corrupt or truncated", "corrupt_image"),      # NormalizingResizer's refinement, below
    (r"Image decoding error", "not_an_image"),
))
INDEX = "url_index"          # row number in the URL list: joins img2dataset's records to it
SOURCE_KEY = "source_key"    # the list's own key (img2dataset reserves the column name "key")
KEPT_COLUMNS = ("split", "gt")
NO_RECORD = "no record from img2dataset"
OTHER_MESSAGES_SHOWN = 20


def classify(message: Optional[str]) -> str:
    if message:
        for pattern, reason in ERROR_RULES:
            if pattern.search(message):
                return reason
    return "other"



# ---- verification -------------------------------------------------------------------------------
def decode_error(data: Optional[bytes]) -> Optional[str]:
    """Why ``data`` is not a fully decodable JPEG, or None. Strict: truncation is an error."""
    if not data:
        return "no image bytes"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                return f"not a JPEG ({im.format})"
            im.load()
    except Exception as err:  # noqa: BLE001 -- any failure to decode means the image is unusable
        return f"{type(err).__name__}: {err}"
    return None


def decode_errors(path) -> dict[int, str]:
    """{url_index: error} of the samples of one downloaded shard that do not decode strictly:
    the verification's costly part, a map over shards (a Spark task each under ``engine: spark``)."""
    errors: dict[int, str] = {}
    strict, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        for sample in iter_shard(Path(path)):
            error = decode_error(sample.get("jpg"))
            if error:
                errors[json.loads(sample["json"])[INDEX]] = error
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = strict
    return errors


def write_sample(sink: ShardSink, sample: dict, meta: dict, prefix: str) -> str:
    """One verified sample of img2dataset's into ``sink`` under the key it keeps; returns the key."""
    if SOURCE_KEY in meta:
        meta["crawl_key"], meta["key"] = meta["key"], meta.pop(SOURCE_KEY)
    else:
        # img2dataset's keys restart at 000000000 in every crawl: a later part's
        # are made unique by its prefix (part 0 keeps them as they were).
        meta["key"] = prefix + meta["key"]
    sink.write({"__key__": meta["key"], "jpg": sample["jpg"], "txt": sample["txt"],
                "json": json.dumps(meta).encode()})
    return meta["key"]



# ---- the log ------------------------------------------------------------------------------------
LOG_COLUMNS = (INDEX, "key", "url", "status", "reason", "error_message")


def log_rows(joined: pd.DataFrame) -> pd.DataFrame:
    """The log's rows from each URL joined to what became of it: ``joined`` holds url_index, key
    (the list's, or None), url, rec_status and rec_message (img2dataset's record; None where it
    has none), drop_error (the verification's, or None) and written_key (the key it was written
    under, or None). The same function under both engines (Spark: in ``mapInPandas``)."""
    rows = []     # (status, reason, message)
    for drop, rec_status, rec_message in zip(joined["drop_error"], joined["rec_status"], joined["rec_message"]):
        if isinstance(drop, str):
            rows.append(("failed", "corrupt_image", drop))
        elif rec_status == "success":
            rows.append(("success", None, None))
        else:
            msg = rec_message if isinstance(rec_status, str) else NO_RECORD
            # classified on the raw message; kept with its URLs' credentials and queries redacted
            # (urllib echoes the URL: a presigned one's signature would land in metrics and reports)
            rows.append(("failed", classify(msg), redact_urls_in(msg)))
    status, reason, message = zip(*rows) if rows else ((), (), ())
    # Without a key column in the list, the sample key is img2dataset's (None where not written).
    keys = [k if isinstance(k, str) else (w if isinstance(w, str) else None)
            for k, w in zip(joined["key"], joined["written_key"])]
    return pd.DataFrame({INDEX: joined[INDEX].values, "key": keys, "url": joined["url"].values,
                         "status": list(status), "reason": list(reason), "error_message": list(message)},
                        columns=list(LOG_COLUMNS))


def lost_message(lost: int, total: int) -> str:
    # img2dataset retries a failed shard once, then only prints: its URLs have no record. Kept,
    # they would be logged as attempted and never fetched again; failing here keeps data/raw as
    # it was, and the next run crawls them.
    return (f"img2dataset lost {lost} of {total} URLs: a download shard failed (see its traceback above: "
            f"a worker crash, a full disk...); nothing was written, run the crawl again")
