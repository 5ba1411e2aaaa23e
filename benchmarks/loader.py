"""Loader throughput: Loom's loader against a plain webdataset pipeline and against reading the raw tar bytes,
over the same shards, in one run. Prints samples/s and ratios (never a bare absolute time as a target).

    .venv/bin/python benchmarks/loader.py                 # ttv and latent shards, workers 0 and 2 (~3 min)
    .venv/bin/python benchmarks/loader.py --quick         # smaller corpora (~1 min)
    .venv/bin/python benchmarks/loader.py --corpora latents --workers 0 --repeats 9 --read-threads 0 1
    .venv/bin/python benchmarks/loader.py --cold          # every reader starts with the shards out of the page cache

Readers per corpus, each over one full epoch, best of ``--repeats`` interleaved runs (a busy machine slows every
reader alike), all over the same files:

- raw: every shard read whole, sequentially, with ``readinto`` in 8 MiB chunks into ONE page-aligned buffer,
  nothing decoded (what ``cat shards/* > /dev/null`` does). It reads every byte of the tars, a little more than
  the loaders (tar headers);
- raw->batches: the same reads, into two page-aligned buffers of one batch's bytes each, filled in turn (the batch
  being filled and the one the consumer holds): the memory traffic of ANY loader that hands out batches of this
  size, and so the limit of a loader that copies nothing but the read. With the shards in the page cache, raw's
  8 MiB destination stays in the CPU cache while a batch of latents (tens of MB) does not, so raw->batches is
  lower than raw: that gap is memory bandwidth, not loader work;
- raw with ``--raw-threads`` (2) threads: the same chunks read by that many threads at once (``preadv``), each
  into its own 8 MiB buffer; and raw->batches with the chunks of each batch buffer read by them at once: the
  baselines for a loader that reads with as many threads;
- webdataset: ``wds.WebDataset(urls, shardshuffle=False) -> map(decode_sample) -> batched(collate)`` in a
  ``DataLoader(batch_size=None)`` with the same workers: sequential reads, no shuffle (its cheapest setting);
- loom: ``LoomLoader`` with a full shuffle (random ranged reads), same decoders, same collate, same workers; one
  row per ``--read-threads`` value (0: the loader's default, 2 read threads for latents without workers).

Best of the repeats per reader; for loom also the median over the rounds of raw's time over loom's in the same
round (steadier when other jobs load the machine in bursts).

Page cache: by default every reader runs warm (one untimed pass reads the shards first; the corpus must fit in
memory), so raw is the memory-bandwidth limit, the strictest one. ``--cold`` drops the shards from the page cache
(``posix_fadvise(DONTNEED)``) before every timed run of every reader, so each reads from the device.

Targets (issue 6): loom >= 1.0x webdataset for every corpus; latent shards >= 0.8x raw.

The latent corpus has the members ``loom cache latents`` writes (three float16 pass latents, the float16 mask, the
source's camera.npz, a meta.json of the real size); ``--latent-shape`` is (C, T', H', W'), by default the latents
of the turntable job's default video (61 frames of 512x512: 16 x 16 x 64 x 64, 6.4 MB a sample); the job writes
4 samples a shard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from loom.datasets import io as dio
from loom.datasets import loader as L
from loom.platform import shards


def ttv_sample(i: int, t: int, hw: int) -> dict[str, bytes]:
    from loom.datasets import ttv

    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:hw, 0:hw] / hw
    base = (np.sin(6 * xx + i) * 0.5 + 0.5)[None, ..., None] * np.array([255, 180, 90]) * np.ones((t, 1, 1, 1))
    rgb = np.clip(base + rng.normal(0, 4, (t, hw, hw, 3)), 0, 255).astype(np.uint8)
    mask = np.broadcast_to((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.15, (t, hw, hw)).copy()
    depth = np.where(mask, 2.0 + 0.1 * xx, 0).astype(np.float32)
    K = np.tile(np.array([[hw, 0, hw / 2], [0, hw, hw / 2], [0, 0, 1]], np.float32), (t, 1, 1))
    a = {"rgb": rgb, "normal": np.where(mask[..., None], [0, 0, 1.0], 0).astype(np.float32),
         "position": np.where(mask[..., None], np.stack([xx, yy, depth[0]], -1), 0).astype(np.float32),
         "depth": depth, "mask": mask, "K": K, "c2w": np.tile(np.eye(4, dtype=np.float32), (t, 1, 1))}
    return ttv.encode_sample(a, {"kind": "ttv", "i": i})


def latent_sample(i: int, shape: tuple[int, ...]) -> dict[str, bytes]:
    """A sample with the members and dtypes ``loom cache latents`` writes (loom.datasets.latents): three float16
    pass latents (C,T',H',W'), the float16 mask coverage (T',H',W'), the source's compressed camera.npz and a
    meta.json of the real one's size (source meta plus the "latents" block with the normalisation vectors)."""
    from loom.datasets.codecs import npz
    from loom.datasets.latents import PASSES, npy

    rng = np.random.default_rng(i)
    c, t = shape[0], shape[1]
    frames = 1 + 4 * (t - 1)  # the source frames the Wan VAE folds into t latent frames
    files = {f"{p}_latent.npy": npy(rng.standard_normal(shape, dtype=np.float32).astype(np.float16)) for p in PASSES}
    files["mask_latent.npy"] = npy(rng.random(shape[1:], dtype=np.float32).astype(np.float16))
    K = np.tile(np.array([[560.0, 0, 256], [0, 560.0, 256], [0, 0, 1]], np.float32), (frames, 1, 1))
    a = np.linspace(0, 2 * np.pi, frames, endpoint=False) + rng.uniform(0, 2 * np.pi)  # a turntable orbit
    c2w = np.zeros((frames, 4, 4), np.float32)
    c2w[:, 0, 0], c2w[:, 0, 1], c2w[:, 1, 0], c2w[:, 1, 1] = -np.sin(a), 0, np.cos(a), 0
    c2w[:, 2, 1], c2w[:, 0, 2], c2w[:, 1, 2] = -1, -np.cos(a), -np.sin(a)
    c2w[:, :3, 3] = np.stack([2.5 * np.cos(a), 2.5 * np.sin(a), np.full(frames, 0.4)], -1)
    c2w[:, 3, 3] = 1
    files["camera.npz"] = npz(K=K, c2w=c2w)
    meta = {"kind": "ttv", "i": i, "asset": {"id": f"asset{i:06d}", "sha256": "0" * 64}, "seed": i, "frames": frames,
            "latents": {"passes": list(PASSES), "frames": {"source": frames, "used": frames, "policy": "trim"},
                        "normalization": {"kind": "mean_std", "mean": rng.normal(0, 1, c).tolist(),
                                          "std": rng.uniform(0.5, 2, c).tolist()},
                        "vae": {"path": "/models/Wan2.1/vae", "class": "AutoencoderKLWan", "z_dim": c},
                        "store_dtype": "float16", "loom_version": "0"}}
    files["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return files


def write_corpus(out: str, kind: str, n: int, per_shard: int, make) -> None:
    names = []
    for s in range(0, n, per_shard):
        name = shards.shard_name(kind, s // per_shard)
        size, sha, keys = shards.write_tar(shards.shard_url(out, name),
                                           ((f"{kind}{i:06d}", make(i)) for i in range(s, min(n, s + per_shard))))
        shards.write_sidecar(out, shards.ShardRecord(name=name, samples=len(keys), size=size, sha256=sha, keys=keys))
        names.append(name)
    shards.write_manifest(out, names, extra={"kind": kind})


def _aligned(nbytes: int) -> memoryview:
    """A page-aligned, already faulted-in buffer (so no reader pays first-touch page faults in its timing)."""
    a = np.ones(nbytes + 4096, np.uint8)
    start = -a.ctypes.data % 4096
    return memoryview(a)[start:start + nbytes]


def bench_raw(urls: list[str], bufs: list[memoryview], chunk: int = 8 << 20) -> int:
    """Read every shard whole, sequentially, in ``chunk`` reads, into ``bufs`` in turn (each filled to its end
    before the next). Returns the bytes read."""
    total, k, pos = 0, 0, 0
    for u in urls:
        with open(u, "rb", buffering=0) as f:
            while True:
                buf = bufs[k]
                got = f.readinto(buf[pos:pos + min(chunk, len(buf) - pos)])
                if not got:
                    break
                total, pos = total + got, pos + got
                if pos == len(buf):
                    k, pos = (k + 1) % len(bufs), 0
    return total


def bench_raw_threaded(urls: list[str], bufs: list[memoryview], pool, chunk: int = 8 << 20,
                       per_thread: bool = False) -> int:
    """``bench_raw`` with the threads of ``pool`` reading concurrently (``preadv`` releases the GIL). ``per_thread``:
    thread ``k`` of ``len(bufs)`` reads chunks ``k, k + len(bufs), ...`` into ``bufs[k]``, never waiting for the
    others (raw with threads); else the chunks of one buffer are read concurrently, and the next buffer starts when
    all of them are in (a loader that fills a batch with several threads). Returns the bytes read."""
    fds = [os.open(u, os.O_RDONLY) for u in urls]
    try:
        rounds: list[list] = [[]]  # reads that run concurrently: (fd, file offset, destination)
        k, pos = 0, 0
        for fd in fds:
            size, off = os.fstat(fd).st_size, 0
            while off < size:
                if per_thread:
                    n = min(chunk, size - off)
                    rounds[-1].append((fd, off, n))
                else:  # the chunks of one batch buffer
                    n = min(chunk, size - off, len(bufs[k]) - pos)
                    rounds[-1].append((fd, off, bufs[k][pos:pos + n]))
                    pos += n
                    if pos == len(bufs[k]):
                        k, pos = (k + 1) % len(bufs), 0
                        rounds.append([])
                off += n
        if per_thread:
            chunks = rounds[0]

            def one_thread(k):
                return sum(os.preadv(fd, [bufs[k][:n]], off) for fd, off, n in chunks[k::len(bufs)])

            return sum(pool.map(one_thread, range(len(bufs))))
        total = 0
        for r in rounds:
            total += sum(pool.map(lambda t: os.preadv(t[0], [t[2]], t[1]), r))
        return total
    finally:
        for fd in fds:
            os.close(fd)


def drop_cache(urls: list[str]) -> None:
    """Evict the shards from the page cache (clean pages of files we can open: no privileges needed)."""
    for u in urls:
        fd = os.open(u, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def wds_pipeline(urls: list[str], decode, batch_size: int, workers: int):
    import webdataset as wds

    def dec(s):
        files = {k: v for k, v in s.items() if not k.startswith("__")}
        out = decode(files, None)
        out["__key__"] = s["__key__"]
        return out

    # every worker reads whole shards (split_by_worker): the plain webdataset recipe
    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                          empty_check=False)
          .map(dec).batched(batch_size, collation_fn=dio.collate, partial=True))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)


def count(batches) -> int:
    n = 0
    for b in batches:
        n += len(b["__key__"])
    return n


def run(args) -> dict:
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="loom-bench-loader-")
    corpora = {
        "ttv": (lambda i: ttv_sample(i, args.frames, args.size), args.ttv_samples, 8),
        "latents": (lambda i: latent_sample(i, tuple(args.latent_shape)), args.latent_samples, 4),
    }
    results = {}
    for kind in args.corpora:
        make, n, per_shard = corpora[kind]
        out = os.path.join(tmp, kind)
        t0 = time.perf_counter()
        write_corpus(out, kind, n, per_shard, make)
        urls = shards.shard_urls(out)
        size = sum(os.path.getsize(u) for u in urls)
        mb = size / 1e6
        print(f"\n== {kind}: {n} samples, {len(urls)} shards, {mb:.1f} MB, batch {args.batch_size} "
              f"({'cold' if args.cold else 'warm'} page cache; written in {time.perf_counter() - t0:.1f} s)")
        decode = dio.resolve_decoder(kind)
        chunk_buf = [_aligned(8 << 20)]
        batch_bufs = [_aligned(-(-size * args.batch_size // n)) for _ in range(2)]
        bench_raw(urls, chunk_buf)  # warm the page cache for every reader alike
        best: dict[str, float] = {}
        times: dict[str, list[float]] = {}  # every run, in rounds: run i of each reader ran in round i

        def clock(name, fn, expect, best=best, times=times, urls=urls):
            if args.cold:
                drop_cache(urls)
            t0 = time.perf_counter()
            got = fn()
            dt = time.perf_counter() - t0
            best[name] = min(best.get(name, float("inf")), dt)
            times.setdefault(name, []).append(dt)
            assert got >= expect, (name, got, expect)

        rt = args.raw_threads
        pool = ThreadPoolExecutor(rt) if rt > 1 else None
        thread_bufs = [_aligned(8 << 20) for _ in range(rt)]
        loaders = {(w, t): L.LoomLoader(out, batch_size=args.batch_size, num_workers=w, world_size=1, rank=0, seed=0,
                                        read_threads=t or None)
                   for w in args.workers for t in args.read_threads}

        def loom_epoch(w, t, loaders=loaders):
            loaders[w, t].set_epoch(0)
            return count(loaders[w, t])

        for _ in range(args.repeats):
            clock("raw", lambda u=urls, b=chunk_buf: bench_raw(u, b), size)
            clock("raw->batches", lambda u=urls, b=batch_bufs: bench_raw(u, b), size)
            if pool is not None:
                clock("rawT", lambda u=urls, b=thread_bufs, p=pool: bench_raw_threaded(u, b, p, per_thread=True),
                      size)
                clock("rawT->batches", lambda u=urls, b=batch_bufs, p=pool: bench_raw_threaded(u, b, p), size)
            for w in args.workers:
                clock(f"wds{w}", lambda u=urls, d=decode, w=w: count(wds_pipeline(u, d, args.batch_size, w)), n)
                for t in args.read_threads:
                    clock(f"loom{w}/{t}", lambda w=w, t=t: loom_epoch(w, t), n)
        if pool is not None:
            pool.shutdown()
        raw, raw_b = n / best["raw"], n / best["raw->batches"]
        print(f"  raw tar bytes         {raw:10.1f} samples/s {mb / best['raw']:8.1f} MB/s   1.00x raw")
        print(f"  raw -> batches        {raw_b:10.1f} samples/s {mb / best['raw->batches']:8.1f} MB/s "
              f"  {raw_b / raw:4.2f}x raw")
        raw_t = raw_tb = None
        if pool is not None:
            raw_t, raw_tb = n / best["rawT"], n / best["rawT->batches"]
            print(f"  raw, {rt} threads        {raw_t:10.1f} samples/s {mb / best['rawT']:8.1f} MB/s "
                  f"  {raw_t / raw:4.2f}x raw")
            print(f"  raw -> batches, {rt} thr {raw_tb:10.1f} samples/s {mb / best['rawT->batches']:8.1f} MB/s "
                  f"  {raw_tb / raw:4.2f}x raw  {raw_tb / raw_t:4.2f}x raw {rt} threads")
        for w in args.workers:
            wds_rate = n / best[f"wds{w}"]
            print(f"  webdataset w={w}       {wds_rate:10.1f} samples/s                {wds_rate / raw:5.2f}x raw")
            for t in args.read_threads:
                loom_rate = n / best[f"loom{w}/{t}"]
                name = f"w={w}" + (f" t={t}" if t else "")
                vs_t = f"  {loom_rate / raw_t:5.2f}x raw {rt} threads" if raw_t else ""
                # the ratio of the two runs of each round, median over the rounds: steadier than the ratio of the
                # bests when other jobs load the machine in bursts
                med = float(np.median(np.divide(times["raw"], times[f"loom{w}/{t}"])))
                print(f"  loom       {name:10s} {loom_rate:10.1f} samples/s                {loom_rate / raw:5.2f}x raw  "
                      f"{loom_rate / raw_b:5.2f}x raw->batches  {loom_rate / wds_rate:5.2f}x webdataset{vs_t}  "
                      f"(median of rounds {med:4.2f}x raw)")
                r = {"raw": raw, "raw_batches": raw_b, "webdataset": wds_rate, "loom": loom_rate,
                     "loom_vs_wds": loom_rate / wds_rate, "loom_vs_raw": loom_rate / raw,
                     "loom_vs_raw_batches": loom_rate / raw_b, "loom_vs_raw_median_of_rounds": med}
                if raw_t:
                    r.update(raw_threads=raw_t, raw_threads_batches=raw_tb, loom_vs_raw_threads=loom_rate / raw_t)
                results[f"{kind}/w{w}" + (f"/t{t}" if t else "")] = r
    print("\nTargets: loom >= 1.0x webdataset (every corpus); latents loom >= 0.8x raw")
    for k, r in results.items():
        ok = r["loom_vs_wds"] >= 1.0 and (not k.startswith("latents") or r["loom_vs_raw"] >= 0.8)
        print(f"  {k:14s} {r['loom_vs_wds']:5.2f}x webdataset  {r['loom_vs_raw']:5.2f}x raw  "
              f"{r['loom_vs_raw_batches']:5.2f}x raw->batches  (rounds {r['loom_vs_raw_median_of_rounds']:4.2f}x raw)  "
              + (f"{r['loom_vs_raw_threads']:5.2f}x raw {args.raw_threads} threads  " if "loom_vs_raw_threads" in r
                 else "") + ("PASS" if ok else "FAIL"))
    if not args.keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"\nshards kept in {tmp}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small corpora for a smoke run")
    p.add_argument("--corpora", nargs="+", choices=("ttv", "latents"), default=["ttv", "latents"])
    p.add_argument("--ttv-samples", type=int, default=96)
    p.add_argument("--frames", type=int, default=8, help="frames per turntable sample")
    p.add_argument("--size", type=int, default=128, help="turntable frame size (square)")
    p.add_argument("--latent-samples", type=int, default=128)
    p.add_argument("--latent-shape", type=int, nargs=4, default=[16, 16, 64, 64], metavar=("C", "T", "H", "W"),
                   help="latent shape per pass (float16); default: the turntable job's default video, 6.4 MB a "
                   "sample with its three passes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--read-threads", type=int, nargs="+", default=[0], metavar="T",
                   help="loom rows with read_threads=T (0: the loader's default)")
    p.add_argument("--raw-threads", type=int, default=2,
                   help="threads of the threaded raw rows (1: no such rows)")
    p.add_argument("--cold", action="store_true", help="drop the shards from the page cache before every run")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the temporary shards")
    args = p.parse_args(argv)
    if args.quick:
        args.ttv_samples, args.latent_samples, args.repeats = 32, 32, 2
    res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": res}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
