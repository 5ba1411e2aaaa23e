"""The reader under the loader: shard index scans, corrupt and truncated shards named or skipped-and-recorded,
direct batches (read straight into the batch arrays) equal to the general decode path, threads, page-cache-only
helper reads, recycled and shared batch memory."""

import io
import json
import struct
import uuid
import zipfile

import numpy as np
import pytest
import torch

from loom.datasets import io as dio
from loom.datasets import loader as L
from loom.platform import shards, storage
from tests.datasets.toy_corpus import (corrupt, keys_of, make_corpus, npy, npy_long_header, npy_v2, same_batches,
                                       slow_reads, toy_npz, truncate)


@pytest.mark.parametrize("gap", [None, 0])  # 0: every member is its own read (as past an array not asked for)
def test_direct_batches_match_the_general_path_whatever_the_npy_headers(tmp_path, monkeypatch, gap):
    if gap is not None:
        monkeypatch.setattr(dio, "_GAP", gap)
    out = str(tmp_path / "c")
    general_calls = []
    decoded_batch = L.LoomDataset._decoded_batch
    monkeypatch.setattr(L.LoomDataset, "_decoded_batch",
                        lambda self, ids, *a: general_calls.append(ids.tolist()) or decoded_batch(self, ids, *a))

    def sample(i):
        x = np.array([i, i * 10], dtype=np.int64)
        xs = {3: npy_long_header(x), 4: npy_v2(x)}.get(i, npy(x))  # other header lengths and bytes mid-batch
        w = np.arange(i % 3 + 1, dtype=np.float32)  # shapes differ between samples: kept as a list
        return {"x.npy": xs, "w.npy": npy(w) if i >= 8 else npy(np.zeros(2, np.float32)), "z.npz": toy_npz(i),
                "meta.json": json.dumps({"kind": "toy", "i": i}).encode()}

    make_corpus(out, sample=sample)
    for keys in (None, ("x",)):
        kw = {"batch_size": 4, "shuffle": False, "world_size": 1, "rank": 0, "keys": keys}
        general_calls.clear()
        direct = list(L.LoomLoader(out, **kw))
        # read directly: the batches with the odd headers (samples 3 and 4); the general path only where the
        # shapes of w differ (samples 8..15)
        assert general_calls == ([] if keys else [[8, 9, 10, 11], [12, 13, 14, 15]])
        general = list(L.LoomLoader(out, **kw, transform=lambda s, r: s))
        assert len(direct) == len(general) == 4
        for d, g in zip(direct, general, strict=True):
            assert d.keys() == g.keys() and d["__key__"] == g["__key__"] and d["meta"] == g["meta"]
            assert torch.equal(d["x"], g["x"]) and d["x"][:, 0].tolist() == [int(k[1:]) for k in d["__key__"]]
            if keys is None:
                assert torch.equal(d["y"], g["y"])
                w_d, w_g = d["w"], g["w"]
                assert type(w_d) is type(w_g)
                assert all(torch.equal(a, b) for a, b in zip(w_d, w_g, strict=True))
            else:
                assert "w" not in d and "y" not in d  # not asked for
        if keys is None:
            assert isinstance(direct[0]["w"], torch.Tensor) and isinstance(direct[2]["w"], list)


def test_batch_memory_is_reused_only_once_every_tensor_of_it_is_gone(corpus):
    mem = dio.BatchMemory()
    a = mem.take(10000)
    first = a.ctypes.data
    assert first % 4096 == 0 and a.nbytes == 10000 and a.flags.writeable
    t = torch.from_numpy(a[4096:].view(np.float32))[1:]  # a tensor of a view of it
    del a
    b = mem.take(10000)
    assert b.ctypes.data != first, "memory handed out again while a tensor of it exists"
    second = b.ctypes.data
    del t, b
    assert {mem.take(10000).ctypes.data, mem.take(10000).ctypes.data} == {first, second}  # both reused

    out, _ = corpus
    ld = L.LoomLoader(out, batch_size=2, seed=3, world_size=1, rank=0)
    held = [(b["x"], b["x"].clone()) for b in ld]  # epoch 0, every batch kept
    assert all(torch.equal(x, c) for x, c in held), "a batch was overwritten while the consumer held it"
    view, want = held[0][0][1:], held[0][1][1:]
    del held
    for b in ld:  # epoch 1 (another order) may reuse the memory of the dropped batches only
        assert b["x"].data_ptr() != view.data_ptr() - 16
    assert torch.equal(view, want)


def test_npz_members_parse_like_numpy(tmp_path):
    from loom.datasets.codecs import npz, unnpz

    arrays = {"K": np.random.default_rng(0).random((5, 3, 3), dtype=np.float32), "e": np.zeros((0, 2)),
              "s": np.float64(2.5), "b": np.ones((2, 2), bool)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # stored, not deflated
    for data in (npz(**arrays), buf.getvalue()):
        got, ref = dio._unnpz(data), unnpz(data)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape and np.array_equal(got[k], ref[k])
            assert got[k].flags.writeable
        info = zipfile.ZipFile(io.BytesIO(data)).infolist()[0]
        local = struct.unpack_from("<26xHH", data, info.header_offset)
        bad = bytearray(data)
        bad[info.header_offset + 30 + sum(local) + info.compress_size // 2] ^= 0xFF  # inside the first payload
        with pytest.raises(Exception):  # noqa: B017 - zlib's, the CRC check's or numpy's error: never silent
            dio._unnpz(bytes(bad))


def test_latent_samples_load_directly(tmp_path):
    from loom.datasets import latents
    from loom.datasets.codecs import npz

    def sample(i):
        rng = np.random.default_rng(i)
        f = {f"{p}_latent.npy": latents.npy(rng.standard_normal((4, 2, 3, 5)).astype(np.float16))
             for p in latents.PASSES}
        f["mask_latent.npy"] = latents.npy(rng.random((2, 3, 5)).astype(np.float16))
        f["camera.npz"] = npz(K=rng.random((5, 3, 3), dtype=np.float32), c2w=rng.random((5, 4, 4), dtype=np.float32))
        f["meta.json"] = json.dumps({"kind": "ttv", "i": i, "latents": {"passes": list(latents.PASSES)}}).encode()
        return f

    out = str(tmp_path / "lat")
    make_corpus(out, sizes=(3, 2), kind="latents", sample=sample)
    batches = list(L.LoomLoader(out, batch_size=2, world_size=1, rank=0, seed=1))
    ref = {s["__key__"]: s for s in latents.iter_samples(out)}
    for b in batches:
        assert b["rgb_latent"].dtype == torch.float16 and b["rgb_latent"].shape == (2, 4, 2, 3, 5)
        assert b["K"].shape == (2, 5, 3, 3) and b["c2w"].shape == (2, 5, 4, 4)
        for j, key in enumerate(b["__key__"]):
            for name in ("rgb_latent", "normal_latent", "position_latent", "mask_latent"):
                assert np.array_equal(b[name][j].float().numpy(), ref[key][name])
            assert np.array_equal(b["K"][j].numpy(), ref[key]["K"]) and b["meta"][j] == ref[key]["meta"]


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threaded_direct_batches_equal_one_thread(corpus, monkeypatch, threads):
    out, _ = corpus
    kw = {"batch_size": 4, "seed": 5, "world_size": 1, "rank": 0}
    one = [list(ld) for ld in [L.LoomLoader(out, read_threads=1, **kw)] for _ in range(2)]
    readers = slow_reads(monkeypatch)
    ld = L.LoomLoader(out, read_threads=threads, **kw)
    many = [list(ld) for _ in range(2)]  # two epochs: the pool and the batch memory are reused
    assert len(readers) > 1, "the batches were not read by several threads"
    for a, b in zip(one, many, strict=True):
        same_batches(a, b)
    assert L.LoomDataset(out, 4).reader.threads(True) == dio.DIRECT_READ_THREADS > 1  # the default on local files
    assert L.LoomDataset(out, 4).reader.threads(False) == 1


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_threaded_direct_path_skips_failed_samples_in_order(tmp_path, monkeypatch, threads):
    out = str(tmp_path / "c")
    keys = make_corpus(out)
    bad = {"k0004": ("x.npy", 0),  # the first sample of batch 1: its headers cannot be learned
           "k0009": ("z.npz", None), "k0010": ("x.npy", 0),  # two neighbours in the middle of batch 2
           "k0014": ("x.npy", 0)}  # the third of batch 3
    for key, (ext, at) in bad.items():
        corrupt(out, key, ext, at)
    kw = {"batch_size": 4, "shuffle": False, "world_size": 1, "rank": 0}
    general = list(L.LoomLoader(out, on_error="skip", transform=lambda s, r: s, **kw))  # the decode path
    readers = slow_reads(monkeypatch)
    ld = L.LoomLoader(out, on_error="skip", read_threads=threads, **kw)
    got = list(ld)
    assert threads == 1 or len(readers) > 1
    same_batches(got, general)
    assert [s["key"] for s in ld.skipped] == list(bad)
    assert [b["x"][:, 0].tolist() for b in got] == [[0, 1, 2, 3], [5, 6, 7], [8, 11], [12, 13, 15]]
    assert keys_of(got, with_pad=False) == [k for k in keys if k not in bad]


@pytest.mark.parametrize("threads", [2, 4])
def test_threaded_direct_path_raises_for_the_first_failure_in_batch_order(tmp_path, monkeypatch, threads):
    import time

    out = str(tmp_path / "c")
    make_corpus(out)
    corrupt(out, "k0009", "z.npz", None)
    corrupt(out, "k0010", "x.npy")
    url = shards.shard_url(out, shards.shard_name("toy", 3))
    late = dio.scan_shard(url).members[0]["x.npy"][0]  # k0009's first member is x.npy: its read starts there
    readv = dio.RangeReader.readv

    def k0009_last(self, u, start, bufs, total=None, cached_only=False):
        if u == url and start <= late < start + (total or 0):
            time.sleep(0.05)  # k0010 fails first in time
        return readv(self, u, start, bufs, total, cached_only)

    monkeypatch.setattr(dio.RangeReader, "readv", k0009_last)
    ld = L.LoomLoader(out, batch_size=4, shuffle=False, world_size=1, rank=0, read_threads=threads)
    it = iter(ld)
    assert next(it)["__key__"] == ["k0000", "k0001", "k0002", "k0003"]
    assert next(it)["__key__"] == ["k0004", "k0005", "k0006", "k0007"]
    with pytest.raises(shards.ShardError, match="toy-000003.tar.*k0009"):
        next(it)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_worker_batches_come_in_shared_memory_and_equal_the_main_process_ones(tmp_path):
    out = str(tmp_path / "c")
    make_corpus(out)
    corrupt(out, "k0005", "z.npz", None)  # a row to close up, in a worker
    kw = {"batch_size": 4, "seed": 2, "world_size": 1, "rank": 0, "on_error": "skip"}
    main = list(L.LoomLoader(out, **kw))
    workers = list(L.LoomLoader(out, num_workers=2, **kw))
    same_batches(workers, main)
    for b in workers:
        # made in shared memory by the worker: the main process maps it (no copy into fresh shared memory), and
        # the small tensors share one block (one file descriptor to pass, not one per tensor)
        assert b["x"].is_shared() and b["y"].is_shared()
        ptr = b["y"].untyped_storage().data_ptr()
        assert b["__pad__"].untyped_storage().data_ptr() == ptr == b["__index__"].untyped_storage().data_ptr()


def test_threaded_direct_path_resumes_exactly(corpus, monkeypatch):
    out, _ = corpus
    kw = {"batch_size": 2, "seed": 3, "world_size": 1, "rank": 0}
    ref = L.LoomLoader(out, read_threads=1, **kw)
    full = [keys_of([b]) for _ in range(2) for b in ref]
    slow_reads(monkeypatch)
    a = L.LoomLoader(out, read_threads=2, **kw)
    seen = []
    for b in a:
        seen.append(keys_of([b]))
        if len(seen) == 3:
            break
    b_ = L.LoomLoader(out, read_threads=2, **kw)
    b_.load_state_dict(json.loads(json.dumps(a.state_dict())))
    rest = []
    while len(seen) + len(rest) < len(full):
        rest += [keys_of([b]) for b in b_]
    assert seen + rest == full


def test_truncated_shard_is_named_or_skipped_and_recorded(tmp_path):
    out = str(tmp_path / "c")
    keys = make_corpus(out)
    name = shards.shard_name("toy", 1)
    truncate(out, name, 1536)  # cut inside the second sample (5 in this shard)
    with pytest.raises(shards.ShardError, match=name):
        L.LoomLoader(out, batch_size=2)
    ld = L.LoomLoader(out, batch_size=2, on_error="skip", world_size=1, rank=0)
    assert [s["shard"].endswith(name) for s in ld.skipped] == [True]
    got = keys_of(list(ld), with_pad=False)
    assert sorted(got) == keys[:3] + keys[8:]  # the other shards, each sample once


def test_shard_cut_after_indexing_is_named_or_skipped_by_the_direct_path(tmp_path):
    out = str(tmp_path / "c")
    keys = make_corpus(out)
    ld = L.LoomLoader(out, batch_size=4, world_size=1, rank=0, shuffle=False, on_error="skip")  # indexed whole
    url = shards.shard_url(out, shards.shard_name("toy", 1))  # samples 3..7
    x_of_5 = dio.scan_shard(url).members[2]["x.npy"][0]
    storage.write_bytes(url, storage.read_bytes(url)[:x_of_5 + 130])  # inside sample 5's x payload
    got = list(ld)
    assert [s["key"] for s in ld.skipped] == ["k0005", "k0006", "k0007"]
    assert all("short read" in s["reason"] for s in ld.skipped)
    assert sorted(keys_of(got, with_pad=False)) == [k for k in keys if k not in ("k0005", "k0006", "k0007")]
    assert got[1]["x"][:, 0].tolist() == [4]  # the rows that were read, and no others
    with pytest.raises(shards.ShardError, match="toy-000001.tar.*k0005"):
        list(L.LoomLoader(out, batch_size=4, world_size=1, rank=0, shuffle=False, cache_index=True))


def test_truncated_at_a_header_boundary_without_manifest_is_caught(tmp_path):
    out = str(tmp_path / "c")
    make_corpus(out)
    storage.remove(storage.join(out, shards.MANIFEST))  # a bare folder of tars: no sizes or keys to compare with
    url = shards.shard_url(out, shards.shard_name("toy", 3))
    data = storage.read_bytes(url)
    members = dio.scan_shard(url).members
    cut = members[4]["meta.json"][0] - 512  # exactly before a header: tarfile alone would see a clean end
    storage.write_bytes(url, data[:cut])
    with pytest.raises(shards.ShardError, match="toy-000003.tar.*end-of-archive"):
        dio.scan_shard(url)


def test_corrupt_member_names_shard_and_key_or_is_skipped(tmp_path):
    out = str(tmp_path / "c")
    keys = make_corpus(out)
    name = shards.shard_name("toy", 3)
    url = shards.shard_url(out, name)
    ix = dio.scan_shard(url)
    o, n = ix.members[2]["z.npz"]
    data = bytearray(storage.read_bytes(url))
    data[o + n // 2:o + n // 2 + 8] = b"\xff" * 8  # a bit-rot in the compressed payload: same size, same keys
    storage.write_bytes(url, bytes(data))
    bad = ix.keys[2]
    ld = L.LoomLoader(out, batch_size=4, world_size=1, rank=0, shuffle=False)
    with pytest.raises(shards.ShardError, match=f"{name}.*{bad}"):
        list(ld)
    ld = L.LoomLoader(out, batch_size=4, world_size=1, rank=0, on_error="skip", num_workers=2)
    batches = list(ld)
    assert [s["key"] for s in ld.skipped] == [bad] and name in ld.skipped[0]["shard"]
    got = keys_of(batches, with_pad=False)
    assert sorted(got) == [k for k in keys if k != bad]
    assert len(batches) == 4 and sum(len(b["__skipped__"]) for b in batches) == 1


def test_memory_filesystem_and_index_cache(tmp_path):
    out = f"memory://loom-loader-{uuid.uuid4().hex}"
    keys = make_corpus(out)
    ld = L.LoomLoader(out, batch_size=5, world_size=1, rank=0, read_threads=4)
    assert sorted(keys_of(list(ld), with_pad=False)) == keys
    assert storage.exists(storage.join(out, dio.INDEX))
    cached, _, _ = dio.build_index(out)
    assert [c.keys for c in cached] == [ix.keys for ix in ld.dataset.index]


def test_folder_of_tars_and_generic_kind(tmp_path):
    out = str(tmp_path / "c")
    keys = make_corpus(out, sizes=(2, 2))
    storage.remove(storage.join(out, shards.MANIFEST))
    ld = L.LoomLoader(storage.join(out, "shards"), batch_size=2, world_size=1, rank=0)
    assert ld.dataset.kind == "toy" and sorted(keys_of(list(ld))) == keys


def test_helper_threads_leave_samples_outside_the_page_cache_to_the_calling_thread(corpus, monkeypatch):
    """Helpers read with RWF_NOWAIT: from the device one reader at a time is faster, so a sample that is not cached
    goes to the calling thread; the batches are the same."""
    import os
    import threading

    out, _ = corpus
    kw = {"batch_size": 4, "seed": 5, "world_size": 1, "rank": 0}
    want = list(L.LoomLoader(out, read_threads=1, **kw))
    if not dio._RWF_NOWAIT:
        pytest.skip("no RWF_NOWAIT on this platform")
    for url in shards.shard_urls(out):  # out of the page cache (written back first: dirty pages stay)
        fd = os.open(url, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    calls = []
    readv = dio.RangeReader.readv

    def spy(self, url, start, bufs, total=None, cached_only=False):
        try:
            got = readv(self, url, start, bufs, total, cached_only)
        except dio._WouldBlock:
            calls.append((threading.current_thread().name, cached_only, "would block"))
            raise
        calls.append((threading.current_thread().name, cached_only, "read"))
        return got

    monkeypatch.setattr(dio.RangeReader, "readv", spy)
    same_batches(want, list(L.LoomLoader(out, read_threads=2, **kw)))
    assert all(cached == name.startswith("loom-read") for name, cached, _ in calls)  # helpers: cached only
    assert ("MainThread", False, "read") in calls
    if any(what == "would block" for _, _, what in calls):  # the usual case after the eviction
        assert all(what == "read" for name, _, what in calls if not name.startswith("loom-read"))

    def never_cached(self, url, start, bufs, total=None, cached_only=False):
        if cached_only:
            raise dio._WouldBlock
        return readv(self, url, start, bufs, total)

    monkeypatch.setattr(dio.RangeReader, "readv", never_cached)  # every helper read would block: all on this thread
    same_batches(want, list(L.LoomLoader(out, read_threads=3, **kw)))
