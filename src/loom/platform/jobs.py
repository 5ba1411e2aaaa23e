"""The one data-job mechanism every corpus uses: tasks -> shards -> Ray Data fan-out -> sandboxed workers -> tars.

Data flow::

    asset manifest ──> tasks (pure: asset, variant, seed -> params) ──> plan.json (task -> shard, fixed once)
         ──> Ray Data: one row per unfinished shard ──map──> ShardWorker (one per Ray worker, owns a Sandbox)
               for each task: fetch asset -> Sandbox.run(entry, params, timeout) -> {ext: bytes} | failure row
               write tar atomically -> write sidecar JSON
         ──> driver: progress bar, then manifest.json + failures.jsonl + summary

A job kind (turntable videos, 4D sequences, scene videos) supplies only its task list and an ``entry``
("module:function") that turns task params into ``{"files": {ext: bytes}, "info": {...}}`` inside the sandbox.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from loom.platform import shards, storage
from loom.platform.config import config, field as cfield, require
from loom.platform.ray import RaySettings, init_ray


@config
class ShardSettings:
    samples_per_shard: int = cfield(4, help="samples per tar shard (the unit of work, retry and resume)")

    def __post_init__(self):
        require(self.samples_per_shard >= 1, "shards.samples_per_shard", self.samples_per_shard, "must be >= 1")


@dataclass
class Task:
    key: str  # sample key in the tar (no dots); unique in the job
    asset: dict  # AssetRecord.to_dict()
    params: dict  # JSON params for the entry, minus asset_path/workdir which the worker adds
    frames: int = 0


@dataclass
class JobSpec:
    kind: str  # "ttv", "4d", "scene": also the shard name prefix
    entry: str  # "module:function" run in the sandbox
    tasks: list[Task]
    out: str
    config: dict  # resolved config, for config.yaml and the manifest
    config_hash: str
    timeout_s: float
    ray: RaySettings
    samples_per_shard: int
    env: dict[str, str] = field(default_factory=dict)
    preload: tuple[str, ...] = ()  # modules the sandbox imports at start-up (bpy)
    # "module:function(asset: dict, dest_dir) -> local path" run before each task (its result becomes the entry's
    # ``asset_path``); None when the entry reads its own input (e.g. a source shard named in its params).
    fetch: str | None = None
    verb: str = "render"  # for the progress bar


@dataclass
class Summary:
    out: str
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    samples_done: int = 0
    samples_skipped: int = 0
    failed: int = 0
    frames: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)

    def line(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        return (f"done {self.samples_done} samples in {self.shards_done} shards, skipped {self.samples_skipped} "
                f"already complete ({self.shards_skipped} shards), failed {self.failed}, {len(self.warnings)} with "
                f"warnings; {self.frames} frames in "
                f"{self.seconds:.1f} s ({fps:.2f} frames/s)")


PLAN = "plan.json"


def plan_shards(tasks: list[Task], kind: str, per_shard: int) -> list[dict]:
    return [
        {"name": shards.shard_name(kind, i // per_shard), "tasks": [asdict(t) for t in tasks[i: i + per_shard]]}
        for i in range(0, len(tasks), per_shard)
    ]


def load_or_write_plan(spec: JobSpec) -> list[dict]:
    """The shard plan of ``spec.out``: written at the first run, reused by reruns. A rerun with a different config
    or task list into the same folder is refused instead of mixing two corpora."""
    url = storage.join(spec.out, PLAN)
    plan = plan_shards(spec.tasks, spec.kind, spec.samples_per_shard)
    doc = {"kind": spec.kind, "config_hash": spec.config_hash, "shards": plan}
    if storage.exists(url):
        old = storage.read_json(url)
        # Compared by what the shards hold (which task of which asset goes where), not by the task parameters'
        # layout: a folder planned by an earlier Loom whose parameters were spelled differently still resumes.
        if old.get("config_hash") != spec.config_hash or _layout(old.get("shards") or []) != _layout(plan):
            what = "config" if old.get("config_hash") != spec.config_hash else "asset list"
            raise RuntimeError(
                f"{spec.out} already holds a {old.get('kind')} job with a different {what} (plan.json). "
                "Use a new --out, or delete that folder to start over."
            )
        return plan
    storage.write_json(url, doc)
    return plan


def _layout(plan: list[dict]) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """(shard name, [(task key, asset sha256)]) of a plan: what a rerun must agree on."""
    return [(s["name"], [(t["key"], (t.get("asset") or {}).get("sha256")) for t in s["tasks"]]) for s in plan]


class ShardWorker:
    """Ray Data map function (one instance per worker): renders a shard's tasks in its sandbox, writes the tar."""

    def __init__(self, entry: str, out: str, timeout_s: float, env: dict[str, str], progress=None,
                 preload: tuple[str, ...] = (), fetch: str | None = None):
        from loom.platform.sandbox import Sandbox

        self.out, self.timeout_s, self.progress, self.fetch = out, timeout_s, progress, fetch
        self.scratch = tempfile.mkdtemp(prefix="loom-worker-")
        self.sandbox = Sandbox(entry, env=env, log_dir=os.path.join(self.scratch, "logs"), preload=preload)
        self.sandbox.start()  # pay the bpy import while Ray is still starting the other workers

    def __call__(self, row: dict) -> dict:
        shard = json.loads(row["shard"])
        return render_shard(shard, self.out, self.sandbox, self.timeout_s, self.scratch, self._tick, self.fetch)

    def _tick(self, ok: int, failed: int, frames: int) -> None:
        if self.progress is not None:
            self.progress.add.remote(ok, failed, frames)

    def __del__(self):
        try:
            self.sandbox.close()
            shutil.rmtree(self.scratch, ignore_errors=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _resolve_fn(ref: str):
    import importlib

    mod, _, fn = ref.partition(":")
    return getattr(importlib.import_module(mod), fn)


def task_keys(task: Task) -> list[str]:
    """The sample keys a task produces: one (its own key) for a render task, several for a task over a shard."""
    return list(task.asset.get("keys") or [task.key])


def render_shard(shard: dict, out: str, sandbox, timeout_s: float, scratch: str, tick=None,
                 fetch: str | None = None) -> dict:
    """Run every task of one shard and write it. One task's failure is a row, never the end of the shard.

    An entry returns either ``{"files": {ext: bytes}, ...}`` (one sample, keyed by the task) or
    ``{"samples": [(key, files)], "failures": [{"key", "reason"}], "frames": n, ...}`` (a task over many samples).
    """
    from loom.platform.errors import TaskError

    fetch_fn = _resolve_fn(fetch) if fetch else None
    t0 = time.monotonic()
    samples, failures, warnings, frames = [], [], [], 0
    stats: dict[str, float] = {}
    for t in shard["tasks"]:
        task = Task(**t)
        row = {"uid": task.asset.get("uid"), "source": task.asset.get("source")}
        workdir = tempfile.mkdtemp(prefix="task-", dir=scratch)
        n_ok = n_failed = n_frames = 0
        try:
            params = {**task.params, "workdir": workdir}
            if fetch_fn is not None:
                params["asset_path"] = fetch_fn(task.asset, os.path.join(scratch, "assets"))
            res = sandbox.run(params, timeout_s)
            if "samples" in res:
                samples += [(k, f) for k, f in res["samples"]]
                failures += [{**row, **f} for f in res["failures"]]
                n_ok, n_failed, n_frames = len(res["samples"]), len(res["failures"]), int(res.get("frames", 0))
            else:
                samples.append((task.key, res["files"]))
                n_ok, n_frames = 1, task.frames
                if res.get("warnings"):
                    warnings.append({"key": task.key, "warnings": list(res["warnings"])})
            for k, v in res.get("timings", {}).items():
                stats[k] = stats.get(k, 0.0) + float(v)
        except (TaskError, OSError, ValueError) as e:  # OSError/ValueError: fetching (missing file, bad checksum)
            reason = str(e) if isinstance(e, TaskError) else f"{type(e).__name__}: {e}"
            keys = task_keys(task)
            failures += [{**row, "key": k, "reason": reason} for k in keys]
            n_failed = len(keys)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        frames += n_frames
        if tick is not None:
            tick(n_ok, n_failed, n_frames)
    t_write = time.monotonic()
    size, sha, keys = shards.write_tar(shards.shard_url(out, shard["name"]), samples)
    stats["write"] = time.monotonic() - t_write
    stats["seconds"] = time.monotonic() - t0
    rec = shards.ShardRecord(name=shard["name"], samples=len(keys), size=size, sha256=sha, keys=keys,
                             failures=failures, warnings=warnings, stats={**stats, "frames": frames})
    shards.write_sidecar(out, rec)
    return {"name": shard["name"], "samples": len(keys), "failed": len(failures), "frames": frames,
            "failures": json.dumps(failures), "warnings": json.dumps(warnings)}


class _ProgressCounter:
    """A tiny Ray actor the workers report each finished task to, so the progress bar moves per sample rather
    than per shard (a shard of 61-frame videos at 512x512 takes tens of minutes)."""

    def __init__(self):
        self.ok = self.failed = self.frames = 0

    def add(self, ok: int, failed: int, frames: int) -> None:
        self.ok += ok
        self.failed += failed
        self.frames += frames

    def get(self) -> tuple[int, int, int]:
        return self.ok, self.failed, self.frames


def run_job(spec: JobSpec, *, progress: bool = True, retry_failed: bool = False,
            max_shards: int | None = None) -> Summary:
    """Render every unfinished shard of the plan; returns the summary. Safe to rerun at any point."""
    storage.check_writable(spec.out)
    plan = load_or_write_plan(spec)
    storage.write_bytes(storage.join(spec.out, "config.yaml"), _yaml(spec.config).encode())
    storage.remove_stale_temporaries(storage.join(spec.out, shards.SHARDS_DIR))
    summary = Summary(out=spec.out, shards_total=len(plan))
    todo = []
    for s in plan:
        rec = shards.read_sidecar(spec.out, s["name"])
        if rec is not None and not (retry_failed and rec.failures):
            summary.shards_skipped += 1
            summary.samples_skipped += rec.samples
            continue
        todo.append(s)
    if max_shards is not None:
        todo = todo[:max_shards]
    t0 = time.monotonic()
    if todo:
        init_ray(spec.ray)
        import ray
        import ray.data

        for name in ("ray.data", "ray.data._internal.execution.streaming_executor", "ray.data._internal"):
            logging.getLogger(name).setLevel(logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        workers = spec.ray.workers or max(1, cpus // spec.ray.cpus_per_worker)
        workers = min(workers, len(todo))
        # The counter lives on the driver's node: a worker node lost mid-job must not take the progress bar (and
        # with it the driver) down.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        counter = ray.remote(num_cpus=0)(_ProgressCounter).options(scheduling_strategy=here).remote()
        ds = ray.data.from_items([{"shard": json.dumps(s)} for s in todo], override_num_blocks=len(todo))
        ds = ds.map(
            ShardWorker,
            fn_constructor_kwargs=dict(entry=spec.entry, out=spec.out, timeout_s=spec.timeout_s, env=spec.env,
                                       progress=counter, preload=spec.preload, fetch=spec.fetch),
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=spec.ray.cpus_per_worker,
            num_gpus=spec.ray.gpus_per_worker or None,
        )
        from tqdm import tqdm

        n_samples = sum(len(task_keys(Task(**t))) for s in todo for t in s["tasks"])
        bar = tqdm(total=n_samples, unit="sample", desc=f"{spec.verb} {spec.kind}", disable=not progress,
                   file=sys.stderr)
        rows: list[dict] = []
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                rows.extend(ds.iter_rows())
            except BaseException as e:  # noqa: BLE001 - re-raised in the driver thread below
                errors.append(e)

        import threading

        th = threading.Thread(target=consume, daemon=True)
        th.start()
        while th.is_alive():
            th.join(1.0)
            try:
                ok, failed, frames = ray.get(counter.get.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - progress is cosmetic; the shards and their sidecars are the truth
                continue
            bar.n = ok + failed
            bar.set_postfix(failed=failed, fps=f"{frames / max(time.monotonic() - t0, 1e-9):.2f}", refresh=False)
            bar.refresh()
        bar.close()
        if errors:
            raise errors[0]
        for row in rows:
            summary.shards_done += 1
            summary.samples_done += row["samples"]
            summary.failed += row["failed"]
            summary.frames += row["frames"]
            summary.failures += json.loads(row["failures"])
            summary.warnings += json.loads(row["warnings"])
    summary.seconds = time.monotonic() - t0
    shards.write_manifest(spec.out, [s["name"] for s in plan],
                          extra={"kind": spec.kind, "config_hash": spec.config_hash})
    return summary


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)




@dataclass
class Estimate:
    tasks: int
    shards: int
    frames: int
    seconds_per_frame: float
    seconds_per_task_fixed: float
    bytes_per_frame: float
    threads: int
    workers: int
    gpu: bool

    @property
    def seconds_per_task(self) -> float:
        return self.seconds_per_task_fixed + self.seconds_per_frame * (self.frames / max(self.tasks, 1))

    @property
    def core_hours(self) -> float:
        return self.tasks * self.seconds_per_task * self.threads / 3600

    @property
    def gpu_hours(self) -> float:
        return self.tasks * self.seconds_per_task / 3600 if self.gpu else 0.0

    @property
    def wall_hours(self) -> float:
        return self.tasks * self.seconds_per_task / max(self.workers, 1) / 3600

    @property
    def output_bytes(self) -> float:
        return self.bytes_per_frame * self.frames

    def report(self) -> str:
        gb = self.output_bytes / 1e9
        lines = [
            f"tasks            {self.tasks} samples in {self.shards} shards, {self.frames} frames",
            f"calibration      {self.seconds_per_frame:.3f} s/frame + {self.seconds_per_task_fixed:.2f} s/task "
            f"(import, scene set-up) with {self.threads} thread(s)",
            f"output size      {gb:.3f} GB ({self.bytes_per_frame / 1e3:.1f} kB/frame)",
            f"cost             {self.core_hours:.2f} core-hours" + (f", {self.gpu_hours:.2f} GPU-hours" if self.gpu
                                                                    else ""),
            f"wall time        {self.wall_hours:.2f} h with {self.workers} worker(s)",
        ]
        return "\n".join(lines)


def estimate(spec: JobSpec, *, calibration_frames: int = 3, calibrate: bool = True) -> Estimate:
    """Price a job before running it: render the first task with a few frames in a sandbox and extrapolate."""
    from loom.platform.sandbox import Sandbox

    n_frames = sum(t.frames for t in spec.tasks)
    n_shards = len(plan_shards(spec.tasks, spec.kind, spec.samples_per_shard))
    workers = spec.ray.workers or max(1, (os.cpu_count() or 1) // spec.ray.cpus_per_worker)
    spf = fixed = bpf = 0.0
    if calibrate and spec.tasks:
        task = spec.tasks[0]
        cf = min(calibration_frames, task.frames) or 1
        scratch = tempfile.mkdtemp(prefix="loom-calibrate-")
        try:
            params = {**task.params, "frames": cf, "workdir": scratch}
            if spec.fetch:
                params["asset_path"] = _resolve_fn(spec.fetch)(task.asset, os.path.join(scratch, "assets"))
            with Sandbox(spec.entry, env=spec.env, log_dir=scratch) as box:
                res = box.run(params, spec.timeout_s)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        tm = res["timings"]
        # Every stage but loading the asset and setting up the scene grows with the number of frames.
        per_frame = sum(v for k, v in tm.items() if k not in ("import", "scene", "load", "task"))
        spf = per_frame / cf
        fixed = max(tm.get("task", 0.0) - per_frame, 0.0)
        bpf = sum(len(b) for b in res["files"].values()) / cf
    return Estimate(tasks=len(spec.tasks), shards=n_shards, frames=n_frames, seconds_per_frame=spf,
                    seconds_per_task_fixed=fixed, bytes_per_frame=bpf, threads=spec.ray.cpus_per_worker,
                    workers=workers, gpu=spec.ray.gpus_per_worker > 0)
