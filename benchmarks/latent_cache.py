"""Latent cache throughput: clips/s of the encoding ``loom cache latents`` does per turntable clip, against a plain
diffusers ``AutoencoderKLWan.encode`` loop over the same clips with the same VAE, in one run.

    .venv/bin/python benchmarks/latent_cache.py --shape smoke        # seconds on a CPU: the code paths run
    python benchmarks/latent_cache.py --shape wan                    # on a GPU: the Wan2.1 VAE, 61 x 480 x 832
    python benchmarks/latent_cache.py --shape wan --frames 61 --size 512 512 --clips 4 --json out/cache.json

Shapes (random weights; the work does not depend on their values):
- ``smoke``: the tests' tiny VAE (`loom.models.video_vae.build_tiny_vae`) and a 2-layer CLIP, 5 frames of 32 x 32.
- ``wan``: diffusers' ``AutoencoderKLWan()`` defaults, which are the Wan2.1 VAE (base 96, z 16, 8x spatial, 4x
  temporal; 127 M parameters), and open-clip ViT-H/14 as Wan uses it (CLIP vision, 32 layers of width 1280, 224 px,
  257 tokens); by default 61 frames of 480 x 832, the clips the wan1.3b training shape is made of.

What is compared, per clip of rgb, normal and position passes (+ the object mask), decoded frames in host memory:
- ``loom``: the per-sample work of ``loom.corpora.latents.encode_entry`` after decoding, with its defaults: each
  pass -> [-1, 1] (`loom.corpora.latents.video_input`), the passes stacked into batches of ``--batch`` (the job's
  ``batch``, 3) through `VideoVAE.encode` (posterior mode, Wan normalisation), the mask pooled onto the latent grid
  (`VideoVAE.pool_mask`), CLIP on frame 0 (`ImageEncoder.encode`), everything back to host memory as float16.
  Text is left out: the umT5 runs once per distinct prompt per shard (the default template: once per shard).
- ``plain``: what a script written against diffusers does: per pass, the same [-1, 1] mapping, then
  ``vae.encode(x[None]).latent_dist.mode()`` (same module, same dtype and device) and the latent back to the host.
The two alternate clip by clip after one warm-up clip each; clips/s = clips / the sum of their clip times. On a GPU
both compute in bfloat16 (the ``gpu`` recipe); on a CPU in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from loom.corpora.latents import video_input  # noqa: E402
from loom.models.image_encoder import ImageEncoder  # noqa: E402
from loom.models.video_vae import VideoVAE, tiny_vae_config  # noqa: E402

PASSES = ("rgb", "normal", "position")
SHAPES = {
    "smoke": {"frames": 5, "size": (32, 32), "clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, image_size=28, patch_size=14)},
    "wan": {"frames": 61, "size": (480, 832), "clip": dict(hidden_size=1280, intermediate_size=5120,
                                                           num_hidden_layers=32, num_attention_heads=16,
                                                           image_size=224, patch_size=14)},
}


def build(shape_name: str, device: torch.device, dtype: torch.dtype) -> tuple[VideoVAE, ImageEncoder]:
    """Random networks, wrapped and placed as `load_video_vae` and `load_image_encoder` place the real ones."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    with torch.device(device):  # draw the random weights where they live
        raw = AutoencoderKLWan(**tiny_vae_config()) if shape_name == "smoke" else AutoencoderKLWan()
        clip = CLIPVisionModel(CLIPVisionConfig(**SHAPES[shape_name]["clip"]))
    return VideoVAE(raw.to(dtype)).to(device), ImageEncoder(clip.to(dtype)).to(device)


def clip_sample(frames: int, h: int, w: int, seed: int) -> dict[str, np.ndarray]:
    """One decoded turntable sample as `loom.datasets.ttv.decode_sample` gives it: rgb uint8, normal and position
    float16 (T, H, W, 3), mask bool (T, H, W)."""
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randint(0, 256, (frames, h, w, 3), generator=g, dtype=torch.uint8).numpy(),
            "normal": (torch.rand(frames, h, w, 3, generator=g) * 2 - 1).half().numpy(),
            "position": (torch.rand(frames, h, w, 3, generator=g) - 0.5).half().numpy(),
            "mask": (torch.rand(frames, h, w, generator=g) > 0.5).numpy()}


def loom_clip(s: dict, vae: VideoVAE, image_enc: ImageEncoder, batch: int) -> dict[str, np.ndarray]:
    """encode_entry's per-sample encoding (see the module docstring)."""
    videos = [video_input(p, s[p], 1.0) for p in PASSES]  # each (3, T, H, W) float32 in [-1, 1]
    latents = []
    for i in range(0, len(videos), batch):
        latents += list(vae.encode(torch.stack(videos[i: i + batch]), True))
    mask = vae.pool_mask(torch.from_numpy(s["mask"]))  # (T', H', W')
    image = image_enc.encode(s["rgb"][:1])[0]  # (257, 1280) for ViT-H/14
    out = {f"{p}_latent": z.cpu().numpy().astype(np.float16) for p, z in zip(PASSES, latents, strict=True)}
    out["mask_latent"] = mask.numpy().astype(np.float16)
    out["image_embed"] = image.numpy().astype(np.float16)
    return out


@torch.no_grad()
def plain_clip(s: dict, vae, device, dtype) -> dict[str, np.ndarray]:
    """A plain diffusers loop: one pass at a time through ``AutoencoderKLWan.encode``."""
    out = {}
    for p in PASSES:
        a = torch.from_numpy(s[p]).float()
        x = a / 127.5 - 1 if p == "rgb" else a.clamp(-1, 1)  # (T, H, W, 3)
        x = x.permute(3, 0, 1, 2)[None].to(device, dtype)  # (1, 3, T, H, W)
        out[f"{p}_latent"] = vae.encode(x).latent_dist.mode()[0].float().cpu().numpy().astype(np.float16)
    return out


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shape = SHAPES[args.shape]
    frames = args.frames or shape["frames"]
    h, w = args.size or shape["size"]
    vae, image_enc = build(args.shape, device, dtype)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    t, hh, ww = vae.latent_shape(frames, h, w)[1:]
    print(f"device {device}, shape {args.shape}: clips of {frames} frames {h}x{w} -> latents 16 x {t} x {hh} x {ww}, "
          f"{len(PASSES)} passes, batch {args.batch}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}",
          flush=True)
    samples = [clip_sample(frames, h, w, i) for i in range(2)]  # two inputs, alternated
    sides = {"loom": lambda s: loom_clip(s, vae, image_enc, args.batch),
             "plain": lambda s: plain_clip(s, vae.vae, device, dtype)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    peaks: dict[str, float] = {}
    problems = []
    try:
        sides["loom"](samples[0])
    except RuntimeError as e:
        if "same device" not in str(e):
            raise
        # ImageEncoder.to(device) moves its mean/std buffers; its torch preprocessing makes the pixels on the CPU
        problems.append(f"ImageEncoder.encode failed on {device} as load_image_encoder places it: "
                        f"{str(e).splitlines()[0]}; measured with its mean/std buffers kept on the CPU")
        print("BUG:", problems[-1], flush=True)
        image_enc.mean, image_enc.std = image_enc.mean.cpu(), image_enc.std.cpu()
    for k, fn in sides.items():  # warm-up (kernel selection, allocator)
        fn(samples[0])
    for i in range(args.clips):
        for k, fn in sides.items():
            sync()
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = fn(samples[(i + 1) % 2])
            sync()
            times[k].append(time.perf_counter() - t0)
            if on_gpu:
                peaks[k] = max(peaks.get(k, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    check = {k: v.shape for k, v in out.items()}
    res = {"shape": args.shape, "frames": frames, "size": [h, w], "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if on_gpu else None, "torch": torch.__version__,
           "clips": args.clips, "batch": args.batch, "latent_shapes": {k: list(v) for k, v in check.items()},
           "problems": problems}
    for k in sides:
        res[k] = {"clips_per_s": len(times[k]) / sum(times[k]), "clip_s": sorted(times[k])[len(times[k]) // 2]}
        if on_gpu:
            res[k]["peak_gib"] = peaks[k]
    res["ratio"] = res["loom"]["clips_per_s"] / res["plain"]["clips_per_s"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smoke")
    p.add_argument("--frames", type=int, default=0, help="frames per clip, 1 + 4k (0 = the shape's)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="frame height and width (multiples of 8)")
    p.add_argument("--clips", type=int, default=3, help="timed clips per side, after one warm-up clip each")
    p.add_argument("--batch", type=int, default=3, help="videos per VAE call on Loom's side (the job's batch)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.shape == "wan" and not torch.cuda.is_available():
        print("the wan shape (a 127 M-parameter VAE over 61 frames of 480x832, 3 passes a clip) needs a GPU; use "
              "--shape smoke here")
        return 2
    res = run(args)
    for k in ("loom", "plain"):
        r = res[k]
        extra = f", peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""
        print(f"{k:6s} {r['clips_per_s']:.3f} clips/s ({r['clip_s']:.3f} s a clip){extra}")
    print(f"ratio loom / plain: {res['ratio']:.2f}x clips/s (loom also pools the mask and runs CLIP on frame 0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
