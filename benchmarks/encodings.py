"""Bytes per frame and decode rate of the turntable shard encodings (``encoding.geometry``), measured in one run.

Renders (Blender, Cycles, CPU) a few frames of each bundled asset at 512x512 with the default recipe's settings
(or loads the render cached under ``.cache/loom-encodings/``), encodes every sample with each encoding
(``npz``: the layout before issue 22; ``precise``: the default; ``model-input``: 8-bit) and prints

1. bytes per frame per pass (member) per encoding, and the total against the targets (precise <= 0.45 MB,
   model-input <= 0.15 MB per 512x512 frame);
2. the largest decode error of each array against the renderer's own float32 passes (position and depth: world
   units; normal: radians; mask: wrong pixels);
3. the decode rate (frames/s through ``decode_sample``) with all keys and with the keys ttv conditioning uses
   (rgb, normal, position, mask), as a ratio to npz measured in the same run: smaller must not be slower;
4. the same for whole epochs through ``LoomLoader``, the trainers' reader (tar reads included, all keys).

Usage::

    python benchmarks/encodings.py                  # 5 bundled assets x 4 frames at 512x512 (first run renders)
    python benchmarks/encodings.py --quick          # 2 assets x 2 frames
    python benchmarks/encodings.py --size 128       # other render size (own cache entry)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "loom-encodings")
ENCODINGS = ("npz", "precise", "model-input")
TARGET_MB = {"precise": 0.45, "model-input": 0.15}
TRAIN_KEYS = ("rgb", "normal", "position", "mask", "meta")  # what `loom train ttv`'s conditioning reads


def render_params(uid: str, size: int, frames: int, workdir: str) -> dict:
    """The task parameters the default recipe gives asset ``uid`` (variant 0), at ``size`` x ``size``."""
    from loom.corpora.assets.sources import bundled_assets
    from loom.corpora.ttv import RenderTTVJob
    from loom.platform import config as c
    from loom.render import hdri_path

    [rec] = [r for r in bundled_assets() if r.uid == uid]
    cfg = c.resolve(RenderTTVJob, "default", c.parse_set([f"render.width={size}", f"render.height={size}",
                                                           f"orbit.frames={frames}", "ray.cpus_per_worker=2"]))
    p = c.to_dict(cfg.task(rec.to_dict(), 0, "benchmark"))
    return {**p, "asset_path": rec.path, "workdir": workdir, "hdri_path": hdri_path(p["lighting"]["hdri"])}


def cached_render(uid: str, size: int, frames: int) -> dict:
    """The renderer's arrays (float32 passes, as ``render_ttv`` returns them) for one asset; rendered in a child
    process (bpy never loads here) the first time, then read from the cache."""
    path = os.path.join(CACHE, f"{uid}-{size}-{frames}.npz")
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="loom-enc-") as tmp:
            params = render_params(uid, size, frames, tmp)
            code = ("import json, sys, numpy as np; from loom.render.ttv import render_ttv; "
                    "p = json.load(open(sys.argv[1])); out = render_ttv(p); info = out.pop('info'); "
                    "np.savez(sys.argv[2], **out, normalization=np.asarray(info['normalization']))")
            pj = os.path.join(tmp, "params.json")
            with open(pj, "w") as f:
                json.dump(params, f)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code, pj, path + ".tmp.npz"], check=True)
            os.replace(path + ".tmp.npz", path)
            print(f"rendered {uid} {frames}x{size}x{size} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.arctan2(np.linalg.norm(np.cross(a, b), axis=-1), (a * b).sum(-1))


def decode_rate(files: dict, frames: int, keys, repeats: int) -> float:
    """Frames per second through decode_sample: the best of ``repeats`` (the machine may be shared)."""
    from loom.datasets.ttv import decode_sample

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        decode_sample(files, keys)
        best = min(best, time.perf_counter() - t0)
    return frames / best


def measure(uids: list[str], size: int, frames: int, repeats: int) -> dict:
    from loom.datasets.ttv import decode_sample, encode_sample

    rows = {}
    for uid in uids:
        a = cached_render(uid, size, frames)
        a.pop("normalization", None)
        m = a["mask"]
        files = {g: encode_sample(a, {"uid": uid}, "ffv1", g) for g in ENCODINGS}
        row = {}
        for g in ENCODINGS:
            d = decode_sample(files[g])
            row[g] = {
                "bytes": {ext: len(b) / frames for ext, b in files[g].items()},
                "errors": {"position": float(np.abs(d["position"] - a["position"])[m].max()),
                           "depth": float(np.abs(d["depth"] - a["depth"])[m].max()),
                           "normal_rad": float(angle(d["normal"][m], a["normal"][m]).max()),
                           "mask_pixels": int((d["mask"] != m).sum())},
            }
        # decode rates interleaved round by round, so a busy moment of the machine hits every encoding alike
        for keys, name in ((None, "all"), (TRAIN_KEYS, "train")):
            rates = {g: [] for g in ENCODINGS}
            for _ in range(repeats):
                for g in ENCODINGS:
                    rates[g].append(decode_rate(files[g], frames, keys, 1))
            for g in ENCODINGS:
                row[g][f"fps_{name}"] = max(rates[g])
        row["_files"] = files
        rows[uid] = row
    return rows


def loader_rates(rows: dict, frames: int, repeats: int) -> dict[str, float]:
    """Frames per second of whole epochs through ``LoomLoader`` (the trainers' reader: one tar per encoding holding
    every asset's sample, all keys, batch size 1, no workers, no prefetch; the best of ``repeats`` epochs, the
    encodings taking turns epoch by epoch)."""
    from loom.datasets.loader import LoomLoader
    from loom.platform.shards import write_tar

    with tempfile.TemporaryDirectory(prefix="loom-enc-loader-") as tmp:
        loaders = {}
        for g in ENCODINGS:
            url = os.path.join(tmp, f"{g}.tar")
            write_tar(url, [(uid, r["_files"][g]) for uid, r in rows.items()])
            loaders[g] = LoomLoader(url, 1, kind="ttv", shuffle=False, cache_index=False)
        best = {g: float("inf") for g in ENCODINGS}
        for _ in range(repeats):
            for g, loader in loaders.items():
                t0 = time.perf_counter()
                n = sum(1 for _ in loader)
                best[g] = min(best[g], time.perf_counter() - t0)
                assert n == len(rows), (g, n)
        return {g: len(rows) * frames / best[g] for g in ENCODINGS}


def report(rows: dict, size: int, loader: dict | None = None) -> list[str]:
    lines = []
    members = sorted({ext for r in rows.values() for g in ENCODINGS for ext in r[g]["bytes"]})
    lines.append(f"bytes per {size}x{size} frame (kB), per member, mean over assets")
    lines.append(f"{'member':<20}" + "".join(f"{g:>14}" for g in ENCODINGS))
    for ext in members:
        vals = [np.mean([r[g]["bytes"].get(ext, 0) for r in rows.values()]) / 1e3 for g in ENCODINGS]
        lines.append(f"{ext:<20}" + "".join(f"{v:>14.1f}" if v else f"{'-':>14}" for v in vals))
    lines.append("")
    lines.append(f"{'asset':<20}" + "".join(f"{g + ' MB':>14}" for g in ENCODINGS) + "   targets: " +
                 ", ".join(f"{g} <= {t}" for g, t in TARGET_MB.items()))
    worst = {g: 0.0 for g in ENCODINGS}
    for uid, r in rows.items():
        tot = {g: sum(r[g]["bytes"].values()) / 1e6 for g in ENCODINGS}
        worst = {g: max(worst[g], tot[g]) for g in ENCODINGS}
        lines.append(f"{uid:<20}" + "".join(f"{tot[g]:>14.3f}" for g in ENCODINGS))
    lines.append(f"{'max':<20}" + "".join(f"{worst[g]:>14.3f}" for g in ENCODINGS) + "   " + ", ".join(
        f"{g} {'OK' if worst[g] <= t else 'OVER'}" for g, t in TARGET_MB.items()))
    lines.append("")
    lines.append("max decode error against the renderer's float32 passes (all assets)")
    lines.append(f"{'encoding':<14}{'position':>12}{'depth':>12}{'normal rad':>12}{'mask px':>9}")
    for g in ENCODINGS:
        e = {k: max(r[g]["errors"][k] for r in rows.values()) for k in rows[next(iter(rows))][g]["errors"]}
        lines.append(f"{g:<14}{e['position']:>12.2e}{e['depth']:>12.2e}{e['normal_rad']:>12.2e}{e['mask_pixels']:>9d}")
    lines.append("")
    lines.append("decode rate through decode_sample, ratio to npz in this run (>= 1: not slower); npz frames/s")
    lines.append(f"{'asset':<20}{'keys':<7}" + "".join(f"{g:>13}" for g in ENCODINGS if g != "npz") + "   npz f/s")
    for name in ("all", "train"):
        ratios = {g: [] for g in ENCODINGS}
        for uid, r in rows.items():
            base = r["npz"][f"fps_{name}"]
            for g in ENCODINGS:
                ratios[g].append(r[g][f"fps_{name}"] / base)
            lines.append(f"{uid:<20}{name:<7}" + "".join(f"{r[g][f'fps_{name}'] / base:>12.2f}x" for g in ENCODINGS
                                                         if g != "npz") + f"{base:>10.1f} f/s")
        gm = {g: float(np.exp(np.mean(np.log(ratios[g])))) for g in ENCODINGS}
        lines.append(f"{'geomean':<20}{name:<7}" + "".join(f"{gm[g]:>12.2f}x" for g in ENCODINGS if g != "npz"))
    if loader:
        lines.append("")
        lines.append("whole epochs through LoomLoader (all assets in one tar, all keys: what `loom train ttv` reads)")
        lines.append(f"{'':<27}" + "".join(f"{g:>13}" for g in ENCODINGS if g != "npz") + "   npz f/s")
        lines.append(f"{'ratio to npz':<27}" + "".join(f"{loader[g] / loader['npz']:>12.2f}x" for g in ENCODINGS
                                                        if g != "npz") + f"{loader['npz']:>10.1f} f/s")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 assets x 2 frames")
    p.add_argument("--size", type=int, default=512, help="render width and height")
    p.add_argument("--frames", type=int, default=4, help="frames per asset")
    p.add_argument("--assets", default="bunny,bunny_colors,marble_shaderball,pmndrs_logo,suzi_checker")
    p.add_argument("--repeats", type=int, default=7, help="decode timings per encoding (the best counts)")
    p.add_argument("--json", help="also write the measurements here")
    args = p.parse_args()
    uids = args.assets.split(",")
    frames = args.frames
    if args.quick:
        uids, frames = uids[:2], 2
    rows = measure(uids, args.size, frames, args.repeats)
    loader = loader_rates(rows, frames, args.repeats)
    print("\n".join(report(rows, args.size, loader)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"assets": {uid: {k: v for k, v in r.items() if k != "_files"} for uid, r in rows.items()},
                       "loader_fps": loader}, f, indent=1)


if __name__ == "__main__":
    main()
