"""A toy corpus of Loom shards for the loader tests, and the helpers that read, break and compare it."""

import io
import json

import numpy as np
import torch

from loom.datasets import io as dio
from loom.datasets import loader as L
from loom.platform import shards, storage


SIZES = (3, 5, 1, 7)  # uneven on purpose: 16 samples


def npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def make_corpus(out, sizes=SIZES, kind="toy", sample=None):
    """A Loom output folder with shards of ``sizes`` samples; toy samples carry their number in x.npy."""
    names, n = [], 0
    sample = sample or (lambda i: {"x.npy": npy(np.array([i, i * 10], dtype=np.int64)),
                                   "z.npz": toy_npz(i), "meta.json": json.dumps({"kind": kind, "i": i}).encode()})
    for s, size in enumerate(sizes):
        name = shards.shard_name("toy", s)
        items = [(f"k{n + j:04d}", sample(n + j)) for j in range(size)]
        n += size
        sz, sha, keys = shards.write_tar(shards.shard_url(out, name), items)
        shards.write_sidecar(out, shards.ShardRecord(name=name, samples=len(keys), size=sz, sha256=sha, keys=keys))
        names.append(name)
    shards.write_manifest(out, names, extra={"kind": kind})
    return [f"k{i:04d}" for i in range(n)]


def toy_npz(i):
    from loom.datasets.codecs import npz
    return npz(y=np.full((4,), i, dtype=np.float32))


def run_epoch(out, nw=0, **kw):
    ld = L.LoomLoader(out, batch_size=kw.pop("batch_size", 3), num_workers=nw, **kw)
    return ld, [b for b in ld]


def keys_of(batches, with_pad=True):
    return [k for b in batches for k, p in zip(b["__key__"], b["__pad__"].tolist(), strict=True) if with_pad or not p]


def consume(ld, k):
    """The first ``k`` batches of the loader's epoch, and its state as a checkpoint file would give it back."""
    got = []
    for b in ld:
        got.append(b)
        if len(got) == k:
            break
    return got, json.loads(json.dumps(ld.state_dict()))


def npy_long_header(a):
    """A valid .npy whose header is padded to 192 bytes (numpy writes 128 for small arrays)."""
    d = repr({"descr": a.dtype.str, "fortran_order": False, "shape": a.shape}).encode()
    head = d + b" " * (192 - 10 - len(d) - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + a.tobytes()


def npy_v2(a):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, version=(2, 0))
    return buf.getvalue()


def corrupt(out, key, ext, at=0):
    """Overwrite 8 bytes of member ``ext`` of sample ``key`` at ``at`` (default: its first bytes, e.g. the .npy
    magic) or, with ``at=None``, in its middle; same size and keys, so the index still accepts the shard."""
    for url in shards.shard_urls(out):
        ix = dio.scan_shard(url)
        if key in ix.keys:
            o, n = ix.members[ix.keys.index(key)][ext]
            p = o + (n // 2 if at is None else at)
            data = bytearray(storage.read_bytes(url))
            data[p:p + 8] = b"\xff" * 8
            storage.write_bytes(url, bytes(data))
            return
    raise KeyError(key)


def truncate(out, name, keep):
    url = shards.shard_url(out, name)
    storage.write_bytes(url, storage.read_bytes(url)[:keep])


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and x["__key__"] == y["__key__"] and x["meta"] == y["meta"]
        assert torch.equal(x["__index__"], y["__index__"]) and torch.equal(x["__pad__"], y["__pad__"])
        assert torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"])
        assert x["x"][:, 0].tolist() == [int(k[1:]) for k in x["__key__"]]  # each row is its sample's
        assert [s["key"] for s in x["__skipped__"]] == [s["key"] for s in y["__skipped__"]]


def slow_reads(monkeypatch):
    """Make every direct read sleep a little, longer for some samples than others, so that the read threads
    finish out of order; record the threads that read."""
    import threading
    import time

    readers = set()
    readv = dio.RangeReader.readv

    def slow(self, url, start, bufs, total=None, cached_only=False):
        readers.add(threading.get_ident())
        time.sleep(0.001 * (start // 512 % 4))  # GIL released: the other threads read meanwhile
        return readv(self, url, start, bufs, total, cached_only)

    monkeypatch.setattr(dio.RangeReader, "readv", slow)
    return readers
