"""How the loader reads Loom shards: the index of where each sample lies, the decoders, and the fast reader.

The loader (:mod:`loom.datasets.loader`) decides WHICH samples make a batch; this module reads them. Design notes 1
(index) and 6 (reading) of :mod:`loom.datasets.loader` say why it is built this way; in short:

- :func:`build_index` / :func:`scan_shard`: one scan of the tar headers per shard (cached in ``index.json``), so a
  sample is one contiguous byte range and a truncated shard is found before the epoch starts.
- :class:`RangeReader`: ranged reads, one open handle per shard: ``pread``/``preadv`` on local files (with
  ``RWF_NOWAIT`` for reads that must not wait for the device), ``cat_file`` on any other fsspec filesystem.
- :class:`SampleReader`: per process, the samples of a batch. Generic samples (cached latents) are read by
  :meth:`SampleReader.direct_batch` straight into the rows of recycled, page-aligned batch memory
  (:class:`BatchMemory`), by 2 threads, or in a DataLoader worker into shared memory that the main process maps.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import itertools
import json
import logging
import math
import os
import struct
import tarfile
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from torch.utils.data import get_worker_info

from loom.datasets.codecs import unnpz
from loom.datasets.order import shard_offsets
from loom.platform import shards as _shards
from loom.platform import storage
from loom.platform.shards import ShardError

log = logging.getLogger(__name__)
_MEMORY_LOCK = threading.Lock()

INDEX = "index.json"
INDEX_FORMAT = "loom-index/1"
ON_ERROR = ("raise", "skip")
_IOV_MAX = 512  # buffers per preadv (Linux allows 1024)
DIRECT_READ_THREADS = 2  # concurrent preadv per process for direct batches on local files (benchmarks/README.md)
_GAP = 64 << 10  # unwanted bytes between two wanted members read and dropped rather than skipped by a new read
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)

Decode = Callable[[dict[str, bytes], "tuple[str, ...] | None"], dict[str, Any]]


# ----------------------------------------------------------------------------------------------- index


@dataclass
class ShardIndex:
    """One shard: its URL and, per sample, the key and ``{ext: (offset, size)}`` of its members."""

    url: str
    keys: list[str]
    members: list[dict[str, tuple[int, int]]]

    def span(self, i: int) -> tuple[int, int]:
        """(start, end) bytes covering all members of sample ``i`` (they are contiguous in a Loom tar)."""
        m = self.members[i].values()
        return min(o for o, _ in m), max(o + s for o, s in m)

    def to_dict(self) -> dict:
        return {"keys": self.keys, "members": [{e: list(r) for e, r in m.items()} for m in self.members]}


def scan_shard(url: str, expect_keys: list[str] | None = None, expect_size: int | None = None) -> ShardIndex:
    """Read a tar's headers (seeking over the payloads) into a :class:`ShardIndex`. Raises ShardError naming the
    shard if it is truncated, has a corrupt header, lacks the end-of-archive marker, or disagrees with the
    manifest's size or keys."""
    fs, path = storage.filesystem(url)
    keys: list[str] = []
    members: list[dict[str, tuple[int, int]]] = []
    try:
        total = int(fs.size(path))
        if expect_size is not None and total != expect_size:
            raise ShardError(f"shard {url} has {total} bytes but the manifest says {expect_size} (truncated or "
                             "rewritten?); run `loom shards verify` on its folder and rerun the job")
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > total:
                    raise ShardError(f"shard {url}: member {m.name} is truncated "
                                     f"({total - m.offset_data} of {m.size} bytes)")
                key, ext = _shards.split_member(m.name)
                if not keys or keys[-1] != key:
                    keys.append(key)
                    members.append({})
                members[-1][ext] = (m.offset_data, m.size)
            end = tar.offset
            # tarfile stops quietly at a corrupt header after the first member: insist on two zero blocks there.
            f.seek(end)
            marker = f.read(2 * tarfile.BLOCKSIZE)
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ShardError(f"shard {url} is corrupt or truncated ({type(e).__name__}: {e}); run `loom shards verify` "
                         "on its folder and rerun the job to rewrite it") from e
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise ShardError(f"shard {url} is truncated or corrupt at byte {end} (no end-of-archive marker after "
                         f"{len(keys)} samples); run `loom shards verify` on its folder and rerun the job")
    if len(set(keys)) != len(keys):
        raise ShardError(f"shard {url}: a key's members are not contiguous (not written by Loom?): {keys[:5]}...")
    if expect_keys is not None and keys != list(expect_keys):
        raise ShardError(f"shard {url}: keys {keys[:3]}... ({len(keys)}) differ from the manifest's "
                         f"{list(expect_keys)[:3]}... ({len(expect_keys)}); run `loom shards verify`")
    return ShardIndex(url, keys, members)


def _sources(url: str | list[str]) -> tuple[list[str], dict[str, dict], dict]:
    """(shard URLs, manifest entry per URL, manifest) for an output folder, a folder of tars, a tar or a list."""
    if isinstance(url, (list, tuple)):
        return list(url), {}, {}
    urls = _shards.shard_urls(url)
    if url.endswith(".tar") or not storage.exists(storage.join(url, _shards.MANIFEST)):
        return urls, {}, {}
    manifest = _shards.read_manifest(url)
    entries = {_shards.shard_url(url, s["name"]): s for s in manifest["shards"]}
    return urls, entries, manifest


def build_index(url: str | list[str], on_error: str = "raise", cache: bool = True,
                threads: int = 8) -> tuple[list[ShardIndex], list[dict], dict]:
    """Index every shard at ``url``. Returns (indexes of the readable shards in order, skipped shards as
    ``{shard, key, reason}`` rows, manifest or {}). With ``on_error="raise"`` the first bad shard raises."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: use one of {ON_ERROR}")
    urls, entries, manifest = _sources(url)
    if not urls:
        raise FileNotFoundError(f"no shards at {url}")
    cached = _read_index_cache(url, entries) if (cache and entries) else {}

    def one(u: str) -> ShardIndex | ShardError:
        if u in cached:
            return cached[u]
        e = entries.get(u, {})
        try:
            return scan_shard(u, e.get("keys"), e.get("size"))
        except ShardError as err:
            return err

    with ThreadPoolExecutor(max(1, min(threads, len(urls)))) as pool:
        results = list(pool.map(one, urls))
    out, skipped = [], []
    for u, r in zip(urls, results, strict=True):
        if isinstance(r, ShardError):
            if on_error == "raise":
                raise r
            log.warning("skipping shard: %s", r)
            skipped.append({"shard": u, "key": None, "reason": str(r)})
        else:
            out.append(r)
    if cache and entries and not skipped and len(cached) != len(urls):
        _write_index_cache(url, entries, out)
    return out, skipped, manifest


def _read_index_cache(url: str, entries: dict[str, dict]) -> dict[str, ShardIndex]:
    try:
        doc = storage.read_json(storage.join(url, INDEX))
    except (FileNotFoundError, ValueError, OSError):
        return {}
    if doc.get("format") != INDEX_FORMAT:
        return {}
    got = {}
    for u, e in entries.items():
        s = doc["shards"].get(e["name"])
        if s and s.get("sha256") == e["sha256"] and s.get("size") == e["size"] and s["keys"] == e["keys"]:
            got[u] = ShardIndex(u, s["keys"], [{x: tuple(r) for x, r in m.items()} for m in s["members"]])
    return got


def _write_index_cache(url: str, entries: dict[str, dict], indexes: list[ShardIndex]) -> None:
    shards = {}
    for ix in indexes:
        e = entries[ix.url]
        shards[e["name"]] = {"sha256": e["sha256"], "size": e["size"], **ix.to_dict()}
    try:
        storage.write_bytes(storage.join(url, INDEX),
                            json.dumps({"format": INDEX_FORMAT, "shards": shards}, separators=(",", ":")).encode())
    except Exception as e:  # noqa: BLE001 - a read-only corpus is normal: keep the index in memory
        log.info("index of %s kept in memory (cannot write %s: %s)", url, INDEX, e)


# ----------------------------------------------------------------------------------------------- decoding


def generic_decode(files: dict[str, bytes], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Decoder for kinds without a reader (e.g. cached latents): ``x.npy`` -> ``x``, each array ``a`` of
    ``x.npz`` -> ``a``, ``x.json`` -> ``x`` (parsed); other members stay bytes under their extension."""
    want = set(keys) if keys else None
    out: dict[str, Any] = {}
    for ext, data in files.items():
        name, _, suffix = ext.rpartition(".")
        if want is not None and name not in want and name != "meta" and suffix != "npz":
            continue
        if suffix == "npy":
            out[name] = _npy_view(data)
        elif suffix == "npz":
            out.update({k: v for k, v in _unnpz(data).items() if want is None or k in want})
        elif suffix == "json":
            out[name] = json.loads(bytes(data))
        else:
            out[ext] = bytes(data)
    return out


class _Unusual(Exception):
    """An .npz that the short parser leaves to numpy."""


_EOCD = struct.Struct("<4s4H2LH")  # zip end of central directory
_CDIR = struct.Struct("<4s6H3L5H2L")  # central directory entry
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header


def _unnpz(data: bytes | memoryview) -> dict[str, np.ndarray]:
    """``np.load`` of an ``.npz`` member (writeable arrays, as numpy gives). The small zips numpy writes (a
    central directory of ``.npy`` entries, stored or deflated) are parsed here: ``zipfile`` + ``np.load`` cost
    ~350 us per small camera.npz, as much as reading 3 MB of latents. Sizes, names and CRC32 are checked as
    zipfile checks them; anything else (zip64 directory, comment, encryption, non-.npy entries) goes to numpy."""
    try:
        return _unnpz_short(memoryview(data))
    except _Unusual:
        return unnpz(bytes(data))


def _unnpz_short(mv: memoryview) -> dict[str, np.ndarray]:
    if len(mv) < _EOCD.size:
        raise _Unusual
    sig, disk, cd_disk, n, total, _, cd_off, comment = _EOCD.unpack_from(mv, len(mv) - _EOCD.size)
    if sig != b"PK\x05\x06" or disk or cd_disk or n != total or comment or cd_off == 0xFFFFFFFF:
        raise _Unusual
    out, p = {}, cd_off
    for _ in range(n):
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen, _, _, _, loff) = _CDIR.unpack_from(mv, p)
        if sig != b"PK\x01\x02" or flags & 1 or method not in (0, 8) or 0xFFFFFFFF in (csize, usize, loff):
            raise _Unusual
        name = bytes(mv[p + _CDIR.size:p + _CDIR.size + nlen])
        p += _CDIR.size + nlen + xlen + clen
        lsig, _, _, _, _, _, _, _, _, lnlen, lxlen = _LOCAL.unpack_from(mv, loff)
        start = loff + _LOCAL.size + lnlen + lxlen
        if lsig != b"PK\x03\x04" or bytes(mv[loff + _LOCAL.size:loff + _LOCAL.size + lnlen]) != name:
            raise _Unusual  # numpy raises its own error for a corrupt zip
        if not name.endswith(b".npy") or start + csize > len(mv):
            raise _Unusual
        payload = zlib.decompress(mv[start:start + csize], -15) if method == 8 else bytes(mv[start:start + csize])
        if len(payload) != usize or zlib.crc32(payload) != crc:
            raise ValueError(f"npz entry {name.decode(errors='replace')} fails its CRC32 or size check (corrupt)")
        out[name[:-4].decode()] = _npy_view(payload).copy()
    return out


@functools.lru_cache(maxsize=256)
def _npy_header_cached(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    from numpy.lib import format as npf

    f = io.BytesIO(head)
    major, _ = npf.read_magic(f)
    shape, fortran, dtype = (npf.read_array_header_1_0 if major == 1 else npf.read_array_header_2_0)(f)
    return tuple(shape), fortran, dtype, f.tell()


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header length) of a ``.npy`` member from its first bytes (memoised: the
    samples of a corpus share a few headers, and numpy parses them with ``ast``)."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy member (bad magic)")
    major = data[6]
    hlen = (int.from_bytes(data[8:10], "little") + 10) if major == 1 else (int.from_bytes(data[8:12], "little") + 12)
    if hlen > len(data):
        raise ValueError(f".npy header of {hlen} bytes is longer than the member")
    return _npy_header_cached(bytes(data[:hlen]))


def _npy_view(data: bytes | memoryview) -> np.ndarray:
    """A ``.npy`` member as a read-only array over its bytes (no copy: latents are read at the I/O rate; the
    batch is a fresh array made by collate's stack)."""
    shape, fortran, dtype, hlen = _npy_header(data)
    if dtype.hasobject:
        raise ValueError("object arrays are not loaded (they would need pickle)")
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=hlen)
    return arr.reshape(shape, order="F" if fortran else "C")


def resolve_decoder(kind: str | None) -> Decode:
    """The ``decode_sample`` of a sample kind (manifest "kind" or meta.json "kind"); :func:`generic_decode` for
    kinds without a reader of their own (e.g. cached latents). Each reader is imported only when its kind is read
    (the video readers import PyAV)."""
    if kind == "ttv":
        from loom.datasets import ttv

        return ttv.decode_sample
    if kind == "4d":
        from loom.datasets import shape4d

        return shape4d.decode_sample
    if kind == "scene":
        from loom.datasets import scene

        return scene.decode_sample
    if kind == "clips":
        from loom.datasets import clips

        return clips.decode_sample
    return generic_decode


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """List of decoded samples -> batch: equal-shape arrays stacked into a tensor (B, ...), other arrays kept as a
    list of tensors, everything else (meta, keys) as a list."""
    batch: dict[str, Any] = {}
    if not samples:
        return batch
    names = list(samples[0])
    for s in samples[1:]:
        names += [k for k in s if k not in names]
    for k in names:
        vals = [s.get(k) for s in samples]
        if all(isinstance(v, np.ndarray) for v in vals):
            if all(v.shape == vals[0].shape and v.dtype == vals[0].dtype for v in vals):
                batch[k] = torch.from_numpy(np.stack(vals))
            else:
                batch[k] = [torch.from_numpy(v.copy() if not v.flags.writeable else np.ascontiguousarray(v))
                            for v in vals]
        else:
            batch[k] = vals
    return batch


class _Lease:
    """What the arrays of one batch hang on (their numpy ``base``): it outlives every array, view and tensor made
    from the batch, so its death says that the memory is free again."""

    __slots__ = ("__array_interface__", "mem", "__weakref__")

    def __init__(self, mem: np.ndarray, start: int, nbytes: int):
        self.mem = mem
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "version": 3,
                                    "data": (mem.ctypes.data + start, False)}


class BatchMemory:
    """Memory for direct batches, reused once the consumer has dropped every tensor of an earlier batch.

    Why: a fresh batch of latents (tens of MB) is mapped anew by malloc and every page faults on the read that
    fills it; that cost ~40% of the read rate (benchmarks/README.md, loader section). Reuse is safe by
    construction: a buffer returns to the free list only when its :class:`_Lease` dies, i.e. when no array, view
    or tensor of the batch exists any more (a tensor pickled to the main process by a worker, or copied into
    pinned memory, no longer refers to it). Memory kept: the batches alive plus ``keep`` free ones.

    Arrays start on a page boundary: the kernel's copy into a destination a few bytes past the source's page
    offset is ~6x slower on some CPUs (4K aliasing; measured on AMD EPYC), and ``.npy`` payloads in a Loom
    tar start on 64-byte boundaries."""

    ALIGN = 4096

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()  # finalizers run in whichever thread drops the last tensor

    def take(self, nbytes: int) -> np.ndarray:
        """A writeable uint8 array of ``nbytes`` on a page boundary."""
        mem = None
        with self._lock:
            for i, m in enumerate(self._free):
                if nbytes <= m.nbytes - self.ALIGN <= 2 * nbytes:
                    mem = self._free.pop(i)
                    break
        if mem is None:
            mem = np.empty(nbytes + self.ALIGN, np.uint8)
        lease = _Lease(mem, -mem.ctypes.data % self.ALIGN, nbytes)
        weakref.finalize(lease, self._give_back, mem).atexit = False
        return np.asarray(lease)

    def _give_back(self, mem: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(mem)


def _share_small(batch: dict[str, Any], big: dict[str, torch.Tensor]) -> None:
    """Move the batch's other tensors (small: cameras, ``__pad__``, ``__index__``) into ONE block of shared memory,
    as views of it. A DataLoader worker sends every tensor storage to the main process as a file descriptor, and
    each costs a connection and a handshake (~4 ms on a busy machine): one storage for all of them, not one each."""
    small = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in big}
    if not small:
        return
    offsets, total = {}, 0
    for k, v in small.items():
        offsets[k] = total
        total += -(-v.nbytes // 64) * 64
    block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    for k, v in small.items():
        t = block[offsets[k]:offsets[k] + v.nbytes].view(v.dtype).view(v.shape)
        t.copy_(v)
        batch[k] = t


class RangeReader:
    """Ranged reads of samples, one handle per shard kept open in the process that reads (never pickled). Safe to
    share between the read threads of one process: the handle table is locked, and a handle is closed (least
    recently used, past ``max_open``) only after ``max_open`` other shards were opened since its last use, which
    no read in flight sees with fewer than ``max_open`` threads."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._fs: dict[str, tuple[Any, str]] = {}
        self._lock = threading.Lock()

    def _fd(self, url: str) -> tuple[int | None, Any, str]:
        """(file descriptor or None for a non-local filesystem, filesystem, path)."""
        fs_path = self._fs.get(url)
        if fs_path is None:
            fs_path = self._fs[url] = storage.filesystem(url)
        fs, path = fs_path
        if not isinstance(fs, LocalFileSystem):
            return None, fs, path
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd
                if len(self._fds) > self.max_open:
                    os.close(self._fds.popitem(last=False)[1])
            else:
                self._fds.move_to_end(path)
        return fd, fs, path

    def read(self, url: str, start: int, end: int) -> bytes:
        fd, fs, path = self._fd(url)
        if fd is not None:
            return os.pread(fd, end - start, start)
        if isinstance(fs, MemoryFileSystem):
            # memory:// files are shared BytesIO objects: concurrent seek+read from threads would interleave.
            with _MEMORY_LOCK:
                return fs.cat_file(path, start=start, end=end)
        return fs.cat_file(path, start=start, end=end)

    def readinto(self, url: str, start: int, buf: memoryview) -> int:
        """Read ``len(buf)`` bytes at ``start`` straight into ``buf``; returns the count read."""
        return self.readv(url, start, [buf])

    def readv(self, url: str, start: int, bufs: list[memoryview], total: int | None = None,
              cached_only: bool = False) -> int:
        """Fill ``bufs`` in turn from the bytes at ``start`` (one ``preadv`` on a local file); returns the count
        read, short only at the end of the file. ``total``: their summed length, if the caller knows it.
        ``cached_only``: raise :class:`_WouldBlock` instead of waiting for the device when a byte is not in the page
        cache (``RWF_NOWAIT``; local files only, elsewhere ignored)."""
        if total is None:
            total = sum(len(b) for b in bufs)
        fd, fs, path = self._fd(url)
        if fd is not None and cached_only and _RWF_NOWAIT:
            try:
                return self._preadv_all(fd, start, bufs, total, _RWF_NOWAIT)
            except BlockingIOError:
                raise _WouldBlock from None
            except OSError as e:  # a filesystem without RWF_NOWAIT (EOPNOTSUPP): read normally
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        if fd is None:
            data = self.read(url, start, start + total)
            p = 0
            for b in bufs:
                k = max(0, min(len(b), len(data) - p))
                b[:k] = data[p:p + k]
                p += k
            return len(data)
        return self._preadv_all(fd, start, bufs, total, 0)

    @staticmethod
    def _preadv_all(fd: int, start: int, bufs: list[memoryview], total: int, flags: int) -> int:
        if len(bufs) <= _IOV_MAX:
            got = os.preadv(fd, bufs, start, flags)
            if got == total or got <= 0:
                return max(got, 0)
        else:
            got = 0
        done = got  # a read may stop early (at 2 GiB, IOV_MAX buffers, or uncached pages): go on from there
        while bufs:
            while bufs and got >= len(bufs[0]):
                got -= len(bufs[0])
                bufs = bufs[1:]
            if got:
                bufs = [bufs[0][got:], *bufs[1:]]
            if not bufs:
                break
            got = os.preadv(fd, bufs[:_IOV_MAX], start + done, flags)
            if got <= 0:
                break
            done += got
        return done

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown: os may already be gone
            self.close()




# ----------------------------------------------------------------------------------------------- samples of a batch


class _NotDirect(Exception):
    """The batch needs the general decode path."""


class _WouldBlock(Exception):
    """A cached-only read met bytes that are not in the page cache."""


def first_kind(index: list[ShardIndex]) -> str | None:
    """The sample kind named in the first sample's meta.json (None without one): for corpora without a manifest."""
    ix = index[0]
    if "meta.json" not in ix.members[0]:
        return None
    o, s = ix.members[0]["meta.json"]
    return json.loads(RangeReader().read(ix.url, o, o + s)).get("kind")


class SampleReader:
    """Reads the samples of ``index`` in the process that iterates: one sample's members for the general decode
    path (:meth:`read_sample`), or a whole batch of generic samples straight into its arrays
    (:meth:`direct_batch`). The state of the reading process (file handles, batch memory, read threads) is made
    by that process and never pickled: a DataLoader worker makes its own.

    ``read_threads``: samples read concurrently per process (None: the default of each path, see :meth:`threads`).
    ``share``: direct batches made in a DataLoader worker go in shared memory (a switch for benchmarks)."""

    def __init__(self, index: list[ShardIndex], *, keys: tuple[str, ...] | None = None, on_error: str = "raise",
                 read_threads: int | None = None):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: use one of {ON_ERROR}")
        if read_threads is not None and read_threads < 1:
            raise ValueError(f"read_threads={read_threads}: must be >= 1 (or None for the default)")
        self.index, self.keys, self.on_error, self.read_threads = index, keys, on_error, read_threads
        self.offsets = shard_offsets([len(ix.keys) for ix in index])
        self.remote = not isinstance(storage.filesystem(index[0].url)[0], LocalFileSystem)
        self.share = True
        self._reader: RangeReader | None = None
        self._memory: BatchMemory | None = None  # made by the process that reads (see direct_batch)
        self._pool: ThreadPoolExecutor | None = None  # likewise: the direct path's readers
        self._pid = 0
        self._npy_names: dict[str, str | None] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_reader"] = None  # file descriptors stay in the process that opened them
        d["_memory"] = None  # a lock and batch memory: per process
        d["_pool"] = None  # threads: per process
        return d

    def locate(self, gid: int) -> tuple[ShardIndex, int]:
        """(shard index, sample number in it) of global sample id ``gid``."""
        s = int(np.searchsorted(self.offsets, gid, side="right")) - 1
        return self.index[s], int(gid - self.offsets[s])

    def read_sample(self, ix: ShardIndex, i: int, zero_copy: bool = False) -> dict[str, bytes | memoryview]:
        """The members ``{ext: bytes}`` of sample ``i`` of shard ``ix``, in one ranged read (``zero_copy``:
        memoryviews of it, for decoders that keep ``.npy`` payloads as views). Raises ShardError on a short read."""
        self.own()
        start, end = ix.span(i)
        blob = self._reader.read(ix.url, start, end)
        if len(blob) != end - start:
            raise ShardError(f"short read: {len(blob)} of {end - start} bytes (truncated shard?)")
        view = memoryview(blob) if zero_copy else blob
        return {e: view[o - start:o - start + n] for e, (o, n) in ix.members[i].items()}

    def threads(self, direct: bool) -> int:
        """Concurrent sample reads per process: ``read_threads`` if given, else 16 on a remote filesystem (latency
        bound), else on local files :data:`DIRECT_READ_THREADS` for direct batches in the main process and 1 in a
        DataLoader worker (the workers already read in parallel; 2 threads each measured no faster) and for
        decoded batches (decoding holds the GIL, so threads would only take turns)."""
        if self.read_threads is not None:
            return self.read_threads
        if self.remote:
            return 16
        return DIRECT_READ_THREADS if direct and get_worker_info() is None else 1

    def own(self) -> None:
        """The reading state of this process: a forked DataLoader worker inherits the parent's without pickling,
        maybe with a lock held by one of the parent's threads, and a thread pool without its threads."""
        if self._pid != os.getpid() or self._reader is None or self._memory is None:
            self._reader, self._memory, self._pool = RangeReader(), BatchMemory(), None
            self._pid = os.getpid()

    def direct_batch(self, ids: np.ndarray, pad: np.ndarray) -> dict[str, Any] | None:
        """The batch of generic samples ``ids`` read straight into its arrays (see :meth:`_direct_batch`), or None
        where the general decode path is needed (arrays of different shapes, Fortran order, a name clash)."""
        try:
            return self._direct_batch(ids, pad)
        except _NotDirect:
            return None

    def _direct_batch(self, ids: np.ndarray, pad: np.ndarray) -> dict[str, Any]:
        """Batch of generic samples (e.g. cached latents) whose ``.npy`` payloads are read straight into the batch
        arrays: the only copy is the read itself. Raises _NotDirect where the general path is needed (arrays of
        different shapes, Fortran order).

        Per sample, ONE ``preadv`` covers the sample's bytes: tar headers, ``.npy`` headers and the small members
        (meta.json, camera.npz) land in a scratch buffer, each payload in its row of the batch. Where the payloads
        start is known before the read from the ``.npy`` headers of the batch's first readable sample (read
        separately); each sample's own headers, read along, must equal them byte for byte, else that member is read
        again the careful way. The batch memory is recycled (:class:`BatchMemory`).

        Sample ``j`` of the batch goes to row ``j``; with ``threads(True) > 1`` the samples are read concurrently
        by a per-process thread pool (``preadv`` releases the GIL: two threads copy from the page cache at
        ~1.4x the rate of one). The results are then taken in batch order, so errors, skips and fallbacks are
        those of reading one sample after the other; rows of skipped samples are closed up by moving the later
        rows down (a copy on that rare path only)."""
        self.own()
        threads = min(self.threads(True), len(ids))
        B = len(ids)
        shard_of = (np.searchsorted(self.offsets, ids, side="right") - 1).tolist()
        local_of = (ids - self.offsets[shard_of]).tolist()
        arrays: dict[str, np.ndarray] = {}
        rows_mv: dict[str, memoryview] = {}  # the bytes of each batch array, sliced per row below
        tensors: dict[str, torch.Tensor] = {}  # the batch arrays as tensors on shared memory (in a worker)
        heads: dict[str, tuple[bytes, tuple[int, ...], np.dtype, int]] = {}  # name -> (header, shape, dtype, size)
        got: list[dict[str, Any] | Exception] = []  # per sample of the batch: its small members decoded, or why not

        for j in range(B):  # the headers of the first sample that has readable ones
            ix, i = self.index[shard_of[j]], local_of[j]
            try:
                self._learn_heads(ix.url, ix.members[i], heads)
            except _NotDirect:
                raise
            except Exception as e:  # noqa: BLE001 - this sample's error, reported in its turn below
                got.append(e)
                continue
            self._allocate(B, heads, arrays, rows_mv, tensors)
            break

        def one(j: int, cached_only: bool = False) -> dict[str, Any] | Exception:
            ix, i = self.index[shard_of[j]], local_of[j]
            try:
                return generic_decode(self._read_direct(ix.url, ix.members[i], heads, rows_mv, j, cached_only),
                                      self.keys)
            except _WouldBlock:
                raise
            except Exception as e:  # noqa: BLE001 - _NotDirect included: taken in batch order below
                return e

        first = len(got)
        got += [None] * (B - first)  # type: ignore[list-item]
        if threads > 1 and B - first > 1:
            # this thread and threads-1 helpers take the samples in turn (next() on a count is atomic under the GIL).
            # Helpers read only what the page cache holds: from the device, concurrent reads of large samples are
            # slower than one after the other (measured on this VM's disk: 0.7x), so a sample that would wait for
            # the device is left to this thread, after its own.
            todo = itertools.count(first)
            uncached: list[int] = []

            def drain(helper: bool) -> None:
                while (j := next(todo)) < B:
                    try:
                        got[j] = one(j, cached_only=helper)
                    except _WouldBlock:
                        uncached.append(j)

            if self._pool is None:  # its threads start on first use
                self._pool = ThreadPoolExecutor(self.threads(True) - 1, thread_name_prefix="loom-read")
            helpers = [self._pool.submit(drain, True) for _ in range(min(threads, B - first) - 1)]
            drain(False)
            for h in helpers:
                h.result()
            for j in sorted(uncached):
                got[j] = one(j)
        else:
            for j in range(first, B):
                got[j] = one(j)

        rows: list[dict[str, Any]] = []
        skipped: list[dict] = []
        keep: list[int] = []
        for j, row in enumerate(got):
            ix, i = self.index[shard_of[j]], local_of[j]
            if isinstance(row, _NotDirect):
                raise _NotDirect
            if isinstance(row, Exception):
                self._failed(ix.url, ix.keys[i], row, skipped)
                continue
            if any(k in row for k in arrays):
                raise _NotDirect  # a name clash (x.npy and an x in an npz): the general path handles it
            row["__key__"], row["__shard__"] = ix.keys[i], ix.url
            rows.append(row)
            keep.append(j)
        batch = collate(rows)
        for name, a in arrays.items():
            for r, j in enumerate(keep):  # close up the rows of skipped samples (keep rises: j >= r)
                if j != r:
                    a[r] = a[j]
            batch[name] = tensors[name][:len(keep)] if tensors else torch.from_numpy(a[:len(keep)])
        batch.setdefault("__key__", [])
        batch["__pad__"] = torch.from_numpy(pad[keep].copy())
        batch["__index__"] = torch.from_numpy(ids[keep].copy())
        batch["__skipped__"] = skipped
        if tensors:
            _share_small(batch, tensors)
        return batch

    def _failed(self, url: str, key: str, e: Exception, skipped: list[dict]) -> None:
        """Raise a ShardError for a sample that cannot be read, or record it as skipped (``on_error="skip"``)."""
        err = ShardError(f"shard {url}: sample {key!r} cannot be read ({type(e).__name__}: {e}); run "
                         "`loom shards verify` on its folder, or pass on_error='skip' to skip and record it")
        if self.on_error == "raise":
            raise err from e
        skipped.append({"shard": url, "key": key, "reason": str(err)})

    def _wanted_npy(self, ext: str) -> str | None:
        """The array name of a ``.npy`` member to read into the batch, "" for one not asked for, None for any other
        member (memoised: a corpus has a few extensions)."""
        got = self._npy_names.get(ext, False)
        if got is False:
            name, _, suffix = ext.rpartition(".")
            wanted = not self.keys or name in self.keys
            got = self._npy_names[ext] = (name if wanted else "") if suffix == "npy" else None
        return got

    def _head(self, url: str, o: int, n: int) -> tuple[bytes, tuple[int, ...], np.dtype, int]:
        """(header bytes, shape, dtype, payload size) of the ``.npy`` member at ``o``; _NotDirect if the batch
        cannot hold it as a plain row (Fortran order, object dtype)."""
        data = self._reader.read(url, o, o + min(n, 4096))
        shape, fortran, dtype, hlen = _npy_header(data)
        if fortran or dtype.hasobject:
            raise _NotDirect
        return bytes(data[:hlen]), shape, dtype, math.prod(shape) * dtype.itemsize

    def _learn_heads(self, url: str, members: dict[str, tuple[int, int]], heads: dict) -> None:
        heads.clear()
        for ext, (o, n) in members.items():
            name = self._wanted_npy(ext)
            if name:
                heads[name] = self._head(url, o, n)

    def _allocate(self, B: int, heads: dict, arrays: dict, rows_mv: dict, tensors: dict) -> None:
        align = BatchMemory.ALIGN
        sizes = {name: -(-B * h[3] // align) * align for name, h in heads.items()}
        shared = None
        if self.share and get_worker_info() is not None:
            shared = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(sum(sizes.values())))
            mem = shared.numpy()
        else:
            mem = self._memory.take(sum(sizes.values()))
        o = 0
        for name, (_, shape, dtype, size) in heads.items():
            arrays[name] = mem[o:o + B * size].view(dtype).reshape(B, *shape)
            rows_mv[name] = memoryview(mem[o:o + B * size])
            if shared is not None:
                tensors[name] = shared[o:o + B * size].view(torch.from_numpy(arrays[name][:0]).dtype).view(B, *shape)
            o += sizes[name]

    def _read_direct(self, url: str, members: dict[str, tuple[int, int]], heads: dict, rows_mv: dict,
                     r: int, cached_only: bool = False) -> dict[str, memoryview]:
        """Read one sample: payloads into row ``r`` of the batch arrays; returns the other members (views of a
        buffer of their own, with the tar and ``.npy`` headers read along)."""
        # sizes first, then the buffer and the views of it that the read fills
        plan: list[tuple[int, int, str, str | None]] = []  # (offset, size, ext, array name or None)
        need, end, filled = 0, -1, 0
        for ext, (o, n) in members.items():
            name = self._wanted_npy(ext)
            if name == "":
                continue  # an array the caller did not ask for
            if o < end:
                raise _NotDirect  # members out of order: not a Loom tar
            if name is None:
                need += n
            else:
                head = heads.get(name)
                if head is None:
                    raise _NotDirect  # an array the batch's first sample lacks
                if n != len(head[0]) + head[3]:
                    heads = {**heads, name: self._checked_head(url, ext, o, n, head)}
                need += len(heads[name][0])
                filled += 1
            if end >= 0 and o - end <= _GAP:
                need += o - end
            plan.append((o, n, ext, name))
            end = o + n
        if filled != len(rows_mv):
            raise _NotDirect  # the batch's first sample has an array this one lacks
        scratch = bytearray(need)
        mv = memoryview(scratch)
        runs: list[list] = []  # [file offset, buffers, their total]
        checks, small, sp, end = [], {}, 0, -1
        for o, n, ext, name in plan:
            if end < 0 or o - end > _GAP:  # a new read: skips what lies between (an array not asked for)
                run = [o, [], 0]
                runs.append(run)
            elif o > end:
                run[1].append(mv[sp:sp + o - end])  # tar headers between members: read and dropped
                run[2] += o - end
                sp += o - end
            if name is None:
                small[ext] = view = mv[sp:sp + n]
                run[1].append(view)
                sp += n
            else:
                hdr, _, _, size = heads[name]
                checks.append((sp, ext, o, n, name))
                run[1] += (mv[sp:sp + len(hdr)], rows_mv[name][r * size:(r + 1) * size])
                sp += len(hdr)
            run[2] += n
            end = o + n
        for o, bufs, want in runs:
            got = self._reader.readv(url, o, bufs, want, cached_only)
            if got != want:
                raise ShardError(f"short read: {got} of {want} bytes at {o} (truncated shard?)")
        for sp, ext, o, n, name in checks:
            if not scratch.startswith(heads[name][0], sp):
                # this sample's header differs from the first sample's: where its payload starts is unknown
                hdr, _, _, size = self._checked_head(url, ext, o, n, heads[name])
                got = self._reader.readinto(url, o + len(hdr), rows_mv[name][r * size:(r + 1) * size])
                if got != size:
                    raise ShardError(f"short read of {ext}: {got} of {size} bytes (truncated shard?)")
        return small

    def _checked_head(self, url: str, ext: str, o: int, n: int, first: tuple) -> tuple:
        """This sample's own header of ``ext``: it must describe the same array as the batch's first sample's."""
        head = self._head(url, o, n)
        if head[1:3] != first[1:3]:
            raise _NotDirect  # arrays of different shapes or dtypes: the general path keeps them as lists
        if n - len(head[0]) != head[3]:
            raise ShardError(f"{ext} holds {n - len(head[0])} bytes of data, its header says {head[3]}")
        return head


__all__ = ["DIRECT_READ_THREADS", "INDEX", "ON_ERROR", "BatchMemory", "RangeReader", "SampleReader",
           "ShardError", "ShardIndex", "build_index", "collate", "first_kind", "generic_decode", "resolve_decoder",
           "scan_shard"]
