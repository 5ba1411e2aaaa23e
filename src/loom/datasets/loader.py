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
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from loom.datasets.io import (DIRECT_READ_THREADS, INDEX, ON_ERROR, Decode, RangeReader, SampleReader, ShardIndex,
                              build_index, collate, first_kind, generic_decode, resolve_decoder, scan_shard)
from loom.datasets.order import (epoch_batches, epoch_order, rank_batches, resume_point, samples_consumed,
                                 shard_offsets)
from loom.platform.shards import ShardError

log = logging.getLogger(__name__)

Transform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


# ----------------------------------------------------------------------------------------------- dataset


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class LoomDataset(IterableDataset):
    """The rank's batches of one epoch, as an IterableDataset to use with ``DataLoader(batch_size=None)``.
    Most users want :class:`LoomLoader`, which adds the consumed-batch count that makes resuming exact.

    ``read_threads``: samples read concurrently per process. None (default): 16 on a remote filesystem; on local
    files :data:`DIRECT_READ_THREADS` (2) for direct batches (generic kinds such as latents, no transform) in the
    main process, and 1 in a DataLoader worker and for decoded batches (see :meth:`SampleReader.threads`)."""

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
        self.offsets = shard_offsets(self.counts)
        self.num_samples = int(self.offsets[-1])
        if self.num_samples == 0:
            raise ValueError(f"no readable samples at {url} (skipped: {self.skipped_shards})")
        self.kind = kind or manifest.get("kind") or first_kind(self.index)
        self.decode = decode or resolve_decoder(self.kind)
        # file handles, batch memory and read threads: made by the process that reads (never pickled)
        self.reader = SampleReader(self.index, keys=keys, on_error=on_error, read_threads=read_threads)
        self.remote = self.reader.remote
        self.read_threads = read_threads  # None: the default of each path (see SampleReader.threads)
        self.epoch, self.start_batch, self.start_sample = 0, 0, 0

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
        return self.reader.locate(gid)

    def load_sample(self, gid: int, epoch: int) -> dict[str, Any]:
        """Read, decode and transform one sample (numpy). Raises ShardError naming the shard and key."""
        ix, i = self.locate(gid)
        key = ix.keys[i]
        try:
            # zero-copy members for the generic decoder: its .npy arrays are views of the read
            files = self.reader.read_sample(ix, i, zero_copy=self.decode is generic_decode)
            sample = self.decode(files, self.keys)
            if self.transform is not None:
                sample = self.transform(sample, np.random.default_rng([self.seed, epoch, gid, 0x7F]))
        except Exception as e:
            raise ShardError(f"shard {ix.url}: sample {key!r} cannot be read ({type(e).__name__}: {e}); run "
                             "`loom shards verify` on its folder, or pass on_error='skip' to skip and record it") from e
        sample["__key__"], sample["__shard__"] = key, ix.url
        return sample

    @property
    def direct(self) -> bool:
        """Whether batches are read straight into the batch arrays (:meth:`SampleReader.direct_batch`): generic
        samples (e.g. cached latents) without a transform. Remote shards only when asked for one read at a time
        (their reads are whole-range fetches, gathered by the general path's 16 threads)."""
        return (self.decode is generic_decode and self.transform is None
                and (not self.remote or self.read_threads == 1))

    def make_batch(self, ids: np.ndarray, pad: np.ndarray, epoch: int) -> dict[str, Any]:
        self.reader.own()
        if self.direct:
            batch = self.reader.direct_batch(ids, pad)
            if batch is not None:
                return batch
        return self._decoded_batch(ids, pad, epoch)

    def _decoded_batch(self, ids: np.ndarray, pad: np.ndarray, epoch: int) -> dict[str, Any]:
        def one(j: int):
            try:
                return self.load_sample(int(ids[j]), epoch)
            except ShardError as e:
                if self.on_error == "raise":
                    raise
                ix, i = self.locate(int(ids[j]))
                return {"shard": ix.url, "key": ix.keys[i], "reason": str(e)}

        threads = self.reader.threads(False)
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
                "samples": samples_consumed(self.offset, self.batch, d.world_size, d.batch_size)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where ``state`` stopped: the next samples are those of the same epoch's global order after the
        ``state["samples"]`` consumed ones (from ``batch``, ``world_size`` and ``batch_size`` for states that
        predate it). With the same world and batch size the next batch is exactly the uninterrupted run's; with
        others the rest of the epoch is cut into this loader's global batches, so over the old and the new run
        each sample of the epoch is seen once (padding apart). Refused if the order would differ."""
        self.epoch, self.batch, self.offset = resume_point(state, self.state_dict())

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
        kind = first_kind(index)
    dec = decode or resolve_decoder(kind)
    items = [{"shard": ix.url, "key": k, "members": json.dumps(ix.members[i])}
             for ix in index for i, k in enumerate(ix.keys)]

    def read(row: dict[str, Any]) -> list[dict[str, Any]]:
        members = {e: tuple(r) for e, r in json.loads(row["members"]).items()}
        start, end = min(o for o, _ in members.values()), max(o + n for o, n in members.values())
        try:
            blob = RangeReader().read(row["shard"], start, end)
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


# names that lived here before the split into order.py and io.py, kept importable from the loader
__all__ = ["DIRECT_READ_THREADS", "INDEX", "LoomDataset", "LoomLoader", "ShardError", "ShardIndex", "build_index",
           "collate", "epoch_batches", "epoch_order", "generic_decode", "rank_batches", "ray_dataset", "resolve_decoder",
           "scan_shard"]
