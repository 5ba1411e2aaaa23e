"""Video DiT training step: Loom's full step against the plain diffusers + peft step of the same model, in one run.
Prints step time, peak memory, FLOPs and (on a GPU) model FLOPs utilisation, and the ratio plain / Loom.

    .venv/bin/python benchmarks/train_ttv.py                       # CPU-sized shape (a few minutes on 2 cores)
    python benchmarks/train_ttv.py --shape wan1.3b --compile       # on a GPU: the Wan2.1-1.3B shape of issue 7

Shapes:
- ``cpu``: a 4-layer Wan transformer of width 256, latent 16 x 5 x 16 x 16 (320 tokens), 512 text tokens,
  LoRA r16: small enough for 2 CPU cores, same code paths.
- ``wan1.3b``: Wan2.1-1.3B (width 1536, 30 layers, 12 heads, FFN 8960, text 4096) in the Fun-Control layout
  (48 input channels), 61 frames at 480x832 -> latent 16 x 16 x 60 x 104 (24,960 tokens), 512 text tokens,
  257 CLIP tokens, LoRA r128 on every linear layer of the blocks.

Both steps do the same work: forward and backward of the LoRA'd transformer, the flow-matching MSE loss, AdamW on
the trainable parameters; Loom's step adds its geometry fusion module (trained, 4 condition latents in), the
reference latent, per-sample draws, LoRA+ parameter groups. Gradient checkpointing on both; bf16 autocast on GPUs.
``--compile`` compiles the repeated blocks of both (diffusers' ``compile_repeated_blocks``).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one step (matmuls and attention); MFU is
FLOPs / step time / peak (``--peak-tflops``, 989 for an H100 SXM in dense bf16).
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
from loom.models.geometry_fusion import GeometryFusion  # noqa: E402
from loom.models.ttv_dit import TTVDiT  # noqa: E402

SHAPES = {
    "cpu": {"model": dict(num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=4, text_dim=256,
                          image_dim=256, freq_dim=256), "latent": (16, 5, 16, 16), "text": 512, "image": 257,
            "rank": 16},
    "wan1.3b": {"model": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                              text_dim=4096, image_dim=1280, freq_dim=256), "latent": (16, 16, 60, 104),
                "text": 512, "image": 257, "rank": 128},
}


def transformer_config(shape: dict) -> dict:
    m = shape["model"]
    inner = m["num_attention_heads"] * m["attention_head_dim"]
    return dict(patch_size=(1, 2, 2), in_channels=48, out_channels=16, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, added_kv_proj_dim=inner, **m)


def build(shape: dict, device: torch.device, loom: bool):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**transformer_config(shape))
    fusion = GeometryFusion(64, 16)
    dit = TTVDiT(transformer, fusion)
    dit.add_lora(rank=shape["rank"])
    dit.enable_gradient_checkpointing()
    dit.to(device)
    if loom:
        groups = dit.lora_plus_param_groups(1e-4, 4.0)
    else:
        # the plain step: peft LoRA on the transformer, one parameter group, no fusion module
        dit.fusion.requires_grad_(False)
        groups = [{"params": [p for p in dit.transformer.parameters() if p.requires_grad], "lr": 1e-4}]
    return dit, torch.optim.AdamW(groups, lr=1e-4)


def inputs(shape: dict, device: torch.device, b: int = 1):
    c, t, h, w = shape["latent"]
    g = torch.Generator().manual_seed(0)
    r = {"x0": torch.randn(b, c, t, h, w, generator=g), "geometry": torch.randn(b, 4 * c, t, h, w, generator=g),
         "control": torch.randn(b, c, t, h, w, generator=g),
         "text": torch.randn(b, shape["text"], shape["model"]["text_dim"], generator=g),
         "image": torch.randn(b, shape["image"], shape["model"]["image_dim"], generator=g)}
    return {k: v.to(device) for k, v in r.items()}


def loom_step(dit, opt, x, flow, step, autocast):
    g = [sample_generator(0, step, "sample0")]
    x0 = x["x0"]
    x_t, t, target, _ = flow.draw(x0, g)
    ref = dit.reference_latent(x0[:, :, :1], x0.shape[2])
    with autocast():
        pred = dit(x_t, t, x["geometry"], ref, x["text"], x["image"])
    loss = flow.loss(pred, target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def plain_step(dit, opt, x, flow, step, autocast):
    g = torch.Generator().manual_seed(step)
    x0 = x["x0"]
    noise = torch.randn(x0.shape, generator=g).to(x0)
    sigma = torch.rand(1, generator=g).to(x0)
    x_t = (1 - sigma) * x0 + sigma * noise
    hidden = torch.cat([x_t, x["control"], torch.zeros_like(x0)], 1)
    with autocast():
        pred = dit.transformer(hidden, sigma * 1000, x["text"], encoder_hidden_states_image=x["image"],
                               return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def measure(name: str, shape: dict, device, args) -> dict:
    loom = name == "loom"
    dit, opt = build(shape, device, loom)
    if args.compile:
        dit.transformer.compile_repeated_blocks(fullgraph=True)
    x = inputs(shape, device)
    flow = FlowMatching()
    step = loom_step if loom else plain_step
    on_gpu = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for i in range(args.warmup):
        step(dit, opt, x, flow, i, autocast)
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step(dit, opt, x, flow, args.warmup, autocast)
    flops = fc.get_total_flops()
    sync()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(dit, opt, x, flow, 100 + i, autocast)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    res = {"name": name, "step_s": med, "best_s": times[0], "flops": flops, "tflops_per_s": flops / med / 1e12}
    if on_gpu:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["mfu"] = flops / med / (args.peak_tflops * 1e12)
    del dit, opt
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="compile_repeated_blocks on both")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 SXM bf16)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "wan1.3b" and device.type != "cuda":
        print("the wan1.3b shape needs a GPU (about 12 GiB with checkpointing); use --shape cpu here")
        return 2
    shape = SHAPES[args.shape]
    print(f"device {device}, shape {args.shape}: latent {shape['latent']}, {shape['text']} text tokens, "
          f"LoRA r{shape['rank']}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    results = [measure(n, shape, device, args) for n in ("plain", "loom")]
    for r in results:
        extra = f", peak {r['peak_gib']:.2f} GiB, MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        print(f"{r['name']:6s} step {r['step_s']:.3f} s (best {r['best_s']:.3f}), {r['flops'] / 1e12:.2f} TFLOP/step, "
              f"{r['tflops_per_s']:.3f} TFLOP/s{extra}")
    plain, loom = results
    print(f"speed: plain / loom step time = {plain['step_s'] / loom['step_s']:.2f}x "
          f"(loom does {loom['flops'] / plain['flops']:.3f}x the FLOPs: the fusion module and its 4 latents)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "device": str(device), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
