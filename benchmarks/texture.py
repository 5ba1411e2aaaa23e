"""Seconds per asset per stage of texturing a mesh from its turntable (TAPESTRY 3.2), and the share of each.

    .venv/bin/python benchmarks/texture.py                       # suzi_checker, 61 frames at 256 px, 1024^2 texels
    .venv/bin/python benchmarks/texture.py --frames 12 --size 128 --resolution 512   # quick
    .venv/bin/python benchmarks/texture.py --asset marble_shaderball --json out/bench-texture.json

Stages: ``render`` (the real `loom render ttv` job on the asset: Ray, a sandboxed Blender worker, geometry and
colour passes, shards; Ray started before the clock), then `loom texture --frames`'s own stages from its report
(mesh: read and unwrap; read_frames; rasterise: the UV atlas; back_project: every frame into the atlas; fill:
seams and unseen texels; write: images, GLB, OBJ). The generative stages (generate the turntable with a trained
run, 3D-aware inpainting) are not built yet: when they are, they are added here beside these. The baseline the
shares are measured against is the whole asset's time in the same run; there is no speed target to check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ASSETS = os.path.join(os.path.dirname(__file__), "..", "src", "loom", "data", "assets")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--asset", default="suzi_checker", help="a bundled asset (its .obj or .glb)")
    ap.add_argument("--frames", type=int, default=61, help="turntable frames (the paper: 61)")
    ap.add_argument("--size", type=int, default=256, help="frame width and height")
    ap.add_argument("--resolution", type=int, default=1024, help="texture size in texels")
    ap.add_argument("--samples", type=int, default=16, help="Cycles samples of the colour pass")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    from loom.inference.texture import render_conditions, texture_from_frames
    from loom.platform.ray import RaySettings, init_ray

    files = [f for f in os.listdir(ASSETS) if f.startswith(args.asset + ".")]
    if not files:
        ap.error(f"--asset {args.asset}: no such bundled asset in {ASSETS}")
    tmp = tempfile.mkdtemp(prefix="loom-bench-texture-")
    try:
        src = os.path.join(tmp, "asset")
        os.makedirs(src)
        for f in files:
            shutil.copy(os.path.join(ASSETS, f), src)
        mesh = os.path.join(src, next(f for f in files if f.endswith((".obj", ".glb", ".gltf"))))
        init_ray(RaySettings(), announce=False)
        t0 = time.monotonic()
        # the render job `loom texture --run` renders conditions with, here with the albedo pass
        frames = render_conditions(mesh, os.path.join(tmp, "ttv"), args.frames, args.size,
                                   extra=[("render.samples", args.samples), ("ray.workers", 1),
                                          ("passes.albedo", True)])
        seconds = {"render": time.monotonic() - t0}
        done = texture_from_frames(mesh, frames, os.path.join(tmp, "textured"), frames_pass="albedo",
                                   resolution=args.resolution)
        seconds.update(done.seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(seconds.values())
    print(f"{args.asset}: {args.frames} frames at {args.size} px, {args.resolution}^2 texels, coverage "
          f"{done.coverage:.1%}")
    print(f"{'stage':14s} {'seconds':>8s} {'share':>7s}")
    for k, v in seconds.items():
        print(f"{k:14s} {v:8.2f} {v / total:7.1%}")
    print(f"{'asset':14s} {total:8.2f} {1:7.1%}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"asset": args.asset, "frames": args.frames, "size": args.size, "resolution": args.resolution,
                       "coverage": done.coverage, "seconds": seconds, "total": total}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
