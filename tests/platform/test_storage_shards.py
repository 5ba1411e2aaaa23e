"""Atomic writes, path checks, tar shards, manifests and verification, on local disk and memory://."""


import pytest

from loom.platform import shards, storage


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    import uuid
    return f"memory://loom-test-{uuid.uuid4().hex}"


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "", "a\\b", "..", "a\x00b"])
def test_join_refuses_escapes(bad):
    with pytest.raises(ValueError):
        storage.join("/data/out", bad)


def test_atomic_writer_leaves_nothing_on_error(root):
    url = storage.join(root, "f.bin")
    storage.write_bytes(url, b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(url) as w:
            w.write(b"partial")
            raise RuntimeError("boom")
    assert storage.read_bytes(url) == b"old"
    assert [n for n in storage.listdir(root) if n.startswith(storage.TMP_MARK)] == []


def _samples(n):
    return [(f"s{i}", {"a.txt": f"hello {i}".encode(), "b.bin": bytes(range(i + 1))}) for i in range(n)]


def test_tar_round_trip_is_deterministic_and_webdataset_compatible(root):
    url = storage.join(root, "shards", "x-000000.tar")
    size, sha, keys = shards.write_tar(url, _samples(3))
    assert keys == ["s0", "s1", "s2"] and storage.size(url) == size
    assert list(shards.iter_tar(url)) == _samples(3)
    size2, sha2, _ = shards.write_tar(url, _samples(3))
    assert (size2, sha2) == (size, sha)  # byte-identical rewrite
    if root.startswith("/"):
        import webdataset as wds
        got = list(wds.WebDataset(url, shardshuffle=False))
        assert [g["__key__"] for g in got] == keys and got[1]["a.txt"] == b"hello 1"


def test_truncated_tar_is_a_named_error(root):
    url = storage.join(root, "t.tar")
    shards.write_tar(url, _samples(4))
    data = storage.read_bytes(url)
    storage.write_bytes(url, data[: len(data) // 2 + 100])
    with pytest.raises(shards.ShardError, match="t.tar"):
        list(shards.iter_tar(url))


def test_manifest_and_verify_catch_tampering(root):
    names = []
    for i in range(2):
        name = shards.shard_name("x", i)
        size, sha, keys = shards.write_tar(shards.shard_url(root, name), _samples(2))
        shards.write_sidecar(root, shards.ShardRecord(name=name, samples=2, size=size, sha256=sha, keys=keys,
                                                      failures=[{"key": "bad", "reason": "no faces"}]))
        names.append(name)
    m = shards.write_manifest(root, names)
    assert m["complete"] and m["totals"] == {"shards": 2, "samples": 4, "bytes": m["totals"]["bytes"],
                                             "failures": 2, "samples_with_warnings": 0}
    assert shards.verify(root) == []
    # Same size, different bytes: only the checksum can tell.
    url = shards.shard_url(root, names[1])
    data = bytearray(storage.read_bytes(url))
    data[600] ^= 0xFF
    storage.write_bytes(url, bytes(data))
    problems = shards.verify(root)
    assert len(problems) == 1 and "sha256" in problems[0] and names[1] in problems[0]


def test_incomplete_shard_is_not_complete(root):
    name = shards.shard_name("x", 0)
    shards.write_tar(shards.shard_url(root, name), _samples(1))
    assert shards.read_sidecar(root, name) is None  # tar without sidecar: redo


def test_shard_urls_accepts_folder_and_single_tar(root):
    url = storage.join(root, "a.tar")
    shards.write_tar(url, _samples(1))
    assert shards.shard_urls(url) == [url]
    assert shards.shard_urls(root) == [url]
    with pytest.raises(FileNotFoundError):
        shards.shard_urls(storage.join(root, "nothing-here"))
