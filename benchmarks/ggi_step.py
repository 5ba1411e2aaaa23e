"""GGI training step (VideoFrom3D 3.3-3.4, `loom.models.ggi.loss`) against a plain diffusers CogVideoX-I2V training
step at the same shape, in one run: step time, peak memory and the ratio GGI / plain.

    .venv/bin/python benchmarks/ggi_step.py                        # CPU-sized shape (about a minute on 2 cores)
    python benchmarks/ggi_step.py --shape cogvideox5b-8             # on a GPU (benchmarks/gpu_check.sh runs it)

Shapes (random weights; the networks' shapes are what costs):
- ``smoke``: the tests' tiny transformer, 3 latent frames of 4 x 4: checks every code path, measures nothing.
- ``cpu``: 4 heads x 64, 2 blocks, 13 latent frames of 12 x 18 (a 49-frame 144 x 96 clip), text 32 x 256.
- ``cogvideox5b-8``: CogVideoX-5B-I2V's block (48 heads x 64, time embedding 512, T5 4096) with 8 of its 42
  blocks, at the paper's 49 frames of 720 x 480 (13 x 60 x 90 latents, 17,550 video tokens + 226 text): what one
  block costs at the real size, within one GPU's memory with AdamW on every parameter.

The two steps (forward, backward, AdamW over every transformer parameter, as the authors train it):
- ``plain``: CogVideoXTransformer3DModel with the I2V input (noisy latent + image latents, 2C channels), the
  v-prediction loss on CogVideoX's schedule, what diffusers' CogVideoX fine-tuning script does.
- ``ggi``: the same transformer widened to 3C input channels (+ edge latents), `loom.models.ggi.loss` (the input
  layout and objective of ``loom train ggi``).
Gradient checkpointing on both for the GPU shape; bf16 on GPUs, fp32 on CPUs. On a CPU their timed steps alternate,
so other load on a shared machine falls on both alike (``GGI_STEP_ORDER=ggi,plain`` swaps which goes first, to see
that the order does not matter). The expected ratio is ~1: GGI adds C input channels to one convolution.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from loom.models import ggi  # noqa: E402

ORDER = tuple(os.environ.get("GGI_STEP_ORDER", "plain,ggi").split(","))
SHAPES = {
    "smoke": {"model": None, "latent": (3, 4, 4), "channels": 4, "text": (8, 16)},
    "cpu": {"model": dict(num_attention_heads=4, attention_head_dim=64, in_channels=32, out_channels=16,
                          time_embed_dim=128, text_embed_dim=256, num_layers=2, sample_width=18, sample_height=12,
                          sample_frames=49, patch_size=2, max_text_seq_length=32,
                          use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
            "latent": (13, 12, 18), "channels": 16, "text": (32, 256)},
    "cogvideox5b-8": {"model": dict(num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16,
                                    time_embed_dim=512, text_embed_dim=4096, num_layers=8, sample_width=90,
                                    sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
                                    use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
                      "latent": (13, 60, 90), "channels": 16, "text": (226, 4096)},
}


def build(shape: dict, widen: bool, device, dtype):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    tr = ggi.tiny_transformer() if shape["model"] is None else CogVideoXTransformer3DModel(**shape["model"])
    if widen:
        ggi.widen_patch_embed(tr, 3 * tr.config.out_channels)
    return tr.to(device=device, dtype=dtype).train()


def plain_loss(tr, sched, x0, eps, t, image, text):
    """diffusers' CogVideoX-I2V fine-tuning step: noisy latent + image latents in, v-prediction loss."""
    x_t = sched.add_noise(x0, eps, t)
    out = ggi.forward(tr, torch.cat([x_t, image], 2), t, text).float()
    a = sched.alphas_cumprod.to(x0.device)[t].float().view(-1, 1, 1, 1, 1)
    return (out - (a.sqrt() * eps - (1 - a).sqrt() * x0)).pow(2).mean()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu", choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each first")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    shape = SHAPES[args.shape]
    f, h, w = shape["latent"]
    c = shape["channels"]
    g = torch.Generator().manual_seed(0)

    def lat():
        return torch.randn(1, f, c, h, w, generator=g).to(device)

    x0, eps, image, edges = lat(), lat(), lat(), lat()
    text = torch.randn(1, *shape["text"], generator=g).to(device)
    t = torch.tensor([500], device=device)
    sched = ggi.make_scheduler()
    runs = {}
    for name in ORDER:
        tr = build(shape, name == "ggi", device, dtype)
        if gpu and args.shape != "smoke":
            tr.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(tr.parameters(), lr=1e-5)

        def step(tr=tr, opt=opt, name=name):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                loss = (ggi.loss(tr, sched, x0, eps, t, image, edges, text).mean() if name == "ggi"
                        else plain_loss(tr, sched, x0, eps, t, image, text))
            loss.backward()
            opt.step()
            if gpu:
                torch.cuda.synchronize()

        runs[name] = {"step": step, "tr": tr, "times": []}
        if gpu:  # one after the other on a GPU: each its own peak memory
            torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup):
                step()
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                runs[name]["times"].append(time.perf_counter() - t0)
            runs[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            del runs[name]["tr"], runs[name]["step"], tr, opt
            torch.cuda.empty_cache()
    if not gpu:  # alternate on a CPU
        for r in runs.values():
            for _ in range(args.warmup):
                r["step"]()
        for _ in range(args.steps):
            for r in runs.values():
                t0 = time.perf_counter()
                r["step"]()
                r["times"].append(time.perf_counter() - t0)
    result = {}
    for name, r in runs.items():
        times = sorted(r["times"])
        result[name] = {"step_s": times[len(times) // 2], "peak_gib": r.get("peak_gib")}
        print(f"{name:6s} step {result[name]['step_s']:.3f} s (median of {len(times)})"
              + (f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") else ""))
    ratio = result["ggi"]["step_s"] / result["plain"]["step_s"]
    print(f"ggi / plain: {ratio:.3f}  ({args.shape}, {'GPU ' + torch.cuda.get_device_name() if gpu else 'CPU'})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": args.shape, "gpu": torch.cuda.get_device_name() if gpu else None,
                       "results": [{"ratio": ratio, **result}]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
