"""A PyTorch loader over Loom shards: every sample once per epoch, the same order for any number of workers,
split by rank, resumable mid-epoch; and the same shards as a Ray Data dataset.

Usage (trainer)::

    loader = LoomLoader("s3://bucket/ttv-run", batch_size=8, seed=0, num_workers=4)  # rank, world: torch.distributed
    loader.load_state_dict(ckpt["loader"])          # optional: resume mid-epoch
    for epoch in range(epochs):
        for batch in loader:                        # batch["rgb"]: (B,T,H,W,3) uint8 tensor, batch["meta"]: list
            ...                                     # batch["__pad__"]: (B,) bool, True for padding repeats
            ckpt["loader"] = loader.state_dict()

Design (why it is built this way, against the failures of the peers):

1. **Index, not stream.** A shard is a plain tar whose members ``<key>.<ext>`` are grouped by key, so one sample
   is one contiguous byte range. :func:`build_index` scans the tar headers once (seeks only, no payload read) and
   records per sample its key and each member's (offset, size). The scan insists on the end-of-archive marker and
   on the manifest's keys and size, so a truncated or corrupt shard is found before the epoch starts, named, and
   never read as a silently shorter epoch. The index of an output folder is cached in ``index.json`` (written
   atomically, tied to the manifest's sha256 of every shard) when the folder is writable, else kept in memory.
2. **Order in index space.** The epoch's order is a pure function of (seed, epoch, index): the shards are
   permuted with the seed, then either a full permutation of all samples (``shuffle_buffer=None``, the default:
   random access makes it free) or a literal shuffle buffer of that size over the concatenated stream (webdataset's
   semantics, computed on integers). No data is read to compute it, so every rank and worker computes the same
   order, whatever their number.
3. **Ranks.** The order is cut into global batches of ``batch_size``; global batch ``g`` goes to rank
   ``g % world_size``, so at each step the ranks together consume one contiguous block of ``world_size *
   batch_size`` samples of the global order (the same blocks as one rank with a ``world_size`` times larger batch).
   The order is padded by repeating its first samples (flagged ``__pad__``) or, with ``drop_last``, cut, to a
   multiple of ``world_size * batch_size``: every rank gets exactly the same number of full batches, so uneven
   shards never leave a rank waiting in a collective at the end of an epoch (unlike per-rank shard lists).
4. **Workers.** :class:`LoomDataset` is an ``IterableDataset`` that yields whole batches (``DataLoader(
   batch_size=None)``); worker ``k`` of ``n`` builds the rank's batches ``start + k, start + k + n, ...``. The
   DataLoader hands out worker outputs round-robin starting at worker 0, so the batch sequence is identical for
   0, 1, 2 or 4 workers, and resuming at any batch ``start`` keeps it.
5. **Resume.** :class:`LoomLoader` counts the batches it has handed to the caller in the main process (workers
   cannot see what was consumed; their prefetched batches are simply made again). ``state_dict()`` is
   ``{seed, epoch, batch, samples, ...}``, where ``samples`` is the position in the epoch's global order that all
   ranks together have reached (``batch * world_size * batch_size`` plus where the epoch was resumed; every rank
   holds the same). With the same world and batch size, the next batch after ``load_state_dict()`` is exactly the
   next batch of the uninterrupted run. With another world size or batch size (more or fewer GPUs after a crash)
   the run continues from that sample position of the same global order: if it falls on a boundary of the new
   global batches, the batches are those the new world would have had from the start; otherwise the rest of the
   epoch is cut into new global batches from there, padded (or cut, with ``drop_last``) like any epoch, so every
   rank gets the same number of batches and over the old and the new run each sample of the epoch is seen once
   (padding apart). The next epoch is the new world's own. States without ``samples`` (older ones) derive it
   from ``batch``, ``world_size`` and ``batch_size``. A state from another seed, shuffle setting, ``drop_last`` or
   corpus (sample count) is refused.
6. **Reading.** One ranged read per sample (``os.pread`` on local files, ``fs.cat_file(path, start, end)`` on any
   other fsspec filesystem, ``read_threads`` concurrent reads per process), the kind's ``decode_sample`` (from the
   manifest's ``kind`` or the first sample's meta.json; a generic ``.npy/.npz/.json`` decoder for other kinds such
   as cached latents), an optional per-sample transform with its own generator seeded by (seed, epoch, sample),
   then numpy -> torch: arrays of equal shape are stacked, others kept as lists, ``meta`` stays a list of dicts.
   For generic kinds (latents) with no transform, a local sample is ONE ``preadv`` that scatters each ``.npy``
   payload straight into its row of the batch arrays (the read is the only copy) and the rest into a scratch
   buffer, whose small members (meta.json, camera.npz) are decoded from there. The samples of a batch are read by
   2 threads (``read_threads``; ``preadv`` releases the GIL, and one thread alone cannot keep up with the page
   cache), each sample into its own row; errors, skips and fallbacks are then taken in batch order, so the batch
   is exactly the one-thread batch. Batch memory is recycled once the consumer has dropped every tensor of a batch,
   never earlier; a fresh allocation per batch would fault in every page on each read. In a DataLoader worker the
   batch is instead made in fresh shared memory (one thread), which the main process maps instead of the
   DataLoader copying it. With the shards in the page cache and a core to spare, local latent shards load at
   0.8-1.1x the rate of reading their bytes raw; on a loaded machine or from disk at ~0.6-0.7x
   (benchmarks/README.md, loader section, for the figures and their spread).
   Workers are started per epoch (``persistent_workers`` would freeze the epoch/start seen by the workers); a
   crash leaves no shared memory or lock files behind.
7. **Errors.** A sample that cannot be read or decoded raises :class:`ShardError` naming the shard and the key.
   With ``on_error="skip"`` it is left out of its batch (the batch is shorter, the number of batches is unchanged,
   so ranks stay in step), logged, and recorded in ``loader.skipped``; a shard that fails the index scan is
   dropped as a whole and recorded the same way. Nothing is skipped silently.
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
import queue
import struct
import tarfile
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from loom.datasets.codecs import unnpz
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

# sample kind (manifest "kind" or meta.json "kind") -> module with decode_sample(files, keys)
DECODERS = {"ttv": "loom.datasets.ttv", "4d": "loom.datasets.shape4d", "scene": "loom.datasets.scene"}

Decode = Callable[[dict[str, bytes], "tuple[str, ...] | None"], dict[str, Any]]
Transform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


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


# ----------------------------------------------------------------------------------------------- order


def epoch_order(counts: list[int], seed: int, epoch: int, shuffle: bool = True,
                shuffle_buffer: int | None = None) -> np.ndarray:
    """Global sample ids (positions in the concatenation of the shards, in index order) for one epoch: a pure
    function of its arguments. ``shuffle_buffer=None`` is a full permutation; an int N applies a literal
    shuffle buffer of N samples to the stream of the seed-permuted shards."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, 0x10AD])
    if shuffle_buffer is None:
        return rng.permutation(n).astype(np.int64)
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer={shuffle_buffer}: use None (full permutation) or a size >= 1")
    perm = rng.permutation(len(counts))
    stream = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in perm] or [np.zeros(0, np.int64)])
    out = np.empty(n, dtype=np.int64)
    buf = list(stream[:shuffle_buffer])
    picks = rng.random(n)
    o = 0
    for x in stream[shuffle_buffer:]:
        j = int(picks[o] * len(buf))
        out[o] = buf[j]
        buf[j] = x
        o += 1
    tail = rng.permutation(len(buf))
    out[o:] = np.asarray(buf, dtype=np.int64)[tail] if buf else []
    return out


def rank_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int,
                 drop_last: bool = False, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, pad) of shape (num_batches, batch_size) for ``rank``: global batch g goes to rank g % world_size;
    the order is padded by repeating its start (pad=True) or cut (drop_last) to a multiple of
    world_size * batch_size, so all ranks get the same number of full batches.

    ``start``: the first ``start`` samples of the order were consumed already (a run with another world or batch
    size, resumed): the rest of the order is cut into global batches from there and padded or cut the same way."""
    n, block = len(order), batch_size * world_size
    if n == 0:
        raise ValueError("no samples to load")
    start = min(max(int(start), 0), n)
    rest = n - start
    if drop_last:
        used = rest // block * block
        ids, pad = order[start:start + used], np.zeros(used, bool)
    else:
        used = -(-rest // block) * block
        # repeats of the epoch's first samples (wrapping if the order is tiny), whatever ``start``: a resume at any
        # point of the same run pads with the same samples
        reps = np.resize(order, used - rest)
        ids = np.concatenate([order[start:], reps])
        pad = np.concatenate([np.zeros(rest, bool), np.ones(used - rest, bool)])
    ids = ids.reshape(-1, world_size, batch_size)[:, rank]
    pad = pad.reshape(-1, world_size, batch_size)[:, rank]
    return ids, pad


def epoch_batches(num_samples: int, batch_size: int, world_size: int, drop_last: bool = False,
                  start: int = 0) -> int:
    """Batches per rank in an epoch whose first ``start`` samples were consumed already (see :func:`rank_batches`)."""
    rest, block = num_samples - min(max(int(start), 0), num_samples), batch_size * world_size
    return rest // block if drop_last else -(-rest // block)


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
    import importlib

    if kind in DECODERS:
        return importlib.import_module(DECODERS[kind]).decode_sample
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


class _BatchMemory:
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


class _Reader:
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


# ----------------------------------------------------------------------------------------------- dataset


class _NotDirect(Exception):
    """The batch needs the general decode path."""


class _WouldBlock(Exception):
    """A cached-only read met bytes that are not in the page cache."""


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class LoomDataset(IterableDataset):
    """The rank's batches of one epoch, as an IterableDataset to use with ``DataLoader(batch_size=None)``.
    Most users want :class:`LoomLoader`, which adds the consumed-batch count that makes resuming exact.

    ``read_threads``: samples read concurrently per process. None (default): 16 on a remote filesystem; on local
    files :data:`DIRECT_READ_THREADS` (2) for direct batches (generic kinds such as latents, no transform) in the
    main process, and 1 in a DataLoader worker and for decoded batches (see :meth:`_threads`)."""

    def __init__(self, url: str | list[str], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int | None = None, rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False, kind: str | None = None, keys: tuple[str, ...] | None = None,
                 decode: Decode | None = None, transform: Transform | None = None, on_error: str = "raise",
                 read_threads: int | None = None, cache_index: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: use one of {ON_ERROR}")
        r, w = _dist_rank_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is not in [0, world_size={self.world_size})")
        self.url, self.batch_size, self.seed, self.shuffle = url, batch_size, seed, shuffle
        self.shuffle_buffer, self.drop_last, self.keys, self.on_error = shuffle_buffer, drop_last, keys, on_error
        self.transform = transform
        self.index, self.skipped_shards, manifest = build_index(url, on_error=on_error, cache=cache_index)
        self.counts = [len(ix.keys) for ix in self.index]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.num_samples = int(self.offsets[-1])
        if self.num_samples == 0:
            raise ValueError(f"no readable samples at {url} (skipped: {self.skipped_shards})")
        self.kind = kind or manifest.get("kind") or self._first_kind()
        self.decode = decode or resolve_decoder(self.kind)
        if read_threads is not None and read_threads < 1:
            raise ValueError(f"read_threads={read_threads}: must be >= 1 (or None for the default)")
        self.remote = not isinstance(storage.filesystem(self.index[0].url)[0], LocalFileSystem)
        self.read_threads = read_threads  # None: the default of each path (see _threads)
        self.epoch, self.start_batch, self.start_sample = 0, 0, 0
        self._reader: _Reader | None = None
        self._memory: _BatchMemory | None = None  # made by the process that reads (see _direct_batch)
        self._pool: ThreadPoolExecutor | None = None  # likewise: the direct path's readers
        self._pid = 0
        self._share = True  # direct batches made in a DataLoader worker go in shared memory (switch: benchmarks)
        self._npy_names: dict[str, str | None] = {}

    def _first_kind(self) -> str | None:
        ix = self.index[0]
        if "meta.json" not in ix.members[0]:
            return None
        o, s = ix.members[0]["meta.json"]
        return json.loads(_Reader().read(ix.url, o, o + s)).get("kind")

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_reader"] = None  # file descriptors stay in the process that opened them
        d["_memory"] = None  # a lock and batch memory: per process
        d["_pool"] = None  # threads: per process
        return d

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return epoch_batches(self.num_samples, self.batch_size, self.world_size, self.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0, start_sample: int = 0) -> None:
        """Iterate ``epoch`` from batch ``start_batch`` of the batches cut after the first ``start_sample``
        samples of the epoch's global order (0 but after a resume from another world or batch size)."""
        self.epoch, self.start_batch, self.start_sample = epoch, start_batch, start_sample

    def batches(self, epoch: int, start_sample: int = 0) -> tuple[np.ndarray, np.ndarray]:
        order = epoch_order(self.counts, self.seed, epoch, self.shuffle, self.shuffle_buffer)
        return rank_batches(order, self.batch_size, self.rank, self.world_size, self.drop_last, start_sample)

    def locate(self, gid: int) -> tuple[ShardIndex, int]:
        s = int(np.searchsorted(self.offsets, gid, side="right")) - 1
        return self.index[s], int(gid - self.offsets[s])

    def load_sample(self, gid: int, epoch: int) -> dict[str, Any]:
        """Read, decode and transform one sample (numpy). Raises ShardError naming the shard and key."""
        ix, i = self.locate(gid)
        key = ix.keys[i]
        if self._reader is None:
            self._reader = _Reader()
        try:
            start, end = ix.span(i)
            blob = self._reader.read(ix.url, start, end)
            if len(blob) != end - start:
                raise ShardError(f"short read: {len(blob)} of {end - start} bytes (truncated shard?)")
            view = memoryview(blob) if self.decode is generic_decode else blob  # zero-copy members for .npy
            files = {e: view[o - start:o - start + n] for e, (o, n) in ix.members[i].items()}
            sample = self.decode(files, self.keys)
            if self.transform is not None:
                sample = self.transform(sample, np.random.default_rng([self.seed, epoch, gid, 0x7F]))
        except Exception as e:
            raise ShardError(f"shard {ix.url}: sample {key!r} cannot be read ({type(e).__name__}: {e}); run "
                             "`loom shards verify` on its folder, or pass on_error='skip' to skip and record it") from e
        sample["__key__"], sample["__shard__"] = key, ix.url
        return sample

    def _threads(self, direct: bool) -> int:
        """Concurrent sample reads per process: ``read_threads`` if given, else 16 on a remote filesystem (latency
        bound), else on local files :data:`DIRECT_READ_THREADS` for direct batches in the main process and 1 in a
        DataLoader worker (the workers already read in parallel; 2 threads each measured no faster) and for
        decoded batches (decoding holds the GIL, so threads would only take turns)."""
        if self.read_threads is not None:
            return self.read_threads
        if self.remote:
            return 16
        return DIRECT_READ_THREADS if direct and get_worker_info() is None else 1

    def _own(self) -> None:
        """The reading state of this process: a forked DataLoader worker inherits the parent's without pickling,
        maybe with a lock held by one of the parent's threads, and a thread pool without its threads."""
        if self._pid != os.getpid() or self._reader is None or self._memory is None:
            self._reader, self._memory, self._pool = _Reader(), _BatchMemory(), None
            self._pid = os.getpid()

    @property
    def direct(self) -> bool:
        """Whether batches are read straight into the batch arrays (:meth:`_direct_batch`): generic samples (e.g.
        cached latents) without a transform. Remote shards only when asked for one read at a time (their reads are
        whole-range fetches, gathered by the general path's 16 threads)."""
        return (self.decode is generic_decode and self.transform is None
                and (not self.remote or self.read_threads == 1))

    def make_batch(self, ids: np.ndarray, pad: np.ndarray, epoch: int) -> dict[str, Any]:
        self._own()
        if self.direct:
            try:
                return self._direct_batch(ids, pad)
            except _NotDirect:
                pass
        return self._decoded_batch(ids, pad, epoch)

    def _direct_batch(self, ids: np.ndarray, pad: np.ndarray) -> dict[str, Any]:
        """Batch of generic samples (e.g. cached latents) whose ``.npy`` payloads are read straight into the batch
        arrays: the only copy is the read itself. Raises _NotDirect where the general path is needed (arrays of
        different shapes, Fortran order).

        Per sample, ONE ``preadv`` covers the sample's bytes: tar headers, ``.npy`` headers and the small members
        (meta.json, camera.npz) land in a scratch buffer, each payload in its row of the batch. Where the payloads
        start is known before the read from the ``.npy`` headers of the batch's first readable sample (read
        separately); each sample's own headers, read along, must equal them byte for byte, else that member is read
        again the careful way. The batch memory is recycled (:class:`_BatchMemory`).

        Sample ``j`` of the batch goes to row ``j``; with ``_threads(True) > 1`` the samples are read concurrently
        by a per-process thread pool (``preadv`` releases the GIL: two threads copy from the page cache at
        ~1.4x the rate of one). The results are then taken in batch order, so errors, skips and fallbacks are
        those of reading one sample after the other; rows of skipped samples are closed up by moving the later
        rows down (a copy on that rare path only)."""
        self._own()
        threads = min(self._threads(True), len(ids))
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
                self._pool = ThreadPoolExecutor(self._threads(True) - 1, thread_name_prefix="loom-read")
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
        align = _BatchMemory.ALIGN
        sizes = {name: -(-B * h[3] // align) * align for name, h in heads.items()}
        shared = None
        if self._share and get_worker_info() is not None:
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

    def _decoded_batch(self, ids: np.ndarray, pad: np.ndarray, epoch: int) -> dict[str, Any]:
        def one(j: int):
            try:
                return self.load_sample(int(ids[j]), epoch)
            except ShardError as e:
                if self.on_error == "raise":
                    raise
                ix, i = self.locate(int(ids[j]))
                return {"shard": ix.url, "key": ix.keys[i], "reason": str(e)}

        threads = self._threads(False)
        if threads > 1 and len(ids) > 1:
            with ThreadPoolExecutor(min(threads, len(ids))) as pool:
                got = list(pool.map(one, range(len(ids))))
        else:
            got = [one(j) for j in range(len(ids))]
        keep = [j for j, g in enumerate(got) if "__key__" in g]
        skipped = [g for g in got if "__key__" not in g]
        batch = collate([got[j] for j in keep])
        batch.setdefault("__key__", [])
        batch["__pad__"] = torch.from_numpy(pad[keep].copy())
        batch["__index__"] = torch.from_numpy(ids[keep].copy())
        batch["__skipped__"] = skipped
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ids, pad = self.batches(self.epoch, self.start_sample)
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for b in range(self.start_batch + k, len(ids), n):
            yield self.make_batch(ids[b], pad[b], self.epoch)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate for ready-made batches (its default would walk every meta dict)."""
    return batch


class LoomLoader:
    """Batches of Loom samples for one rank: ``DataLoader`` over :class:`LoomDataset` plus the exact resume
    state. Iterating runs the current epoch from where it stands; when it ends the epoch advances.

    The arguments are those of :class:`LoomDataset` plus ``num_workers``, ``pin_memory`` and ``prefetch_factor``
    of the DataLoader, and ``prefetch``: without worker processes, a background thread makes up to that many
    batches ahead of the consumer (0, the default: each batch is made when it is asked for). Reads release the GIL,
    so they overlap the training step (a GPU step, or any work that releases the GIL): with a 25-100 ms step, epochs
    of latent shards ran 1.1-1.6x faster with ``prefetch=2`` (``benchmarks/loader_overlap.py``); a loop that only
    loads gains nothing (the hand-over costs ~5%). For latent shards this is the fast way to load (DataLoader
    workers must ship every batch through shared memory). Loom's trainers pass ``data.prefetch`` (2). The order,
    the batches and ``state_dict()`` are the same with or without it: a batch counts as consumed when it is
    yielded, and batches made ahead but not yielded are dropped. Skipped samples (``on_error="skip"``) are
    appended to ``self.skipped`` as ``{shard, key, reason}`` and logged; ``batch["__skipped__"]`` lists those of
    each batch."""

    def __init__(self, url: str | list[str], batch_size: int, *, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, prefetch: int = 0, **dataset_kwargs: Any):
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch}: must be >= 0")
        self.dataset = LoomDataset(url, batch_size, **dataset_kwargs)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.prefetch = prefetch
        d = self.dataset
        if num_workers and d.direct and not d.remote:
            log.warning("%s: samples of kind %r are read straight into the batch, so DataLoader workers only add a "
                        "copy through shared memory (~0.1x the read rate, benchmarks/README.md): num_workers=0 with "
                        "prefetch=2 (a reading thread) is faster", url if isinstance(url, str) else url[0], d.kind)
        # batch ``self.batch`` of the epoch starts at sample ``self.offset + self.batch * world_size * batch_size``
        # of the epoch's global order; the offset is 0 but after a resume from another world or batch size
        self.epoch, self.batch, self.offset = 0, 0, 0
        self.skipped: list[dict] = list(self.dataset.skipped_shards)

    def __len__(self) -> int:
        """Batches per (full) epoch for this rank."""
        return len(self.dataset)

    def _epoch_len(self) -> int:
        d = self.dataset
        return epoch_batches(d.num_samples, d.batch_size, d.world_size, d.drop_last, self.offset)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch at the next iteration."""
        self.epoch, self.batch, self.offset = epoch, 0, 0

    def state_dict(self) -> dict[str, Any]:
        """The resume point. ``samples``: how many samples of the epoch's global order all ranks together have
        consumed (``batch * world_size * batch_size`` plus where the epoch was resumed); it lets a loader with
        another world or batch size resume. ``batch``: batches this loader consumed in the epoch."""
        d = self.dataset
        return {"seed": d.seed, "epoch": self.epoch, "batch": self.batch, "batch_size": d.batch_size,
                "world_size": d.world_size, "rank": d.rank, "num_samples": d.num_samples,
                "shuffle": d.shuffle, "shuffle_buffer": d.shuffle_buffer, "drop_last": d.drop_last,
                "samples": self.offset + self.batch * d.world_size * d.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where ``state`` stopped: the next samples are those of the same epoch's global order after the
        ``state["samples"]`` consumed ones (from ``batch``, ``world_size`` and ``batch_size`` for states that
        predate it). With the same world and batch size the next batch is exactly the uninterrupted run's; with
        others the rest of the epoch is cut into this loader's global batches, so over the old and the new run
        each sample of the epoch is seen once (padding apart). Refused if the order would differ."""
        d = self.dataset
        mine = self.state_dict()
        for k in ("seed", "num_samples", "shuffle", "shuffle_buffer", "drop_last"):
            if k in state and state[k] != mine[k]:
                raise ValueError(f"loader state has {k}={state[k]!r} but this loader has {mine[k]!r}: the order "
                                 "would differ, so resuming would not be exact (build the loader with the same "
                                 "arguments and shards)")
        old_block = state.get("world_size", d.world_size) * state.get("batch_size", d.batch_size)
        pos = state.get("samples", state["batch"] * old_block)
        limit = d.num_samples if d.drop_last else d.num_samples + old_block - 1  # past n: padding consumed
        if not (isinstance(pos, (int, np.integer)) and 0 <= pos <= limit and 0 <= state["batch"]):
            raise ValueError(f"loader state samples={pos} (batch={state['batch']}) is outside this epoch's "
                             f"0..{limit} samples: not a state of this corpus")
        pos, block = min(int(pos), d.num_samples), d.world_size * d.batch_size  # past n: only padding was left
        # on a global-batch boundary the batches are the epoch's own (as if this world had run from the start);
        # elsewhere the rest of the epoch is cut into global batches from ``pos``
        self.epoch = int(state["epoch"])
        self.batch, self.offset = (pos // block, 0) if pos % block == 0 else (0, pos)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batch >= self._epoch_len():
            self.epoch, self.batch, self.offset = self.epoch + 1, 0, 0
        self.dataset.set_epoch(self.epoch, self.batch, self.offset)
        kw = {"prefetch_factor": self.prefetch_factor} if self.num_workers and self.prefetch_factor else {}
        dl = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                        persistent_workers=False, collate_fn=_as_is, **kw)
        batches = _ahead(iter(dl), self.prefetch) if self.prefetch and not self.num_workers else dl
        for batch in batches:
            for s in batch["__skipped__"]:
                log.warning("skipped sample %s of %s: %s", s["key"], s["shard"], s["reason"])
            self.skipped += batch["__skipped__"]
            self.batch += 1
            yield batch
        if self.batch >= self._epoch_len():
            self.epoch, self.batch, self.offset = self.epoch + 1, 0, 0


def _ahead(it: Iterator[Any], n: int) -> Iterator[Any]:
    """``it``'s items, made by a background thread up to ``n`` ahead of the consumer; its exception is raised here,
    in order. Closing this generator (the consumer stops early) stops the thread at its next item."""
    q: queue.Queue = queue.Queue(maxsize=n)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for x in it:
                if not put((None, x)):
                    return
            put((None, end))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((e, None))

    t = threading.Thread(target=run, name="loom-prefetch", daemon=True)
    t.start()
    try:
        while True:
            err, x = q.get()
            if err is not None:
                raise err
            if x is end:
                return
            yield x
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:  # free the batches made ahead (their memory returns to the pool)
                q.get_nowait()
        t.join(timeout=30)


# ----------------------------------------------------------------------------------------------- Ray Data


def ray_dataset(url: str | list[str], kind: str | None = None, keys: tuple[str, ...] | None = None,
                decode: Decode | None = None, on_error: str = "raise", override_num_blocks: int | None = None):
    """The samples at ``url`` as a ``ray.data.Dataset``, one row per sample in index order: the decoded arrays,
    ``meta`` as a JSON string (rows of different kinds of metadata fit one Arrow column), ``__key__`` and
    ``__shard__``. With ``on_error="skip"`` unreadable samples are dropped and logged by the workers; unreadable
    shards are dropped and logged here."""
    import ray

    index, skipped, manifest = build_index(url, on_error=on_error)
    for s in skipped:
        log.warning("ray_dataset: skipped shard %s: %s", s["shard"], s["reason"])
    kind = kind or manifest.get("kind")
    if kind is None and decode is None:
        ix = index[0]
        if "meta.json" in ix.members[0]:
            o, s = ix.members[0]["meta.json"]
            kind = json.loads(_Reader().read(ix.url, o, o + s)).get("kind")
    dec = decode or resolve_decoder(kind)
    items = [{"shard": ix.url, "key": k, "members": json.dumps(ix.members[i])}
             for ix in index for i, k in enumerate(ix.keys)]

    def read(row: dict[str, Any]) -> list[dict[str, Any]]:
        members = {e: tuple(r) for e, r in json.loads(row["members"]).items()}
        start, end = min(o for o, _ in members.values()), max(o + n for o, n in members.values())
        try:
            blob = _Reader().read(row["shard"], start, end)
            if len(blob) != end - start:
                raise ShardError(f"short read: {len(blob)} of {end - start} bytes")
            sample = dec({e: blob[o - start:o - start + n] for e, (o, n) in members.items()}, keys)
        except Exception as e:
            msg = f"shard {row['shard']}: sample {row['key']!r} cannot be read ({type(e).__name__}: {e})"
            if on_error == "raise":
                raise ShardError(msg) from e
            logging.getLogger(__name__).warning("ray_dataset: skipped %s", msg)
            return []
        if "meta" in sample:
            sample["meta"] = json.dumps(sample["meta"], sort_keys=True)
        sample["__key__"], sample["__shard__"] = row["key"], row["shard"]
        return [sample]

    return ray.data.from_items(items, override_num_blocks=override_num_blocks).flat_map(read)


__all__ = ["LoomDataset", "LoomLoader", "ShardError", "ShardIndex", "build_index", "collate", "epoch_batches",
           "epoch_order", "generic_decode", "rank_batches", "ray_dataset", "scan_shard"]
