"""The crawl stage: the smoke corpus crawled once (faults included) over the loopback server,
a user's CSV list on a server of the test's own, bad lists, and the server's lifetime.

conftest.py sets NO_ALBUMENTATIONS_UPDATE and HF_HUB_OFFLINE before anything imports img2dataset.
"""
from __future__ import annotations

import importlib
import io
import json
import multiprocessing
import signal
import socket
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from helpers.own_data import static_server      # the loopback server of the own-data tests
from pipeline import config
from pipeline.data import corpus, crawl, server
from pipeline.data.corpus_images import CorpusImages
from pipeline.data.shards import ShardSink, count_samples, iter_samples, sample_meta, shard_paths
from pipeline.stages import StageError
from pipeline.workspace import Workspace

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
EXPECTED_REASON = {"http_404": "http_404", "http_500": "http_5xx", "timeout": "timeout",
                   "not_an_image": "not_an_image", "truncated_jpeg": "corrupt_image",
                   "too_large": "too_large", "opted_out": "opted_out"}


def port_of(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


def accepts_connections(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def crawled(tmp_path_factory):
    """(ws, metrics, pairs, served base URLs, SIGINT handler before) of one smoke-corpus crawl."""
    cfg = config.load(PARAMS, "smoke")
    ws = Workspace.at(tmp_path_factory.mktemp("crawl"))
    corpus.run(cfg, ws)
    base_urls = []

    @contextmanager
    def spy(*args):
        with server.serve_corpus(*args) as base_url:
            base_urls.append(base_url)
            yield base_url

    sigint = signal.getsignal(signal.SIGINT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(crawl, "serve_corpus", spy)
        metrics = crawl.run(cfg, ws)
    return ws, metrics, pd.read_parquet(ws.corpus / "pairs.parquet"), base_urls, sigint


def raw_samples(ws) -> list[dict]:
    return list(iter_samples(shard_paths(ws.raw)))


# ---- the smoke corpus ---------------------------------------------------------------------------
def test_every_fault_kind_is_counted_under_its_reason(crawled):
    _, m, pairs, _, _ = crawled
    kinds = pairs.fault.value_counts()
    assert set(kinds.index) == set(EXPECTED_REASON)
    assert m["faults_by_kind_vs_reason"] == {k: {EXPECTED_REASON[k]: int(n)} for k, n in kinds.items()}
    # Every other URL of the smoke corpus is good, so the failures are exactly the faults.
    expected = {r: 0 for r in crawl.REASONS}
    for kind, n in kinds.items():
        expected[EXPECTED_REASON[kind]] += int(n)
    assert m["failed_by_reason"] == expected and m["other_messages"] == {}


def test_counts_reconcile(crawled):
    ws, m, pairs, _, _ = crawled
    assert m["attempted"] == len(pairs) == m["succeeded"] + sum(m["failed_by_reason"].values())
    assert m["failed"] == m["attempted"] - m["succeeded"]
    assert m["succeeded"] == sum(count_samples(p) for p in shard_paths(ws.raw)) == len(raw_samples(ws))
    assert m["shards"] == len(shard_paths(ws.raw)) == -(-m["succeeded"] // 200)   # smoke shard_size
    assert m["images_per_s"] > 0
    json.dumps(m)   # a metrics file and MLflow take it as is

    log = pd.read_parquet(ws.raw / "crawl_log.parquet")
    assert list(log.key) == list(pairs.key) and list(log.url) == list(pairs.url)
    assert (log.status == "success").sum() == m["succeeded"]
    by_key = log.set_index("key")
    faults = pairs.dropna(subset=["fault"])
    assert [by_key.reason[k] for k in faults.key] == [EXPECTED_REASON[f] for f in faults.fault]


def test_shards_hold_every_good_url_in_list_order_and_no_fault(crawled):
    ws, m, pairs, _, _ = crawled
    assert m["fault_urls_in_shards"] == 0
    samples = raw_samples(ws)
    good = pairs[pairs.fault.isna()]
    assert [s["__key__"] for s in samples] == list(good.key)
    truth = good.set_index("key")
    for s in samples:
        assert {"jpg", "txt", "json"} <= set(s)
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.format == "JPEG"
            im.load()
        meta = json.loads(s["json"])      # raw: gt must be stored exactly as listed
        key = s["__key__"]
        assert meta["key"] == key and meta["status"] == "success"
        assert s["txt"].decode() == truth.caption[key]
        assert meta["split"] == truth["split"][key] and meta["gt"] == truth["gt"][key]


def test_server_is_stopped_and_sigint_restored(crawled):
    _, _, _, base_urls, sigint = crawled
    assert len(base_urls) == 1 and not accepts_connections(port_of(base_urls[0]))
    assert signal.getsignal(signal.SIGINT) is sigint    # img2dataset installs its own


# ---- the server ---------------------------------------------------------------------------------
def fetch(url: str, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_server_answers_each_fault(crawled):
    ws = crawled[0]
    faults = ws.corpus / "faults"
    with server.serve_corpus(ws.corpus, timeout_s=0.3) as base:
        status, headers, body = fetch(f"{base}/images/0000001.jpg")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        with CorpusImages(ws.corpus) as images:
            assert body == images.read("images/0000001.jpg")
        assert fetch(f"{base}/fault/http_404/0.jpg")[0] == 404
        assert fetch(f"{base}/fault/http_500/1.jpg")[0] == 500
        assert fetch(f"{base}/fault/not_an_image/2.jpg")[2] == (faults / "not_an_image.html").read_bytes()
        assert fetch(f"{base}/fault/truncated_jpeg/3.jpg")[2] == (faults / "truncated.jpg").read_bytes()
        status, headers, body = fetch(f"{base}/fault/too_large/4.jpg")
        assert headers["Content-Type"] == "image/png" and Image.open(io.BytesIO(body)).size == (4096, 4096)
        status, headers, body = fetch(f"{base}/fault/opted_out/5.jpg")
        assert status == 200 and headers["X-Robots-Tag"] == "noai"
        for path in ("nothing", "images/../pairs.parquet", "images/.hidden", "images/0000001", "images.zip",
                     "images/%2e%2e/images.zip", "fault/unknown/1.jpg"):
            assert fetch(f"{base}/{path}")[0] == 404, path
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            fetch(f"{base}/fault/timeout/6.jpg", timeout=0.3)
        t0 = time.perf_counter()     # the stalled handler must not hold up the shutdown
    assert time.perf_counter() - t0 < 0.6
    assert not accepts_connections(port_of(base))


def test_server_is_stopped_when_img2dataset_raises(tmp_path, monkeypatch, crawled):
    """img2dataset fails after starting its logger process: the stage raises, leaves no output,
    no server and no child process behind."""
    ws = Workspace.at(tmp_path)
    ws.corpus.parent.mkdir(parents=True)
    ws.corpus.symlink_to(crawled[0].corpus)
    seen = {}

    def failing_reader(url_list, *args, **kwargs):
        first = pd.read_parquet(url_list).url.iloc[0]
        seen["status"], seen["port"] = fetch(first)[0], port_of(first.split("/images/")[0])
        raise RuntimeError("img2dataset blew up")

    monkeypatch.setattr(importlib.import_module("img2dataset.main"), "Reader", failing_reader)
    with pytest.raises(RuntimeError, match="blew up"):
        crawl.run(config.load(PARAMS, "smoke"), ws)
    assert seen["status"] == 200 and not accepts_connections(seen["port"])
    assert not ws.raw.exists() and not list(ws.raw.parent.glob(".raw.tmp-*"))
    assert not multiprocessing.active_children()


# ---- a user's URL list --------------------------------------------------------------------------


def test_user_csv_list(tmp_path, crawled):
    site = tmp_path / "site"
    site.mkdir()
    with CorpusImages(crawled[0].corpus) as archive:
        images = [Path(n) for n in sorted(archive.names) if n.startswith("images/000")][:3]
        for p in images:
            (site / p.name).write_bytes(archive.read(str(p)))
    ws = Workspace.at(tmp_path / "ws")
    cfg = config.load(PARAMS, "smoke")
    with static_server(site) as base:
        urls = [f"{base}/{p.name}" for p in images] + [f"{base}/missing.jpg"]
        captions = ["a red circle", "a blue square", "a green triangle", "gone"]
        pd.DataFrame({"url": urls, "caption": captions}).to_csv(tmp_path / "list.csv", index=False)
        # the list names the loopback server: the opt-in a list served from this machine needs
        cfg = cfg.model_copy(update={"crawl": cfg.crawl.model_copy(update={"url_list": str(tmp_path / "list.csv"),
                                                                           "allow_private_hosts": True})})
        m = crawl.run(cfg, ws)
    assert (m["attempted"], m["succeeded"], m["failed_by_reason"]["http_404"]) == (4, 3, 1)
    assert "faults_by_kind_vs_reason" not in m
    samples = raw_samples(ws)
    assert [s["txt"].decode() for s in samples] == captions[:3]
    # Without a key column the sample key is img2dataset's, and the log names it.
    log = pd.read_parquet(ws.raw / "crawl_log.parquet")
    assert list(log.key[:3]) == [s["__key__"] for s in samples] and log.key[3] is None
    assert log.url.tolist() == urls


@pytest.mark.parametrize("table, message", [
    (None, "no such file"),
    (pd.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "text": ["x"]}), "no column 'caption'"),
    (pd.DataFrame({"url": ["http://a/1.jpg", "http://a/2.jpg"], "caption": ["x", "y"], "key": ["k", "k"]}),
     "column 'key' must be unique"),
])
def test_bad_url_list_is_a_clear_stage_error(tmp_path, table, message):
    path = tmp_path / "urls.csv"
    if table is not None:
        table.to_csv(path, index=False)
    cfg = config.load(PARAMS, "smoke")
    cfg = cfg.model_copy(update={"crawl": cfg.crawl.model_copy(update={"url_list": str(path)})})
    with pytest.raises(StageError, match=message) as err:
        crawl.run(cfg, Workspace.at(tmp_path))
    assert str(path) in str(err.value)


# ---- pieces -------------------------------------------------------------------------------------
def test_classify_error_messages():
    assert crawl.classify("HTTP Error 404: Not Found") == "http_404"
    assert crawl.classify("HTTP Error 503: Service Unavailable") == "http_5xx"
    assert crawl.classify("<urlopen error timed out>") == "timeout"
    assert crawl.classify("Image decoding error") == "not_an_image"
    assert crawl.classify("Image decoding error: corrupt or truncated JPEG") == "corrupt_image"
    assert crawl.classify("image area too large") == "too_large"
    assert crawl.classify("image too small") == "too_small"
    assert crawl.classify("Use of image disallowed by X-Robots-Tag directive") == "opted_out"
    assert crawl.classify("HTTP Error 403: Forbidden") == crawl.classify(None) == "other"


def test_verification_drops_what_pil_cannot_decode_and_restores_list_order(tmp_path, crawled):
    """img2dataset-like input shard: a truncated JPEG that OpenCV let through must not pass."""
    with CorpusImages(crawled[0].corpus) as archive:
        jpeg = archive.read("images/0000000.jpg")
    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, format="PNG")
    src = tmp_path / "i2d"
    items = [(2, jpeg), (0, jpeg[: len(jpeg) - 200]), (1, jpeg), (3, png.getvalue())]
    with ShardSink(src, 10) as sink:
        for index, data in items:
            meta = {"url_index": index, "key": f"i2d{index}", "source_key": f"k{index}"}
            sink.write({"__key__": f"i2d{index}", "jpg": data, "txt": b"c", "json": json.dumps(meta).encode()})
    written, dropped = crawl.verify_and_rewrite(src, tmp_path / "out", 10, len(items))
    assert written == {1: "k1", 2: "k2"} and set(dropped) == {0, 3}
    assert "truncated" in dropped[0] and "not a JPEG" in dropped[3]
    out = list(iter_samples(shard_paths(tmp_path / "out")))
    assert [s["__key__"] for s in out] == ["k1", "k2"]
    assert sample_meta(out[0])["crawl_key"] == "i2d1"
