"""Every GPU measurement of issue 16 in one run, each part in its own process with its own time limit, then one
summary with the targets: run it through ``bash benchmarks/gpu_check.sh`` (which installs the carried wheels first).

    python benchmarks/gpu_check.py --out out/gpu-check              # on a GPU, after gpu_check.sh's set-up
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke            # tiny shapes on a CPU: every code path runs

Parts (the scripts beside this one; each prints its own details into ``<out>/<part>.log`` and ``<out>/<part>.json``):

- (a) ``train_ttv.py --shape wan1.3b``: the video DiT step at the Wan-1.3B shape (61 frames of 480 x 832 -> latent
  16 x 16 x 60 x 104, LoRA r128, bf16, gradient checkpointing): the plain diffusers + peft step eager and compiled,
  Loom's step through ``loom.training.launch`` and DeepSpeed compiled and eager. Targets (issue 7, H100): Loom
  <= 1.2 s and <= 12 GiB, >= 1.75x the plain eager step, >= 1.29x the plain compiled one.
- (b) ``train_shape4d.py --shape paper``: the 4D step at the paper's shape against the base trained per frame.
  Target (issue 8, H100): <= 1.5 s per 16-frame sequence.
- (c) ``latent_cache.py --shape wan``: clips/s of ``loom cache latents``'s encoding against a plain
  ``AutoencoderKLWan.encode`` loop.
- (d) ``cudnn_attention.py``: does cuDNN attention crash in the 4D backward, at which token count, and why.
- (e) ``memory_14b.py --measure``: the 14B memory estimate, with two 14B-wide blocks measured on the GPU.

Parts run in the order (a) plain, plain compiled, Loom compiled, (b), (c), (d), (e), (f), then (a) Loom eager, so that a
slow or hung part costs only its own limit and the parts that answer a target come first. The whole run keeps
inside ``--budget-s`` (gpu_check.sh passes what is left of 9 minutes after its set-up): a part starts only with at
least ``MIN_PART_S`` left and is stopped at its limit or the budget, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_PART_S = 20
TTV_TARGETS = {"step_s": 1.2, "peak_gib": 12.0, "vs_plain_eager": 1.75, "vs_plain_compiled": 1.29}
SHAPE4D_TARGET_S = 1.5


@dataclass
class Part:
    name: str
    title: str
    argv: list[str]  # script and its arguments; --json is added
    limit_s: float
    result: dict | None = None
    status: str = "not run"
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def parts(smoke: bool) -> list[Part]:
    if smoke:
        ttv = ["train_ttv.py", "--shape", "smoke", "--steps", "2", "--warmup", "1"]
        comp = ["--compile", "--compile-backend", "eager"]
        return [
            Part("a-plain", "plain diffusers + peft, eager", [*ttv, "--variants", "plain"], 60),
            Part("a-plain-compiled", "plain diffusers + peft, compiled", [*ttv, "--variants", "plain", *comp], 60),
            Part("a-launcher-compiled", "Loom (launcher + DeepSpeed), compiled",
                 [*ttv, "--variants", "launcher", *comp], 90),
            Part("b-shape4d", "4D step", ["train_shape4d.py", "--shape", "smoke", "--steps", "2", "--warmup", "1"],
                 60),
            Part("c-latent-cache", "latent cache", ["latent_cache.py", "--shape", "smoke", "--clips", "1"], 60),
            Part("d-cudnn", "cuDNN attention in the 4D backward", ["cudnn_attention.py"], 30),
            Part("e-memory14b", "14B memory", ["memory_14b.py", "--shape", "wan1.3b", "--frames", "5", "--height",
                                               "32", "--width", "32", "--gpus", "1", "--nodes", "1"], 90),
            Part("f-ggi", "GGI step vs plain CogVideoX-I2V", ["ggi_step.py", "--shape", "smoke", "--steps", "2"], 60),
            Part("a-launcher", "Loom (launcher + DeepSpeed), eager", [*ttv, "--variants", "launcher"], 60),
        ]
    ttv = ["train_ttv.py", "--shape", "wan1.3b", "--steps", "4", "--warmup", "2"]
    return [
        Part("a-plain", "plain diffusers + peft, eager", [*ttv, "--variants", "plain"], 75),
        Part("a-plain-compiled", "plain diffusers + peft, compiled", [*ttv, "--variants", "plain", "--compile"], 110),
        Part("a-launcher-compiled", "Loom (launcher + DeepSpeed), compiled",
             [*ttv, "--variants", "launcher", "--compile"], 140),
        Part("b-shape4d", "4D step", ["train_shape4d.py", "--shape", "paper", "--steps", "3", "--warmup", "1"], 120),
        Part("c-latent-cache", "latent cache", ["latent_cache.py", "--shape", "wan", "--clips", "2"], 75),
        Part("d-cudnn", "cuDNN attention in the 4D backward", ["cudnn_attention.py"], 100),
        Part("e-memory14b", "14B memory", ["memory_14b.py", "--measure"], 60),
        Part("f-ggi", "GGI step vs plain CogVideoX-I2V", ["ggi_step.py", "--shape", "cogvideox5b-8", "--steps", "3"],
             90),
        Part("a-launcher", "Loom (launcher + DeepSpeed), eager", [*ttv, "--variants", "launcher"], 80),
    ]


def run_part(p: Part, out: str, python: str, limit_s: float) -> None:
    """Run one part in its own process group (so a hang is stopped with everything it started)."""
    js, log = os.path.join(out, f"{p.name}.json"), os.path.join(out, f"{p.name}.log")
    argv = [python, os.path.join(HERE, p.argv[0]), *p.argv[1:], "--json", js]
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(" ".join(argv) + "\n")
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = proc.wait(timeout=limit_s)
            p.status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            p.status = f"stopped at its limit of {limit_s:.0f} s"
    p.seconds = time.monotonic() - t0
    if os.path.isfile(js):
        with open(js) as f:
            p.result = json.load(f)
    if p.status != "ok":
        with open(log) as f:
            p.extra["log_tail"] = f.read()[-1500:]


def run_all(ps: list[Part], out: str, python: str, budget_s: float) -> None:
    deadline = time.monotonic() + budget_s
    for p in ps:
        left = deadline - time.monotonic()
        if left < MIN_PART_S:
            p.status = f"skipped: {left:.0f} s of the budget left"
            continue
        limit = min(p.limit_s, left)
        print(f"[{budget_s - left:5.0f} s] {p.name}: {p.title} (limit {limit:.0f} s) ...", flush=True)
        run_part(p, out, python, limit)
        print(f"          {p.status} in {p.seconds:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------------- summary


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def first(p: Part) -> dict | None:
    return p.result["results"][0] if p.result and p.result.get("results") else None


def summarize(ps: dict[str, Part], smoke: bool) -> tuple[list[str], dict]:
    lines: list[str] = []
    data: dict = {"parts": {k: {"status": p.status, "seconds": round(p.seconds, 1)} for k, p in ps.items()}}
    gpu = next((p.result.get("gpu") for p in ps.values() if p.result and p.result.get("gpu")), None)
    data["gpu"] = gpu
    if smoke:
        lines.append("CPU smoke run: tiny shapes, so every figure below checks a code path and measures nothing.")
    # (a)
    plain, plain_c = first(ps["a-plain"]), first(ps["a-plain-compiled"])
    loom_c, loom_e = first(ps["a-launcher-compiled"]), first(ps["a-launcher"])
    flops_plain = plain["flops"] if plain else None
    flops_loom = (loom_e or {}).get("flops") or flops_plain  # compiled runs do not count FLOPs
    peak = 989.0 if gpu else None  # TFLOP/s, the scripts' --peak-tflops default: H100 SXM dense bf16
    lines += ["", "(a) video DiT step, Wan-1.3B shape (61 x 480 x 832 -> 16 x 16 x 60 x 104, LoRA r128, bf16, "
              "gradient checkpointing)", "",
              "| step | s/step | peak GiB | MFU | vs plain eager | vs plain compiled |",
              "|---|---:|---:|---:|---:|---:|"]
    rows = [("plain diffusers + peft, eager", plain, flops_plain), ("plain diffusers + peft, compiled", plain_c,
                                                                     flops_plain),
            ("Loom: launcher + DeepSpeed ZeRO-2, compiled", loom_c, flops_loom),
            ("Loom: launcher + DeepSpeed ZeRO-2, eager", loom_e, flops_loom)]
    table = {}
    for label, r, flops in rows:
        if r is None:
            lines.append(f"| {label} | - | - | - | - | - |")
            continue
        mfu = flops / r["step_s"] / (peak * 1e12) if (flops and peak) else None
        vs_e = plain["step_s"] / r["step_s"] if plain else None
        vs_c = plain_c["step_s"] / r["step_s"] if plain_c else None
        table[label] = {"step_s": r["step_s"], "peak_gib": r.get("peak_gib"), "mfu": mfu, "vs_plain_eager": vs_e,
                        "vs_plain_compiled": vs_c, "warmup_s": r.get("warmup_s"), "loss_finite": r.get("loss_finite")}
        lines.append(f"| {label} | {r['step_s']:.3f} | {fmt(r.get('peak_gib'), '.2f')} | {fmt(mfu, '.1%')} | "
                     f"{fmt(vs_e, '.2f', 'x')} | {fmt(vs_c, '.2f', 'x')} |")
    data["a"] = table
    best = min((r for r in (loom_c, loom_e) if r), key=lambda r: r["step_s"], default=None)
    if best is not None:
        checks = {
            f"Loom step <= {TTV_TARGETS['step_s']} s": best["step_s"] <= TTV_TARGETS["step_s"],
            f"Loom peak <= {TTV_TARGETS['peak_gib']} GiB": (best["peak_gib"] <= TTV_TARGETS["peak_gib"]
                                                            if best.get("peak_gib") is not None else None),
            f">= {TTV_TARGETS['vs_plain_eager']}x plain eager": (plain["step_s"] / best["step_s"] >=
                                                                 TTV_TARGETS["vs_plain_eager"] if plain else None),
            f">= {TTV_TARGETS['vs_plain_compiled']}x plain compiled": (plain_c["step_s"] / best["step_s"] >=
                                                                       TTV_TARGETS["vs_plain_compiled"]
                                                                       if plain_c else None)}
        data["a_targets"] = {k: verdict(v) for k, v in checks.items()}
        lines.append("")
        lines.append("targets (H100; Loom's faster step): " + "; ".join(f"{k}: {verdict(v)}" for k, v in
                                                                         checks.items()))
    # (b)
    lines += ["", "(b) 4D step, paper's shape (16 frames x (1,024 latents + 1,370 DINOv2 tokens), width 1280, "
              "36 spatiotemporal layers)", ""]
    b = ps["b-shape4d"].result
    if b:
        res = {r["name"]: r for r in b["results"]}
        for name, label in (("base", "base per frame (no spatiotemporal layers)"), ("4d", "4D (Loom's step)")):
            r = res.get(name)
            if r:
                lines.append(f"- {label}: {r['step_s']:.3f} s a step, {r['per_sequence_s']:.3f} s a sequence, "
                             f"peak {fmt(r.get('peak_gib'), '.2f')} GiB, MFU {fmt(r.get('mfu'), '.1%')}")
        st = res.get("4d")
        if st and res.get("base"):
            lines.append(f"- 4D / base: {st['step_s'] / res['base']['step_s']:.2f}x the time for "
                         f"{st['flops'] / res['base']['flops']:.2f}x the FLOPs")
        if st:
            ok = st["per_sequence_s"] <= SHAPE4D_TARGET_S
            data["b"] = {"per_sequence_s": st["per_sequence_s"], "peak_gib": st.get("peak_gib"),
                         "target": verdict(ok)}
            lines.append(f"- target <= {SHAPE4D_TARGET_S} s per sequence (H100): {verdict(ok)}")
        if "encoders_s" in b:
            lines.append(f"- frozen encoders of a step (shape VAE + DINOv2): {b['encoders_s']:.3f} s")
    else:
        lines.append(f"- {ps['b-shape4d'].status}")
    # (c)
    c = ps["c-latent-cache"].result
    lines += ["", "(c) latent cache", ""]
    if c:
        data["c"] = {"loom_clips_per_s": c["loom"]["clips_per_s"], "plain_clips_per_s": c["plain"]["clips_per_s"],
                     "ratio": c["ratio"]}
        lines.append(f"- {c['frames']} frames {c['size'][0]}x{c['size'][1]}, rgb + normal + position: Loom "
                     f"{c['loom']['clips_per_s']:.3f} clips/s (peak {fmt(c['loom'].get('peak_gib'), '.2f')} GiB), "
                     f"plain AutoencoderKLWan.encode loop {c['plain']['clips_per_s']:.3f} clips/s: "
                     f"{c['ratio']:.2f}x")
        lines += [f"- BUG: {x}" for x in c.get("problems", [])]
    else:
        lines.append(f"- {ps['c-latent-cache'].status}")
    # (d)
    d = ps["d-cudnn"].result
    lines += ["", "(d) cuDNN attention in the 4D backward", ""]
    if d and d.get("skipped"):
        lines.append(f"- not run: {d['skipped']}")
    elif d:
        v = d.get("parent") or d.get("versions") or {}
        lines.append(f"- torch {v.get('torch')}, CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}, {v.get('gpu')}; SDPA's "
                     f"own pick: {v.get('default_choice')}")
        for r in d["cases"] + d.get("variants", []):
            cse = r["case"]
            state = (f"ok, NaN {r.get('nan')}, largest relative difference to {r.get('reference')} "
                     f"{fmt(r.get('max_rel_diff'), '.1e')}") if r["ok"] else f"FAILED: {r['error'][:200]}"
            lines.append(f"- {cse['name']} ({cse['b']} x {cse['s']} tokens, {cse['layout']}): {state}")
        if "limit" in d:
            lim = d["limit"]
            lines.append(f"- limit: fails from {lim['smallest_failing']} tokens, passes at {lim['largest_passing']} "
                         f"(batch {lim['b']}, {lim['layout']})")
        data["d"] = {"all_ok": all(r["ok"] for r in d["cases"]), "limit": d.get("limit")}
    else:
        lines.append(f"- {ps['d-cudnn'].status}")
    # (e)
    e = ps["e-memory14b"].result
    lines += ["", "(e) 14B memory", ""]
    if e:
        rows14 = {(r["config"], r["gpus"]): r for r in e["rows"]}
        for (cfg, g), r in rows14.items():
            if r["recipe"]:
                lines.append(f"- {cfg} (`{r['recipe']}`), {g} GPUs: {r['gpu_total'] / 2**30:.1f} GiB a GPU "
                             "(estimate)")
        m = e.get("measured")
        if m:
            lines.append(f"- measured on the GPU, 2 blocks: {m['activation_peak'] / 2**30:.2f} GiB of activations "
                         f"against {m['predicted'] / 2**30:.2f} GiB estimated (x{m['ratio']:.2f})")
            data["e"] = {"ratio": m["ratio"]}
    else:
        lines.append(f"- {ps['e-memory14b'].status}")
    # (f)
    f = ps["f-ggi"].result if "f-ggi" in ps else None
    lines += ["", "(f) GGI step (VideoFrom3D), CogVideoX-5B block shape, 8 of 42 blocks, 49 x 480 x 720", ""]
    if f:
        r = f["results"][0]
        lines.append(f"- plain CogVideoX-I2V step {r['plain']['step_s']:.3f} s (peak "
                     f"{fmt(r['plain'].get('peak_gib'), '.1f')} GiB), GGI step {r['ggi']['step_s']:.3f} s (peak "
                     f"{fmt(r['ggi'].get('peak_gib'), '.1f')} GiB): {r['ratio']:.3f}x")
        data["f"] = {"ratio": r["ratio"], "ggi_step_s": r["ggi"]["step_s"]}
    elif "f-ggi" in ps:
        lines.append(f"- {ps['f-ggi'].status}")
    failed = [f"{k}: {p.status}" for k, p in ps.items() if p.status != "ok"]
    if failed:
        lines += ["", "parts that did not finish: " + "; ".join(failed) + " (their logs are in the output folder)"]
    return lines, data


def fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/gpu-check", help="folder for the parts' logs and JSON and the summary")
    p.add_argument("--budget-s", type=float, default=510, help="seconds for all parts together")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on a CPU (checks the code paths)")
    p.add_argument("--only", nargs="+", help="run only these parts (names as printed)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    ps = parts(args.cpu_smoke)
    if args.only:
        unknown = sorted(set(args.only) - {x.name for x in ps})
        if unknown:
            p.error(f"unknown parts {unknown}; known: {[x.name for x in ps]}")
    todo = [x for x in ps if not args.only or x.name in args.only]
    t0 = time.monotonic()
    run_all(todo, args.out, sys.executable, args.budget_s)
    lines, data = summarize({x.name: x for x in ps}, args.cpu_smoke)
    data.update(seconds=round(time.monotonic() - t0, 1), smoke=args.cpu_smoke)
    head = f"GPU check summary ({data['gpu'] or 'no GPU'}), parts took {data['seconds']:.0f} s"
    print("\n".join(["", "=" * 100, head, *lines]))
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(data, f, indent=1)
    return 0 if all(x.status == "ok" for x in todo) else 1


if __name__ == "__main__":
    sys.exit(main())
