"""The crawl against hostile URL lists (SECURITY.md): schemes and inside hosts refused at fetch
time and on every redirect (H1), downloads and images bounded before they cost memory (H2),
opt-out headers aimed at the crawler honoured (M12), transient failures retried on the next
crawl and a lost img2dataset shard failing the stage (H6), and keys that would break the shards
refused up front (M8).

The hostile answers come from tests/helpers/hostile_server.py on loopback; the lists that use it
set ``crawl.allow_private_hosts`` (the opt-in for a list served from this machine), and what
must be refused is refused under it too (other schemes, link-local / metadata addresses).
"""
from __future__ import annotations

import base64
import io
import multiprocessing
import os
import pickle
import threading
import time
import urllib.error
from pathlib import Path

import pandas as pd
import pytest

from helpers.hostile_server import BOMB_SIDE, hostile_server, jpeg, jpeg_declaring, png_declaring
from pipeline import config
from pipeline.data import crawl, fetch
from pipeline.data.shards import iter_samples, sample_meta, shard_paths
from pipeline.stages import StageError
from pipeline.workspace import Workspace

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
MAX_BYTES = 1 << 20


def crawl_cfg(url_list: Path, **crawl_changes):
    cfg = config.load(PARAMS, "smoke")
    changes = {"url_list": str(url_list), "allow_private_hosts": True, "deadline_s": 3.0, "max_bytes": MAX_BYTES,
               **crawl_changes}
    return cfg.model_copy(update={"crawl": cfg.crawl.model_copy(update=changes)})


def policy(**changes) -> fetch.FetchPolicy:
    return fetch.FetchPolicy(**{"timeout_s": 1.0, "deadline_s": 3.0, "max_bytes": MAX_BYTES, **changes})


def failure(url: str, pol: fetch.FetchPolicy) -> str:
    """The message the crawl logs for ``url`` (None: fetched)."""
    return fetch.download_with_retry(pol, (0, url))[2]


@pytest.fixture(scope="module")
def server():
    with hostile_server() as (base, httpd):
        yield base, httpd


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """A valid JPEG on the crawler's disk that no URL list may read."""
    path = tmp_path_factory.mktemp("private") / "secret.jpg"
    path.write_bytes(jpeg(99))
    return path


# ---- H1: schemes, hosts, redirects -----------------------------------------------------------------
def test_fetch_refuses_other_schemes_and_inside_hosts(secret, server):
    base, httpd = server
    data_url = "data:image/jpeg;base64," + base64.b64encode(secret.read_bytes()).decode()
    strict = policy()
    for url in (f"file://{secret}", f"file://localhost{secret}", data_url, "ftp://127.0.0.1/x.jpg",
                f"{base}/img/1.jpg", "http://localhost:9/x.jpg", "http://[::1]:9/x.jpg",
                "http://[::ffff:127.0.0.1]:9/x.jpg", "http://10.0.0.1/x.jpg", "http://192.168.0.1/x.jpg",
                "http://169.254.169.254/latest/meta-data/", "http://0.0.0.0:9/x.jpg", "gopher://127.0.0.1/x"):
        message = failure(url, strict)
        assert message and message.startswith(fetch.REFUSED), (url, message)
        assert crawl.classify(message) == "refused_url"
    # the opt-in lets loopback and private networks in, never other schemes or link-local (metadata)
    lenient = policy(allow_private_hosts=True)
    assert failure(f"{base}/img/1.jpg", lenient) is None
    for url in (f"file://{secret}", data_url, "http://169.254.169.254/latest/meta-data/",
                "http://[fe80::1]:9/", "http://[fd00:ec2::254]/latest/"):
        assert failure(url, lenient).startswith(fetch.REFUSED), url
    assert "/img/1.jpg" in httpd.requests and not any("meta-data" in r for r in httpd.requests)


def test_every_redirect_is_checked(secret, server):
    """The corpus-server exception (one origin) lets the first hop in; where it redirects is judged
    on its own: another scheme, another loopback port, the metadata service."""
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    only_origin = policy(allowed_origins=frozenset({("127.0.0.1", port)}))
    assert failure(f"{base}/img/2.jpg", only_origin) is None
    for target in (f"file://{secret}", "data:image/jpeg;base64,AAAA", "ftp://127.0.0.1/x.jpg",
                   "http://127.0.0.1:9/x.jpg", "http://169.254.169.254/latest/meta-data/"):
        message = failure(f"{base}/redirect?to={target}", only_origin)
        assert message and crawl.classify(message) == "refused_url", (target, message)
    # and a redirect to an allowed place is followed
    assert failure(f"{base}/redirect?to={base}/img/2.jpg", only_origin) is None


# ---- H2: bytes and time per URL, image size from the header ---------------------------------------
def test_bodies_over_max_bytes_are_refused_without_reading_them(server):
    base, _ = server
    pol = policy(allow_private_hosts=True)
    for path in ("/big-declared", "/big-streamed"):
        t0 = time.monotonic()
        message = failure(base + path, pol)
        assert message and crawl.classify(message) == "too_large", (path, message)
        assert time.monotonic() - t0 < 3.0, path


def test_a_drip_feeding_server_times_out_at_the_deadline(server):
    base, _ = server
    pol = policy(allow_private_hosts=True, deadline_s=1.5)
    t0 = time.monotonic()
    message = failure(base + "/drip", pol)
    took = time.monotonic() - t0
    assert message and crawl.classify(message) == "timeout", message
    assert 1.4 < took < 3.0, took          # each byte came within timeout_s: only the deadline stops it


def test_fetches_share_one_opener_and_one_deadline_thread(server, monkeypatch):
    """A thread's fetches reuse one urllib opener per policy (building one costs about 0.5 ms of CPU)
    and start no thread (a Timer per URL cost about 0.2 ms): one thread per process keeps every
    deadline, and still stops a drip-fed download after many cancelled ones."""
    base, _ = server
    pol = policy(allow_private_hosts=True, deadline_s=1.5)
    built, started, here = [], [], threading.current_thread()
    real_init, real_start = fetch.Opener.__init__, threading.Thread.start
    monkeypatch.setattr(fetch.Opener, "__init__", lambda self, p: (built.append(p), real_init(self, p))[1])
    monkeypatch.setattr(threading.Thread, "start",
                        lambda self: (started.append(threading.current_thread() is here), real_start(self))[1])
    for i in range(20):
        assert failure(f"{base}/img/{i}.jpg", pol) is None
    assert len(built) <= 1, built
    assert sum(started) <= 1, started          # at most the deadline thread, once per process
    assert timed_failure(base + "/drip", pol)[1] < 3.0


def timed_failure(url: str, pol: fetch.FetchPolicy) -> tuple[str, float]:
    t0 = time.monotonic()
    message = failure(url, pol)
    assert message and crawl.classify(message) == "timeout", message
    return message, time.monotonic() - t0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork start method only")
def test_a_forked_worker_keeps_its_own_deadlines(server):
    """A forked worker (Spark's Python workers fork) inherits the deadline heap and its lock but
    not its thread: they are reset at the fork, so a drip-fed download still stops at the deadline."""
    base, _ = server
    pol = policy(allow_private_hosts=True, deadline_s=1.5)
    assert failure(f"{base}/img/1.jpg", pol) is None           # this process's deadline thread runs
    with multiprocessing.get_context("fork").Pool(1) as pool:
        _, took = pool.apply_async(timed_failure, (base + "/drip", pol)).get(timeout=20)
    assert took < 3.0, took


def new_resizer(max_image_area: int) -> crawl.NormalizingResizer:
    return crawl.NormalizingResizer((255, 255, 255), image_size=256, resize_mode="no", resize_only_if_bigger=False,
                                    skip_reencode=True, encode_format="jpg", min_image_size=8,
                                    max_image_area=max_image_area)


class Unreachable:
    """Stands in for img2dataset's OpenCV Resizer: the test fails if anything decodes the image."""
    def __init__(self, inner):
        self.min_image_size, self.max_image_area = inner.min_image_size, inner.max_image_area

    def __call__(self, *args, **kwargs):
        raise AssertionError("decoded an image whose header already says it is too large")


@pytest.mark.parametrize("make", [png_declaring, jpeg_declaring], ids=["png", "plain-jpeg"])
def test_image_size_is_judged_from_the_header_before_decoding(make):
    resizer = new_resizer(max_image_area=1 << 20)
    resizer.resizer = Unreachable(resizer.resizer)
    data = make(BOMB_SIDE if make is png_declaring else 3000)
    result = resizer(io.BytesIO(data))
    assert result[0] is None and crawl.classify(result[-1]) == "too_large", result[-1]


def test_decoders_pixel_caps_are_set_in_the_workers(monkeypatch, tmp_path):
    """PIL's cap in the worker that unpickles the resizer; OpenCV's in the environment the
    spawned workers start with (it reads it once, when it loads)."""
    from PIL import Image
    resizer = new_resizer(max_image_area=123456)
    before = Image.MAX_IMAGE_PIXELS
    try:
        pickle.loads(pickle.dumps(resizer))
        assert Image.MAX_IMAGE_PIXELS == 123456
    finally:
        Image.MAX_IMAGE_PIXELS = before
    import importlib
    i2d_main = importlib.import_module("img2dataset.main")
    seen = {}

    def fake_download(**kwargs):
        seen["cv"] = os.environ.get(crawl.CV_CAP)
        seen["downloader"] = i2d_main.Downloader
    monkeypatch.setattr(i2d_main, "download", fake_download)
    monkeypatch.delenv(crawl.CV_CAP, raising=False)
    cfg = config.load(PARAMS, "smoke")
    crawl.download(tmp_path / "urls.parquet", tmp_path / "out", cfg, [])
    assert seen["cv"] == str(cfg.crawl.max_image_area) and crawl.CV_CAP not in os.environ
    assert seen["downloader"].func is fetch.guarded_downloader


# ---- M12: opt-out headers aimed at the crawler ----------------------------------------------------------
class Headers(dict):
    def get_all(self, name, default=None):
        return self.get(name, default)


@pytest.mark.parametrize("values, out", [
    (["noai"], True), (["noindex, nofollow"], True), (["img2dataset: noai"], True),
    (["unclip-pipeline: noimageai, nofollow"], True), (["IMG2DATASET: NoAI"], True),
    (["googlebot: noai"], False), (["unavailable_after: 25 Jun 2030 15:00:00 PST"], False),
    (["max-image-preview: large"], False), (["googlebot: noindex", "img2dataset: noai"], True), ([], False),
])
def test_x_robots_tag_directives_for_the_crawler_are_honoured(values, out):
    assert fetch.disallowed(Headers({"X-Robots-Tag": values} if values else {}), fetch.DISALLOWED_DIRECTIVES) is out


# ---- one crawl of a hostile list ------------------------------------------------------------------------
HOSTILE = {       # name -> (URL under the server's base, or a full URL; the reason the crawl must give)
    "good0": ("/img/10.jpg", None), "good1": ("/img/11.jpg", None), "good2": ("/img/12.jpg", None),
    "file": ("file://{secret}", "refused_url"), "file_localhost": ("file://localhost{secret}", "refused_url"),
    "data": ("data:image/jpeg;base64,{secret_b64}", "refused_url"), "ftp": ("ftp://127.0.0.1/x.jpg", "refused_url"),
    "metadata": ("http://169.254.169.254/latest/meta-data/x.jpg", "refused_url"),
    "metadata_v6": ("http://[::ffff:169.254.169.254]/x.jpg", "refused_url"),
    "redirect_file": ("/redirect?to=file://{secret}", "refused_url"),
    "redirect_metadata": ("/redirect?to=http://169.254.169.254/x.jpg", "refused_url"),
    "big_declared": ("/big-declared", "too_large"), "big_streamed": ("/big-streamed", "too_large"),
    "bomb_png": ("/bomb.png", "too_large"), "bomb_jpg": ("/bomb.jpg", "too_large"),
    "drip": ("/drip", "timeout"),
    "robots_targeted": ("/robots/img2dataset.jpg", "opted_out"), "robots_all": ("/robots/none.jpg", "opted_out"),
    "robots_other_bot": ("/robots/googlebot.jpg", None),
}


@pytest.fixture(scope="module")
def hostile_crawl(tmp_path_factory, server, secret):
    base, _ = server
    tmp = tmp_path_factory.mktemp("hostile")
    fill = {"secret": secret, "secret_b64": base64.b64encode(secret.read_bytes()).decode()}
    urls = [(u if "://" in u or u.startswith("data:") else base + u).format(**fill) for u, _ in HOSTILE.values()]
    pd.DataFrame({"url": urls, "caption": [f"caption {k}" for k in HOSTILE], "key": list(HOSTILE)}) \
        .to_parquet(tmp / "list.parquet", index=False)
    ws = Workspace.at(tmp / "ws")
    t0 = time.monotonic()
    metrics = crawl.run(crawl_cfg(tmp / "list.parquet"), ws)
    return ws, metrics, time.monotonic() - t0


def test_hostile_list_every_row_counted_under_its_reason(hostile_crawl):
    ws, m, seconds = hostile_crawl
    log = pd.read_parquet(ws.raw / crawl.LOG).set_index("key")
    got = {k: (None if log.status[k] == "success" else log.reason[k]) for k in HOSTILE}
    assert got == {k: reason for k, (_, reason) in HOSTILE.items()}, log.error_message.to_dict()
    expected = pd.Series([r for _, r in HOSTILE.values() if r]).value_counts().to_dict()
    assert {r: n for r, n in m["failed_by_reason"].items() if n} == expected
    assert m["failed_by_reason"]["refused_url"] == 8
    assert seconds < 60


def test_hostile_list_no_private_bytes_in_the_shards(hostile_crawl, secret):
    ws, _, _ = hostile_crawl
    samples = list(iter_samples(shard_paths(ws.raw)))
    assert sorted(s["__key__"] for s in samples) == ["good0", "good1", "good2", "robots_other_bot"]
    blob = b"".join(p.read_bytes() for p in shard_paths(ws.raw))
    assert secret.read_bytes()[-200:] not in blob and b"file://" not in blob
    assert all(sample_meta(s)["url"].startswith("http://127.0.0.1:") for s in samples)


def test_the_crawl_policy_comes_from_params_and_opts_in_only_the_corpus_server():
    cfg = config.load(PARAMS, "smoke")
    pol = crawl.fetch_policy(cfg)
    assert not pol.allow_private_hosts and pol.allowed_origins == frozenset()
    assert (pol.timeout_s, pol.deadline_s, pol.max_bytes) == (cfg.crawl.timeout_s, cfg.crawl.deadline_s,
                                                              cfg.crawl.max_bytes)
    assert crawl.fetch_policy(cfg, "http://127.0.0.1:4321").allowed_origins == frozenset({("127.0.0.1", 4321)})
    with pytest.raises(ValueError, match="deadline_s"):
        config.with_overrides(cfg.crawl, ["deadline_s=0.5"], "crawl")       # under smoke's timeout_s 1.0
    with pytest.raises(ValueError, match="max_image_area"):
        config.with_overrides(cfg.crawl, [f"max_image_area={1 << 30}"], "crawl")


# ---- H6: transient failures are retried, lost shards fail the stage -------------------------------------
def test_transient_failures_are_retried_next_run(tmp_path, server):
    """Crawl 1: the flaky URL answers 503, another always does, a third is a 404. Crawl 2 (the
    same list plus one new URL) fetches the flaky one again and gets it, tries the 503 one a
    second (last) time and leaves the 404 alone; crawl 3 has nothing to fetch. No key column:
    img2dataset's keys, made unique across the parts."""
    base, httpd = server
    tag = f"t{time.monotonic_ns()}"
    rows = [(f"{base}/img/30.jpg", "good"), (f"{base}/flaky/{tag}.jpg", "flaky"),
            (f"{base}/always503/{tag}.jpg", "down"), (f"{base}/missing/{tag}.jpg", "gone")]
    pd.DataFrame(rows, columns=["url", "caption"]).to_csv(tmp_path / "list.csv", index=False)
    ws = Workspace.at(tmp_path / "ws")
    cfg = crawl_cfg(tmp_path / "list.csv", max_attempts=2)
    m1 = crawl.run(cfg, ws)
    assert (m1["succeeded"], m1["failed_by_reason"]["http_5xx"], m1["failed_by_reason"]["http_404"]) == (1, 2, 1)

    rows.append((f"{base}/img/31.jpg", "new"))
    pd.DataFrame(rows, columns=["url", "caption"]).to_csv(tmp_path / "list.csv", index=False)
    m2 = crawl.run(cfg, ws)
    assert (m2["attempted"], m2["succeeded"], m2["failed_by_reason"]["http_5xx"]) == (3, 2, 1)
    assert m2["incremental"]["new_urls"] == 1 and m2["incremental"]["retried_urls"] == 2
    log = pd.read_parquet(ws.raw / crawl.LOG).set_index("url")
    assert len(log) == len(rows) and log.index.is_unique
    assert log.loc[rows[1][0], ["status", "attempts", "part"]].tolist() == ["success", 2, 1]
    assert log.loc[rows[2][0], ["reason", "attempts"]].tolist() == ["http_5xx", 2]
    assert log.loc[rows[3][0], ["reason", "attempts", "part"]].tolist() == ["http_404", 1, 0]
    assert sum(r.endswith(f"/missing/{tag}.jpg") for r in httpd.requests) == 1
    samples = list(iter_samples(shard_paths(ws.raw)))
    assert sorted(s["txt"].decode() for s in samples) == ["flaky", "good", "new"]
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys), keys
    assert set(keys) == set(log.key.dropna())

    m3 = crawl.run(cfg, ws)                            # the 503 URL has had its max_attempts
    assert m3["attempted"] == 0 and m3["incremental"]["part"] is None


def test_failed_img2dataset_shard_fails_the_stage(tmp_path, server, monkeypatch):
    """img2dataset gives up on a shard after one retry and only prints; its URLs have no record.
    Simulated by removing one shard's records (shard_size 2: three download shards)."""
    base, _ = server
    pd.DataFrame({"url": [f"{base}/img/{40 + i}.jpg" for i in range(6)], "caption": ["x"] * 6}) \
        .to_csv(tmp_path / "list.csv", index=False)
    real = crawl.download

    def losing_download(urls_file, output_folder, *args, **kwargs):
        real(urls_file, output_folder, *args, **kwargs)
        for p in sorted(Path(output_folder).glob("00001*")):
            p.unlink()
    monkeypatch.setattr(crawl, "download", losing_download)
    ws = Workspace.at(tmp_path / "ws")
    with pytest.raises(StageError, match="img2dataset lost 2 of 6 URLs"):
        crawl.run(crawl_cfg(tmp_path / "list.csv", shard_size=2), ws)
    assert not ws.raw.exists() and not list(ws.raw.parent.glob(".raw.tmp-*"))


# ---- M8: keys that would break the shards ----------------------------------------------------------------
@pytest.mark.parametrize("key, why", [
    ("a\0b", "control character"), ("line\nbreak", "control character"), ("k" * 86, "over 85"),
    ("é" * 43, "over 85"), ("a.b", "'.'"), ("a/b", "'.'"), ("", "empty"),
])
def test_url_list_rejects_keys_that_break_the_shards(tmp_path, key, why):
    pd.DataFrame({"url": ["http://example.com/a.jpg", "http://example.com/b.jpg"], "caption": ["a", "b"],
                  "key": ["fine", key]}).to_parquet(tmp_path / "list.parquet", index=False)
    with pytest.raises(StageError, match=f"column 'key', row 1.*{why}"):
        crawl.read_url_list(crawl_cfg(tmp_path / "list.parquet"), Workspace.at(tmp_path))
    pd.DataFrame({"url": ["http://example.com/a.jpg"], "caption": ["a"], "key": ["k" * 85]}) \
        .to_parquet(tmp_path / "list.parquet", index=False)
    assert crawl.read_url_list(crawl_cfg(tmp_path / "list.parquet"), Workspace.at(tmp_path))[0].source_key[0] == "k" * 85


def test_refusals_are_not_retried_by_img2dataset_retries(server):
    """``crawl.retries`` repeats a failed download at once; a refusal would only be refused again."""
    base, httpd = server
    before = len(httpd.requests)
    assert fetch.download_with_retry(policy(), (0, f"{base}/img/50.jpg"), retries=3)[2].startswith(fetch.REFUSED)
    assert len(httpd.requests) == before
