"""Loader throughput: Loom's loader against a plain webdataset pipeline and against reading the raw tar bytes,
over the same shards, in one run. Prints samples/s and ratios (never a bare absolute time as a target).

    .venv/bin/python benchmarks/loader.py                 # ttv and latent shards, workers 0 and 2 (~3 min)
    .venv/bin/python benchmarks/loader.py --quick         # smaller corpora (~1 min)
    .venv/bin/python benchmarks/loader.py --workers 0 --json out/bench-loader.json

Three readers per corpus, each over one full epoch, best of ``--repeats`` interleaved runs:

- raw: every shard's bytes read sequentially in 8 MiB chunks, nothing decoded (the I/O limit);
- webdataset: ``wds.WebDataset(urls, shardshuffle=False) -> map(decode_sample) -> batched(collate)`` in a
  ``DataLoader(batch_size=None)`` with the same workers: sequential reads, no shuffle (its cheapest setting);
- loom: ``LoomLoader`` with a full shuffle (random ranged reads), same decoders, same collate, same workers.

Targets (issue 6): loom >= 1.0x webdataset for every corpus; latent shards >= 0.8x raw. Shards sit in the page
cache after the first pass, so "raw" is the memory-bandwidth limit, the strictest one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from loom.datasets import loader as L
from loom.platform import shards


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


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
    rng = np.random.default_rng(i)
    return {"latent.npy": _npy(rng.standard_normal(shape, dtype=np.float32).astype(np.float16)),
            "meta.json": json.dumps({"kind": "latent", "i": i}).encode()}


def write_corpus(out: str, kind: str, n: int, per_shard: int, make) -> None:
    names = []
    for s in range(0, n, per_shard):
        name = shards.shard_name(kind, s // per_shard)
        size, sha, keys = shards.write_tar(shards.shard_url(out, name),
                                           ((f"{kind}{i:06d}", make(i)) for i in range(s, min(n, s + per_shard))))
        shards.write_sidecar(out, shards.ShardRecord(name=name, samples=len(keys), size=size, sha256=sha, keys=keys))
        names.append(name)
    shards.write_manifest(out, names, extra={"kind": kind})


def bench_raw(urls: list[str]) -> int:
    n = 0
    for u in urls:
        with open(u, "rb") as f:
            while f.read(8 << 20):
                pass
        n += 1
    return n


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
          .map(dec).batched(batch_size, collation_fn=L.collate, partial=True))
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
        "latent": (lambda i: latent_sample(i, tuple(args.latent_shape)), args.latent_samples, 32),
    }
    results = {}
    for kind, (make, n, per_shard) in corpora.items():
        out = os.path.join(tmp, kind)
        t0 = time.perf_counter()
        write_corpus(out, kind, n, per_shard, make)
        urls = shards.shard_urls(out)
        mb = sum(os.path.getsize(u) for u in urls) / 1e6
        print(f"\n== {kind}: {n} samples, {len(urls)} shards, {mb:.1f} MB (written in {time.perf_counter() - t0:.1f} s)")
        decode = L.resolve_decoder(kind)
        bench_raw(urls)  # warm the page cache for every reader alike
        best: dict[str, float] = {}

        def clock(name, fn, expect, best=best):
            t0 = time.perf_counter()
            got = fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
            assert got >= expect, (name, got, expect)

        loaders = {w: L.LoomLoader(out, batch_size=args.batch_size, num_workers=w, world_size=1, rank=0, seed=0)
                   for w in args.workers}

        def loom_epoch(w, loaders=loaders):
            loaders[w].set_epoch(0)
            return count(loaders[w])

        # interleaved repeats, best of each: a busy machine slows every reader alike
        for _ in range(args.repeats):
            clock("raw", lambda u=urls, n=n: bench_raw(u) and n, n)
            for w in args.workers:
                clock(f"wds{w}", lambda u=urls, d=decode, w=w: count(wds_pipeline(u, d, args.batch_size, w)), n)
                clock(f"loom{w}", lambda w=w: loom_epoch(w), n)
        raw = n / best["raw"]
        print(f"  raw tar bytes      {raw:10.1f} samples/s   {mb / best['raw']:8.1f} MB/s   1.00x raw")
        for w in args.workers:
            wds_rate, loom_rate = n / best[f"wds{w}"], n / best[f"loom{w}"]
            print(f"  webdataset w={w}    {wds_rate:10.1f} samples/s   {wds_rate / raw:5.2f}x raw")
            print(f"  loom       w={w}    {loom_rate:10.1f} samples/s   {loom_rate / raw:5.2f}x raw   "
                  f"{loom_rate / wds_rate:5.2f}x webdataset")
            results[f"{kind}/w{w}"] = {"raw": raw, "webdataset": wds_rate, "loom": loom_rate,
                                       "loom_vs_wds": loom_rate / wds_rate, "loom_vs_raw": loom_rate / raw}
    print("\nTargets: loom >= 1.0x webdataset (every corpus); latent loom >= 0.8x raw")
    for k, r in results.items():
        ok = r["loom_vs_wds"] >= 1.0 and (not k.startswith("latent") or r["loom_vs_raw"] >= 0.8)
        print(f"  {k:10s} {r['loom_vs_wds']:5.2f}x webdataset  {r['loom_vs_raw']:5.2f}x raw  {'PASS' if ok else 'FAIL'}")
    if not args.keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small corpora for a smoke run")
    p.add_argument("--ttv-samples", type=int, default=96)
    p.add_argument("--frames", type=int, default=8, help="frames per turntable sample")
    p.add_argument("--size", type=int, default=128, help="turntable frame size (square)")
    p.add_argument("--latent-samples", type=int, default=512)
    p.add_argument("--latent-shape", type=int, nargs="+", default=[16, 4, 60, 90],
                   help="latent array shape per sample (float16); default ~0.7 MB")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the temporary shards")
    args = p.parse_args(argv)
    if args.quick:
        args.ttv_samples, args.latent_samples, args.repeats = 32, 128, 2
    res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": res}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
