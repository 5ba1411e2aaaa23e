"""How Loom's job machinery scales with the number of tasks: plan size, per-task overhead, driver memory and a
no-op resume, at two corpus sizes in one run (the smaller one is the baseline the larger is compared with).

What runs is what a data engineer runs, with the fake renderer so that rendering costs almost nothing and only the
machinery is measured: ``loom render ttv --assets FOLDER --recipe smoke --set render.backend=fake`` at 16x16 with one
frame and 4 lighting variants (TAPESTRY's 4 per asset), 4 samples per shard (the default recipe's), on a folder of
``tasks / 4`` distinct tiny OBJ files, as its own process (``python -m loom.cli``); the driver's resident memory is
sampled every 0.1 s (psutil; Ray's own processes are not the driver's). Then the same command again: a no-op resume
(every shard complete).

Printed per size: wall seconds, per-task overhead (wall / tasks, the whole job with 2 workers), plan.json bytes per
task, driver peak memory, no-op resume seconds; then the larger size against the smaller (per-task overhead and
memory should stay flat) and against the figures issue 22 recorded for Loom before this change (5,000 tasks, 2
cores: 23 ms a task, 475 MB driver memory, 4.6 s no-op resume, 2.3 KB of plan a task; another run of another code,
for orientation only).

Usage::

    python benchmarks/jobs_scale.py                     # 5,000 then 20,000 tasks (~15 min on 2 cores)
    python benchmarks/jobs_scale.py --quick             # 200 then 800 tasks (~1-2 min)
    python benchmarks/jobs_scale.py --tasks 2000 20000 --json out/bench-jobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ISSUE_22 = {"tasks": 5000, "ms_per_task": 23.0, "driver_mb": 475.0, "resume_s": 4.6, "plan_bytes_per_task": 2300.0}
VARIANTS = 4


def make_assets(folder: str, n: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        with open(os.path.join(folder, f"a{i:06d}.obj"), "w") as f:
            f.write(f"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n# {i}\n")


def run_cli(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak driver RSS in MB, stdout) of ``python -m loom.cli ARGS``."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "loom.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    peak = [0.0]

    def sample() -> None:
        proc = psutil.Process(p.pid)
        while p.poll() is None:
            try:
                peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
            except psutil.Error:
                break
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = p.communicate()
    wall = time.monotonic() - t0
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"loom {' '.join(args)} failed ({p.returncode}):\n{err[-3000:]}")
    return wall, peak[0], out


def measure(tasks: int, cores: int, workdir: str) -> dict:
    assets, out = os.path.join(workdir, f"assets-{tasks}"), os.path.join(workdir, f"out-{tasks}")
    make_assets(assets, tasks // VARIANTS)
    cmd = ["render", "ttv", "--assets", assets, "--out", out, "--recipe", "smoke", "--no-progress",
           "--set", "render.backend=fake", "--set", "render.width=16", "--set", "render.height=16",
           "--set", "orbit.frames=1", "--set", f"lighting.variants={VARIANTS}", "--set", "shards.samples_per_shard=4",
           "--set", f"ray.workers={cores}", "--set", "ray.cpus_per_worker=1"]
    wall, mem, stdout = run_cli(cmd)
    done = f"done {tasks} samples"
    if done not in stdout:
        raise SystemExit(f"expected '{done}' in the job's output, got: {stdout[-2000:]}")
    plan = os.path.getsize(os.path.join(out, "plan.json"))
    manifest = os.path.getsize(os.path.join(out, "manifest.json"))
    resume, resume_mem, stdout = run_cli(cmd)
    if f"skipped {tasks} already complete" not in stdout:
        raise SystemExit(f"the rerun did work: {stdout[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(assets, ignore_errors=True)
    return {"tasks": tasks, "wall_s": wall, "ms_per_task": wall / tasks * 1e3, "driver_mb": mem,
            "resume_s": resume, "resume_driver_mb": resume_mem, "plan_bytes_per_task": plan / tasks,
            "manifest_bytes_per_task": manifest / tasks}


def report(rows: list[dict]) -> str:
    small, large = rows[0], rows[-1]
    lines = [f"{'tasks':>8s} {'wall s':>8s} {'ms/task':>8s} {'driver MB':>10s} {'resume s':>9s} "
             f"{'plan B/task':>12s} {'manifest B/task':>16s}"]
    for r in rows:
        lines.append(f"{r['tasks']:>8d} {r['wall_s']:>8.1f} {r['ms_per_task']:>8.1f} {r['driver_mb']:>10.0f} "
                     f"{r['resume_s']:>9.1f} {r['plan_bytes_per_task']:>12.0f} {r['manifest_bytes_per_task']:>16.0f}")
    k = large["tasks"] / small["tasks"]
    lines += [
        "",
        f"{large['tasks']} vs {small['tasks']} tasks ({k:.0f}x the tasks, same run):",
        f"  per-task overhead   {large['ms_per_task'] / small['ms_per_task']:.2f}x   (flat: ~1)",
        f"  driver peak memory  {large['driver_mb'] / small['driver_mb']:.2f}x   (flat: ~1; {k:.0f}x would be linear)",
        f"  no-op resume        {large['resume_s'] / small['resume_s']:.2f}x   (per task "
        f"{large['resume_s'] / large['tasks'] * 1e3:.2f} ms vs {small['resume_s'] / small['tasks'] * 1e3:.2f} ms)",
        f"  plan bytes per task {large['plan_bytes_per_task']:.0f} (target <= 300)",
        "",
        f"against issue 22's figures for earlier Loom ({ISSUE_22['tasks']} tasks; another run, for orientation):",
        f"  per-task overhead   {large['ms_per_task']:.1f} ms vs {ISSUE_22['ms_per_task']} ms "
        f"({large['ms_per_task'] / ISSUE_22['ms_per_task']:.2f}x)",
        f"  driver peak memory  {large['driver_mb']:.0f} MB vs {ISSUE_22['driver_mb']:.0f} MB "
        f"({large['driver_mb'] / ISSUE_22['driver_mb']:.2f}x) at {large['tasks'] / ISSUE_22['tasks']:.0f}x the tasks",
        f"  no-op resume        {large['resume_s'] / large['tasks'] * 5000:.1f} s per 5,000 tasks vs "
        f"{ISSUE_22['resume_s']} s",
        f"  plan                {large['plan_bytes_per_task']:.0f} B/task vs {ISSUE_22['plan_bytes_per_task']:.0f}",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs=2, default=(5000, 20000), metavar=("SMALL", "LARGE"))
    ap.add_argument("--quick", action="store_true", help="200 then 800 tasks")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    sizes = (200, 800) if a.quick else tuple(a.tasks)
    if any(n % VARIANTS for n in sizes):
        raise SystemExit(f"--tasks must be multiples of {VARIANTS} (assets x {VARIANTS} lighting variants)")
    workdir = tempfile.mkdtemp(prefix="loom-bench-jobs-")
    try:
        rows = []
        for n in sizes:
            rows.append(measure(n, a.cores, workdir))
            print(f"measured {n} tasks: {json.dumps({k: round(v, 3) for k, v in rows[-1].items()})}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(report(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "issue_22": ISSUE_22}, f, indent=2)


if __name__ == "__main__":
    main()
