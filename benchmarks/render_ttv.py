"""Frames per second per core of Loom's turntable render against a plain per-asset bpy loop, measured in one run.

Loom's side goes through the real job machinery: ``loom.platform.jobs.run_job`` on the ``JobSpec`` of
``loom.corpora.base.job_spec`` (Ray Data, one sandboxed persistent Blender worker per core, EXR readback, FFV1/npz
encoding, tar shards) into a temporary folder. The baseline (``_baseline_objaverse_loop.py``) renders the same
frames the way the public Objaverse render scripts do: one fresh ``python`` + ``import bpy`` per asset, every pass
in one render, one file per pass per frame through the compositor's File Output node.

Both get the same 2 cores (or ``--cores``): Loom as ``cores`` workers x 1 thread (``ray.cpus_per_worker=1``),
the baseline as one process with ``threads=cores``. Frames/s/core = frames / wall seconds / cores.

Targets (ratios only, never absolute times):

1. same settings (resolution, samples, denoiser, adaptive sampling, light-path bounds, frames, assets, cameras,
   lighting): Loom >= 1.5x the baseline's frames/s/core at smoke size, >= 1.1x at 512x512.
2. same quality: Loom's colour pass (16 samples + OIDN + adaptive sampling + bounded light paths) >= 4x faster per
   frame per core than a 128-sample OIDN-denoised Cycles render with Blender's defaults otherwise, with PSNR >= 35 dB
   on the sRGB uint8 frames, computed over the object's pixels (Loom's mask or the reference's alpha > 0); the
   whole-frame PSNR (background included) is printed too.

Usage::

    python benchmarks/render_ttv.py                       # smoke and 512 (~10-20 min on 2 cores)
    python benchmarks/render_ttv.py --quick               # CI smoke, < 3 min
    python benchmarks/render_ttv.py --size smoke --json out/bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE_SCRIPT = os.path.join(HERE, "_baseline_objaverse_loop.py")
# Diverse first: a textured 88K-face glTF, a textured OBJ with side files, a Draco glTF, then the rest.
ASSET_ORDER = ("marble_shaderball", "suzi_checker", "bunny", "pmndrs_logo", "bunny_colors")
LOOM_STAGES = ("import", "scene", "render_geometry", "render_color", "readback", "encode", "write")


@dataclass(frozen=True)
class Size:
    name: str
    width: int
    frames: int


SIZES = {"smoke": Size("smoke", 128, 8), "512": Size("512", 512, 12)}
QUICK = Size("smoke", 64, 3)


# ------------------------------------------------------------------------------------------------------- Loom side


def loom_config(size: Size, frames: int, cores: int, out: str):
    from loom.corpora.ttv import RenderTTVJob
    from loom.platform.config import resolve

    return resolve(RenderTTVJob, "default", [
        ("render.width", size.width), ("render.height", size.width), ("orbit.frames", frames),
        ("lighting.variants", 1), ("ray.cpus_per_worker", 1), ("ray.workers", cores),
        ("shards.samples_per_shard", 1), ("out", out),
    ])


def pick_assets(n: int) -> list:
    from loom.corpora.assets import bundled_assets

    by_uid = {r.uid: r for r in bundled_assets()}
    order = [u for u in ASSET_ORDER if u in by_uid] + sorted(set(by_uid) - set(ASSET_ORDER))
    if not 1 <= n <= len(order):
        raise SystemExit(f"--assets must be in 1..{len(order)} (bundled assets), got {n}")
    return [by_uid[u] for u in order[:n]]


def run_loom(cfg, records, cores: int) -> dict:
    from loom.platform.jobs import run_job
    from loom.corpora.base import job_spec
    from loom.platform import shards

    spec = job_spec(cfg, records)
    t0 = time.monotonic()
    summary = run_job(spec, progress=False)
    wall = time.monotonic() - t0
    if summary.failed:
        raise SystemExit(f"Loom failed {summary.failed} task(s): {summary.failures}")
    stages = {k: 0.0 for k in LOOM_STAGES}
    shard_seconds = 0.0
    for name in sorted(os.listdir(os.path.join(cfg.out, shards.SHARDS_DIR))):
        if name.endswith(".json"):
            st = shards.read_sidecar(cfg.out, name[:-5] + ".tar").stats
            for k in LOOM_STAGES:
                stages[k] += float(st.get(k, 0.0))
            shard_seconds += float(st["seconds"])
    workers = min(cores, len(spec.tasks))
    core_s = wall * workers * cfg.ray.cpus_per_worker
    # Everything outside the stages: Ray Data scheduling, actor start, sandbox spawn + `import bpy`, asset fetch,
    # and cores idle at the end when tasks do not divide evenly among workers.
    stages["other"] = core_s - sum(stages.values())
    return {"wall_s": wall, "frames": summary.frames, "cores": workers * cfg.ray.cpus_per_worker,
            "fps_per_core": summary.frames / wall / (workers * cfg.ray.cpus_per_worker),
            "core_s": stages, "shard_seconds": shard_seconds}


def loom_samples(out: str) -> dict[str, dict]:
    """key -> decoded sample (rgb, mask, c2w, meta)."""
    from loom.datasets.ttv import iter_samples

    return {s["__key__"]: s for s in iter_samples(out, keys=("rgb", "mask", "c2w", "meta"))}


# --------------------------------------------------------------------------------------------------- baseline side


def same_settings_cycles(render) -> dict:
    """Loom's colour-pass settings, spelled the way a plain script would set them."""
    mb = render.max_bounces
    return {"samples": render.samples, "denoise": render.denoise, "adaptive_threshold": render.adaptive_threshold,
            "max_bounces": mb, "diffuse_bounces": min(mb, 2), "glossy_bounces": min(mb, 4),
            "transmission_bounces": mb, "volume_bounces": 0, "transparent_max_bounces": max(mb, 8),
            "sample_clamp_indirect": 10.0, "caustics_reflective": False, "caustics_refractive": False,
            "use_light_tree": True}


REFERENCE_CYCLES = {"samples": 128, "denoise": True}  # the public scripts' defaults; Blender's for the rest


def baseline_jobs(records, samples: dict, frame_idx: list[int] | None) -> list[dict]:
    """Per asset: the lighting variants Loom rendered, with Loom's normalisation, FOV and cameras."""
    from loom.render import hdri_path

    jobs = []
    for rec in records:
        variants = []
        for key in sorted(k for k in samples if samples[k]["meta"]["uid"] == rec.uid):
            s = samples[key]
            m = s["meta"]
            idx = frame_idx if frame_idx is not None else list(range(len(s["c2w"])))
            variants.append({
                "key": key, "normalization": m["normalization"], "fov_x": m["fov_x"],
                "c2w": [s["c2w"][i].astype(float).tolist() for i in idx], "frame_idx": idx,
                "hdri_path": hdri_path(m["lighting"]["hdri"]), "hdri_strength": m["lighting"]["strength"],
                "hdri_rotation": m["lighting"]["rotation"], "seed": m["seed"] % (2**31 - 1),
            })
        jobs.append({"asset_path": rec.path, "uid": rec.uid, "variants": variants})
    return jobs


def run_baseline(jobs: list[dict], common: dict, workdir: str) -> dict:
    """One fresh process per asset, one after another (the Objaverse drivers' loop)."""
    totals = {"startup": 0.0, "import": 0.0, "scene": 0.0, "render_first": 0.0, "render_rest": 0.0}
    os.makedirs(workdir, exist_ok=True)
    frames, frame_times, t0 = 0, [], time.monotonic()
    for job in jobs:
        job = {**job, **common, "out_dir": os.path.join(workdir, job["uid"])}
        path = os.path.join(workdir, f"{job['uid']}.json")
        with open(path, "w") as f:
            json.dump(job, f)
        a = time.monotonic()
        proc = subprocess.run([sys.executable, BASELINE_SCRIPT, path], capture_output=True, text=True, check=False)
        wall = time.monotonic() - a
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BASELINE_RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"baseline failed on {job['asset_path']} (exit {proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        r = json.loads(lines[-1][len("BASELINE_RESULT "):])
        ft = r["frame_times"]
        totals["startup"] += wall - (r["total_in_process"] - r["bpy_import"])  # python start, import bpy, exit
        totals["import"] += r["import"]
        totals["scene"] += r["scene"] + r.get("warmup", 0.0)
        totals["render_first"] += ft[0]
        totals["render_rest"] += sum(ft[1:])
        frames += r["frames"]
        frame_times.append(ft)
    wall = time.monotonic() - t0
    cores = int(common["threads"])
    core_s = {k: v * cores for k, v in totals.items()}
    core_s["other"] = wall * cores - sum(core_s.values())
    return {"wall_s": wall, "frames": frames, "cores": cores, "fps_per_core": frames / wall / cores,
            "core_s": core_s, "frame_times": frame_times}


# ------------------------------------------------------------------------------------------------------- checks


def png_alpha(path: str) -> np.ndarray:
    import av  # PyAV decodes PNG without another dependency

    with av.open(path) as c:
        frame = next(c.decode(video=0))
        return frame.to_ndarray(format="gray") if frame.format.name.startswith("gray") else \
            frame.to_ndarray(format="rgba")[..., 3]


def mask_iou(samples: dict, jobs: list[dict], workdir: str) -> float:
    """The baseline's alpha > 0.5 against Loom's mask, over every frame: checks both rendered the same frames."""
    inter = union = 0
    for job in jobs:
        for v in job["variants"]:
            for j, i in enumerate(v["frame_idx"]):
                a = png_alpha(os.path.join(workdir, job["uid"], f"{v['key']}_{j:04d}_mask.png")) > 127
                b = samples[v["key"]]["mask"][i]
                inter += int((a & b).sum())
                union += int((a | b).sum())
    return inter / max(union, 1)


def srgb8_over(rgba: np.ndarray, background) -> np.ndarray:
    """Premultiplied linear RGBA -> sRGB uint8 over an sRGB background: the same conversion as Loom's colour pass."""
    def enc(x):
        x = np.clip(x, 0.0, 1.0)
        return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)

    def dec(x):
        x = np.clip(x, 0.0, 1.0)
        return np.where(x <= 0.04045, x / 12.92, np.power((x + 0.055) / 1.055, 2.4))

    alpha = np.clip(rgba[..., 3:4], 0.0, 1.0)
    linear = rgba[..., :3] + (1.0 - alpha) * dec(np.asarray(background, np.float32))
    return np.round(enc(linear) * 255.0).astype(np.uint8)


def read_exr_rgba(path: str) -> np.ndarray:
    import OpenEXR

    with OpenEXR.File(path, separate_channels=True) as f:
        ch = {n: c for part in f.parts for n, c in part.channels.items()}
        return np.stack([np.asarray(ch[c].pixels, np.float32) for c in "RGBA"], axis=-1)


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = float(d[where].mean()) if where is not None else float(d.mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run_quality(cfg, records, samples: dict, loom_res: dict, frames: int, n_ref: int, cores: int,
                workdir: str) -> dict:
    """Target 2: a 128-sample denoised Cycles render (Blender defaults otherwise) of some of Loom's frames."""
    n_ref = max(1, min(n_ref, frames))
    idx = sorted({round(i * frames / n_ref) % frames for i in range(n_ref)})
    jobs = baseline_jobs(records, samples, idx)
    common = {"width": cfg.render.width, "height": cfg.render.height, "threads": cores, "mode": "color",
              "cycles": REFERENCE_CYCLES, "persistent_data": True}
    ref = run_baseline(jobs, common, workdir)
    whole, obj = [], []
    for job in jobs:
        for v in job["variants"]:
            for j, i in enumerate(v["frame_idx"]):
                rgba = read_exr_rgba(os.path.join(workdir, job["uid"], f"{v['key']}_{j:04d}_rgba.exr"))
                r8 = srgb8_over(rgba, cfg.render.background)
                l8 = samples[v["key"]]["rgb"][i]
                region = samples[v["key"]]["mask"][i] | (rgba[..., 3] > 0)
                whole.append(psnr(l8, r8))
                obj.append(psnr(l8, r8, region[..., None].repeat(3, axis=-1)))
    # Every reference frame is steady state (the baseline warms up with a 1-sample render, see its warm_up), as is
    # Loom's colour pass, which runs after the geometry pass has built the BVH and the environment's importance map.
    ref_core_s = float(np.mean([t for ft in ref["frame_times"] for t in ft])) * cores
    loom_core_s = loom_res["core_s"]["render_color"] / loom_res["frames"]  # workers render with 1 thread
    return {"frames_compared": len(whole), "frame_idx": idx, "psnr_object_db": float(np.mean(obj)),
            "psnr_object_min_db": float(np.min(obj)), "psnr_whole_db": float(np.mean(whole)),
            "ref_core_s_per_frame": ref_core_s, "loom_color_core_s_per_frame": loom_core_s,
            "speedup": ref_core_s / loom_core_s, "ref_frame_times": ref["frame_times"]}


# ------------------------------------------------------------------------------------------------------- report


def stage_table(loom: dict, base: dict) -> str:
    lf, bf = loom["frames"], base["frames"]
    rows = [("where the time goes", "Loom core-s/frame", "baseline core-s/frame")]
    lc, bc = loom["core_s"], base["core_s"]
    spec = [
        ("start-up (process, import bpy)", None, "startup"),
        ("asset import", "import", "import"),
        ("scene set-up", "scene", "scene"),
        ("render: geometry pass", "render_geometry", None),
        ("render: colour pass / all passes, 1st frame of each asset", "render_color", "render_first"),
        ("render: all passes, other frames (+file write)", None, "render_rest"),
        ("readback (EXR -> arrays)", "readback", None),
        ("encode (FFV1, npz)", "encode", None),
        ("write (tar)", "write", None),
        ("other (Ray, workers, sandbox start, idle)", "other", "other"),
    ]
    for label, lk, bk in spec:
        rows.append((label, f"{lc[lk] / lf:.3f}" if lk else "-", f"{bc[bk] / bf:.3f}" if bk else "-"))
    rows.append(("total", f"{sum(lc.values()) / lf:.3f}", f"{sum(bc.values()) / bf:.3f}"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"  {a:<{w}}  {b:>18}  {c:>22}" for a, b, c in rows)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("smoke", "512", "both"), default="both")
    ap.add_argument("--frames", type=int, default=None, help="frames per asset (default: smoke 8, 512 12)")
    ap.add_argument("--assets", type=int, default=3, help="bundled assets to render (1..5)")
    ap.add_argument("--cores", type=int, default=2, help="cores given to each side")
    ap.add_argument("--quality-frames", type=int, default=2,
                    help="frames per asset rendered at 128 samples for target 2 (at the largest size run)")
    ap.add_argument("--baseline-persistent-data", action="store_true",
                    help="let the baseline keep Cycles data between its frames (public scripts do not)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 64x64, 3 frames, 2 assets, 1 quality frame")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary output folders")
    args = ap.parse_args(argv)

    if args.quick:
        sizes = [QUICK]
        args.assets, args.quality_frames = min(args.assets, 2), 1
    else:
        sizes = [SIZES[s] for s in (("smoke", "512") if args.size == "both" else (args.size,))]
    cores = args.cores
    records = pick_assets(args.assets)
    tmp = tempfile.mkdtemp(prefix="loom-bench-")
    results: dict = {"cores": cores, "assets": [r.uid for r in records], "sizes": {}, "targets": []}
    try:
        import bpy  # noqa: F401 - fails early with a clear message when bpy is missing

        from loom.platform.ray import init_ray

        # Warm the page cache for both sides (bpy is ~1 GB of shared libraries).
        subprocess.run([sys.executable, "-c", "import bpy"], capture_output=True, check=True)
        t = time.monotonic()
        init_ray(loom_config(sizes[0], 1, cores, os.path.join(tmp, "x")).ray)
        results["ray_init_s"] = time.monotonic() - t
        print(f"cores per side: {cores} (Loom: {cores} workers x 1 thread; baseline: 1 process x {cores} threads)")
        print(f"assets: {', '.join(results['assets'])}; Ray started once in {results['ray_init_s']:.1f} s "
              "(not counted: a cluster is up before a job)\n")
        last = None
        for size in sizes:
            frames = args.frames or size.frames
            cfg = loom_config(size, frames, cores, os.path.join(tmp, f"loom-{size.name}"))
            print(f"== {size.name}: {size.width}x{size.width}, {frames} frames x {len(records)} assets, "
                  f"{cfg.render.samples} samples, denoise={cfg.render.denoise}, "
                  f"adaptive={cfg.render.adaptive_threshold}, max_bounces={cfg.render.max_bounces}", flush=True)
            loom = run_loom(cfg, records, cores)
            print(f"   Loom      {loom['frames']} frames in {loom['wall_s']:.1f} s", flush=True)
            samples = loom_samples(cfg.out)
            jobs = baseline_jobs(records, samples, None)
            bdir = os.path.join(tmp, f"baseline-{size.name}")
            common = {"width": size.width, "height": size.width, "threads": cores, "mode": "passes",
                      "cycles": same_settings_cycles(cfg.render), "persistent_data": args.baseline_persistent_data}
            base = run_baseline(jobs, common, bdir)
            print(f"   baseline  {base['frames']} frames in {base['wall_s']:.1f} s", flush=True)
            iou = mask_iou(samples, jobs, bdir)
            ratio = loom["fps_per_core"] / base["fps_per_core"]
            need = 1.5 if size.name == "smoke" else 1.1
            print(f"\n  frames/s/core: Loom {loom['fps_per_core']:.3f}  baseline {base['fps_per_core']:.3f}  "
                  f"ratio {ratio:.2f}x (target >= {need}x: {verdict(ratio >= need)})")
            print(f"  with Ray start counted in Loom's wall: ratio "
                  f"{loom['frames'] / (loom['wall_s'] + results['ray_init_s']) / loom['cores'] / base['fps_per_core']:.2f}x")
            print(f"  same frames: mask IoU Loom vs baseline alpha {iou:.4f}")
            print(stage_table(loom, base) + "\n", flush=True)
            results["sizes"][size.name] = {"width": size.width, "frames_per_asset": frames, "loom": loom,
                                           "baseline": {k: v for k, v in base.items() if k != "frame_times"},
                                           "baseline_frame_times": base["frame_times"], "ratio": ratio,
                                           "mask_iou": iou}
            results["targets"].append({"name": f"same settings, {size.name}", "value": ratio, "need": need,
                                       "pass": ratio >= need})
            last = (cfg, samples, loom, frames)
            if not args.keep:
                shutil.rmtree(bdir, ignore_errors=True)

        cfg, samples, loom, frames = last
        print(f"== quality: {cfg.render.width}x{cfg.render.height}, Loom colour pass vs 128 samples + OIDN "
              f"(Blender defaults otherwise), {args.quality_frames} frame(s) per asset", flush=True)
        q = run_quality(cfg, records, samples, loom, frames, args.quality_frames, cores,
                        os.path.join(tmp, "reference"))
        ok_speed, ok_psnr = q["speedup"] >= 4.0, q["psnr_object_db"] >= 35.0
        print(f"  colour pass core-s/frame: Loom {q['loom_color_core_s_per_frame']:.3f}  reference "
              f"{q['ref_core_s_per_frame']:.3f}  speed-up {q['speedup']:.2f}x (target >= 4x: {verdict(ok_speed)})")
        print(f"  PSNR over object pixels {q['psnr_object_db']:.2f} dB (min {q['psnr_object_min_db']:.2f}; "
              f"target >= 35: {verdict(ok_psnr)}); whole frame {q['psnr_whole_db']:.2f} dB; "
              f"{q['frames_compared']} frames")
        results["quality"] = q
        results["targets"] += [
            {"name": "same quality: speed-up", "value": q["speedup"], "need": 4.0, "pass": ok_speed},
            {"name": "same quality: PSNR (object pixels)", "value": q["psnr_object_db"], "need": 35.0,
             "pass": ok_psnr},
        ]
        print("\nTargets:")
        for t in results["targets"]:
            print(f"  {verdict(t['pass'])}  {t['name']}: {t['value']:.2f} (need >= {t['need']})")
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
