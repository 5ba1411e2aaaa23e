"""Video DiT training step: Loom's full step against the plain diffusers + peft step of the same model, in one run.
Prints step time, peak memory, FLOPs and (on a GPU) model FLOPs utilisation, and the ratio plain / Loom.

    .venv/bin/python benchmarks/train_ttv.py                       # CPU-sized shape (a few minutes on 2 cores)
    python benchmarks/train_ttv.py --shape wan1.3b --compile       # on a GPU: the Wan2.1-1.3B shape of issue 7
    python benchmarks/train_ttv.py --shape wan1.3b --variants plain launcher --compile --json out/ttv.json

Shapes:
- ``smoke``: a 2-layer Wan transformer of width 64, latent 16 x 2 x 8 x 8, LoRA r4: seconds on a CPU; checks that
  every code path runs (``benchmarks/gpu_check.sh --cpu-smoke``), measures nothing.
- ``cpu``: a 4-layer Wan transformer of width 256, latent 16 x 5 x 16 x 16 (320 tokens), 512 text tokens,
  LoRA r16: small enough for 2 CPU cores, same code paths.
- ``wan1.3b``: Wan2.1-1.3B (width 1536, 30 layers, 12 heads, FFN 8960, text 4096) in the Fun-Control layout
  (48 input channels), 61 frames at 480x832 -> latent 16 x 16 x 60 x 104 (24,960 tokens), 512 text tokens,
  257 CLIP tokens, LoRA r128 on every linear layer of the blocks.

Variants (``--variants``, any of them, in one run; ``--compile`` compiles the repeated blocks of each, diffusers'
``compile_repeated_blocks(fullgraph=True)``):
- ``plain``: peft LoRA on the diffusers transformer, one AdamW group, no fusion module: the step a user writes.
- ``loom``: Loom's model step called directly: the geometry fusion module (trained, 4 condition latents in), the
  reference latent, per-sample draws, LoRA+ parameter groups, plain AdamW.
- ``launcher``: Loom's whole training step as ``loom train ttv`` runs it: ``loom.training.launch.fit`` builds the
  Lightning Trainer with Loom's DeepSpeed strategy (ZeRO-2, the ``default`` recipe's bf16-mixed and gradient
  checkpointing on a GPU; fp32 on a CPU), ``TTVModule.training_step`` conditions synthetic latent-shard batches
  (what ``loom cache latents`` writes: rgb/normal/position latents, cached umT5 and CLIP embeddings) and DeepSpeed
  steps the optimizer. The only substitution: the module's ``build_dit`` / ``build_vae`` return random networks
  of the shape instead of reading checkpoints. Its step time is the wall time between the ends of consecutive
  steps (Lightning's loop, the batch transfer and logging included); its run stops after the timed steps, before
  the end-of-run checkpoint, LoRA export and sample video.

All variants do the same work: forward and backward of the LoRA'd transformer, the flow-matching MSE loss, AdamW on
the trainable parameters. Gradient checkpointing on all; bf16 autocast (``plain``, ``loom``) or DeepSpeed bf16
(``launcher``) on GPUs. Loom's variants run Wan2.1-Fun-V1.1's transformer (`loom.models.wan_fun`, with ``ref_conv``:
its reference tokens are one latent frame more, 26,520 tokens at the wan1.3b shape, so Loom does ~9% more FLOPs);
the ``loom`` step passes the first latent frame as ``ref_latent`` (`reference_input`); ``--no-ref-conv`` gives
Loom diffusers' V1.0-layout model instead, the plain step's.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one step (matmuls and attention), counted for
eager variants (``--count-flops`` also for compiled ones); MFU is FLOPs / step time / peak (``--peak-tflops``, 989
for an H100 SXM in dense bf16). Issue 7's target at the wan1.3b shape on an H100: Loom's step <= 1.2 s and <= 12
GiB, i.e. >= 1.75x the plain eager step (2.11 s measured there) and >= 1.29x the plain compiled one (1.54 s).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from loom.models.flow import FlowMatching, sample_generator  # noqa: E402
from loom.models.geometry_fusion import GeometryFusion  # noqa: E402
from loom.models.ttv_dit import TTVDiT  # noqa: E402

SHAPES = {
    "smoke": {"model": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, text_dim=32,
                            image_dim=32, freq_dim=32), "latent": (16, 2, 8, 8), "text": 512, "image": 8,
              "rank": 4, "vae": "tiny"},
    "cpu": {"model": dict(num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=4, text_dim=256,
                          image_dim=256, freq_dim=256), "latent": (16, 5, 16, 16), "text": 512, "image": 257,
            "rank": 16, "vae": "tiny"},
    "wan1.3b": {"model": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                              text_dim=4096, image_dim=1280, freq_dim=256), "latent": (16, 16, 60, 104),
                "text": 512, "image": 257, "rank": 128, "vae": "wan"},
}
VARIANTS = ("plain", "loom", "launcher")
TARGETS = {"step_s": 1.2, "peak_gib": 12.0, "vs_plain_eager": 1.75, "vs_plain_compiled": 1.29}  # issue 7, H100


def transformer_config(shape: dict) -> dict:
    m = shape["model"]
    inner = m["num_attention_heads"] * m["attention_head_dim"]
    return dict(patch_size=(1, 2, 2), in_channels=48, out_channels=16, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, added_kv_proj_dim=inner, **m)


def make_dit(shape: dict, device: torch.device | str = "cpu", ref_conv: bool = False) -> TTVDiT:
    """The video DiT at ``shape`` with random weights (seed 0), without LoRA, initialised on ``device`` (a GPU
    draws 1.6 B random weights in a blink; 2 CPU cores take ~25 s). ``ref_conv``: Wan2.1-Fun-V1.1's transformer
    (`loom.models.wan_fun`: its reference tokens add one latent frame), else diffusers' ``WanTransformer3DModel``."""
    cfg = transformer_config(shape)
    torch.manual_seed(0)
    with torch.device(device):
        if ref_conv:
            from loom.models.wan_fun import WanFunTransformer3DModel

            transformer = WanFunTransformer3DModel(**cfg, ref_channels=cfg["out_channels"])
        else:
            from diffusers import WanTransformer3DModel

            transformer = WanTransformer3DModel(**cfg)
        return TTVDiT(transformer, GeometryFusion(64, 16))


def build(shape: dict, device: torch.device, loom: bool, ref_conv: bool = False):
    dit = make_dit(shape, device, ref_conv=loom and ref_conv)
    with torch.device(device):
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


def compile_blocks(dit: TTVDiT, backend: str) -> None:
    """diffusers' ``compile_repeated_blocks(fullgraph=True)``, the call ``model.compile=true`` makes; ``backend``
    other than inductor only for smoke runs (dynamo tracing checked, no code generated)."""
    kw = {} if backend == "inductor" else {"backend": backend}
    dit.transformer.compile_repeated_blocks(fullgraph=True, **kw)


def reference_input(dit: TTVDiT, x0: torch.Tensor) -> dict:
    """Wan2.1-Fun-V1.1's reference input when the DiT has its ``ref_conv``: ``{"ref_latent": the first latent frame
    (B, 16, 1, H', W')}``; ``{}`` for a transformer without one (V1.0, the plain diffusers model)."""
    if not getattr(dit, "has_ref_conv", False):
        return {}
    return {"ref_latent": x0[:, :, :1]}


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
        pred = dit(x_t, t, x["geometry"], ref, x["text"], x["image"], **reference_input(dit, x0))
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


def count_flops(args) -> bool:
    return args.count_flops if args.count_flops is not None else not args.compile


def measure(name: str, shape: dict, device, args) -> dict:
    if name == "launcher":
        return measure_launcher(shape, device, args)
    loom = name == "loom"
    dit, opt = build(shape, device, loom, args.ref_conv)
    if args.compile:
        compile_blocks(dit, args.compile_backend)
    x = inputs(shape, device)
    flow = FlowMatching()
    step = loom_step if loom else plain_step
    on_gpu = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(dit, opt, x, flow, i, autocast)
    sync()
    warm_s = time.perf_counter() - t0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    flops = None
    if count_flops(args):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            loss = step(dit, opt, x, flow, args.warmup, autocast)
        flops = fc.get_total_flops()
    else:
        loss = step(dit, opt, x, flow, args.warmup, autocast)
    sync()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step(dit, opt, x, flow, 100 + i, autocast)
        sync()
        times.append(time.perf_counter() - t0)
    res = summarize(name, times, flops, warm_s, float(loss.detach()), on_gpu, args)
    del dit, opt
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return res


def summarize(name: str, times: list[float], flops, warm_s: float, loss: float, on_gpu: bool, args) -> dict:
    times = sorted(times)
    med = times[len(times) // 2]
    res = {"name": name, "compiled": bool(args.compile), "step_s": med, "best_s": times[0], "steps": len(times),
           "warmup_s": warm_s, "flops": flops, "tflops_per_s": flops / med / 1e12 if flops else None,
           "loss": loss, "loss_finite": bool(torch.isfinite(torch.tensor(loss)))}
    if on_gpu:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        res["mfu"] = flops / med / (args.peak_tflops * 1e12) if flops else None
    return res


# ---------------------------------------------------------------------------------------------- the launcher


class SyntheticLatents:
    """Batches as ``LoomLoader`` yields them from latent shards (the members ``loom cache latents`` writes, float16
    as stored): the same tensors every step under fresh sample keys, so each step draws its own noise."""

    def __init__(self, shape: dict, b: int = 1, text_tokens: int = 32):
        c, t, h, w = shape["latent"]
        g = torch.Generator().manual_seed(0)
        half = functools.partial(torch.randn, generator=g, dtype=torch.float32)
        self.base = {f"{p}_latent": half(b, c, t, h, w).half() for p in ("rgb", "normal", "position")}
        self.base["mask_latent"] = torch.rand(b, t, h, w, generator=g).half()
        # umT5 features of the real tokens only (the trainer pads them to 512), CLIP's 257 x 1280
        self.base["text_embed"] = half(b, text_tokens, shape["model"]["text_dim"]).half()
        self.base["image_embed"] = half(b, shape["image"], shape["model"]["image_dim"]).half()
        self.b = b

    def __iter__(self):
        i = 0
        while True:
            yield {**self.base, "__key__": [f"synthetic-{i:06d}-{k}" for k in range(self.b)]}
            i += 1


class _Done(Exception):
    """Raised after the last timed step: Lightning tears the run down without its end-of-run work."""


def measure_launcher(shape: dict, device, args) -> dict:
    """Loom's training step through ``loom.training.launch.fit`` (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    from loom.models.video_vae import VideoVAE, build_tiny_vae
    from loom.platform.config import resolve
    from loom.training import launch
    from loom.training.ttv import TrainTTVJob
    from loom.training.ttv import module as ttv_module

    on_gpu = device.type == "cuda"
    total = args.warmup + 1 + args.steps  # warm-up steps, one step counted (FLOPs) or untimed, timed steps
    out = tempfile.mkdtemp(prefix="loom-bench-ttv-")
    cfg = resolve(TrainTTVJob, "default", [
        ("out", out), ("tracking.enabled", False),
        ("trainer.accelerator", "gpu" if on_gpu else "cpu"), ("trainer.precision", "bf16-mixed" if on_gpu else
                                                              "32-true"),
        ("trainer.strategy", "deepspeed"), ("trainer.zero_stage", 2), ("trainer.gradient_checkpointing", True),
        ("trainer.max_steps", total + 1), ("trainer.checkpoint_every", 10 * total), ("trainer.progress", False),
        ("model.transformer", "random"), ("model.vae", "random"),
        ("model.lora_rank", shape["rank"]), ("model.compile", bool(args.compile)),
        ("model.dtype", "bfloat16" if on_gpu else "float32"), ("data.image_len", shape["image"])])
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    result: dict = {}

    def build_dit(m, seed):  # ttv.build_dit's work on a random network of the shape, on the CPU as it loads
        dit = make_dit(shape, ref_conv=args.ref_conv)
        dit.add_lora(rank=m.lora_rank, alpha=m.lora_alpha or None)
        if m.compile and args.compile_backend != "inductor":  # the module compiles it; smoke runs skip codegen
            dit.transformer.compile_repeated_blocks = functools.partial(
                dit.transformer.compile_repeated_blocks, backend=args.compile_backend)
        return dit

    def build_vae(m, seed):  # the Wan2.1 VAE's architecture (diffusers' defaults) with random weights
        if shape["vae"] == "tiny":  # CPU shapes: the tests' tiny VAE, same factors
            return build_tiny_vae(seed)
        from diffusers import AutoencoderKLWan

        torch.manual_seed(seed)  # placed as load_video_vae places the real one: the VAE in dtype, its buffers fp32
        return VideoVAE(AutoencoderKLWan().to(torch.bfloat16 if on_gpu else torch.float32))

    class Timed(ttv_module.TTVModule):
        done = 0  # steps finished
        t_prev = 0.0
        fc = None

        def on_train_batch_start(self, batch, batch_idx):
            if self.done == args.warmup and count_flops(args):
                self.fc = FlopCounterMode(display=False)
                self.fc.__enter__()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            sync()
            now = time.perf_counter()
            if self.fc is not None:
                self.fc.__exit__(None, None, None)
                result["flops"] = self.fc.get_total_flops()
                self.fc = None
            if self.done == 0:  # from launch.fit's call: the module built, DeepSpeed set up, compiled, one step
                result["first_step_s"] = now - result["fit_start"]
            if self.done == args.warmup:  # the timed window starts at the end of this step
                result["warmup_s"] = now - result["fit_start"]
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats()
            elif self.done > args.warmup:
                result.setdefault("times", []).append(now - self.t_prev)
            self.t_prev = now
            self.done += 1
            if self.done == total:
                result["loss"] = self.losses[-1][1]
                if on_gpu:
                    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    result["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
                raise _Done

        def on_train_end(self):  # the sample video and LoRA export are not part of a step
            pass

    def make():
        return Timed(cfg), SyntheticLatents(shape)

    saved = ttv_module.build_dit, ttv_module.build_vae
    ttv_module.build_dit, ttv_module.build_vae = build_dit, build_vae
    try:
        result["fit_start"] = time.perf_counter()
        launch.fit(make, cfg.trainer, cfg.tracking, cfg.out)
        raise RuntimeError(f"the launcher run ended before its {total} steps")
    except _Done:
        pass
    finally:
        ttv_module.build_dit, ttv_module.build_vae = saved
        shutil.rmtree(out, ignore_errors=True)
    res = summarize("launcher", result["times"], result.get("flops"), result["warmup_s"], result["loss"], False,
                    args)
    res["first_step_s"] = result["first_step_s"]
    res["strategy"] = f"deepspeed zero-{cfg.trainer.zero_stage}, {cfg.trainer.precision}"
    res["ref_conv"] = bool(args.ref_conv)
    if on_gpu:
        res.update(peak_gib=result["peak_gib"], reserved_gib=result["reserved_gib"],
                   mfu=res["flops"] / res["step_s"] / (args.peak_tflops * 1e12) if res["flops"] else None)
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------- report


def report(results: list[dict], shape_name: str, on_gpu: bool) -> None:
    for r in results:
        extra = f", peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""
        if r.get("mfu"):
            extra += f", MFU {100 * r['mfu']:.1f}%"
        flops = f"{r['flops'] / 1e12:.2f} TFLOP/step, {r['tflops_per_s']:.3f} TFLOP/s" if r["flops"] else \
            "FLOPs not counted"
        name = r["name"] + (" (compiled)" if r["compiled"] else "")
        print(f"{name:22s} step {r['step_s']:.3f} s (best {r['best_s']:.3f}; warm-up {r['warmup_s']:.1f} s), "
              f"{flops}{extra}, loss {r['loss']:.4f}")
    by = {r["name"]: r for r in results}
    loom = by.get("launcher") or by.get("loom")
    if "plain" in by and loom is not None:
        plain = by["plain"]
        line = f"speed: plain / {loom['name']} step time = {plain['step_s'] / loom['step_s']:.2f}x"
        if plain["flops"] and loom["flops"]:
            line += (f" ({loom['name']} does {loom['flops'] / plain['flops']:.3f}x the FLOPs: the fusion module, its 4 "
                     "latents and, with ref_conv, the reference tokens)")
        print(line)
    if shape_name == "wan1.3b" and on_gpu and loom is not None:
        print(f"target (H100): {loom['name']} step {loom['step_s']:.2f} s <= {TARGETS['step_s']} s -> "
              f"{'met' if loom['step_s'] <= TARGETS['step_s'] else 'not met'}; peak {loom['peak_gib']:.2f} GiB <= "
              f"{TARGETS['peak_gib']} GiB -> {'met' if loom['peak_gib'] <= TARGETS['peak_gib'] else 'not met'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["plain", "loom"],
                   help="steps to measure, one after the other (plain = diffusers + peft)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="compile_repeated_blocks on every variant")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (inductor; 'eager' traces without generating code: smoke runs)")
    p.add_argument("--ref-conv", action=argparse.BooleanOptionalAction, default=True,
                   help="Loom's steps (loom, launcher) on Wan2.1-Fun-V1.1's transformer with ref_conv (one latent "
                   "frame of reference tokens more); the plain step is always diffusers' model")
    p.add_argument("--count-flops", action=argparse.BooleanOptionalAction, default=None,
                   help="count FLOPs over one step (default: for eager variants only)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 SXM bf16)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "wan1.3b" and device.type != "cuda":
        print("the wan1.3b shape needs a GPU (about 12 GiB with checkpointing); use --shape cpu here")
        return 2
    shape = SHAPES[args.shape]
    print(f"device {device}, shape {args.shape}: latent {shape['latent']}, {shape['text']} text tokens, "
          f"LoRA r{shape['rank']}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    results = [measure(n, shape, device, args) for n in args.variants]
    report(results, args.shape, device.type == "cuda")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "device": str(device), "gpu": gpu_name(device),
                       "torch": torch.__version__, "results": results}, f, indent=1)
    return 0


def gpu_name(device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


if __name__ == "__main__":
    sys.exit(main())
