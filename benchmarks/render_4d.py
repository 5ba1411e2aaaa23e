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
    python benchmarks/render_4d.py --paths         # today's mesh path against the 2026-12 one (~6 min on 2 cores)
    python benchmarks/render_4d.py --paths --quick # smoke recipe (< 1 min)

``--paths`` compares the mesh stage of two code paths on the SAME extracted sequences, in one run, 1 thread each
(``OMP_NUM_THREADS=1``, Loom's worker): Blender runs once per asset (``extract_sequence`` in a fresh process, its
stage times kept), then ``process_sequence`` runs with the path before 2026-12 (``watertight_resolution`` 20,000 for
the default recipe, every SDF distance through the exact query) and with the config's path (its resolution,
far-point skip), interleaved sequence by sequence, and ``encode_sample`` once per path. Sequences per core-hour =
3600 / (Blender + mesh + encode seconds per sequence); Loom's fixed cost per job (Ray, sandbox start, ~10% of its
time in the Loom/plain table) is not in it. It prints the sample differences with their tolerances (see
``path_differences``).
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
    from loom.corpora.base import job_spec

    spec = job_spec(cfg, records)
    jobs = []
    for t in spec.tasks:
        local = fetch_local(AssetRecord.from_dict(t.asset), os.path.join(workdir, "assets"))
        jobs.append({"key": t.key, "params": {**spec.params(t), "asset_path": local, "threads": cores}})
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


# ------------------------------------------------------------------------------------------------------ paths

# The path before 2026-12 (``--paths``): these points settings, every SDF distance through the exact query.
OLD_POINTS = {"default": {"watertight_resolution": 20000}, "smoke": {"watertight_resolution": 5000}}
# Tolerances of the new path's samples against today's, in units of the SDF truncation tau (box units):
# - surface: mean distance of the new path's surface points of a frame to the OLD path's watertight mesh of that
#   frame (0 where the mesh is unchanged; a Chamfer of points to surface, free of sampling noise): <= 1 tau in
#   every frame. The old path's own watertight offset changes by ~1 tau from frame to frame (one octree level:
#   median 0.005-0.014 in the [-1, 1] box at 20,000), so this is what today's corpus already varies by.
# - SDF: the new path's SDF samples against the OLD watertight mesh's clipped signed distance at the same points:
#   mean |diff| <= 0.25 tau over a sequence (max |diff| printed; it reaches 2 tau at frames whose octree level
#   changed, where a point inside one shell is outside the other).
# - frames whose watertight mesh is unchanged: max |SDF diff| against the old mesh <= 1e-6 (float32 rounding).
# - watertight offset (median distance of the watertight vertices to the animated mesh, per frame): a frame the
#   new path changes may drop ONE octree level, no more: its offset <= 2 sqrt(2) x the old path's for that frame
#   (one level doubles it, 2.0-2.11x measured; two would make it 4x), and
#   <= 0.75 x points.inner_threshold (the queries' inner-point test needs the offset below it). This is a quality
#   trade-off, not free: such a frame's surface moves out by ~1 tau (0.01 -> 0.02 in the [-1, 1] box) and its SDF
#   by ~0.56 tau on average (measured on the fake arm); the old path already mixes both levels in one sequence.
TOLERANCES = {"surface_chamfer_tau": 1.0, "sdf_mean_tau": 0.25, "sdf_same_mesh": 1e-6, "offset_vs_old": 2.83,
              "offset_vs_inner_threshold": 0.75}


def watertight_offset(vw: np.ndarray, v: np.ndarray, f: np.ndarray) -> float:
    """Median distance of the watertight vertices to the animated mesh."""
    import point_cloud_utils as pcu

    return float(np.median(pcu.closest_points_on_mesh(vw, v.astype(np.float64), f.astype(np.int64))[0]))


def extract_loop(job_file: str) -> None:
    """Runs in a fresh process (``--_extract``): Blender once per task, the sequence saved as .npz with its
    stage times."""
    import bpy  # noqa: F401

    from loom.render import hdri_path
    from loom.render.anim import extract_sequence

    with open(job_file) as f:
        doc = json.load(f)
    for job in doc["jobs"]:
        params = job["params"]
        work = tempfile.mkdtemp(prefix="extract-", dir=doc["out"])
        seq = extract_sequence({**params, "workdir": work, "hdri_path": hdri_path(params["lighting"]["hdri"])})
        info = seq.pop("info")
        np.savez(os.path.join(doc["out"], f"{job['key']}.npz"), **seq)
        with open(os.path.join(doc["out"], f"{job['key']}.json"), "w") as f:
            json.dump({"timings": info["timings"], "info": {k: info[k] for k in ("normalization", "mesh")}}, f)
        shutil.rmtree(work, ignore_errors=True)


def path_differences(old: dict, new: dict, old_meshes: list, truncation: float) -> dict:
    """Differences of the new path's samples from the old path's, per the ``TOLERANCES`` above."""
    from loom.geometry import mesh

    import point_cloud_utils as pcu

    chamfer, sdf_max, sdf_mean, same_max, changed = [], [], [], [], 0
    for t, (vw, fw) in enumerate(old_meshes):
        surface = new["surface"][t, :, :3].astype(np.float64)
        chamfer.append(float(np.asarray(pcu.closest_points_on_mesh(surface, vw, fw)[0]).mean()))
        # The old path's own value at the new points: exact distance and winding number, then clipped.
        ref = np.clip(mesh.signed_distance(new["sdf_points"][t], vw, fw), -truncation, truncation)
        diff = np.abs(new["sdf"][t].astype(np.float64) - ref)
        sdf_max.append(diff.max())
        sdf_mean.append(diff.mean())
        same = new["_meshes"][t][0].shape == vw.shape and np.array_equal(new["_meshes"][t][0], vw)
        changed += not same
        if same:
            same_max.append(diff.max())
    return {"surface_chamfer_max": float(max(chamfer)), "sdf_max": float(max(sdf_max)),
            "sdf_mean": float(np.mean(sdf_mean)), "sdf_same_mesh_max": float(max(same_max, default=0.0)),
            "frames": len(old_meshes), "frames_changed": changed}


def run_paths(args) -> dict:
    """Today's mesh path against the config's on the same extracted sequences (see the module docstring)."""
    from loom.corpora.shape4d import process_sequence
    from loom.datasets.shape4d import encode_sample
    from loom.geometry import mesh

    records = pick_records(args.assets, 1)
    tmp = tempfile.mkdtemp(prefix="loom-bench4d-paths-")
    try:
        cfg = loom_config(args, os.path.join(tmp, "loom"))
        recipe_name = "smoke" if args.quick else "default"
        p_new = dataclasses.asdict(cfg.points)
        p_old = {**p_new, **OLD_POINTS[recipe_name]}
        tau = float(p_new["sdf_truncation"])
        print(f"{len(records)} sequences ({', '.join(r.uid for r in records)}); recipe {recipe_name}: "
              f"{cfg.sequence.frames} frames, {cfg.render.width}x{cfg.render.height} video, {cfg.render.samples} "
              f"samples; 1 thread (OMP_NUM_THREADS=1, Blender threads=1)")
        print(f"  old path: watertight_resolution {p_old['watertight_resolution']}, exact distance for every SDF "
              f"point\n  new path: watertight_resolution {p_new['watertight_resolution']}, SDF points provably "
              "beyond the truncation skip the exact distance", flush=True)
        jobs = plain_jobs(cfg, records, 1, tmp)
        ext = os.path.join(tmp, "seq")
        os.makedirs(ext)
        with open(os.path.join(tmp, "extract.json"), "w") as f:
            json.dump({"jobs": jobs, "out": ext}, f)
        proc = subprocess.run([sys.executable, HERE, "--_extract", os.path.join(tmp, "extract.json")],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"extraction failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        sums = {"blender": 0.0, "old": {"watertight": 0.0, "sampling": 0.0, "encode": 0.0},
                "new": {"watertight": 0.0, "sampling": 0.0, "encode": 0.0}}
        worst: dict = {}
        offsets: dict = {"old": [], "new": []}
        for i, job in enumerate(jobs):
            key, params = job["key"], job["params"]
            seq = dict(np.load(os.path.join(ext, f"{key}.npz")))
            with open(os.path.join(ext, f"{key}.json")) as f:
                sums["blender"] += sum(json.load(f)["timings"].values())
            seq["half_extent"] = params["half_extent"]
            out = {}
            order = (("old", p_old, False), ("new", p_new, True))
            for name, p, skip in order if i % 2 == 0 else order[::-1]:  # alternate: a warm-up favours neither
                timings: dict = {}
                meshes: list = []
                arrays = process_sequence(seq, p, params["seed"], timings, skip_far=skip, watertight_out=meshes)
                t0 = time.perf_counter()
                encode_sample({**arrays, "video": seq["video"], "K": seq["K"], "c2w": seq["c2w"]}, {"key": key})
                sums[name]["encode"] += time.perf_counter() - t0
                sums[name]["watertight"] += timings["watertight"]
                sums[name]["sampling"] += timings["sampling"]
                out[name] = {**arrays, "_meshes": meshes}
            d = path_differences(out["old"], out["new"], out["old"]["_meshes"], tau)
            for vw, fw in out["new"]["_meshes"]:
                assert mesh.is_watertight(vw, fw), f"{key}: new watertight mesh is not watertight"
            off = {name: [watertight_offset(vw, seq["vertices"][t], seq["faces"])
                          for t, (vw, _) in enumerate(out[name]["_meshes"])] for name in ("old", "new")}
            offsets["old"] += off["old"]
            offsets["new"] += off["new"]
            d["offset_ratio"] = max(a / b for a, b in zip(off["new"], off["old"]))
            d["offset_max"] = max(off["new"])
            print(f"  {key}: frames with a changed watertight mesh {d['frames_changed']}/{d['frames']}; surface "
                  f"to old mesh, mean per frame, max {d['surface_chamfer_max']:.4f}; SDF |diff| max {d['sdf_max']:.4f} "
                  f"mean {d['sdf_mean']:.5f} (same-mesh frames max {d['sdf_same_mesh_max']:.1e}); watertight offset "
                  f"old {min(off['old']):.4f}..{max(off['old']):.4f}, new {min(off['new']):.4f}..{max(off['new']):.4f}",
                  flush=True)
            for k, v in d.items():  # the worst sequence (sdf_mean: the worst sequence's mean)
                worst[k] = max(worst.get(k, 0), v)
        n = len(jobs)
        rows = [("stage (1 thread)", "old s/seq", "new s/seq", "old/new")]
        tot = {}
        for name in ("old", "new"):
            tot[name] = sums["blender"] + sum(sums[name].values())
        for label, get in (("Blender (import, animation, render, readback)", lambda x: sums["blender"]),
                           ("watertight conversion", lambda x: sums[x]["watertight"]),
                           ("sampling (surface, sharp, SDF, queries)", lambda x: sums[x]["sampling"]),
                           ("encoding", lambda x: sums[x]["encode"]),
                           ("mesh stage (watertight + sampling)",
                            lambda x: sums[x]["watertight"] + sums[x]["sampling"]),
                           ("total", lambda x: tot[x])):
            a, b = get("old") / n, get("new") / n
            rows.append((label, f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}x" if b > 0 else "-"))
        w = max(len(r[0]) for r in rows)
        ratio = tot["old"] / tot["new"]
        ok = {"surface": worst["surface_chamfer_max"] <= TOLERANCES["surface_chamfer_tau"] * tau,
              "sdf_mean": worst["sdf_mean"] <= TOLERANCES["sdf_mean_tau"] * tau,
              "same_mesh": worst["sdf_same_mesh_max"] <= TOLERANCES["sdf_same_mesh"],
              "offset": worst["offset_ratio"] <= TOLERANCES["offset_vs_old"]
              and worst["offset_max"] <= TOLERANCES["offset_vs_inner_threshold"] * p_new["inner_threshold"]}
        print(f"\n  sequences per core-hour: old {3600 * n / tot['old']:.1f}  new {3600 * n / tot['new']:.1f}  "
              f"ratio new/old {ratio:.2f}x (mesh stage alone {rows[5][3]})")
        print(f"  samples (tau = {tau}): surface to old mesh max {worst['surface_chamfer_max']:.4f} "
              f"(<= {TOLERANCES['surface_chamfer_tau']} tau: {ok['surface']}); SDF |diff| mean "
              f"{worst['sdf_mean']:.5f} (<= {TOLERANCES['sdf_mean_tau']} tau: {ok['sdf_mean']}), max "
              f"{worst['sdf_max']:.4f}; same-mesh frames max {worst['sdf_same_mesh_max']:.1e} (<= 1e-6: "
              f"{ok['same_mesh']}); watertight offset new/old per frame max {worst['offset_ratio']:.2f} (<= "
              f"{TOLERANCES['offset_vs_old']}), new max {worst['offset_max']:.4f} (<= "
              f"{TOLERANCES['offset_vs_inner_threshold']} x inner_threshold {p_new['inner_threshold']}): "
              f"{ok['offset']}")
        print("\n".join(f"  {a:<{w}}  {b:>9}  {c:>9}  {d:>7}" for a, b, c, d in rows), flush=True)
        return {"recipe": recipe_name, "sequences": n, "points_old": p_old, "points_new": p_new, "seconds": sums,
                "ratio": ratio, "differences": worst, "within_tolerance": ok, "tolerances": TOLERANCES,
                "offsets": offsets}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--_extract":
        extract_loop(sys.argv[2])
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
    ap.add_argument("--paths", action="store_true", help="today's mesh path against the config's, 1 thread, on the "
                    "same extracted sequences (instead of Loom against the plain loop)")
    args = ap.parse_args(argv)
    args.frames = args.frames or (4 if args.quick else 16)
    args.size = args.size or (64 if args.quick else 256)
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    if args.paths:
        if os.environ.get("OMP_NUM_THREADS") != "1":
            raise SystemExit("--paths measures one core: run it with OMP_NUM_THREADS=1")
        results = run_paths(args)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 0

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
