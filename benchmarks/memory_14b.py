"""Memory per GPU of LoRA training of Wan2.1-Fun-V1.1-14B-Control through Loom's launcher (recipes ``wan14b`` and
``wan14b-offload`` of ``loom train ttv``): parameter, gradient and optimizer-state bytes from DeepSpeed's own
estimators, activations measured on the meta device, for one node of 8 GPUs and for two.

    .venv/bin/python benchmarks/memory_14b.py                      # the 14B table, CPU, ~15 s
    .venv/bin/python benchmarks/memory_14b.py --shape wan1.3b --gpus 1 --frames 61   # the 1.3B recipe, 1 GPU
    python benchmarks/memory_14b.py --measure --json out/mem.json  # + a 2-block measurement on a GPU

How each line is counted (B = 1 sample per GPU, bf16 everywhere as DeepSpeed's ``bf16`` casts the module):

- Parameter counts: diffusers' ``WanTransformer3DModel`` with the Fun-Control config (dim 5120, 40 layers, 40 heads,
  FFN 13824, 48 input channels, the CLIP image branch) built on ``torch.device("meta")`` inside Loom's `TTVDiT`,
  with ``add_lora(rank=128)`` as ``loom train ttv`` adds it: the frozen base, the LoRA + geometry-fusion parameters
  that train, and one block (the unit ZeRO-3 gathers: ``apply_sharding_intent`` makes the blocks leaf modules).
  V1.1's ``ref_conv`` (Conv2d 16 -> 5120, kernel 2) is 0.33 M parameters and is left out of the counts.
- Trainable model states (bf16 parameter and gradient, fp32 master copy, Adam's two moments): DeepSpeed's
  ``estimate_zero3_model_states_mem_needs`` (ZeRO-3) / ``estimate_zero2_model_states_mem_needs`` (ZeRO-2) on the
  trainable count, with one block's LoRA as the largest layer; zero_init=False, since Loom builds the module before
  DeepSpeed wraps it. ``--deepspeed-table`` also prints ``estimate_zero3_model_states_mem_needs_all_cold``.
- Frozen base: its bf16 copy, 2 bytes a parameter, partitioned over the GPUs (ZeRO-3) or whole on each (ZeRO-2),
  in host memory with ``offload_param``; plus, under ZeRO-3, the gathered blocks in flight (DeepSpeed's default
  ``stage3_max_live_parameters`` = 1e9 parameters caps it; with prefetching about two blocks) and the gradient
  reduce bucket (``reduce_bucket_size`` = 5e8 elements, bf16).
- Activations with gradient checkpointing of every block: the 40 checkpointed block inputs (L x 5120 x 2 bytes
  each), plus ONE block's saved tensors while it is recomputed and differentiated, plus what lies outside the blocks.
  The saved tensors are counted, not guessed: one block's forward runs on the meta device under
  ``torch.autograd.graph.saved_tensors_hooks`` with attention as FlashAttention saves it (q, k, v, output, log-sum-exp;
  the meta device would otherwise take the math kernel's L x L matrix), parameters excluded, each storage once. The
  backward working set adds the gradients flowing in and out of the block (2 x L x 5120 x 2 bytes) and the gradient
  of its largest saved tensor. ``--measure`` checks the per-block figures on a GPU (2 blocks, real kernels).
- Tokens: 81 frames of 480 x 832 -> latent 21 x 60 x 104 -> patches 21 x 30 x 52 = 32,760, plus one frame (1,560)
  for V1.1's reference tokens = 34,320; context 257 CLIP + 512 umT5 tokens.

Not counted: the CUDA context and NCCL buffers (~1-2 GiB a GPU), the allocator's fragmentation, frozen encoders on
the GPU (none with latent shards that carry cached embeddings; umT5-XXL on the fly would add ~11 GiB in bf16) and
the VAE (0.25 GiB).

Host memory at load, not per step: each rank builds the transformer on its CPU in float32 before DeepSpeed casts
and partitions it (`TTVDiT.from_pretrained` default), 4 bytes a parameter per rank; and DeepSpeed (no zero.Init)
first moves the whole bf16 module onto each GPU, then partitions it: a one-off 2 bytes a parameter per GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from train_ttv import transformer_config  # noqa: E402

GIB = 2**30
MODELS = {
    # Wan2.1-Fun-V1.1-14B-Control (Wan2.1 14B width, Fun-Control's 48 input channels, the CLIP image branch)
    "wan14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096,
                   image_dim=1280, freq_dim=256),
    "wan1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096,
                    image_dim=1280, freq_dim=256),
}
CONTEXT = 257 + 512  # CLIP tokens + umT5 tokens
MAX_LIVE = 1e9  # DeepSpeed stage3_max_live_parameters (default)
REDUCE_BUCKET = 5e8  # DeepSpeed reduce_bucket_size (default), elements


def tokens(frames: int, height: int, width: int, ref: bool) -> tuple[int, int]:
    """(latent frames fed to the DiT, tokens): Wan VAE 4x time, 8x space; patches 1 x 2 x 2; V1.1's reference
    frame adds one latent frame of tokens."""
    t = 1 + (frames - 1) // 4 + (1 if ref else 0)
    return t, t * (height // 16) * (width // 16)


def build_meta(model: dict, rank: int, layers: int | None = None):
    """Loom's TTVDiT with LoRA on the meta device (nothing allocated, nothing initialised)."""
    from loom.models.geometry_fusion import GeometryFusion
    from loom.models.ttv_dit import TTVDiT
    from diffusers import WanTransformer3DModel

    cfg = transformer_config({"model": {**model, **({"num_layers": layers} if layers else {})}})
    with torch.device("meta"):
        dit = TTVDiT(WanTransformer3DModel(**cfg), GeometryFusion(64, 16))
        dit.add_lora(rank=rank)
    return dit.to(torch.bfloat16)


def counts(model: dict, rank: int) -> dict:
    dit = build_meta(model, rank)
    params = dict(dit.named_parameters())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    block = {n: p for n, p in params.items() if n.startswith("transformer.blocks.0.")}
    return {"total": sum(p.numel() for p in params.values()), "trainable": trainable,
            "frozen": sum(p.numel() for p in params.values() if not p.requires_grad),
            "fusion": sum(p.numel() for p in dit.fusion.parameters()),
            "block": sum(p.numel() for p in block.values()),
            "block_trainable": sum(p.numel() for p in block.values() if p.requires_grad),
            "ref_conv": 16 * model["num_attention_heads"] * model["attention_head_dim"] * 4 +
            model["num_attention_heads"] * model["attention_head_dim"]}


@contextlib.contextmanager
def flash_like_attention():
    """SDPA on meta tensors as FlashAttention saves it for backward (q, k, v, output, log-sum-exp): the meta device
    would otherwise run the math kernel, which keeps the L x L attention matrix."""
    f = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or enable_gqa:
            return f(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = f


def saved_bytes(model: dict, rank: int, t: int, h: int, w: int) -> dict:
    """Bytes autograd keeps for backward, bf16, one sample, measured on the meta device: inside one block (and its
    largest single tensor) and outside the blocks, for a latent of t x h x w (h, w in latent pixels)."""
    dit = build_meta(model, rank, layers=1)
    skip = {p.untyped_storage()._cdata for p in dit.parameters()}
    where = {"outside": {}, "block": {}}
    part = ["outside"]

    def pack(x):
        s = x.untyped_storage()
        if s._cdata not in skip:
            where[part[0]][s._cdata] = s.nbytes()
        return x

    block = dit.transformer.blocks[0]
    forward = block.forward

    def counted(*a, **kw):
        part[0] = "block"
        try:
            return forward(*a, **kw)
        finally:
            part[0] = "outside"

    block.forward = counted
    with torch.device("meta"):
        x = torch.randn(1, 16, t, h, w, dtype=torch.bfloat16)
        geo = torch.randn(1, 64, t, h, w, dtype=torch.bfloat16)
        text = torch.randn(1, 512, model["text_dim"], dtype=torch.bfloat16)
        image = torch.randn(1, 257, model["image_dim"], dtype=torch.bfloat16)
        tt = torch.full((1,), 500.0)
    with flash_like_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        dit(x, tt, geo, torch.zeros_like(x), text, image)
    return {"block": sum(where["block"].values()), "block_largest": max(where["block"].values()),
            "outside": sum(where["outside"].values())}


def activations(model: dict, rank: int, frames: int, height: int, width: int, ref: bool) -> dict:
    t, n = tokens(frames, height, width, ref)
    d = model["num_attention_heads"] * model["attention_head_dim"]
    s = saved_bytes(model, rank, t, height // 8, width // 8)
    ckpt = model["num_layers"] * n * d * 2
    bwd = 2 * n * d * 2 + s["block_largest"]
    return {"latent_frames": t, "tokens": n, "checkpoints": ckpt, "block_saved": s["block"], "backward": bwd,
            "outside": s["outside"], "total": ckpt + s["block"] + bwd + s["outside"],
            "per_layer": n * d * 2, "block_per_token": s["block"] / n}


def model_states(c: dict, gpus_per_node: int, nodes: int, stage: int, offload_opt: bool, offload_param: bool) -> dict:
    """Per-GPU and per-node host bytes of parameters, gradients and optimizer states (see the module docstring)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    g = gpus_per_node * nodes
    if stage == 3:
        host, gpu, _ = estimate_zero3_model_states_mem_needs(
            c["trainable"], c["block_trainable"], gpus_per_node, nodes, cpu_offload=offload_opt,
            cpu_offload_params=offload_param, zero_init=False)
        frozen = 2 * c["frozen"] / g
        gathered = 2 * min(2 * c["block"], MAX_LIVE)  # blocks in flight (bf16)
        bucket = 2 * min(REDUCE_BUCKET, c["trainable"])
        return {"trainable_gpu": gpu, "frozen_gpu": 0 if offload_param else frozen, "gathered_gpu": gathered,
                "buffers_gpu": bucket, "host_per_node": host + (frozen * gpus_per_node if offload_param else 0)}
    host, gpu = estimate_zero2_model_states_mem_needs(c["trainable"], gpus_per_node, nodes, cpu_offload=offload_opt)
    return {"trainable_gpu": gpu, "frozen_gpu": 2 * c["frozen"], "gathered_gpu": 0,
            "buffers_gpu": 2 * min(REDUCE_BUCKET, c["trainable"]), "host_per_node": host}


CONFIGS = [  # (label, stage, offload optimizer, offload params, recipe)
    ("ZeRO-2 (reference)", 2, False, False, ""),
    ("ZeRO-3", 3, False, False, "wan14b"),
    ("ZeRO-3 + optimizer offload", 3, True, False, ""),
    ("ZeRO-3 + optimizer and parameter offload", 3, True, True, "wan14b-offload"),
]


def table(c: dict, act: dict, gpus: int, node_counts: list[int]) -> list[dict]:
    rows = []
    for label, stage, opt, par, recipe in CONFIGS:
        for nodes in node_counts:
            m = model_states(c, gpus, nodes, stage, opt, par)
            gpu = m["trainable_gpu"] + m["frozen_gpu"] + m["gathered_gpu"] + m["buffers_gpu"] + act["total"]
            rows.append({"config": label, "recipe": recipe, "nodes": nodes, "gpus": gpus * nodes, **m,
                         "activations_gpu": act["total"], "gpu_total": gpu})
    return rows


def print_table(c: dict, act: dict, rows: list[dict], args) -> None:
    print(f"{args.shape}: {c['total'] / 1e9:.3f} B parameters: {c['frozen'] / 1e9:.3f} B frozen base, "
          f"{c['trainable'] / 1e6:.1f} M trained (LoRA r{args.rank} {(c['trainable'] - c['fusion']) / 1e6:.1f} M + "
          f"fusion {c['fusion'] / 1e6:.2f} M); one block {c['block'] / 1e6:.1f} M ({c['block_trainable'] / 1e6:.1f} M "
          f"LoRA); V1.1 ref_conv {c['ref_conv'] / 1e6:.2f} M (not counted)")
    print(f"tokens: {args.frames} frames {args.height}x{args.width}{' + reference frame' if args.ref else ''} -> "
          f"{act['latent_frames']} latent frames, {act['tokens']:,} tokens")
    print(f"activations (GiB, 1 sample): {act['checkpoints'] / GIB:.2f} checkpointed block inputs "
          f"({act['per_layer'] / GIB:.3f} a layer) + {act['block_saved'] / GIB:.2f} one block's saved tensors "
          f"({act['block_per_token'] / 1024:.1f} KiB a token) + {act['backward'] / GIB:.2f} backward working set + "
          f"{act['outside'] / GIB:.2f} outside the blocks = {act['total'] / GIB:.2f}")
    print()
    print("| configuration | recipe | GPUs | trainable states | frozen base | gathered blocks + buffers | activations "
          "| **GPU total** | host per node (states) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['recipe'] and '`' + r['recipe'] + '`'} | {r['gpus']} | "
              f"{r['trainable_gpu'] / GIB:.2f} | {r['frozen_gpu'] / GIB:.2f} | "
              f"{(r['gathered_gpu'] + r['buffers_gpu']) / GIB:.2f} | {r['activations_gpu'] / GIB:.2f} | "
              f"**{r['gpu_total'] / GIB:.1f}** | {r['host_per_node'] / GIB:.1f} |")
    print()
    print(f"at load (once): each rank builds the transformer in float32 on its CPU: {4 * c['total'] / GIB:.1f} GiB a "
          f"rank, {4 * c['total'] * args.gpus / GIB:.0f} GiB a node of {args.gpus}; DeepSpeed then moves the bf16 "
          f"module onto each GPU before partitioning it: {2 * c['total'] / GIB:.1f} GiB a GPU for a moment")


def measure(model: dict, rank: int, t: int, h: int, w: int, layers: int = 2) -> dict:
    """On a GPU: peak memory of forward + backward of a ``layers``-block model of this width (bf16, LoRA, every
    block checkpointed) minus its weights and optimizer-free state: the activation bytes the estimate predicts."""
    from loom.models.geometry_fusion import GeometryFusion
    from loom.models.ttv_dit import TTVDiT
    from diffusers import WanTransformer3DModel

    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = transformer_config({"model": {**model, "num_layers": layers}})
    with torch.device(dev):
        dit = TTVDiT(WanTransformer3DModel(**cfg), GeometryFusion(64, 16))
        dit.add_lora(rank=rank)
    dit.to(torch.bfloat16).enable_gradient_checkpointing()
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1, 16, t, h, w, device=dev, dtype=torch.bfloat16, generator=g)
    geo = torch.randn(1, 64, t, h, w, device=dev, dtype=torch.bfloat16, generator=g)
    text = torch.randn(1, 512, model["text_dim"], device=dev, dtype=torch.bfloat16, generator=g)
    image = torch.randn(1, 257, model["image_dim"], device=dev, dtype=torch.bfloat16, generator=g)
    tt = torch.full((1,), 500.0, device=dev)
    out = []
    for _ in range(2):  # the second pass is the measurement (kernels chosen, workspaces allocated)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        pred = dit(x, tt, geo, torch.zeros_like(x), text, image)
        pred.float().square().mean().backward()
        torch.cuda.synchronize()
        out.append(torch.cuda.max_memory_allocated() - base)
        dit.zero_grad(set_to_none=True)
    return {"layers": layers, "activation_peak": out[-1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(MODELS), default="wan14b")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--ref", action=argparse.BooleanOptionalAction, default=True,
                   help="V1.1's reference frame adds a latent frame of tokens")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2], help="node counts to tabulate")
    p.add_argument("--measure", action="store_true", help="also measure 2 blocks' activations on a GPU")
    p.add_argument("--deepspeed-table", action="store_true",
                   help="also print DeepSpeed's estimate_zero3_model_states_mem_needs_all_cold for the trained params")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    model = MODELS[args.shape]
    c = counts(model, args.rank)
    act = activations(model, args.rank, args.frames, args.height, args.width, args.ref)
    rows = table(c, act, args.gpus, args.nodes)
    print_table(c, act, rows, args)
    if args.deepspeed_table:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

        for nodes in args.nodes:
            estimate_zero3_model_states_mem_needs_all_cold(c["trainable"], c["block_trainable"], args.gpus, nodes)
    res = {"shape": args.shape, "counts": c, "activations": act, "rows": rows, "args": vars(args)}
    if args.measure:
        if not torch.cuda.is_available():
            print("--measure needs a GPU; skipped")
        else:
            t, _ = tokens(args.frames, args.height, args.width, args.ref)
            m = measure(model, args.rank, t, args.height // 8, args.width // 8)
            s = saved_bytes(model, args.rank, t, args.height // 8, args.width // 8)
            predicted = (m["layers"] * act["per_layer"] + act["block_saved"] + act["backward"] + s["outside"])
            m.update(predicted=predicted, ratio=m["activation_peak"] / predicted,
                     gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
            res["measured"] = m
            print(f"measured on {m['gpu']}: {m['layers']} blocks at {act['tokens']:,} tokens, activation peak "
                  f"{m['activation_peak'] / GIB:.2f} GiB against {predicted / GIB:.2f} GiB estimated "
                  f"(x{m['ratio']:.2f}); the {model['num_layers']}-layer total scales to "
                  f"{(act['total'] + m['activation_peak'] - predicted) / GIB:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
