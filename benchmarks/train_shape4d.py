"""4D shape DiT training step (ShapeGen4D 3.2): Loom's step (frozen base + spatiotemporal layers, shared noise, one
sigma per sequence) against the same DiT without spatiotemporal layers trained per frame, in one run. Prints step
time, peak memory, FLOPs and (on a GPU) model FLOPs utilisation, and the ratios 4D / base.

    .venv/bin/python benchmarks/train_shape4d.py                   # CPU-sized shape (about a minute on 2 cores)
    python benchmarks/train_shape4d.py --shape paper               # on a GPU: the paper's shape (issue 8)
    python benchmarks/train_shape4d.py --shape paper --attention flash --batch 4

Shapes:
- ``smoke``: width 32, 1 dual + 1 single block, 4 frames x 16 latents: seconds on a CPU; checks that every code
  path runs (``benchmarks/gpu_check.sh --cpu-smoke``), measures nothing.
- ``cpu``: width 256 (4 heads x 64), 2 dual + 4 single blocks, 8 frames x 128 latents of 16 channels, 65 image
  tokens of width 128 per frame: small enough for 2 CPU cores, same code paths.
- ``paper``: 16 frames x 1,024 latents of 64 channels, the Step1X-3D width 1280 (20 heads x 64) with 12 dual +
  24 single blocks (36 spatiotemporal layers), 1,370 DINOv2-L tokens (width 1,024) per frame: the 4D model has
  2.19 B parameters, 0.89 B of them trainable.

What each step does:
- ``4d`` (Loom's, `loom.training.shape4d.module.Shape4DModule.training_step` without the data): the base frozen
  (`freeze_base`), `shape4d_flow.training_inputs` (noise shared by the frames, one sigma per sequence, per-sample
  generators), forward and backward of the DiT over (B, T, Q, C), AdamW on the spatiotemporal layers.
- ``base``: the same DiT built with ``spatiotemporal=False`` trained on the same B x T shapes as independent
  frames (a Step1X-3D-style 3D step: every parameter trained, per-frame noise and sigma).
Gradient checkpointing on both (every block and layer recomputed); bf16 autocast on GPUs, fp32 on CPUs. On a GPU
the two run one after the other (each its own peak memory); on a CPU their timed steps alternate, so other load on
a shared machine falls on both alike.
``--encoders`` also times the frozen encoders of a step (the shape VAE's posterior of T x S surface points and
DINOv2 over T frames), random weights of the real sizes.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one step (matmuls and attention); MFU is
FLOPs / step time / peak (``--peak-tflops``, 989 for an H100 SXM in dense bf16). Issue 8's target: at most 1.5 s
per sequence on an H100 at the paper's shape, with memory to spare for 4 sequences per GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from loom.models.flow import FlowMatching, sample_generator  # noqa: E402
from loom.models.shape4d_dit import Shape4DDiT, Shape4DDiTConfig  # noqa: E402
from loom.models.shape4d_flow import training_inputs  # noqa: E402

SHAPES = {
    "smoke": {"model": dict(latent_channels=8, image_dim=32, num_attention_heads=2, attention_head_dim=16,
                            num_dual_blocks=1, num_single_blocks=1, timestep_channels=32),
              "frames": 4, "latents": 16, "tokens": 5,
              "vae": dict(latent_channels=8, width=32, heads=2, encoder_layers=1, decoder_layers=1),
              "surface": 256, "dino": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64, image_size=28)},
    "cpu": {"model": dict(latent_channels=16, image_dim=128, num_attention_heads=4, attention_head_dim=64,
                          num_dual_blocks=2, num_single_blocks=4),
            "frames": 8, "latents": 128, "tokens": 65,
            "vae": dict(latent_channels=16, width=128, heads=2, encoder_layers=1, decoder_layers=1),
            "surface": 4096, "dino": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=512, image_size=112)},
    "paper": {"model": {}, "frames": 16, "latents": 1024, "tokens": 1370, "vae": {}, "surface": 32768,
              "dino": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           image_size=518)},
}


def build(shape: dict, device: torch.device, variant: str, attention: str):
    torch.manual_seed(0)
    cfg = Shape4DDiTConfig(**shape["model"], num_latents=shape["latents"], spatiotemporal=variant == "4d",
                           attention_backend=attention)
    with torch.device(device):  # random weights drawn where they will live (2.19 B of them at the paper's shape)
        dit = Shape4DDiT(cfg)
    if variant == "4d":
        dit.freeze_base()
    dit.enable_gradient_checkpointing()
    dit.to(device)
    params = [p for p in dit.parameters() if p.requires_grad]
    return dit, torch.optim.AdamW(params, lr=5e-5), sum(p.numel() for p in params)


def inputs(shape: dict, cfg: Shape4DDiTConfig, device: torch.device, b: int):
    g = torch.Generator().manual_seed(0)
    t, q, n = shape["frames"], shape["latents"], shape["tokens"]
    return {"x0": torch.randn(b, t, q, cfg.latent_channels, generator=g).to(device),
            "image": torch.randn(b, t, n, cfg.image_dim, generator=g).to(device)}


def step_4d(dit, opt, x, flow, step, autocast):
    g = [sample_generator(0, step, f"seq{i}") for i in range(x["x0"].shape[0])]
    x_t, t, target, _ = training_inputs(x["x0"], g, flow, shared=True)
    with autocast():
        pred = dit(x_t, t, x["image"])
    loss = flow.loss(pred, target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def step_base(dit, opt, x, flow, step, autocast):
    # every frame an independent shape: (B*T, Q, C) with its own noise and sigma
    x0 = x["x0"].flatten(0, 1)
    image = x["image"].flatten(0, 1)
    g = [sample_generator(0, step, f"shape{i}") for i in range(x0.shape[0])]
    x_t, t, target, _ = flow.draw(x0, g)
    with autocast():
        pred = dit(x_t, t, image)
    loss = flow.loss(pred, target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


class Variant:
    """One side of the comparison: its model, optimizer and inputs, warmed up, with its FLOPs per step counted."""

    def __init__(self, name: str, shape: dict, device, args):
        self.name, self.args, self.on_gpu = name, args, device.type == "cuda"
        self.dit, self.opt, self.trainable = build(shape, device, name, args.attention)
        self.x = inputs(shape, self.dit.config, device, args.batch)
        self.flow = FlowMatching(shift=1.0)
        self.fn = step_4d if name == "4d" else step_base
        self.times: list[float] = []
        for i in range(args.warmup):
            self.step(i)
        self.sync()
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats()
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            self.step(args.warmup)
        self.flops = fc.get_total_flops()
        self.sync()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.on_gpu else torch.autocast("cpu", enabled=False)

    def sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()

    def step(self, i: int):
        return self.fn(self.dit, self.opt, self.x, self.flow, i, self.autocast)

    def timed(self, i: int) -> None:
        t0 = time.perf_counter()
        self.step(100 + i)
        self.sync()
        self.times.append(time.perf_counter() - t0)

    def result(self) -> dict:
        times = sorted(self.times)
        med = times[len(times) // 2]
        res = {"name": self.name, "step_s": med, "best_s": times[0], "per_sequence_s": med / self.args.batch,
               "flops": self.flops, "tflops_per_s": self.flops / med / 1e12,
               "params": sum(p.numel() for p in self.dit.parameters()), "trainable": self.trainable}
        if self.on_gpu:
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            res["mfu"] = self.flops / med / (self.args.peak_tflops * 1e12)
        return res

    def close(self) -> None:
        del self.dit, self.opt, self.x
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()


def measure(shape: dict, device, args) -> list[dict]:
    """On a GPU one variant after the other (each its own peak memory); on a CPU both built first and their timed
    steps interleaved, so that other load on a shared machine falls on both alike."""
    names = ("base", "4d")
    if device.type == "cuda":
        out = []
        for name in names:
            v = Variant(name, shape, device, args)
            for i in range(args.steps):
                v.timed(i)
            out.append(v.result())
            v.close()
        return out
    vs = [Variant(name, shape, device, args) for name in names]
    for i in range(args.steps):
        for v in vs:
            v.timed(i)
    return [v.result() for v in vs]


@torch.no_grad()
def measure_encoders(shape: dict, device, args) -> dict:
    """The frozen encoders of one step: ShapeVAE posterior means of B*T frames, DINOv2 over B*T frames."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from loom.models.shape_vae import ShapeVAE, ShapeVAEConfig

    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        vae = ShapeVAE(ShapeVAEConfig(**shape["vae"])).to(device, dtype).eval()
        # Step1X-3D's encoder: DINOv2 with 4 registers (1,374 tokens through the blocks at 518 px, 1,370 out)
        dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=14, num_register_tokens=4,
                                                                  **shape["dino"])).to(device, dtype).eval()
    n = args.batch * shape["frames"]
    surface = torch.randn(n, shape["surface"], 6, device=device)
    queries = torch.randn(n, shape["latents"], 3, device=device)
    size = shape["dino"]["image_size"]
    pixels = torch.randn(n, 3, size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    # A VAE with Step1X-3D's sharp-edge branch also encodes a sharp-edge point set: here one as large as the surface's.
    sharp = getattr(vae.config, "sharp_edges", False)

    def run():
        for i in range(0, n, 16):  # model.vae_chunk
            kw = {"sharp_surface": surface[i: i + 16]} if sharp else {}
            vae.encode(surface[i: i + 16], queries[i: i + 16], sample=False, **kw)
        dino(pixel_values=pixels)

    run()
    sync()
    times = []
    for _ in range(max(1, args.steps // 2)):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return {"encoders_s": sorted(times)[len(times) // 2]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attention", default="auto", choices=["auto", "flash", "efficient", "math", "cudnn"],
                   help="SDPA kernels (see loom.models.shape4d_dit: auto never picks cuDNN)")
    p.add_argument("--encoders", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the frozen shape VAE and DINOv2 of a step")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 SXM bf16)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "paper" and device.type != "cuda":
        print("The paper shape (2.19 B parameters, 16 x (1,024 + 1,370) tokens per sequence) needs a GPU, and none "
              "is visible here. Run it where CUDA is available, or use --shape cpu on this machine.")
        return 2
    shape = SHAPES[args.shape]
    w = Shape4DDiTConfig(**shape["model"]).width
    print(f"device {device}, shape {args.shape}: {args.batch} x {shape['frames']} frames x {shape['latents']} "
          f"latents + {shape['tokens']} image tokens, width {w}, attention {args.attention}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}")
    results = measure(shape, device, args)
    for r in results:
        extra = f", peak {r['peak_gib']:.2f} GiB, MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        print(f"{r['name']:5s} step {r['step_s']:.3f} s (best {r['best_s']:.3f}; {r['per_sequence_s']:.3f} s per "
              f"sequence), {r['flops'] / 1e12:.3f} TFLOP/step, {r['tflops_per_s']:.3f} TFLOP/s, "
              f"{r['params'] / 1e6:.1f} M params ({r['trainable'] / 1e6:.1f} M trained){extra}")
    base, st = results
    line = (f"ratio 4d / base: step time {st['step_s'] / base['step_s']:.2f}x, FLOPs {st['flops'] / base['flops']:.2f}x"
            f", trained parameters {st['trainable'] / base['trainable']:.2f}x")
    if "peak_gib" in st:
        line += f", peak memory {st['peak_gib'] / base['peak_gib']:.2f}x"
    print(line)
    enc = measure_encoders(shape, device, args) if args.encoders else {}
    if enc:
        print(f"frozen encoders (shape VAE posterior + DINOv2, {args.batch * shape['frames']} frames): "
              f"{enc['encoders_s']:.3f} s = {enc['encoders_s'] / st['step_s']:.2f}x of the 4d DiT step")
    if args.shape == "paper":
        ok = st["per_sequence_s"] <= 1.5
        print(f"target (<= 1.5 s per sequence on an H100): {st['per_sequence_s']:.2f} s -> "
              f"{'met' if ok else 'not met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "device": str(device), "batch": args.batch, "results": results,
                       "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                       "torch": torch.__version__, "attention": args.attention, **enc}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
