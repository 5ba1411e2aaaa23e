"""Smoke check of one Loom image: `docker run --rm IMAGE python infra/smoke.py TARGET` (see docs/images.md).

    render      loom's CLI, bpy imports, Cycles renders a 16x16 frame on the CPU
    render-gpu  the same on a GPU: Cycles must list a CUDA or OptiX device (run with --gpus all)
    train       torch (a CUDA build), DeepSpeed, Lightning, MLflow and Ray import; with a GPU visible, a bf16 matmul
                runs on it and DeepSpeed's accelerator is CUDA
    mlflow      the tracking server's CLI, its PostgreSQL driver and boto3 (for the S3 artifact store)

Prints one line per check and exits non-zero at the first failure. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def check(label: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {label}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        sys.exit(1)


def loom_cli() -> None:
    exe = shutil.which("loom")
    check("loom on PATH", exe is not None, str(exe))
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    check("loom --version", out.returncode == 0, (out.stdout or out.stderr).strip())


def cycles_render(device: str) -> None:
    import bpy

    check("import bpy", True, f"Blender {bpy.app.version_string}")
    bpy.ops.wm.read_factory_settings(use_empty=False)  # the default cube, light and camera
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    if device == "GPU":
        prefs = bpy.context.preferences.addons["cycles"].preferences
        found = []
        for kind in ("OPTIX", "CUDA"):
            try:
                prefs.compute_device_type = kind
            except TypeError:  # this Blender build lacks the backend
                continue
            prefs.get_devices()
            found = [d for d in prefs.devices if d.type == kind]
            if found:
                break
        check("Cycles sees a GPU", bool(found), ", ".join(f"{d.type} {d.name}" for d in found) or
              "no CUDA/OptiX device: run with --gpus all and NVIDIA_DRIVER_CAPABILITIES including graphics")
        for d in prefs.devices:
            d.use = d in found
    scene.cycles.device = device
    scene.cycles.samples = 1
    scene.cycles.use_denoising = False
    scene.render.resolution_x = scene.render.resolution_y = 16
    scene.render.resolution_percentage = 100
    with tempfile.TemporaryDirectory() as tmp:
        scene.render.filepath = str(Path(tmp) / "frame.png")
        bpy.ops.render.render(write_still=True)
        image = bpy.data.images.load(scene.render.filepath)
        check(f"Cycles {device} render", tuple(image.size) == (16, 16), f"{image.size[0]}x{image.size[1]} png")


def train(allow_cpu_build: bool) -> None:
    import deepspeed
    import lightning
    import mlflow
    import ray
    import torch

    check("imports", True, f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
          f"lightning {lightning.__version__}, mlflow {mlflow.__version__}, ray {ray.__version__}")
    if torch.version.cuda is None and allow_cpu_build:
        print(f"skip torch is a CUDA build: {torch.__version__} accepted (--allow-cpu-build)")
    else:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"{torch.__version__} (the render image's?)"
        check("torch is a CUDA build", torch.version.cuda is not None, build)
    if torch.cuda.is_available():
        x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        check("bf16 matmul on the GPU", bool(torch.isfinite(x @ x).all()), torch.cuda.get_device_name(0))
        from deepspeed.accelerator import get_accelerator

        check("DeepSpeed accelerator", get_accelerator().device_name() == "cuda", get_accelerator().device_name())
    else:
        print("skip GPU checks: no GPU visible (docker run --gpus all ...)")


def mlflow_server() -> None:
    import boto3
    import psycopg2

    out = subprocess.run(["mlflow", "--version"], capture_output=True, text=True)
    check("mlflow --version", out.returncode == 0, out.stdout.strip())
    check("drivers", True, f"psycopg2 {psycopg2.__version__.split()[0]}, boto3 {boto3.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=["render", "render-gpu", "train", "mlflow"])
    parser.add_argument("--allow-cpu-build", action="store_true",
                        help="train: accept a CPU build of torch (for checking this script off a GPU image)")
    args = parser.parse_args()
    if args.target in ("render", "render-gpu"):
        loom_cli()
        cycles_render("GPU" if args.target == "render-gpu" else "CPU")
    elif args.target == "train":
        loom_cli()
        train(args.allow_cpu_build)
    else:
        mlflow_server()


if __name__ == "__main__":
    main()
