"""Clips per hour per core of ``loom prep videos`` and where the time goes, in one run.

The real job: ``loom.platform.jobs.run_job`` on ``loom.corpora.videos.job_spec`` (Ray Data, one sandboxed worker per
core with one thread, tar shards and sidecars) over synthetic H.264 videos made before the clock starts (960x540
like DL3DV-10K's images_4, a textured backdrop panning under a moving box, so that flow, depth and edges have work to
do). Per-stage seconds come from the shard sidecars' ``stats`` (the worker's ``timings``: decode, flow, noise,
depth, edges, caption, encode), and each stage is printed as its share of the whole measured in the same run: the
workers' busy time (the sum of ``task``) and the job's wall time x workers (the rest is Ray, scheduling and tar
writes). Ratios only, never a target time (see /work/shared/CONVENTIONS.md).

Without ``--depth-model``/``--caption-model`` the depth stage is the classical stand-in and the caption the template
(the job's CPU defaults), so their shares are those of the defaults, not of DPT or BLIP.

Usage::

    python benchmarks/prep_videos.py                     # paper size: 46 frames at 720x480, 4 clips (~2 min, 2 cores)
    python benchmarks/prep_videos.py --quick             # 17 frames at 160x96, 2 clips (CI smoke, < 1 min)
    python benchmarks/prep_videos.py --flow farneback --depth-model /models/dpt-hybrid-midas --json out/b.json
    python benchmarks/prep_videos.py --flow raft --raft-weights /models/raft_large_C_T_SKHT_V2-ff5fadd5.pth
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

STAGES = ("decode", "flow", "noise", "depth", "edges", "caption", "encode")


def make_video(path: str, frames: int, seed: int, w: int = 960, h: int = 540) -> None:
    """A panning textured backdrop with a box moving across it, as H.264 (what real corpora hold)."""
    import cv2

    from loom.datasets.codecs import encode_video

    rng = np.random.default_rng(seed)
    big = cv2.GaussianBlur((rng.random((h, w + 4 * frames, 3)) * 255).astype(np.float32), (0, 0), 2.0)
    big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    out = []
    for t in range(frames):
        f = big[:, 4 * t: 4 * t + w].copy()
        x = 100 + 6 * t
        f[150:350, x: x + 200] = (40, 30, 20)  # darker than any of the backdrop: a clear region boundary
        out.append(f)
    _, data = encode_video(np.stack(out), "h264", fps=30, name="v")
    with open(path, "wb") as fh:
        fh.write(data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=4, help="videos (one clip each)")
    ap.add_argument("--frames", type=int, default=46)
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--flow", default="dis", choices=("dis", "farneback", "raft"))
    ap.add_argument("--raft-weights", default="", help="--flow raft: local torchvision raft_large weights")
    ap.add_argument("--depth-model", default="", help="local transformers depth model folder (default: stand-in)")
    ap.add_argument("--caption-model", default="", help="local BLIP folder (default: the template)")
    ap.add_argument("--quick", action="store_true", help="17 frames at 160x96, 2 clips")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.clips, args.frames, args.width, args.height = 2, 17, 160, 96
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray

    from loom.corpora import videos as V
    from loom.platform import config as c
    from loom.platform.jobs import run_job

    tmp = tempfile.mkdtemp(prefix="bench-prep-")
    try:
        src = os.path.join(tmp, "videos")
        os.makedirs(src)
        for i in range(args.clips):
            make_video(os.path.join(src, f"v{i}.mp4"), args.frames + 2, seed=i)
        cfg = c.resolve(V.PrepVideosJob, "default", [
            ("videos", src), ("out", os.path.join(tmp, "out")), ("clip.frames", args.frames),
            ("clip.width", args.width), ("clip.height", args.height), ("flow.method", args.flow),
            ("flow.raft_weights", args.raft_weights),
            ("depth.model", args.depth_model), ("caption.model", args.caption_model),
            ("ray.workers", args.cores), ("ray.cpus_per_worker", 1), ("shards.samples_per_shard", 1)])
        sources = V.find_sources(cfg.videos)
        spec = V.job_spec(cfg, sources)
        ray.init(address="local", num_cpus=args.cores, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)  # a cluster is up before a job runs: not on the clock
        t0 = time.monotonic()
        summary = run_job(spec, progress=False)
        wall = time.monotonic() - t0
        ray.shutdown()
        if summary.failed:
            print(f"{summary.failed} clip(s) failed: {summary.failures[:2]}", file=sys.stderr)
            return 1
        stats: dict[str, float] = {}
        for p in glob.glob(os.path.join(cfg.out, "shards", "*.json")):
            for k, v in json.load(open(p)).get("stats", {}).items():
                stats[k] = stats.get(k, 0.0) + float(v)
        busy = stats.get("task", 0.0)
        n = summary.samples_done
        per_core_wall = n / (wall * args.cores) * 3600
        per_core_busy = n / busy * 3600 if busy else 0.0
        print(f"prep videos: {n} clips of {args.frames} frames at {args.width}x{args.height}, flow {args.flow}, "
              f"depth {'model' if args.depth_model else 'stand-in'}, caption "
              f"{'BLIP' if args.caption_model else 'template'}; {args.cores} workers x 1 thread")
        print(f"  clips/hour per core: {per_core_wall:.0f} (job wall time x cores, Ray and writes included), "
              f"{per_core_busy:.0f} (worker busy time only)")
        print(f"  {'stage':10s} {'share of busy':>14s} {'share of wall x cores':>22s}")
        shares = {}
        for k in STAGES:
            s = stats.get(k, 0.0)
            shares[k] = s / busy if busy else 0.0
            print(f"  {k:10s} {shares[k]:14.1%} {s / (wall * args.cores):22.1%}")
        rest = 1 - busy / (wall * args.cores)
        print(f"  {'job (Ray, scheduling, tar writes, idle)':40s} {rest:.1%} of wall x cores")
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "clips": n, "clips_per_hour_per_core_wall": per_core_wall,
                           "clips_per_hour_per_core_busy": per_core_busy, "share_of_busy": shares,
                           "job_overhead_share": rest}, f, indent=1)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
