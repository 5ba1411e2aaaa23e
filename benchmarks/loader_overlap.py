"""Loading overlapped with the training step: ``LoomLoader(prefetch=N)`` (a background thread makes batches ahead)
against ``prefetch=0`` (each batch made when the loop asks for it), over the same latent shards, with a consumer
that spends ``--step-ms`` per batch in a call that releases the GIL (``time.sleep``: what a GPU step does while
the host waits for the device). Prints samples/s and ratios, never a bare absolute time as a target.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loader_overlap.py                 # steps of 0, 25, 50, 100 ms
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loader_overlap.py --step-ms 50 --repeats 5

For each step time: ``load only`` (prefetch=0, no step: the loading rate), ``step only`` (the step alone: the
compute rate), then both loaders with the step. With no overlap an epoch takes load + step time; with full
overlap max(load, step). ``overlap`` = (serial time - measured time) / (serial time - ideal time): 0 = none,
1 = perfect. The corpus is the latent corpus of ``benchmarks/loader.py`` (6.4 MB samples by default).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from loom.datasets import loader as L
from loom.platform import shards


def _bench_loader():
    spec = importlib.util.spec_from_file_location("bench_loader", os.path.join(os.path.dirname(__file__), "loader.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def epoch(ld: L.LoomLoader, step_s: float) -> tuple[float, int]:
    ld.set_epoch(0)
    n = 0
    t0 = time.perf_counter()
    for b in ld:
        n += len(b["__key__"])
        if step_s:
            time.sleep(step_s)
        del b
    return time.perf_counter() - t0, n


def run(args) -> dict:
    torch.set_num_threads(1)
    bl = _bench_loader()
    tmp = tempfile.mkdtemp(prefix="loom-bench-overlap-")
    try:
        out = os.path.join(tmp, "latents")
        bl.write_corpus(out, "latents", args.samples, 4, lambda i: bl.latent_sample(i, tuple(args.latent_shape)))
        mb = sum(os.path.getsize(u) for u in shards.shard_urls(out)) / 1e6
        kw = {"batch_size": args.batch_size, "world_size": 1, "rank": 0, "seed": 0}
        loaders = {p: L.LoomLoader(out, prefetch=p, **kw) for p in (0, args.prefetch)}
        epoch(loaders[0], 0.0)  # warm the page cache
        print(f"latents: {args.samples} samples ({mb:.0f} MB), batch {args.batch_size}, prefetch {args.prefetch}")
        print(f"{'step ms':>8} {'load only':>11} {'step only':>11} {'prefetch=0':>11} "
              f"{'prefetch=' + str(args.prefetch):>11} {'speed-up':>9} {'overlap p=0':>12} {'overlap':>8}")
        results = []
        batches = -(-args.samples // args.batch_size)
        for ms in args.step_ms:
            best = {k: float("inf") for k in ("load", "p0", "p")}
            for _ in range(args.repeats):  # interleaved: a busy machine slows all alike
                best["load"] = min(best["load"], epoch(loaders[0], 0.0)[0])
                best["p0"] = min(best["p0"], epoch(loaders[0], ms / 1e3)[0])
                best["p"] = min(best["p"], epoch(loaders[args.prefetch], ms / 1e3)[0])
            step = batches * ms / 1e3
            serial, ideal = best["load"] + step, max(best["load"], step)

            def overlap(t, serial=serial, ideal=ideal):
                return (serial - t) / (serial - ideal) if serial > ideal else float("nan")

            rate = {k: args.samples / v for k, v in best.items()}
            row = {"step_ms": ms, "load_only": rate["load"], "step_only": args.samples / step if step else None,
                   "prefetch0": rate["p0"], "prefetch": rate["p"], "speedup": best["p0"] / best["p"],
                   "overlap_prefetch0": overlap(best["p0"]), "overlap": overlap(best["p"])}
            results.append(row)
            step_only = f"{row['step_only']:11.1f}" if step else f"{'-':>11}"
            print(f"{ms:8.0f} {rate['load']:11.1f} {step_only} {rate['p0']:11.1f} {rate['p']:11.1f} "
                  f"{row['speedup']:8.2f}x {row['overlap_prefetch0']:12.2f} {row['overlap']:8.2f}")
        print("(samples/s; speed-up = prefetch=0 time / prefetch time; overlap 0 = serial, 1 = max(load, step))")
        return {"samples": args.samples, "mb": mb, "batch_size": args.batch_size, "prefetch": args.prefetch,
                "rows": results}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--latent-shape", type=int, nargs=4, default=[16, 16, 64, 64], metavar=("C", "T", "H", "W"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prefetch", type=int, default=2, help="prefetch of the compared loader (LoomLoader's default)")
    p.add_argument("--step-ms", type=float, nargs="+", default=[0, 25, 50, 100])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
