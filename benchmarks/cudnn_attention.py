"""Does cuDNN attention still crash in the 4D model's backward pass, where, and why (issue 8, issue 16 (d)).

    python benchmarks/cudnn_attention.py --json out/cudnn.json      # on a GPU: about a minute
    .venv/bin/python benchmarks/cudnn_attention.py                  # on a CPU: says that it needs a GPU

What issue 8 saw: at the paper's shape, PyTorch's cuDNN attention failed in the backward pass ("an illegal memory
access was encountered") on an H100, although the same kernel ran alone and was 1.4-1.7x faster than
FlashAttention-2 there; so `loom.models.shape4d_dit` keeps cuDNN out of its "auto" backends. The 4D model attends
at two shapes, both bf16 with 20 heads of 64 features:

- spatiotemporal layers: 1 x 38,304 tokens (16 frames x (1,024 shape + 1,370 image tokens)); 38,304 = 299 x 128 + 32
- the base's blocks, per frame: 16 x 2,394 tokens; 2,394 = 18 x 128 + 90

Neither length is a multiple of 128, unlike the video DiT's 24,960 = 195 x 128, where cuDNN ran (issue 7).

Known cuDNN SDPA backward bugs in the issue trackers that fit (read them before trusting any fix):
- pytorch/pytorch#169849: invalid memory accesses in cuDNN SDPA's backward for sequence lengths that are not a
  multiple of 128 with the strided q/k/v of a (B, S, H, D) -> (B, H, S, D) transpose; fixed in cuDNN 9.15.1.
  PyTorch then turned cuDNN SDPA off by default below CUDA 12.9 (pytorch/pytorch#171627, in 2.10) and prefers it on
  sm90/sm100 only with cuDNN > 9.15 (``check_prefer_cudnn_attention`` in sdp_utils.cpp; huggingface/transformers
  #48163 quotes it).
- pytorch/pytorch#196678: NaN in grad_q (no crash) when an ``attn_mask`` is passed and S % 128 == 64 (torch 2.11,
  H100/H200). The 4D model passes no mask; the script checks the gradients for NaN anyway.
- pytorch/pytorch#138529 and #141147: grad_output with an innermost stride of 0 (``out.sum().backward()``) is
  unsupported and materialised. Not the 4D model's case (its loss is an MSE).
- openxla/xla#36454: an illegal memory access in cuDNN's fused attention backward at 33,280 tokens with a bias
  (cuDNN 9.13): long sequences with a tail are where these kernels have broken before.

What the script does (each case forward + backward of ``scaled_dot_product_attention`` restricted to
``SDPBackend.CUDNN_ATTENTION``, random bf16 inputs, a random upstream gradient):
1. prints torch, CUDA and cuDNN versions, the GPU, SDPA's backend priority and which kernel SDPA picks on its own at
   both shapes;
2. runs the cases below in worker processes: a case that crashes leaves its CUDA context unusable, so it ends its
   worker and the next case starts a new one (``CUDA_LAUNCH_BLOCKING=1``, so the error names the failing call).
   Each passing case is compared with FlashAttention-2 (memory-efficient where flash is unavailable) on the same
   inputs: NaN count and largest difference of the output and the three gradients, relative to their largest value;
3. when a case fails, bisects its token count (keeping S mod 128, at the same batch) down to the smallest failing
   length, and tries the failing shape padded to a multiple of 128 and as a contiguous (B, H, S, D) layout, which
   say whether the tail or the layout is the trigger.

Cases: ``st`` (1 x 38,304, (B, S, H, D) transposed as diffusers passes it), ``st-contiguous``, ``st-padded``
(38,400 = 300 x 128), ``st-batch4`` (4 sequences, the 4-per-GPU target), ``frame`` (16 x 2,394), and ``layer``:
Loom's own `SpatioTemporalLayer` at the paper's width with the "cudnn" backend, checkpointed as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

HEADS, HEAD_DIM = 20, 64  # the 4D model's attention (width 1280)
FRAMES, LATENTS, IMAGE_TOKENS = 16, 1024, 1370
ST_TOKENS = FRAMES * (LATENTS + IMAGE_TOKENS)  # 38,304
FRAME_TOKENS = LATENTS + IMAGE_TOKENS  # 2,394
CASES = {
    "st": dict(b=1, s=ST_TOKENS, layout="bshd"),
    "st-contiguous": dict(b=1, s=ST_TOKENS, layout="bhsd"),
    "st-padded": dict(b=1, s=-(-ST_TOKENS // 128) * 128, layout="bshd"),
    "st-batch4": dict(b=4, s=ST_TOKENS, layout="bshd"),
    "frame": dict(b=FRAMES, s=FRAME_TOKENS, layout="bshd"),
    "layer": dict(b=1, s=ST_TOKENS, layout="layer"),
}
CASE_TIMEOUT_S = 60


# ------------------------------------------------------------------------------------------------ worker side


def versions() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        from torch.nn.attention import SDPBackend

        names = {int(v): k for k, v in SDPBackend.__members__.items()}
        info["sdpa_priority"] = [names.get(int(b), str(b)) for b in torch._C._get_sdp_priority_order()]
    except (AttributeError, TypeError):  # older torch: no priority order to read
        info["sdpa_priority"] = None
    return info


def default_choice(b: int, s: int) -> str:
    """The kernel SDPA picks with every backend allowed, for bf16 (B, H, S, D) inputs that need gradients."""
    import torch
    from torch.nn.attention import SDPBackend

    names = {int(v): k for k, v in SDPBackend.__members__.items()}
    q = torch.empty(b, s, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True).transpose(1, 2)
    return names.get(int(torch._fused_sdp_choice(q, q, q)), "?")


def qkv(c: dict):
    """Random bf16 q, k, v (needing gradients) and an upstream gradient, (B, H, S, D), in the case's layout:
    ``bshd`` = (B, S, H, D) memory transposed, as diffusers' attention hands them to SDPA; ``bhsd`` = contiguous."""
    import torch

    dev = c.get("device", "cuda")
    g = torch.Generator(device=dev).manual_seed(c["s"])
    b, s, h, d = c["b"], c["s"], c.get("heads", HEADS), c.get("head_dim", HEAD_DIM)
    shape = (b, s, h, d) if c["layout"] == "bshd" else (b, h, s, d)
    ts = [torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4)]
    q, k, v, dout = [t.transpose(1, 2) if c["layout"] == "bshd" else t for t in ts]  # (B, H, S, D) views
    return [t.detach().requires_grad_() for t in (q, k, v)], dout


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def sdpa_grads(backend: str, q, k, v, dout):
    """Output and q, k, v gradients of SDPA restricted to one backend (an ``SDPBackend`` name)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out.backward(dout)
    sync(str(q.device))
    return [out.detach(), q.grad, k.grad, v.grad]


def compare(got, ref) -> dict:
    import torch

    nan = sum(int(torch.isnan(t).sum()) for t in got)
    rel = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))
              for a, b in zip(got, ref, strict=True))
    return {"nan": nan, "max_rel_diff": rel}


def run_sdpa_case(c: dict) -> dict:
    (q, k, v), dout = qkv(c)
    t0 = time.perf_counter()
    got = sdpa_grads(c.get("backend", "CUDNN_ATTENTION"), q, k, v, dout)
    res = {"cudnn_s": time.perf_counter() - t0}
    for ref in c.get("references", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"]):
        try:
            expected = sdpa_grads(ref, q, k, v, dout)
        except RuntimeError:  # not available for this input: try the next
            continue
        res.update(compare(got, expected), reference=ref)
        break
    return res


def run_layer_case(c: dict) -> dict:
    """Loom's SpatioTemporalLayer (the paper's width by default) with Loom's "cudnn" attention backend, forward and
    backward under checkpointing as in training, against its "flash" backend."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from loom.models.shape4d_dit import SDPAProcessor, SpatioTemporalLayer

    dev = c.get("device", "cuda")
    h, d = c.get("heads", HEADS), c.get("head_dim", HEAD_DIM)
    frames, latents, tokens = c.get("frames", FRAMES), c.get("latents", LATENTS), c.get("image_tokens", IMAGE_TOKENS)
    torch.manual_seed(0)
    with torch.device(dev):
        layer = SpatioTemporalLayer(h * d, h, d).to(torch.bfloat16)
        torch.nn.init.normal_(layer.proj_out.weight, std=0.02)  # not the zero init: the gradients must flow
        hidden = torch.randn(c["b"] * frames, latents, h * d, dtype=torch.bfloat16, requires_grad=True)
        context = torch.randn(c["b"] * frames, tokens, h * d, dtype=torch.bfloat16, requires_grad=True)
        temb = torch.randn(c["b"], h * d, dtype=torch.bfloat16)

    def grads(backend):
        layer.attn.set_processor(SDPAProcessor(backend))
        for t in (hidden, context):
            t.grad = None
        ctx, out = checkpoint(layer, hidden, context, temb, frames, use_reentrant=False)
        (out.float().square().mean() + ctx.float().square().mean()).backward()
        sync(dev)
        return [out.detach(), hidden.grad.clone(), context.grad.clone()]

    t0 = time.perf_counter()
    got = grads(c.get("backend", "cudnn"))
    res = {"cudnn_s": time.perf_counter() - t0}
    ref = c.get("reference", "flash")
    res.update(compare(got, grads(ref)), reference=ref)
    return res


def worker() -> int:
    """Read cases (JSON lines) from stdin, print one JSON result line per case; end at the first CUDA error."""
    import torch

    print(json.dumps({"versions": versions()}), flush=True)
    for line in sys.stdin:
        c = json.loads(line)
        try:
            res = run_layer_case(c) if c["layout"] == "layer" else run_sdpa_case(c)
            print(json.dumps({"case": c, "ok": True, **res}), flush=True)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            msg = str(e).strip().splitlines()
            print(json.dumps({"case": c, "ok": False, "error": " | ".join(msg[:3])[:600]}), flush=True)
            try:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
            except RuntimeError:  # the context is gone (illegal address): the parent starts a new worker
                return 3
    return 0


# ------------------------------------------------------------------------------------------------ parent side


class Workers:
    """Runs cases in worker processes (``python script --worker``), a new one after each crash; ``run(cases)`` ->
    one result per case, in order."""

    def __init__(self, python: str = sys.executable, script: str = __file__, timeout_s: float = CASE_TIMEOUT_S):
        self.python, self.script, self.timeout_s = python, script, timeout_s
        self.versions: dict | None = None

    def run(self, cases: list[dict]) -> list[dict]:
        results: list[dict] = []
        while len(results) < len(cases):
            todo = cases[len(results):]
            env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1", "PYTHONUNBUFFERED": "1"}
            with subprocess.Popen([self.python, self.script, "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as p:
                try:
                    out, err = p.communicate("".join(json.dumps(c) + "\n" for c in todo),
                                             timeout=self.timeout_s * len(todo) + 30)
                    died = f"worker exited with {p.returncode}"
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, err = p.communicate()
                    died = f"timed out after {self.timeout_s * len(todo) + 30:.0f} s (a hang counts as a failure)"
            got = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            for r in got:
                if "versions" in r:
                    self.versions = r["versions"]
                else:
                    results.append(r)
            if len(results) < len(cases) and (not got or "case" not in got[-1] or got[-1]["ok"]):
                # the worker ended inside a case without reporting it (abort, segfault, hang): that case failed
                tail = " | ".join(err.strip().splitlines()[-3:])[-600:]
                results.append({"case": cases[len(results)], "ok": False, "error": f"{died}: {tail}"})
        return results


def bisect_tokens(fails, good: int, bad: int, step: int = 128) -> tuple[int, int]:
    """(largest passing, smallest failing) token count between ``good`` (passes) and ``bad`` (fails), moving in
    steps of ``step`` so that every probe keeps ``bad``'s remainder mod ``step``; ``fails(s)`` runs one probe."""
    if (bad - good) % step:
        raise ValueError(f"good={good} and bad={bad} must differ by a multiple of {step}")
    lo, hi = 0, (bad - good) // step  # lo passes, hi fails, in units of step above good
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(good + mid * step):
            hi = mid
        else:
            lo = mid
    return good + lo * step, good + hi * step


def investigate(workers: Workers, names: list[str]) -> dict:
    cases = [{"name": n, **CASES[n]} for n in names]
    results = workers.run(cases)
    report: dict = {"versions": workers.versions, "cases": results}
    failing = [r for r in results if not r["ok"] and r["case"]["layout"] != "layer"]
    if failing:
        first = failing[0]["case"]
        b, s, layout = first["b"], first["s"], first["layout"]
        # the same batch padded to a multiple of 128, and contiguous: is it the tail, or the layout?
        variants = [{"name": f"{first['name']}-padded", "b": b, "s": -(-s // 128) * 128, "layout": layout},
                    {"name": f"{first['name']}-bhsd", "b": b, "s": s, "layout": "bhsd"}]
        seen = {(c["b"], c["s"], c["layout"]) for c in cases}
        report["variants"] = workers.run([v for v in variants if (v["b"], v["s"], v["layout"]) not in seen])
        smallest = s % 128 or 128
        probe = [{"name": f"bisect-{smallest}", "b": b, "s": smallest, "layout": layout}]
        if workers.run(probe)[0]["ok"]:

            def fails(n: int) -> bool:
                r = workers.run([{"name": f"bisect-{n}", "b": b, "s": n, "layout": layout}])[0]
                report.setdefault("bisect_probes", []).append(r)
                return not r["ok"]

            ok, bad = bisect_tokens(fails, smallest, s)
            report["limit"] = {"b": b, "layout": layout, "largest_passing": ok, "smallest_failing": bad}
        else:
            report["limit"] = {"b": b, "layout": layout, "largest_passing": None, "smallest_failing": smallest}
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--json", help="write the report here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker()
    import torch

    if not torch.cuda.is_available():
        print(f"cuDNN attention probe: needs a CUDA GPU, and none is visible here (torch {torch.__version__}); "
              "nothing was run. Run it where CUDA is available (benchmarks/gpu_check.sh).")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"skipped": "no GPU", "torch": torch.__version__}, f)
        return 0
    info = versions()
    try:
        info["default_choice"] = {"st": default_choice(1, ST_TOKENS), "frame": default_choice(FRAMES, FRAME_TOKENS)}
    except (AttributeError, RuntimeError) as e:  # torch._fused_sdp_choice is private: it may move
        info["default_choice"] = {"st": f"unknown ({e})", "frame": "unknown"}
    torch.cuda.empty_cache()
    print(f"torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, {info['gpu']} (sm {info['capability']})"
          f"; SDPA priority {info['sdpa_priority']}; SDPA's own pick: st {info['default_choice']['st']}, frame "
          f"{info['default_choice']['frame']}", flush=True)
    report = investigate(Workers(), args.cases)
    report["parent"] = info
    for r in report["cases"] + report.get("variants", []) + report.get("bisect_probes", []):
        c = r["case"]
        what = f"{c['name']:14s} {c['b']:2d} x {c['s']:6d} tokens ({c['s'] % 128:3d} past a multiple of 128), " \
               f"{c['layout']}"
        if r["ok"]:
            print(f"{what}: ok in {r['cudnn_s']:.3f} s; vs {r.get('reference')}: NaN {r.get('nan')}, largest relative "
                  f"difference {r.get('max_rel_diff', float('nan')):.2e}")
        else:
            print(f"{what}: FAILED: {r['error']}")
    if "limit" in report:
        lim = report["limit"]
        print(f"limit ({lim['b']} x S, {lim['layout']}): fails from S = {lim['smallest_failing']}, passes at "
              f"{lim['largest_passing']}")
    elif all(r["ok"] for r in report["cases"]):
        print("cuDNN attention ran forward and backward at every 4D shape with this torch and cuDNN")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
