"""Shards from elsewhere (reliability review M8): a shard cut off exactly at a member boundary,
one end-of-archive block of two, member names that are not UTF-8: each is a ShardError naming
the file, never a short read without a word or a UnicodeDecodeError."""
from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.data.shards import ShardError, ShardSink, count_samples, iter_shard, ustar_header

SAMPLES = 5


@pytest.fixture
def shard(tmp_path):
    with ShardSink(tmp_path, 100) as sink:
        for i in range(SAMPLES):
            sink.write({"__key__": f"k{i}", "jpg": b"j" * (100 + i), "txt": f"caption {i}", "json": "{}"})
    return tmp_path / "00000.tar"


def member_ends(data: bytes) -> list[int]:
    """Byte offsets where each member (header + padded body) ends."""
    ends = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            ends.append(m.offset_data + m.size + (-m.size % 512))
    return ends


def test_whole_shard_reads_back(shard):
    assert count_samples(shard) == SAMPLES


def test_shard_truncated_at_member_boundary_is_an_error(shard):
    data = shard.read_bytes()
    for end in member_ends(data)[:-1]:                   # after any member but the last
        shard.write_bytes(data[:end])
        with pytest.raises(ShardError, match="truncated"):
            list(iter_shard(shard))
    shard.write_bytes(data[:member_ends(data)[-1] + 512])  # one end-of-archive block of two
    with pytest.raises(ShardError, match="end-of-archive"):
        list(iter_shard(shard))


def test_non_utf8_member_name_is_a_shard_error(tmp_path):
    path = tmp_path / "bad.tar"
    path.write_bytes(ustar_header(b"k\xff\xfe.txt", 3) + b"abc".ljust(512, b"\0") + bytes(1024))
    with pytest.raises(ShardError, match="not UTF-8"):
        list(iter_shard(path))
