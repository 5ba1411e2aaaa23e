"""Sequences per hour of Loom's 4D job against a plain loop without Ray, and where the time goes, in one run.

Loom's side is the real job: ``loom.platform.jobs.run_job`` on the ``JobSpec`` of ``loom.corpora.base.job_spec``
(Ray Data, one sandboxed persistent Blender worker per core, tar shards and sidecars) into a temporary folder. Per-stage
seconds come from the shard sidecars' ``stats``.

The plain loop does the same tasks (same params: frames, size, cameras, lighting, seeds, point counts) in ONE Python
process without Ray or a sandbox: ``import bpy`` once, then per sequence ``extract_sequence`` (load + animation
evaluation + render + readback), ``process_sequence`` (watertight conversion + sampling), ``encode_sample`` and a
``tarfile`` write, each timed.

Both sides get the same cores (2, or ``--cores``): Loom as ``cores`` workers x 1 thread (``OMP_NUM_THREADS=1``), the
plain loop as one process with Blender ``threads=cores`` and ``OMP_NUM_THREADS=cores``. No target ratio: the script
prints the ratio (Loom / plain sequences per hour) and the share of each side's time per stage. Ratios only, never
absolute times (see /work/shared/CONVENTIONS.md).

Usage::

    python benchmarks/render_4d.py                 # 16 frames, 256x256, 3 assets x 2 (~10 min on 2 cores)
    python benchmarks/render_4d.py --quick         # smoke recipe: 4 frames, 64x64, small point counts (< 2 min)
    python benchmarks/render_4d.py --size 512 --json out/bench-4d.json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

HERE = os.path.abspath(__file__)
# Sidecar / plain-loop stage keys, in pipeline order.
STAGES = ("import", "animation", "render", "readback", "watertight", "sampling", "encode", "write")
# Rows of the report: label -> stage keys summed.
ROWS = (
    ("load (asset import)", ("import",)),
    ("animation evaluation", ("animation",)),
    ("rendering (+ EXR readback)", ("render", "readback")),
    ("watertight conversion", ("watertight",)),
    ("sampling (surface, SDF, queries)", ("sampling",)),
    ("encoding + writing", ("encode", "write")),
)


# ------------------------------------------------------------------------------------------------------ set-up


def loom_config(args, out: str):
    from loom.corpora.shape4d import Render4DJob
    from loom.platform.config import resolve

    return resolve(Render4DJob, "smoke" if args.quick else "default", [
        ("sequence.frames", args.frames), ("render.width", args.size), ("render.height", args.size),
        ("lighting.variants", 1), ("ray.workers", args.cores), ("ray.cpus_per_worker", 1),
        ("shards.samples_per_shard", 1), ("out", out),
    ])


def pick_records(n: int, repeat: int) -> list:
    """The first ``n`` bundled animated assets, the list repeated ``repeat`` times (copies get a ``_rK`` uid so
    that sample keys stay unique; same file, same work)."""
    from loom.corpora.assets import resolve_source

    base = resolve_source("bundled-animated")
    if not 1 <= n <= len(base):
        raise SystemExit(f"--assets must be in 1..{len(base)} (bundled animated assets), got {n}")
    base = base[:n]
    return [r if k == 0 else dataclasses.replace(r, uid=f"{r.uid}_r{k}") for k in range(repeat) for r in base]


# ------------------------------------------------------------------------------------------------------- Loom side


def run_loom(cfg, records) -> dict:
    from loom.platform.jobs import run_job
    from loom.corpora.base import job_spec
    from loom.platform import shards

    spec = job_spec(cfg, records)
    t0 = time.monotonic()
    summary = run_job(spec, progress=False)
    wall = time.monotonic() - t0
    if summary.failed:
        raise SystemExit(f"Loom failed {summary.failed} task(s): {summary.failures}")
    stages = {k: 0.0 for k in STAGES}
    task_s = 0.0
    for name in sorted(os.listdir(os.path.join(cfg.out, shards.SHARDS_DIR))):
        if name.endswith(".json"):
            st = shards.read_sidecar(cfg.out, name[:-5] + ".tar").stats
            for k in STAGES:
                stages[k] += float(st.get(k, 0.0))
            task_s += float(st.get("task", 0.0))
    workers = min(cfg.ray.workers, len(spec.tasks))
    cores = workers * cfg.ray.cpus_per_worker
    # Outside the stages: Ray Data scheduling, actor + sandbox start with `import bpy`, asset fetch, meta building,
    # and workers idle at the end of the job when the tasks do not divide evenly.
    stages["other"] = wall * workers - sum(stages.values())
    n = summary.samples_done
    return {"wall_s": wall, "sequences": n, "frames": summary.frames, "workers": workers, "cores": cores,
            "seq_per_hour": n / wall * 3600, "stage_s": stages, "task_s": task_s, "time_s": wall * workers}


# ------------------------------------------------------------------------------------------------------ plain side


def plain_jobs(cfg, records, cores: int, workdir: str) -> list[dict]:
    """The Loom job's task params, with the asset's local path and ``threads = cores`` (one process, all cores)."""
    from loom.corpora.assets import AssetRecord, fetch_local
    from loom.corpora.base import build_tasks

    jobs = []
    for t in build_tasks(cfg, records):
        local = fetch_local(AssetRecord.from_dict(t.asset), os.path.join(workdir, "assets"))
        jobs.append({"key": t.key, "params": {**t.params, "asset_path": local, "threads": cores}})
    return jobs


def plain_loop(job_file: str) -> None:
    """Runs in a fresh process (``--_plain``): import bpy once, then every sequence's stages one after another."""
    t_start = time.monotonic()
    import bpy  # noqa: F401 - once, like a plain script

    t_bpy = time.monotonic() - t_start
    from loom.datasets.shape4d import encode_sample
    from loom.render import hdri_path
    from loom.render.anim import extract_sequence
    from loom.corpora.shape4d import process_sequence

    with open(job_file) as f:
        doc = json.load(f)
    out = doc["out"]
    os.makedirs(out, exist_ok=True)
    totals = {k: 0.0 for k in STAGES}
    per_seq = []
    for job in doc["jobs"]:
        params = job["params"]
        work = tempfile.mkdtemp(prefix="plain-", dir=out)
        seq = extract_sequence({**params, "workdir": work, "hdri_path": hdri_path(params["lighting"]["hdri"])})
        info = seq.pop("info")
        timings = dict(info["timings"])  # import, animation, render, readback
        arrays = process_sequence({**seq, "half_extent": params["half_extent"]}, params["points"], params["seed"],
                                  timings)  # watertight, sampling
        arrays.update(video=seq["video"], K=seq["K"], c2w=seq["c2w"])
        t0 = time.perf_counter()
        meta = {**params["meta"], "frame_times": [float(x) for x in seq["frame_times"]],
                "normalization": info["normalization"], "root_offsets": info["root_offsets"],
                "animation": info["animation"], "mesh": info["mesh"]}
        files = encode_sample(arrays, meta)
        t1 = time.perf_counter()
        with tarfile.open(os.path.join(out, f"{job['key']}.tar"), "w") as tar:
            for ext in sorted(files):
                ti = tarfile.TarInfo(f"{job['key']}.{ext}")
                ti.size = len(files[ext])
                tar.addfile(ti, io.BytesIO(files[ext]))
        timings.update(encode=t1 - t0, write=time.perf_counter() - t1)
        shutil.rmtree(work, ignore_errors=True)
        for k in STAGES:
            totals[k] += float(timings.get(k, 0.0))
        per_seq.append({k: float(timings.get(k, 0.0)) for k in STAGES})
    print("PLAIN_RESULT " + json.dumps({"stage_s": totals, "per_sequence": per_seq, "bpy_import_s": t_bpy,
                                        "in_process_s": time.monotonic() - t_start}), flush=True)


def run_plain(jobs: list[dict], cores: int, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    job_file = os.path.join(workdir, "jobs.json")
    with open(job_file, "w") as f:
        json.dump({"jobs": jobs, "out": os.path.join(workdir, "tars")}, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(cores)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, HERE, "--_plain", job_file], capture_output=True, text=True, env=env,
                          check=False)
    wall = time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PLAIN_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"plain loop failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(lines[-1][len("PLAIN_RESULT "):])
    stages = dict(r["stage_s"])
    # Python start, `import bpy` and loom, building meta, process exit.
    stages["other"] = wall - sum(stages.values())
    n = len(jobs)
    return {"wall_s": wall, "sequences": n, "cores": cores, "seq_per_hour": n / wall * 3600, "stage_s": stages,
            "bpy_import_s": r["bpy_import_s"], "per_sequence": r["per_sequence"], "time_s": wall}


# ------------------------------------------------------------------------------------------------------ checks


def same_samples(loom_out: str, plain_tars: str) -> dict:
    """Both sides made the same samples: largest differences of the geometry arrays and of the video."""
    from loom.datasets.shape4d import decode_sample, iter_samples

    loom = {s["__key__"]: s for s in iter_samples(loom_out)}
    worst = {"surface": 0.0, "queries": 0.0, "sdf": 0.0, "video_mean_abs": 0.0}
    for key, a in loom.items():
        files = {}
        with tarfile.open(os.path.join(plain_tars, f"{key}.tar")) as tar:
            for m in tar:
                files[m.name.split(".", 1)[1]] = tar.extractfile(m).read()
        b = decode_sample(files)
        for k in ("surface", "queries", "sdf"):
            worst[k] = max(worst[k], float(np.abs(a[k] - b[k]).max()))
        worst["video_mean_abs"] = max(worst["video_mean_abs"],
                                      float(np.abs(a["video"].astype(np.int16) - b["video"]).mean()))
    return worst


# ------------------------------------------------------------------------------------------------------ report


def stage_table(loom: dict, plain: dict) -> str:
    ln, pn = loom["sequences"], plain["sequences"]
    rows = [("stage", "Loom worker-s/seq", "share", "plain s/seq", "share")]

    def cells(res, n, keys):
        s = sum(res["stage_s"][k] for k in keys)
        return f"{s / n:.2f}", f"{100 * s / res['time_s']:.1f}%"

    for label, keys in ROWS + (("other (start-up, Ray, sandbox, idle)", ("other",)),):
        rows.append((label, *cells(loom, ln, keys), *cells(plain, pn, keys)))
    rows.append(("total (wall x workers)", f"{loom['time_s'] / ln:.2f}", "100%", f"{plain['time_s'] / pn:.2f}",
                 "100%"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"  {a:<{w}}  {b:>17}  {c:>6}  {d:>11}  {e:>6}" for a, b, c, d, e in rows)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--_plain":
        plain_loop(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=None, help="frames per sequence (default 16; --quick 4)")
    ap.add_argument("--size", type=int, default=None, help="conditioning video width = height in px "
                    "(default 256; --quick 64)")
    ap.add_argument("--assets", type=int, default=3, help="bundled animated assets (1..3: arm, arm_walk, blob)")
    ap.add_argument("--repeat", type=int, default=2, help="repeat the asset list K times (more tasks than workers)")
    ap.add_argument("--cores", type=int, default=2, help="cores given to each side")
    ap.add_argument("--quick", action="store_true", help="smoke recipe: 4 frames, 64x64, small point counts")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary output folders")
    args = ap.parse_args(argv)
    args.frames = args.frames or (4 if args.quick else 16)
    args.size = args.size or (64 if args.quick else 256)
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")

    records = pick_records(args.assets, args.repeat)
    tmp = tempfile.mkdtemp(prefix="loom-bench4d-")
    try:
        cfg = loom_config(args, os.path.join(tmp, "loom"))
        p = cfg.points
        results: dict = {"cores": args.cores, "recipe": "smoke" if args.quick else "default",
                         "frames": cfg.sequence.frames, "size": cfg.render.width,
                         "assets": [r.uid for r in records], "points": dataclasses.asdict(p)}
        print(f"cores per side: {args.cores} (Loom: {args.cores} workers x 1 thread; plain loop: 1 process, "
              f"Blender threads={args.cores}, OMP_NUM_THREADS={args.cores})")
        print(f"{len(records)} sequences ({', '.join(r.uid for r in records)}); recipe {results['recipe']}: "
              f"{cfg.sequence.frames} frames, {cfg.render.width}x{cfg.render.height} video, {cfg.render.samples} "
              f"samples, {p.surface} surface points, {p.sdf_near}+{p.sdf_volume} SDF samples, {p.queries} queries, "
              f"watertight resolution {p.watertight_resolution}", flush=True)

        # Warm the page cache for both sides (bpy is ~1 GB of shared libraries).
        subprocess.run([sys.executable, "-c", "import bpy, point_cloud_utils"], capture_output=True, check=True)

        jobs = plain_jobs(cfg, records, args.cores, tmp)
        plain = run_plain(jobs, args.cores, os.path.join(tmp, "plain"))
        print(f"  plain loop  {plain['sequences']} sequences in {plain['wall_s']:.1f} s", flush=True)

        from loom.platform.ray import init_ray

        t = time.monotonic()
        init_ray(cfg.ray, announce=False)
        results["ray_init_s"] = time.monotonic() - t
        loom = run_loom(cfg, records)
        print(f"  Loom        {loom['sequences']} sequences in {loom['wall_s']:.1f} s (Ray started before, in "
              f"{results['ray_init_s']:.1f} s)", flush=True)

        check = same_samples(cfg.out, os.path.join(tmp, "plain", "tars"))
        ratio = loom["seq_per_hour"] / plain["seq_per_hour"]
        ratio_ray = loom["sequences"] / (loom["wall_s"] + results["ray_init_s"]) * 3600 / plain["seq_per_hour"]
        print(f"\n  sequences/hour: Loom {loom['seq_per_hour']:.1f}  plain loop {plain['seq_per_hour']:.1f}  "
              f"ratio Loom/plain {ratio:.2f}x ({ratio_ray:.2f}x with Ray's start counted)")
        print(f"  same samples: max |diff| surface {check['surface']:.2g}, queries {check['queries']:.2g}, "
              f"sdf {check['sdf']:.2g}; video mean |diff| {check['video_mean_abs']:.3f} (of 255)")
        print("  share of each side's time (Loom: wall x workers; plain: wall)")
        print(stage_table(loom, plain), flush=True)
        results.update(loom=loom, plain=plain, ratio=ratio, ratio_with_ray_start=ratio_ray, same_samples=check)
    finally:
        if args.keep:
            print(f"\noutputs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
