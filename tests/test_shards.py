"""Our shard writer produces standard tars that tarfile and webdataset read back exactly."""
import tarfile

import pytest

from pipeline.data.shards import ShardError, ShardSink, count_samples, iter_samples, shard_paths


def test_roundtrip_with_tarfile_and_webdataset(tmp_path):
    samples = [{"__key__": f"{i:04d}", "jpg": bytes(range(256)) * (i + 1), "txt": f"caption é {i}",
                "json": b"{}", "__url__": "ignored"} for i in range(7)]
    with ShardSink(tmp_path, shard_size=3) as sink:
        for s in samples:
            sink.write(s)
    paths = shard_paths(tmp_path)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [count_samples(p) for p in paths] == [3, 3, 1]
    with tarfile.open(paths[0]) as tf:                     # strict stdlib reader: checksums, sizes
        members = tf.getmembers()
        assert [m.name for m in members[:3]] == ["0000.jpg", "0000.txt", "0000.json"]
        assert tf.extractfile("0001.jpg").read() == samples[1]["jpg"]
    back = list(iter_samples(paths))
    assert [b["__key__"] for b in back] == [s["__key__"] for s in samples]
    assert all(b["txt"].decode() == s["txt"] and b["jpg"] == s["jpg"] for b, s in zip(back, samples))
    assert all("url" not in b for b in back)


def test_rejects_non_bytes_and_long_names(tmp_path):
    with ShardSink(tmp_path, 2) as sink:
        with pytest.raises(TypeError, match="must be bytes or str"):
            sink.write({"__key__": "a", "json": {"x": 1}})
        with pytest.raises(ValueError, match="longer than 100 bytes"):
            sink.write({"__key__": "k" * 120, "txt": "x"})


def test_truncated_shard_is_named(tmp_path):
    with ShardSink(tmp_path, 10) as sink:
        for i in range(5):
            sink.write({"__key__": str(i), "jpg": b"x" * 5000})
    p = shard_paths(tmp_path)[0]
    p.write_bytes(p.read_bytes()[:7000])
    with pytest.raises(ShardError, match="00000.tar"):
        list(iter_samples([p]))


def test_reader_matches_webdataset_on_tarfile_pax_archives(tmp_path):
    import io
    import webdataset as wds
    p = tmp_path / "pax.tar"
    with tarfile.open(p, "w", format=tarfile.PAX_FORMAT) as tf:      # as other writers produce
        for key in ("a/0001", "a/0002", "ключ"):                      # non-ASCII forces pax records
            for ext, data in (("jpg", b"\xff\xd8" + key.encode()), ("txt", b"t"), ("img_emb.npy", b"n")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    ours = [{k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": s["__key__"]}
            for s in iter_samples([p])]
    theirs = [{k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": s["__key__"]}
              for s in wds.WebDataset(str(p), shardshuffle=False)]
    assert ours == theirs and len(ours) == 3 and ours[2]["__key__"] == "ключ"


def test_flipped_header_byte_is_a_checksum_error(tmp_path):
    with ShardSink(tmp_path, 10) as sink:
        sink.write({"__key__": "0", "txt": "hello"})
    p = shard_paths(tmp_path)[0]
    raw = bytearray(p.read_bytes())
    raw[3] ^= 0x20                                                      # inside the name field
    p.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="checksum"):
        list(iter_samples([p]))


def test_checksum_modulo_agrees_with_the_exact_sum():
    import random
    from pipeline.data.shards import checksum_ok, ustar_header
    rng = random.Random(0)
    for _ in range(300):
        header = bytearray(ustar_header(f"{rng.randrange(10 ** 6):07d}.txt_tokens.npy", rng.randrange(10 ** 7)))
        exact = sum(header) - sum(header[148:156]) + 8 * 32
        assert checksum_ok(bytes(header), exact)
        for i in rng.sample([i for i in range(512) if not 148 <= i < 156], rng.randint(1, 256)):
            header[i] = rng.randrange(256)
        changed = sum(header) - sum(header[148:156]) + 8 * 32
        assert checksum_ok(bytes(header), exact) == (changed == exact)
