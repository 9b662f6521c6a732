"""Fuzzing what comes from elsewhere (SECURITY.md): URL lists (malformed rows, odd schemes and
hosts, huge captions, duplicate and hostile keys, wrong types), shards (truncated, corrupt
headers, flipped bytes, members that are not samples) and the response headers the crawler
parses. Every input must end in a clear error (StageError, ShardError) or a counted outcome,
never another exception (a traceback) and never a hang (hypothesis's deadline).

The profile is bounded (``FUZZ_EXAMPLES`` per target, no example database written into the
checkout); the number of inputs each target ran is printed at the end of the module.
"""
from __future__ import annotations

import csv
import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import config
from pipeline.data import crawl, fetch
from pipeline.data.shards import ShardError, ShardSink, iter_shard
from pipeline.stages import StageError
from pipeline.workspace import Workspace

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
FUZZ_EXAMPLES = 100
settings.register_profile("unclip-fuzz", max_examples=FUZZ_EXAMPLES, deadline=2000, database=None,
                          derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
FUZZ = settings.get_profile("unclip-fuzz")

SMOKE = config.load(PARAMS, "smoke")
RAN: Counter = Counter()              # target -> inputs generated
OUTCOMES: Counter = Counter()         # (target, outcome) -> count


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    lines = [f"fuzz: {target}: {n} inputs ({', '.join(f'{o} {c}' for (t, o), c in sorted(OUTCOMES.items()) if t == target)})"
             for target, n in sorted(RAN.items())]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines), flush=True)


# ---- URL lists ------------------------------------------------------------------------------------------
SCHEMES = ["http", "https", "file", "ftp", "data", "gopher", "javascript", "HTTP", "", "ht tp", "jar:file"]
HOSTS = ["example.com", "127.0.0.1", "localhost", "[::1]", "169.254.169.254", "[::ffff:10.0.0.1]", "0",
         "10.0.0.1", "xn--nxasmq6b.com", "ex ample.com", "", "a" * 300, "example.com:99999", "user:pw@example.com",
         "[fe80::1%eth0]", "2130706433"]
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@st.composite
def urls(draw):
    if draw(st.booleans()):
        return draw(text)                                            # anything at all
    scheme, host = draw(st.sampled_from(SCHEMES)), draw(st.sampled_from(HOSTS))
    return f"{scheme}://{host}/{draw(text)}"


def cell(values):
    """A list cell: a value of the expected kind, or one of the wrong ones a real list holds."""
    return st.one_of(values, st.none(), st.just(float("nan")), st.integers(-10, 10 ** 12), st.just(""))


@st.composite
def url_lists(draw):
    """Half the lists are well formed but odd (any scheme or host, huge captions, unique keys of
    any text); the other half hold wrong cells anywhere (missing, NaN, numbers, empty, duplicate
    or hostile keys), which mostly make the list unreadable as a whole."""
    n = draw(st.integers(0, 8))
    clean = draw(st.booleans())
    column = (lambda values: [draw(values) for _ in range(n)]) if clean else \
        (lambda values: [draw(cell(values)) for _ in range(n)])
    columns = {"url": column(urls())}
    if clean or draw(st.booleans()):
        huge = st.text(min_size=0, max_size=5).map(lambda t: t * 20000)       # up to 100k characters
        columns["caption"] = column(st.one_of(text, huge))
    if draw(st.booleans()):
        if clean:
            columns["key"] = [f"k{i}_{t}" for i, t in enumerate(draw(st.lists(text, min_size=n, max_size=n)))]
        else:
            keys = st.one_of(text, st.sampled_from(["k", "k", "a.b", "a/b", "a\0b", "é" * 50, "x" * 90, " "]))
            columns["key"] = column(keys)
    if draw(st.booleans()):
        columns["split"] = column(st.sampled_from(["train", "val", "test", " val ", ""] + ([] if clean else
                                                                                             ["Train", "training"])))
    if draw(st.booleans()):
        columns[draw(text) or "extra"] = column(text)
    return pd.DataFrame(columns) if n else pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})


@pytest.fixture(scope="module")
def list_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lists")


@FUZZ
@given(table=url_lists(), fmt=st.sampled_from(["csv", "parquet"]))
def test_fuzz_url_lists_end_in_a_frame_or_a_stage_error(list_dir, table, fmt):
    RAN["url list"] += 1
    path = list_dir / f"list.{fmt}"
    try:
        # QUOTE_ALL: a bare carriage return inside a field is a line break to every CSV reader
        # (RFC 4180) unless it is quoted, and pandas' minimal quoting leaves it bare
        (table.to_csv(path, index=False, quoting=csv.QUOTE_ALL) if fmt == "csv"
         else table.astype(str).to_parquet(path, index=False))
    except (ValueError, TypeError, UnicodeEncodeError):
        OUTCOMES["url list", "unwritable"] += 1                      # not a list anyone can hand us
        return
    cfg = SMOKE.model_copy(update={"crawl": SMOKE.crawl.model_copy(update={"url_list": str(path)})})
    try:
        frame, faults = crawl.read_url_list(cfg, Workspace.at(list_dir))
    except StageError as err:
        assert str(path) in str(err) or "crawl.url_list" in str(err)
        OUTCOMES["url list", "stage error"] += 1
        return
    OUTCOMES["url list", "read"] += 1
    assert faults is None and len(frame) == len(table) and set(frame["split"]) <= set(crawl.SPLITS)
    # what the fetch makes of every URL before any connection: a refusal or nothing, never a raise
    for url in frame["url"].astype(str):
        why = fetch.url_refusal(url)
        assert why is None or (why.startswith(fetch.REFUSED) and crawl.classify(why) == "refused_url")


@FUZZ
@given(url=st.one_of(urls(), text, st.binary(max_size=30).map(lambda b: b.decode("latin-1"))))
def test_fuzz_url_refusal_never_raises(url):
    RAN["url refusal"] += 1
    why = fetch.url_refusal(url)
    OUTCOMES["url refusal", "refused" if why else "to connect"] += 1
    if why is None:                       # only http(s) with a host gets as far as a connection
        assert url.split(":", 1)[0].lower() in fetch.SCHEMES


class Headers:
    def __init__(self, values):
        self.values = values

    def get_all(self, name, default=None):
        return self.values if name == "X-Robots-Tag" else default


@FUZZ
@given(values=st.lists(st.one_of(text, st.sampled_from(["noai", "img2dataset: noai", "googlebot: noai",
                                                         "unavailable_after: 2030", ":", ", ,", "noai:"])),
                       max_size=4))
def test_fuzz_x_robots_tag_parsing_never_raises(values):
    RAN["x-robots-tag"] += 1
    OUTCOMES["x-robots-tag", "opted out" if fetch.disallowed(Headers(values), fetch.DISALLOWED_DIRECTIVES)
             else "allowed"] += 1


# ---- shards ---------------------------------------------------------------------------------------------
def good_shard(directory: Path, n: int) -> Path:
    with ShardSink(directory, 1000) as sink:
        for i in range(n):
            sink.write({"__key__": f"k{i:03d}", "jpg": bytes([i]) * (i * 37 % 700), "txt": f"caption {i}",
                        "json": json.dumps({"key": f"k{i:03d}", "split": "train"})})
    return directory / "00000.tar"


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory) -> bytes:
    return good_shard(tmp_path_factory.mktemp("shard"), 6).read_bytes()


def read(path: Path, target: str) -> None:
    try:
        samples = list(iter_shard(path))
    except ShardError as err:
        assert str(path) in str(err)
        OUTCOMES[target, "shard error"] += 1
        return
    OUTCOMES[target, "read"] += 1
    assert all(isinstance(s["__key__"], str) for s in samples)


@FUZZ
@given(data=st.data())
def test_fuzz_damaged_shards_end_in_a_shard_error_or_samples(tmp_path, shard_bytes, data):
    RAN["damaged shard"] += 1
    blob = bytearray(shard_bytes)
    damage = data.draw(st.sampled_from(["truncate", "flip", "splice", "zero"]))
    if damage == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif damage == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
    elif damage == "splice":
        i = data.draw(st.integers(0, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=1500))
    else:
        i = data.draw(st.integers(0, len(blob) // 512 - 1)) * 512
        blob[i:i + 512] = bytes(512)
    path = tmp_path / "damaged.tar"
    path.write_bytes(bytes(blob))
    read(path, "damaged shard")


member_names = st.one_of(text.filter(lambda t: "\0" not in t), st.sampled_from(
    ["noext", "a/b.jpg", "k.", ".hidden", "k.jpg", "k.jpg", "k.TXT", "../escape.txt", "k" * 120 + ".json"]))


@FUZZ
@given(members=st.lists(st.tuples(member_names, st.sampled_from(["file", "dir", "symlink", "pax", "gnu"]),
                                  st.binary(max_size=64)), max_size=6))
def test_fuzz_shards_with_wrong_members_end_in_a_shard_error_or_samples(tmp_path, members):
    """Tars written by tarfile (not ShardSink): directories, links, long names in pax or GNU
    form, names without an extension, repeated extensions, non-ASCII names."""
    RAN["wrong members"] += 1
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, kind, body in members:
                if kind in ("pax", "gnu"):
                    tar.format = tarfile.PAX_FORMAT if kind == "pax" else tarfile.GNU_FORMAT
                info = tarfile.TarInfo(name or "x")
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                    tar.addfile(info)
                else:
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
    except (ValueError, UnicodeEncodeError):
        OUTCOMES["wrong members", "unwritable"] += 1
        return
    path = tmp_path / "members.tar"
    path.write_bytes(buf.getvalue())
    read(path, "wrong members")


def test_fuzz_counts_were_reached():
    """Runs last in the module: every target ran its bounded number of inputs (or all there are)."""
    assert set(RAN) == {"url list", "url refusal", "x-robots-tag", "damaged shard", "wrong members"}
    assert all(n >= min(FUZZ_EXAMPLES, 50) for n in RAN.values()), RAN
    assert not any(math.isnan(n) for n in RAN.values())
