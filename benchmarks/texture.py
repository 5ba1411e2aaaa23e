"""Seconds per asset per stage of texturing a mesh from its turntable (TAPESTRY 3.2), and the share of each.

    .venv/bin/python benchmarks/texture.py                       # suzi_checker, 61 frames at 256 px, 1024^2 texels
    .venv/bin/python benchmarks/texture.py --frames 12 --size 128 --resolution 512   # quick
    .venv/bin/python benchmarks/texture.py --asset marble_shaderball --json out/bench-texture.json

Stages: ``render`` (the real `loom render ttv` job on the asset: Ray, a sandboxed Blender worker, geometry and
colour passes, shards; Ray started before the clock), then `loom texture --frames`'s own stages from its report
(mesh: read and unwrap; read_frames; rasterise: the UV atlas; back_project: every frame into the atlas; fill:
seams and unseen texels; write: images, GLB, OBJ). Then the generative path, `loom texture --run` on the same
shards with a tiny run (`loom train ttv --recipe tiny`, one step on these shards: random-quality weights, real
shapes; its training is not counted): load_run, generate (stage 1 and each inpainting stage's), back_project,
choose_rotation (the candidate tilts ray-cast), render (the turned, partially textured mesh along the orbit by
the render job), fuse, fill, write, for ``--stages`` stages (default 2). ``--no-generative`` skips it. The
baseline the shares are measured against is each path's whole time for the asset in the same run; there is no
speed target to check.
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
    ap.add_argument("--stages", type=int, default=2, help="stages of the generative path (1 = the orbit alone)")
    ap.add_argument("--no-generative", action="store_true", help="only the given-frames path")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    from loom.inference.texture import render_conditions, texture_from_frames, texture_from_run
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
        paths = {"frames": (seconds, done.coverage)}
        if not args.no_generative:
            run = tiny_run(frames, os.path.join(tmp, "run"))
            gen = texture_from_run(mesh, run, os.path.join(tmp, "generated"), frames=frames,
                                   resolution=args.resolution, stages=args.stages)
            paths["generative"] = (gen.seconds, gen.coverage)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.asset}: {args.frames} frames at {args.size} px, {args.resolution}^2 texels")
    for name, (secs, coverage) in paths.items():
        total = sum(secs.values())
        print(f"\n{name} path (`loom texture --{'frames' if name == 'frames' else 'run'}`), coverage {coverage:.1%}")
        print(f"{'stage':16s} {'seconds':>8s} {'share':>7s}")
        for k, v in secs.items():
            print(f"{k:16s} {v:8.2f} {v / total:7.1%}")
        print(f"{'asset':16s} {total:8.2f} {1:7.1%}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"asset": args.asset, "frames": args.frames, "size": args.size, "resolution": args.resolution,
                       "stages": args.stages, **{name: {"coverage": cov, "seconds": secs, "total": sum(secs.values())}
                                                 for name, (secs, cov) in paths.items()}}, f, indent=2)
    return 0


def tiny_run(frames: str, out: str) -> str:
    """A `loom train ttv --recipe tiny` run of one step on the shards (MLflow off): real shapes, untrained weights."""
    import subprocess

    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    cmd = [loom, "train", "ttv", "--recipe", "tiny", "--data", frames, "--out", out, "--set", "tracking.enabled=false",
           "--set", "trainer.max_steps=1", "--set", "trainer.progress=false"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return out


if __name__ == "__main__":
    sys.exit(main())
