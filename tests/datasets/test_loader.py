"""The PyTorch loader over Loom shards: exactly once per epoch, the same order for any worker count, rank split
without hangs, exact mid-epoch resume, corrupt shards named or skipped-and-recorded, Ray Data."""

import io
import json
import struct
import uuid
import zipfile

import numpy as np
import pytest
import torch

from loom.datasets import loader as L
from loom.platform import shards, storage

torch.set_num_threads(1)

SIZES = (3, 5, 1, 7)  # uneven on purpose: 16 samples


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def make_corpus(out, sizes=SIZES, kind="toy", sample=None):
    """A Loom output folder with shards of ``sizes`` samples; toy samples carry their number in x.npy."""
    names, n = [], 0
    sample = sample or (lambda i: {"x.npy": _npy(np.array([i, i * 10], dtype=np.int64)),
                                   "z.npz": _zip(i), "meta.json": json.dumps({"kind": kind, "i": i}).encode()})
    for s, size in enumerate(sizes):
        name = shards.shard_name("toy", s)
        items = [(f"k{n + j:04d}", sample(n + j)) for j in range(size)]
        n += size
        sz, sha, keys = shards.write_tar(shards.shard_url(out, name), items)
        shards.write_sidecar(out, shards.ShardRecord(name=name, samples=len(keys), size=sz, sha256=sha, keys=keys))
        names.append(name)
    shards.write_manifest(out, names, extra={"kind": kind})
    return [f"k{i:04d}" for i in range(n)]


def _zip(i):
    from loom.datasets.codecs import npz
    return npz(y=np.full((4,), i, dtype=np.float32))


@pytest.fixture
def corpus(tmp_path):
    out = str(tmp_path / "corpus")
    return out, make_corpus(out)


def run_epoch(out, nw=0, **kw):
    ld = L.LoomLoader(out, batch_size=kw.pop("batch_size", 3), num_workers=nw, **kw)
    return ld, [b for b in ld]


def keys_of(batches, with_pad=True):
    return [k for b in batches for k, p in zip(b["__key__"], b["__pad__"].tolist(), strict=True) if with_pad or not p]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on a 2-core machine, on purpose
@pytest.mark.parametrize("buffer", [None, 4])
def test_exactly_once_and_same_order_over_workers_and_ranks(corpus, buffer):
    out, keys = corpus
    per_world = {}
    for nw in (0, 1, 2, 4):
        ranks = []
        for r in range(2):
            ld, batches = run_epoch(out, nw, seed=7, rank=r, world_size=2, shuffle_buffer=buffer)
            assert len(batches) == len(ld) == 3  # 16 samples padded to 18 = 3 steps of 2 ranks x 3
            assert all(len(b["__key__"]) == 3 for b in batches)
            ranks.append([keys_of([b]) for b in batches])
        real = [k for rb in ranks for b in rb for k in b]
        # every sample exactly once among the non-padded ones; the pads repeat the start of the order
        got = keys_of([b for r in range(2) for b in run_epoch(out, nw, seed=7, rank=r, world_size=2,
                                                                 shuffle_buffer=buffer)[1]], with_pad=False)
        assert sorted(got) == keys and len(real) == 18
        per_world[nw] = ranks
    assert all(per_world[nw] == per_world[0] for nw in (1, 2, 4)), "order depends on the number of workers"
    # the ranks interleave global batches: rank r's step s is global batch 2s + r of the one-rank order
    one = [keys_of([b]) for b in run_epoch(out, 2, seed=7, rank=0, world_size=1, shuffle_buffer=buffer)[1]]
    assert [k for b in one for k in b][:16] == [k for s in range(3) for r in range(2) for k in per_world[0][r][s]][:16]
    # the order is shuffled, changes with the epoch and the seed, and is the same for the same (seed, epoch)
    o0 = keys_of(run_epoch(out, seed=7, world_size=1, rank=0, shuffle_buffer=buffer)[1])
    assert o0 != keys + keys[:2] and sorted(set(o0)) == keys
    assert L.epoch_order(list(SIZES), 7, 1, True, buffer).tolist() != L.epoch_order(list(SIZES), 7, 0, True,
                                                                                      buffer).tolist()
    assert L.epoch_order(list(SIZES), 8, 0, True, buffer).tolist() != L.epoch_order(list(SIZES), 7, 0, True,
                                                                                      buffer).tolist()


def test_uneven_ranks_get_equal_batches_and_drop_last(corpus):
    out, _ = corpus
    for ws in (3, 5):  # 16 samples: no world size divides them
        counts = [len(run_epoch(out, 0, batch_size=2, rank=r, world_size=ws)[1]) for r in range(ws)]
        assert len(set(counts)) == 1, f"ranks would wait for each other at the end of the epoch: {counts}"
    got = []
    for r in range(2):
        _, b = run_epoch(out, 0, rank=r, world_size=2, drop_last=True)
        assert len(b) == 2 and not any(x["__pad__"].any() for x in b)
        got += keys_of(b)
    assert len(got) == len(set(got)) == 12


def test_batches_are_tensors_and_collated(corpus):
    out, _ = corpus
    _, batches = run_epoch(out, 0, batch_size=4, shuffle=False, world_size=1, rank=0)
    b = batches[0]
    assert b["x"].dtype == torch.int64 and b["x"].shape == (4, 2)
    assert b["x"][:, 0].tolist() == [0, 1, 2, 3] and b["y"].shape == (4, 4)
    assert [m["i"] for m in b["meta"]] == [0, 1, 2, 3] and b["__key__"] == ["k0000", "k0001", "k0002", "k0003"]
    assert b["__index__"].tolist() == [0, 1, 2, 3]
    # .npy members read straight into the batch == the general decode path (forced by a transform)
    _, general = run_epoch(out, 0, batch_size=4, shuffle=False, world_size=1, rank=0, transform=lambda s, r: s)
    for x, y in zip(batches, general, strict=True):
        assert x["__key__"] == y["__key__"] and torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"])


def _npy_long_header(a):
    """A valid .npy whose header is padded to 192 bytes (numpy writes 128 for small arrays)."""
    d = repr({"descr": a.dtype.str, "fortran_order": False, "shape": a.shape}).encode()
    head = d + b" " * (192 - 10 - len(d) - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + a.tobytes()


def _npy_v2(a):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, version=(2, 0))
    return buf.getvalue()


@pytest.mark.parametrize("gap", [None, 0])  # 0: every member is its own read (as past an array not asked for)
def test_direct_batches_match_the_general_path_whatever_the_npy_headers(tmp_path, monkeypatch, gap):
    if gap is not None:
        monkeypatch.setattr(L, "_GAP", gap)
    out = str(tmp_path / "c")
    general_calls = []
    decoded_batch = L.LoomDataset._decoded_batch
    monkeypatch.setattr(L.LoomDataset, "_decoded_batch",
                        lambda self, ids, *a: general_calls.append(ids.tolist()) or decoded_batch(self, ids, *a))

    def sample(i):
        x = np.array([i, i * 10], dtype=np.int64)
        xs = {3: _npy_long_header(x), 4: _npy_v2(x)}.get(i, _npy(x))  # other header lengths and bytes mid-batch
        w = np.arange(i % 3 + 1, dtype=np.float32)  # shapes differ between samples: kept as a list
        return {"x.npy": xs, "w.npy": _npy(w) if i >= 8 else _npy(np.zeros(2, np.float32)), "z.npz": _zip(i),
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
    mem = L._BatchMemory()
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


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_forked_workers_after_reading_in_the_main_process(corpus):
    out, _ = corpus
    ld = L.LoomLoader(out, batch_size=3, seed=2, world_size=1, rank=0)
    ref = [keys_of([b]) for b in ld]  # the main process made its reading state (batch memory, scratch)
    ld.num_workers = 2  # forked workers inherit that state without pickling: they must make their own
    ld.set_epoch(0)
    assert [keys_of([b]) for b in ld] == ref


def test_npz_members_parse_like_numpy(tmp_path):
    from loom.datasets.codecs import npz, unnpz

    arrays = {"K": np.random.default_rng(0).random((5, 3, 3), dtype=np.float32), "e": np.zeros((0, 2)),
              "s": np.float64(2.5), "b": np.ones((2, 2), bool)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # stored, not deflated
    for data in (npz(**arrays), buf.getvalue()):
        got, ref = L._unnpz(data), unnpz(data)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape and np.array_equal(got[k], ref[k])
            assert got[k].flags.writeable
        info = zipfile.ZipFile(io.BytesIO(data)).infolist()[0]
        local = struct.unpack_from("<26xHH", data, info.header_offset)
        bad = bytearray(data)
        bad[info.header_offset + 30 + sum(local) + info.compress_size // 2] ^= 0xFF  # inside the first payload
        with pytest.raises(Exception):  # noqa: B017 - zlib's, the CRC check's or numpy's error: never silent
            L._unnpz(bytes(bad))


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


def _slow_reads(monkeypatch):
    """Make every direct read sleep a little, longer for some samples than others, so that the read threads
    finish out of order; record the threads that read."""
    import threading
    import time

    readers = set()
    readv = L._Reader.readv

    def slow(self, url, start, bufs, total=None, cached_only=False):
        readers.add(threading.get_ident())
        time.sleep(0.001 * (start // 512 % 4))  # GIL released: the other threads read meanwhile
        return readv(self, url, start, bufs, total, cached_only)

    monkeypatch.setattr(L._Reader, "readv", slow)
    return readers


def _corrupt(out, key, ext, at=0):
    """Overwrite 8 bytes of member ``ext`` of sample ``key`` at ``at`` (default: its first bytes, e.g. the .npy
    magic) or, with ``at=None``, in its middle; same size and keys, so the index still accepts the shard."""
    for url in shards.shard_urls(out):
        ix = L.scan_shard(url)
        if key in ix.keys:
            o, n = ix.members[ix.keys.index(key)][ext]
            p = o + (n // 2 if at is None else at)
            data = bytearray(storage.read_bytes(url))
            data[p:p + 8] = b"\xff" * 8
            storage.write_bytes(url, bytes(data))
            return
    raise KeyError(key)


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and x["__key__"] == y["__key__"] and x["meta"] == y["meta"]
        assert torch.equal(x["__index__"], y["__index__"]) and torch.equal(x["__pad__"], y["__pad__"])
        assert torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"])
        assert x["x"][:, 0].tolist() == [int(k[1:]) for k in x["__key__"]]  # each row is its sample's
        assert [s["key"] for s in x["__skipped__"]] == [s["key"] for s in y["__skipped__"]]


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threaded_direct_batches_equal_one_thread(corpus, monkeypatch, threads):
    out, _ = corpus
    kw = {"batch_size": 4, "seed": 5, "world_size": 1, "rank": 0}
    one = [list(ld) for ld in [L.LoomLoader(out, read_threads=1, **kw)] for _ in range(2)]
    readers = _slow_reads(monkeypatch)
    ld = L.LoomLoader(out, read_threads=threads, **kw)
    many = [list(ld) for _ in range(2)]  # two epochs: the pool and the batch memory are reused
    assert len(readers) > 1, "the batches were not read by several threads"
    for a, b in zip(one, many, strict=True):
        _same_batches(a, b)
    assert L.LoomDataset(out, 4)._threads(True) == L.DIRECT_READ_THREADS > 1  # the default on local files
    assert L.LoomDataset(out, 4)._threads(False) == 1


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_threaded_direct_path_skips_failed_samples_in_order(tmp_path, monkeypatch, threads):
    out = str(tmp_path / "c")
    keys = make_corpus(out)
    bad = {"k0004": ("x.npy", 0),  # the first sample of batch 1: its headers cannot be learned
           "k0009": ("z.npz", None), "k0010": ("x.npy", 0),  # two neighbours in the middle of batch 2
           "k0014": ("x.npy", 0)}  # the third of batch 3
    for key, (ext, at) in bad.items():
        _corrupt(out, key, ext, at)
    kw = {"batch_size": 4, "shuffle": False, "world_size": 1, "rank": 0}
    general = list(L.LoomLoader(out, on_error="skip", transform=lambda s, r: s, **kw))  # the decode path
    readers = _slow_reads(monkeypatch)
    ld = L.LoomLoader(out, on_error="skip", read_threads=threads, **kw)
    got = list(ld)
    assert threads == 1 or len(readers) > 1
    _same_batches(got, general)
    assert [s["key"] for s in ld.skipped] == list(bad)
    assert [b["x"][:, 0].tolist() for b in got] == [[0, 1, 2, 3], [5, 6, 7], [8, 11], [12, 13, 15]]
    assert keys_of(got, with_pad=False) == [k for k in keys if k not in bad]


@pytest.mark.parametrize("threads", [2, 4])
def test_threaded_direct_path_raises_for_the_first_failure_in_batch_order(tmp_path, monkeypatch, threads):
    import time

    out = str(tmp_path / "c")
    make_corpus(out)
    _corrupt(out, "k0009", "z.npz", None)
    _corrupt(out, "k0010", "x.npy")
    url = shards.shard_url(out, shards.shard_name("toy", 3))
    late = L.scan_shard(url).members[0]["x.npy"][0]  # k0009's first member is x.npy: its read starts there
    readv = L._Reader.readv

    def k0009_last(self, u, start, bufs, total=None, cached_only=False):
        if u == url and start <= late < start + (total or 0):
            time.sleep(0.05)  # k0010 fails first in time
        return readv(self, u, start, bufs, total, cached_only)

    monkeypatch.setattr(L._Reader, "readv", k0009_last)
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
    _corrupt(out, "k0005", "z.npz", None)  # a row to close up, in a worker
    kw = {"batch_size": 4, "seed": 2, "world_size": 1, "rank": 0, "on_error": "skip"}
    main = list(L.LoomLoader(out, **kw))
    workers = list(L.LoomLoader(out, num_workers=2, **kw))
    _same_batches(workers, main)
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
    _slow_reads(monkeypatch)
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


@pytest.mark.parametrize("nw", [0, 2])
def test_resume_mid_epoch_gives_the_same_next_batches(corpus, nw):
    out, _ = corpus
    kw = {"batch_size": 2, "seed": 3, "rank": 1, "world_size": 2, "num_workers": nw}
    ref = L.LoomLoader(out, **kw)
    full = [keys_of([b]) for _ in range(2) for b in ref]  # two epochs, uninterrupted
    assert len(full) == 2 * len(ref) == 8
    for stop in (1, 3, 5):  # mid-epoch 0, mid-epoch 0 at an odd batch, mid-epoch 1
        a = L.LoomLoader(out, **kw)
        seen = []
        while len(seen) < stop:
            for b in a:
                seen.append(keys_of([b]))
                if len(seen) == stop:
                    break
        state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint file
        del a  # "crash"
        b_ = L.LoomLoader(out, **kw)
        b_.load_state_dict(state)
        rest = []
        while len(seen) + len(rest) < len(full):
            rest += [keys_of([b]) for b in b_]
        assert seen + rest == full, f"resume after {stop} batches differs"


def _consume(ld, k):
    """The first ``k`` batches of the loader's epoch, and its state as a checkpoint file would give it back."""
    got = []
    for b in ld:
        got.append(b)
        if len(got) == k:
            break
    return got, json.loads(json.dumps(ld.state_dict()))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("k", [1, 2])
def test_resume_with_another_world_or_batch_size_sees_each_sample_once(corpus, k):
    out, keys = corpus  # 16 samples
    seen, states = [], []
    for r in range(2):  # 2 ranks x batches of 2: each step consumes a block of 4 samples of the global order
        got, st = _consume(L.LoomLoader(out, batch_size=2, seed=4, rank=r, world_size=2), k)
        assert not any(b["__pad__"].any() for b in got)
        seen += keys_of(got)
        states.append(st)
    assert states[0]["samples"] == states[1]["samples"] == 4 * k
    order = L.epoch_order(list(SIZES), 4, 0).tolist()
    # (world, batch, workers): 1 rank on a block boundary; 4 ranks mid-block for k=1; 3 ranks never on one, with a
    # remainder to pad (3 x 3) or not (3 x 2); another batch size
    for ws, bs, nw in ((1, 2, 0), (4, 2, 0), (3, 3, 2), (3, 2, 0)):
        runs = []
        for r in range(ws):
            ld = L.LoomLoader(out, batch_size=bs, seed=4, rank=r, world_size=ws, num_workers=nw)
            ld.load_state_dict(states[r % 2])  # every rank of the old run holds the same position
            runs.append(list(ld))
            assert ld.epoch == 1 and ld.batch == 0, "the resumed epoch did not run to its end"
        assert len({len(b) for b in runs}) == 1, f"ranks would wait for each other: {[len(b) for b in runs]}"
        assert all(len(b["__key__"]) == bs for rb in runs for b in rb)
        rest = [b for rb in runs for b in rb]
        assert sorted(seen + keys_of(rest, with_pad=False)) == keys, f"world {ws} x batch {bs}: not exactly once"
        # the new run continues the same global order: its samples are those after the 4k consumed ones
        got_ids = {i for b in rest for i, p in zip(b["__index__"].tolist(), b["__pad__"].tolist(), strict=True)
                   if not p}
        assert got_ids == set(order[4 * k:])
    # after the resumed epoch, the next one is the new world's own epoch
    ld = L.LoomLoader(out, batch_size=3, seed=4, rank=1, world_size=3)
    ld.load_state_dict(states[1])
    list(ld)
    ref = L.LoomLoader(out, batch_size=3, seed=4, rank=1, world_size=3)
    ref.set_epoch(1)
    assert keys_of(list(ld)) == keys_of(list(ref))


def test_resume_after_a_remapped_resume_is_exact(corpus):
    out, _ = corpus
    _, state = _consume(L.LoomLoader(out, batch_size=2, seed=4, rank=0, world_size=2), 1)  # 4 samples consumed
    kw = {"batch_size": 2, "seed": 4, "rank": 3, "world_size": 4}  # blocks of 8: resumed mid-block
    a = L.LoomLoader(out, **kw)
    a.load_state_dict(state)
    first, state2 = _consume(a, 1)
    assert state2["samples"] == 12
    rest_a = [keys_of([b]) + b["__pad__"].tolist() for b in a]  # the uninterrupted run, padding included
    b_ = L.LoomLoader(out, **kw)
    b_.load_state_dict(state2)
    rest_b = [keys_of([b]) + b["__pad__"].tolist() for b in b_]
    assert rest_b == rest_a and len(rest_a) == 1 and any(rest_a[0][2:])  # the last batch holds padding


def test_old_states_without_a_sample_position_still_resume(corpus):
    out, keys = corpus
    kw = {"batch_size": 2, "seed": 5, "rank": 0, "world_size": 2}
    ref = [keys_of([b]) for b in L.LoomLoader(out, **kw)]
    _, state = _consume(L.LoomLoader(out, **kw), 2)
    del state["samples"]  # a state saved before the field existed
    b = L.LoomLoader(out, **kw)
    b.load_state_dict(state)
    assert [keys_of([x]) for x in b] == ref[2:]
    one = L.LoomLoader(out, batch_size=2, seed=5, rank=0, world_size=1)  # derived: batch * world * batch size
    one.load_state_dict(state)
    seen = [k for r in range(2) for x in _consume(L.LoomLoader(out, **{**kw, "rank": r}), 2)[0] for k in keys_of([x])]
    assert sorted(seen + keys_of(list(one), with_pad=False)) == keys


def test_resume_with_drop_last_and_another_world_never_repeats(corpus):
    out, _ = corpus
    seen = []
    for r in range(2):
        got, state = _consume(L.LoomLoader(out, batch_size=2, seed=6, rank=r, world_size=2, drop_last=True), 1)
        seen += keys_of(got)
    for r in range(4):
        ld = L.LoomLoader(out, batch_size=2, seed=6, rank=r, world_size=4, drop_last=True)
        ld.load_state_dict(state)
        got = list(ld)
        assert len(got) == 1 and not any(b["__pad__"].any() for b in got)  # 12 left: one block of 8, 4 cut
        seen += keys_of(got)
    assert len(seen) == len(set(seen)) == 12


def test_resume_refuses_a_different_setup(corpus, tmp_path):
    out, _ = corpus
    a = L.LoomLoader(out, batch_size=2, seed=1, world_size=1, rank=0)
    for kw, field in (({"seed": 2}, "seed"), ({"shuffle_buffer": 4}, "shuffle_buffer"), ({"drop_last": True},
                                                                                          "drop_last")):
        b = L.LoomLoader(out, batch_size=2, world_size=1, rank=0, **{"seed": 1, **kw})
        with pytest.raises(ValueError, match=field):
            b.load_state_dict(a.state_dict())
    other = str(tmp_path / "other")
    make_corpus(other, sizes=(3, 5))
    with pytest.raises(ValueError, match="num_samples"):
        L.LoomLoader(other, batch_size=2, seed=1, world_size=1, rank=0).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="samples=99"):
        L.LoomLoader(out, batch_size=2, seed=1, world_size=1, rank=0).load_state_dict({**a.state_dict(), "samples": 99})


def _truncate(out, name, keep):
    url = shards.shard_url(out, name)
    storage.write_bytes(url, storage.read_bytes(url)[:keep])


def test_truncated_shard_is_named_or_skipped_and_recorded(tmp_path):
    out = str(tmp_path / "c")
    keys = make_corpus(out)
    name = shards.shard_name("toy", 1)
    _truncate(out, name, 1536)  # cut inside the second sample (5 in this shard)
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
    x_of_5 = L.scan_shard(url).members[2]["x.npy"][0]
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
    members = L.scan_shard(url).members
    cut = members[4]["meta.json"][0] - 512  # exactly before a header: tarfile alone would see a clean end
    storage.write_bytes(url, data[:cut])
    with pytest.raises(shards.ShardError, match="toy-000003.tar.*end-of-archive"):
        L.scan_shard(url)


def test_corrupt_member_names_shard_and_key_or_is_skipped(tmp_path):
    out = str(tmp_path / "c")
    keys = make_corpus(out)
    name = shards.shard_name("toy", 3)
    url = shards.shard_url(out, name)
    ix = L.scan_shard(url)
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
    assert storage.exists(storage.join(out, L.INDEX))
    cached, _, _ = L.build_index(out)
    assert [c.keys for c in cached] == [ix.keys for ix in ld.dataset.index]


def test_folder_of_tars_and_generic_kind(tmp_path):
    out = str(tmp_path / "c")
    keys = make_corpus(out, sizes=(2, 2))
    storage.remove(storage.join(out, shards.MANIFEST))
    ld = L.LoomLoader(storage.join(out, "shards"), batch_size=2, world_size=1, rank=0)
    assert ld.dataset.kind == "toy" and sorted(keys_of(list(ld))) == keys


def test_ttv_samples_with_transform_reproducible_over_workers(tmp_path):
    from loom.datasets import transforms as T
    from loom.datasets import ttv

    rng = np.random.default_rng(0)

    def sample(i):
        t, h, w = 3, 8, 8
        K = np.tile(np.array([[10.0, 0, 4], [0, 10.0, 4], [0, 0, 1]], np.float32), (t, 1, 1))
        a = {"rgb": rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8),
             "normal": np.zeros((t, h, w, 3), np.float32), "position": np.zeros((t, h, w, 3), np.float32),
             "depth": np.full((t, h, w), float(i), np.float32), "mask": np.ones((t, h, w), bool),
             "K": K, "c2w": np.tile(np.eye(4, dtype=np.float32), (t, 1, 1))}
        return ttv.encode_sample(a, {"kind": "ttv", "i": i})

    out = str(tmp_path / "ttv")
    keys = make_corpus(out, sizes=(2, 3), kind="ttv", sample=sample)
    tf = T.Compose(T.SubsampleFrames(2, mode="random"), T.CropResize((4, 4), scale=(0.5, 1.0)))
    runs = [list(L.LoomLoader(out, batch_size=2, world_size=1, rank=0, transform=tf, num_workers=nw, seed=5))
            for nw in (0, 2)]
    b = runs[0][0]
    assert b["rgb"].shape == (2, 2, 4, 4, 3) and b["rgb"].dtype == torch.uint8
    assert b["K"].shape == (2, 2, 3, 3) and b["mask"].dtype == torch.bool and b["depth"].dtype == torch.float32
    assert b["frame_indices"].shape == (2, 2)
    for x, y in zip(*runs, strict=True):
        assert x["__key__"] == y["__key__"] and torch.equal(x["rgb"], y["rgb"]) and torch.equal(x["K"], y["K"])
    assert sorted(keys_of(runs[0], with_pad=False)) == keys


@pytest.mark.integration
def test_ray_dataset_reads_every_sample(tmp_path, ray_local):
    out = str(tmp_path / "c")
    keys = make_corpus(out)
    ds = L.ray_dataset(out)
    rows = ds.take_all()
    assert sorted(r["__key__"] for r in rows) == keys
    r = next(r for r in rows if r["__key__"] == "k0005")
    assert np.asarray(r["x"]).tolist() == [5, 50] and json.loads(r["meta"])["i"] == 5


@pytest.mark.parametrize("prefetch", [1, 2, 5])
def test_prefetched_batches_and_states_equal_those_made_on_demand(corpus, prefetch):
    out, _ = corpus
    kw = {"batch_size": 2, "seed": 5, "rank": 0, "world_size": 1}
    want = [keys_of([b]) for b in L.LoomLoader(out, prefetch=0, **kw)]
    ld = L.LoomLoader(out, prefetch=prefetch, **kw)
    got, states = [], []
    for b in ld:
        got.append(keys_of([b]))
        states.append(ld.state_dict()["samples"])
    assert got == want and states == [2 * (i + 1) for i in range(len(want))]
    # stopping early: the batches made ahead are not consumed; resuming continues right after the last one yielded
    a = L.LoomLoader(out, prefetch=prefetch, **kw)
    first, state = _consume(a, 2)
    b = L.LoomLoader(out, prefetch=prefetch, **kw)
    b.load_state_dict(state)
    assert [keys_of([x]) for x in first] + [keys_of([x]) for x in b] == want


def test_prefetch_thread_raises_the_shard_error_after_the_good_batches_and_stops(tmp_path):
    import threading

    out = str(tmp_path / "c")
    make_corpus(out)
    name = shards.shard_name("toy", 3)
    url = shards.shard_url(out, name)
    ix = L.scan_shard(url)
    o, n = ix.members[2]["z.npz"]
    data = bytearray(storage.read_bytes(url))
    data[o + n // 2:o + n // 2 + 8] = b"\xff" * 8
    storage.write_bytes(url, bytes(data))
    want = []
    with pytest.raises(shards.ShardError):
        for b in L.LoomLoader(out, batch_size=4, world_size=1, rank=0, shuffle=False, prefetch=0):
            want.append(keys_of([b]))
    got = []
    ld = L.LoomLoader(out, batch_size=4, world_size=1, rank=0, shuffle=False, prefetch=3)
    with pytest.raises(shards.ShardError, match=f"{name}.*{ix.keys[2]}"):
        for b in ld:
            got.append(keys_of([b]))
    assert got == want and ld.state_dict()["batch"] == len(want)  # every good batch before the error, in order
    assert not [t for t in threading.enumerate() if t.name == "loom-prefetch"]  # the thread ended

    it = iter(L.LoomLoader(out, batch_size=1, world_size=1, rank=0, shuffle=False, prefetch=2))
    next(it)
    it.close()  # a consumer that stops early ends the thread too
    assert not [t for t in threading.enumerate() if t.name == "loom-prefetch"]
    with pytest.raises(ValueError, match="prefetch"):
        L.LoomLoader(out, batch_size=1, prefetch=-1)


def test_helper_threads_leave_samples_outside_the_page_cache_to_the_calling_thread(corpus, monkeypatch):
    """Helpers read with RWF_NOWAIT: from the device one reader at a time is faster, so a sample that is not cached
    goes to the calling thread; the batches are the same."""
    import os
    import threading

    out, _ = corpus
    kw = {"batch_size": 4, "seed": 5, "world_size": 1, "rank": 0}
    want = list(L.LoomLoader(out, read_threads=1, **kw))
    if not L._RWF_NOWAIT:
        pytest.skip("no RWF_NOWAIT on this platform")
    for url in shards.shard_urls(out):  # out of the page cache (written back first: dirty pages stay)
        fd = os.open(url, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    calls = []
    readv = L._Reader.readv

    def spy(self, url, start, bufs, total=None, cached_only=False):
        try:
            got = readv(self, url, start, bufs, total, cached_only)
        except L._WouldBlock:
            calls.append((threading.current_thread().name, cached_only, "would block"))
            raise
        calls.append((threading.current_thread().name, cached_only, "read"))
        return got

    monkeypatch.setattr(L._Reader, "readv", spy)
    _same_batches(want, list(L.LoomLoader(out, read_threads=2, **kw)))
    assert all(cached == name.startswith("loom-read") for name, cached, _ in calls)  # helpers: cached only
    assert ("MainThread", False, "read") in calls
    if any(what == "would block" for _, _, what in calls):  # the usual case after the eviction
        assert all(what == "read" for name, _, what in calls if not name.startswith("loom-read"))

    def never_cached(self, url, start, bufs, total=None, cached_only=False):
        if cached_only:
            raise L._WouldBlock
        return readv(self, url, start, bufs, total)

    monkeypatch.setattr(L._Reader, "readv", never_cached)  # every helper read would block: all on this thread
    _same_batches(want, list(L.LoomLoader(out, read_threads=3, **kw)))


def test_workers_on_latent_shards_get_a_warning_that_says_what_is_faster(tmp_path, caplog):
    import logging

    out = str(tmp_path / "lat")
    keys = make_corpus(out)  # generic samples: read straight into the batch
    with caplog.at_level(logging.WARNING, logger=L.log.name):
        L.LoomLoader(out, batch_size=2, num_workers=2)
    assert "num_workers=0 with prefetch=2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=L.log.name):
        L.LoomLoader(out, batch_size=2, num_workers=0, prefetch=2)
    assert caplog.text == "" and keys
