"""The prepared GPU check (benchmarks/gpu_check.sh, issue 16): it runs end to end on a CPU at tiny shapes, its
summary judges the targets from the parts' figures, the cuDNN probe survives crashing workers and bisects
correctly, and the 14B memory estimate counts what it says it counts."""

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


@functools.cache
def bench(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # ~65 s: run it before a device session (`pytest -m slow tests/test_gpu_check.py`), not on every push
@pytest.mark.integration
def test_cpu_smoke_runs_every_part_end_to_end(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--cpu-smoke", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] and summary["gpu"] is None
    assert {k for k, v in summary["parts"].items() if v["status"] != "ok"} == set()
    launcher = json.loads((out / "a-launcher-compiled.json").read_text())["results"][0]
    assert launcher["name"] == "launcher" and launcher["compiled"] and launcher["loss_finite"]
    assert launcher["strategy"].startswith("deepspeed zero-2") and launcher["steps"] == 2
    assert json.loads((out / "d-cudnn.json").read_text())["skipped"] == "no GPU"
    assert "(a) video DiT step" in (out / "summary.md").read_text()


def part(name, result, status="ok"):
    gc = bench("gpu_check")
    return gc.Part(name, name, [], 1, result=result, status=status)


def ttv(step_s, peak, flops=None):
    return {"results": [{"name": "x", "step_s": step_s, "peak_gib": peak, "flops": flops}], "gpu": "NVIDIA H100"}


@pytest.mark.parametrize("loom_s,peak,expect", [
    (1.1, 11.0, ["PASS", "PASS", "PASS", "PASS"]),
    (1.25, 12.5, ["FAIL", "FAIL", "PASS", "FAIL"]),  # 2.2 / 1.25 = 1.76x eager, 1.55 / 1.25 = 1.24x compiled
])
def test_summary_judges_the_video_dit_targets(loom_s, peak, expect):
    gc = bench("gpu_check")
    ps = {p.name: p for p in gc.parts(smoke=False)}
    ps["a-plain"].result = ttv(2.2, 11.2, flops=2.0e15)
    ps["a-plain-compiled"].result = ttv(1.55, 11.0)
    ps["a-launcher-compiled"].result = ttv(loom_s, peak)
    lines, data = gc.summarize(ps, smoke=False)
    assert list(data["a_targets"].values()) == expect
    assert data["gpu"] == "NVIDIA H100"
    row = data["a"]["Loom: launcher + DeepSpeed ZeRO-2, compiled"]
    assert row["vs_plain_eager"] == pytest.approx(2.2 / loom_s)
    assert row["mfu"] == pytest.approx(2.0e15 / loom_s / 989e12)  # the plain step's FLOPs when none were counted
    assert any("parts that did not finish" in x for x in lines)  # (b)-(e) never ran here


def test_bisect_finds_the_first_failing_length_in_the_same_residue():
    ca = bench("cudnn_attention")
    probes = []

    def fails(s):
        probes.append(s)
        assert s % 128 == 32
        return s >= 20_000

    assert ca.bisect_tokens(fails, 32, 38_304) == (19_872, 20_000)  # 20,000 = 156 x 128 + 32
    assert len(probes) <= 9
    with pytest.raises(ValueError, match="multiple of 128"):
        ca.bisect_tokens(fails, 30, 38_304)


def test_probe_workers_restart_after_a_crash(tmp_path):
    ca = bench("cudnn_attention")
    stub = tmp_path / "worker.py"  # the worker protocol, with a crash (no report) at s == 2 and an error at s == 4
    stub.write_text(textwrap.dedent("""
        import json, os, sys
        print(json.dumps({"versions": {"torch": "stub"}}), flush=True)
        for line in sys.stdin:
            c = json.loads(line)
            if c["s"] == 2:
                os._exit(7)
            if c["s"] == 4:
                print(json.dumps({"case": c, "ok": False, "error": "CUDA error: an illegal memory access"}))
                sys.exit(3)
            print(json.dumps({"case": c, "ok": True, "cudnn_s": 0.0}), flush=True)
    """))
    cases = [{"name": str(s), "b": 1, "s": s, "layout": "bshd"} for s in (1, 2, 3, 4, 5)]
    res = ca.Workers(python=sys.executable, script=str(stub), timeout_s=20).run(cases)
    assert [r["ok"] for r in res] == [True, False, True, False, True]
    assert [r["case"]["s"] for r in res] == [1, 2, 3, 4, 5]
    assert "worker exited with 7" in res[1]["error"] and "illegal memory access" in res[3]["error"]


def test_probe_worker_runs_cases_and_reports_errors_on_a_cpu():
    """The real worker on tiny CPU cases: SDPA and Loom's spatiotemporal layer with the math kernel against itself,
    and a kernel the CPU lacks (cuDNN) reported as an error without ending the worker."""
    ca = bench("cudnn_attention")
    small = dict(device="cpu", heads=2, head_dim=8)
    cases = [{"name": "sdpa", "b": 2, "s": 40, "layout": "bshd", "backend": "MATH", "references": ["MATH"], **small},
             {"name": "cudnn", "b": 1, "s": 40, "layout": "bhsd", **small},
             {"name": "layer", "b": 1, "s": 0, "layout": "layer", "backend": "math", "reference": "math",
              "frames": 2, "latents": 4, "image_tokens": 3, **small}]
    res = ca.Workers(timeout_s=60).run(cases)
    assert [r["ok"] for r in res] == [True, False, True]
    assert res[0]["nan"] == 0 and res[0]["max_rel_diff"] < 1e-6 and res[0]["reference"] == "MATH"
    assert res[2]["nan"] == 0 and res[2]["max_rel_diff"] < 1e-6
    assert "kernel" in res[1]["error"].lower()


TINY = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=3, text_dim=16, image_dim=16,
            freq_dim=16)


def test_memory_counts_lora_as_peft_adds_it():
    mem = bench("memory_14b")
    c = mem.counts(TINY, rank=4)
    d, f = 32, 64
    # per block: self-attention q,k,v,o + cross-attention q,k,v,o + image k,v (d -> d) and the FFN (d -> f -> d)
    lora = TINY["num_layers"] * (10 * 4 * (d + d) + 4 * (d + f) + 4 * (f + d))
    assert c["trainable"] - c["fusion"] == lora
    assert c["block_trainable"] == lora // TINY["num_layers"]
    assert c["frozen"] + c["trainable"] == c["total"]


def test_memory_activations_grow_linearly_with_tokens():
    """FlashAttention keeps no L x L matrix: the meta count must not either (the math kernel's would be quadratic)."""
    mem = bench("memory_14b")
    s2, s4, s6 = (mem.saved_bytes(TINY, 4, t=t, h=32, w=32)["block"] for t in (2, 4, 6))
    assert s6 - s4 == pytest.approx(s4 - s2, rel=0.01)  # + 512 tokens costs the same each time: no L x L term


def test_memory_table_orders_the_configurations():
    mem = bench("memory_14b")
    c = mem.counts(mem.MODELS["wan1.3b"], 128)
    act = {"total": 4 * 2**30}
    rows = {(r["config"], r["nodes"]): r["gpu_total"] for r in mem.table(c, act, 8, [1, 2])}
    z2, z3 = rows[("ZeRO-2 (reference)", 1)], rows[("ZeRO-3", 1)]
    off = rows[("ZeRO-3 + optimizer and parameter offload", 1)]
    assert off < z3 < z2
    assert rows[("ZeRO-3", 2)] < z3  # more GPUs, smaller shards
