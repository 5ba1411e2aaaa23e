"""The one data-job mechanism every corpus uses: tasks -> shards -> Ray Data fan-out -> sandboxed workers -> tars.

Data flow::

    asset manifest ──> tasks (key, asset, variant; pure) ──> plan.json (task -> shard, fixed once; ~0.1 KB a task)
         ──> Ray Data: one row per unfinished shard (its index) ──map──> ShardWorker (one per Ray worker, owns a
               Sandbox; reads plan.json once): for each task of its shard: params = expand(asset, variant) (pure)
               -> fetch asset -> Sandbox.run(entry, params, timeout) -> {ext: bytes} | failure row
               write tar atomically -> write sidecar JSON
         ──> driver: progress bar, then manifest.json + failures.jsonl + summary

A job kind (turntable videos, 4D sequences, scene videos) supplies its task list, an ``expand`` that makes a task's
parameters from its asset and variant (or the parameters themselves, for jobs of a few tasks) and an ``entry``
("module:function") that turns task params into ``{"files": {ext: bytes}, "info": {...}}`` inside the sandbox.

Why the plan holds no parameters: a task's parameters are a pure function of (config, asset, variant), ~2 KB each;
storing them made plan.json 2.3 KB a task (270 MB at TAPESTRY's 120K videos) and held every one in the driver. The
plan keeps what a rerun must agree on (which task of which asset goes in which shard) and each asset once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

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
    # JSON params for the entry, minus asset_path/workdir which the worker adds; None: the job's ``expand`` makes
    # them from (asset, variant) where they are needed (in the worker), so the driver never holds them all.
    params: dict | None = None
    frames: int = 0
    variant: int = 0


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
    # (asset dict, variant) -> params, for the tasks whose ``params`` is None. Pickled to the workers: a module-level
    # function or a functools.partial of one.
    expand: Callable[[dict, int], dict] | None = None

    def params(self, task: Task) -> dict:
        """The entry's parameters of ``task``."""
        if task.params is not None:
            return task.params
        if self.expand is None:
            raise ValueError(f"task {task.key!r} has no params and the job has no expand function")
        return self.expand(task.asset, task.variant)


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
PLAN_FORMAT = "loom-plan/2"
# Asset-record fields a task needs in the worker (fetch, failure rows, provenance): annotations stay in the asset
# manifest, not in the plan.
PLAN_ASSET_DROP = ("annotations",)


def plan_shards(tasks: list[Task], kind: str, per_shard: int) -> list[dict]:
    """``[{"name": shard name, "tasks": [Task, ...]}]``: consecutive tasks, ``per_shard`` to a shard."""
    return [{"name": shards.shard_name(kind, i // per_shard), "tasks": tasks[i: i + per_shard]}
            for i in range(0, len(tasks), per_shard)]


def plan_doc(spec: JobSpec, plan: list[dict]) -> dict:
    """plan.json: each distinct asset once, then per shard its tasks as ``[key, asset index, variant, frames]``
    (``+ [params]`` for a task that carries its own)."""
    assets: list[dict] = []
    index: dict[int, int] = {}
    rows = []
    for sh in plan:
        tasks = []
        for t in sh["tasks"]:
            a = index.get(id(t.asset))
            if a is None:
                a = index[id(t.asset)] = len(assets)
                assets.append({k: v for k, v in t.asset.items() if k not in PLAN_ASSET_DROP})
            tasks.append([t.key, a, t.variant, t.frames] + ([t.params] if t.params is not None else []))
        rows.append({"name": sh["name"], "tasks": tasks})
    return {"format": PLAN_FORMAT, "kind": spec.kind, "config_hash": spec.config_hash, "assets": assets,
            "shards": rows}


def read_plan(doc: dict) -> list[dict]:
    """plan.json (this format or the first, which stored every task whole) -> ``[{"name", "tasks": [Task]}]``."""
    if doc.get("format") == PLAN_FORMAT:
        assets = doc["assets"]
        return [{"name": sh["name"],
                 "tasks": [Task(key=r[0], asset=assets[r[1]], variant=r[2], frames=r[3],
                                params=r[4] if len(r) > 4 else None) for r in sh["tasks"]]}
                for sh in doc["shards"]]
    return [{"name": sh["name"], "tasks": [Task(**t) for t in sh["tasks"]]} for sh in doc.get("shards") or []]


def load_or_write_plan(spec: JobSpec) -> list[dict]:
    """The shard plan of ``spec.out``: written at the first run, reused by reruns. A rerun with a different config
    or task list into the same folder is refused instead of mixing two corpora. A plan of the first format (whole
    tasks, written by Loom before 0.x) with the same layout is rewritten in this one: the workers read it."""
    url = storage.join(spec.out, PLAN)
    plan = plan_shards(spec.tasks, spec.kind, spec.samples_per_shard)
    if storage.exists(url):
        old = storage.read_json(url)
        # Compared by what the shards hold (which task of which asset goes where), not by the task parameters'
        # layout: a folder planned by an earlier Loom whose parameters were spelled differently still resumes.
        if old.get("config_hash") != spec.config_hash or _layout(read_plan(old)) != _layout(plan):
            what = "config" if old.get("config_hash") != spec.config_hash else "asset list"
            raise RuntimeError(
                f"{spec.out} already holds a {old.get('kind')} job with a different {what} (plan.json). "
                "Use a new --out, or delete that folder to start over."
            )
        if old.get("format") == PLAN_FORMAT:
            return plan
    storage.write_bytes(url, (json.dumps(plan_doc(spec, plan), separators=(",", ":")) + "\n").encode())
    return plan


def _layout(plan: list[dict]) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """(shard name, [(task key, asset sha256)]) of a plan: what a rerun must agree on."""
    return [(s["name"], [(t.key, (t.asset or {}).get("sha256")) for t in s["tasks"]]) for s in plan]


class ShardWorker:
    """Ray Data map function (one instance per worker): renders a shard's tasks in its sandbox, writes the tar."""

    def __init__(self, entry: str, out: str, timeout_s: float, env: dict[str, str], progress=None,
                 preload: tuple[str, ...] = (), fetch: str | None = None, expand=None):
        from loom.platform.sandbox import Sandbox

        self.out, self.timeout_s, self.progress, self.fetch, self.expand = out, timeout_s, progress, fetch, expand
        self.plan: list[dict] | None = None  # read from out/plan.json at the first shard: rows carry only an index
        self.scratch = tempfile.mkdtemp(prefix="loom-worker-")
        self.sandbox = Sandbox(entry, env=env, log_dir=os.path.join(self.scratch, "logs"), preload=preload)
        self.sandbox.start()  # pay the bpy import while Ray is still starting the other workers

    def __call__(self, row: dict) -> dict:
        if self.plan is None:
            self.plan = read_plan(storage.read_json(storage.join(self.out, PLAN)))
        shard = self.plan[int(row["shard"])]
        if row["params"]:  # tasks that carry their own parameters: this run's, not those plan.json was written with
            shard = {**shard, "tasks": [dataclasses.replace(t, params=p)
                                        for t, p in zip(shard["tasks"], json.loads(row["params"]), strict=True)]}
        return render_shard(shard, self.out, self.sandbox, self.timeout_s, self.scratch, self._tick, self.fetch,
                            self.expand)

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
                 fetch: str | None = None, expand=None) -> dict:
    """Run every task of one shard (``{"name", "tasks": [Task]}``) and write it. One task's failure is a row, never
    the end of the shard. ``expand(asset, variant)`` makes the params of tasks that carry none.

    An entry returns either ``{"files": {ext: bytes}, ...}`` (one sample, keyed by the task) or
    ``{"samples": [(key, files)], "failures": [{"key", "reason"}], "frames": n, ...}`` (a task over many samples).
    """
    from loom.platform.errors import TaskError

    fetch_fn = _resolve_fn(fetch) if fetch else None
    t0 = time.monotonic()
    samples, failures, warnings, frames = [], [], [], 0
    stats: dict[str, float] = {}
    for task in shard["tasks"]:
        row = {"uid": task.asset.get("uid"), "source": task.asset.get("source")}
        workdir = tempfile.mkdtemp(prefix="task-", dir=scratch)
        n_ok = n_failed = n_frames = 0
        try:
            params = {**(task.params if task.params is not None else expand(task.asset, task.variant)),
                      "workdir": workdir}
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
    todo = []  # indices into the plan
    for i, s in enumerate(plan):
        rec = shards.read_sidecar(spec.out, s["name"])
        if rec is not None and not (retry_failed and rec.failures):
            summary.shards_skipped += 1
            summary.samples_skipped += rec.samples
            continue
        todo.append(i)
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
        # a row: the shard's index in plan.json (which the workers read), and the parameters of its tasks where they
        # carry their own (a cache job's few tasks; a rerun by a later Loom may spell them differently)
        ds = ray.data.from_items(
            [{"shard": i, "params": json.dumps([t.params for t in plan[i]["tasks"]])
              if any(t.params is not None for t in plan[i]["tasks"]) else ""} for i in todo],
            override_num_blocks=len(todo))
        ds = ds.map(
            ShardWorker,
            fn_constructor_kwargs=dict(entry=spec.entry, out=spec.out, timeout_s=spec.timeout_s, env=spec.env,
                                       progress=counter, preload=spec.preload, fetch=spec.fetch,
                                       expand=spec.expand),
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=spec.ray.cpus_per_worker,
            num_gpus=spec.ray.gpus_per_worker or None,
        )
        from tqdm import tqdm

        n_samples = sum(len(task_keys(t)) for i in todo for t in plan[i]["tasks"])
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




@config
class PriceSettings:
    """What a dry run prices a job at (``--dry-run``): defaults are 2026 on-demand list prices of a large public
    cloud, to be replaced by your own."""

    cpu_core_hour: float = cfield(0.045, help="price of one CPU core for one hour (e.g. a c7i vCPU on demand)")
    gpu_hour: float = cfield(2.50, help="price of one GPU for one hour (e.g. an H100 on demand)")
    storage_tb_month: float = cfield(23.0, help="price of storing one TB for a month (e.g. S3 Standard)")
    currency: str = cfield("USD", help="the currency of the prices above (printed beside them)")

    def __post_init__(self):
        for name in ("cpu_core_hour", "gpu_hour", "storage_tb_month"):
            require(getattr(self, name) >= 0, f"price.{name}", getattr(self, name), "must be >= 0")


@dataclass
class Estimate:
    """A job's price from a calibration: per unit (a frame of a render, a sample of a cache job) and per task, scaled
    to ``tasks`` (the job's own, or a whole corpus's with ``--assets-total``)."""

    tasks: int
    shards: int
    frames: int
    seconds_per_frame: float
    seconds_per_task_fixed: float
    bytes_per_frame: float
    threads: int
    workers: int
    gpu: bool
    unit: str = "frame"
    assets: int | None = None  # the corpus's assets when scaled by --assets-total
    calibrated_on: str = ""  # the asset and frames the calibration ran
    bytes_by_encoding: dict[str, float] = field(default_factory=dict)  # bytes per unit of each encoding of the kind
    encoding: str = ""  # the job's own encoding (a key of bytes_by_encoding)
    price: PriceSettings | None = None

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

    def cost(self) -> dict[str, float]:
        """Compute (CPU cores; GPUs where a GPU works) and a month of storage of the job's own encoding."""
        p = self.price or PriceSettings()
        compute = self.core_hours * p.cpu_core_hour + self.gpu_hours * p.gpu_hour
        return {"compute": compute, "storage_month": self.output_bytes / 1e12 * p.storage_tb_month}

    def report(self) -> str:
        u = self.unit
        p = self.price or PriceSettings()
        scope = f" (a corpus of {self.assets} assets, priced from the assets at hand)" if self.assets else ""
        lines = [
            f"tasks            {self.tasks} samples in {self.shards} shards, {self.frames} {u}s{scope}",
            f"calibration      {self.seconds_per_frame:.3f} s/{u} + {self.seconds_per_task_fixed:.2f} s/task "
            f"(import, scene set-up) with {self.threads} thread(s)" + (f" on {self.calibrated_on}"
                                                                       if self.calibrated_on else ""),
            f"output size      {_size(self.output_bytes)} ({self.bytes_per_frame / 1e3:.1f} kB/{u})",
        ]
        for name, b in self.bytes_by_encoding.items():
            mark = "  <- this job" if name == self.encoding else ""
            lines.append(f"  encoding {name:<14s} {_size(b * self.frames)} ({b / 1e6:.3f} MB/{u}){mark}")
        c = self.cost()
        lines += [
            f"cost             {self.core_hours:.2f} core-hours" + (f", {self.gpu_hours:.2f} GPU-hours" if self.gpu
                                                                    else ""),
            f"price            {c['compute']:,.2f} {p.currency} compute ({p.cpu_core_hour:g}/core-hour"
            + (f", {p.gpu_hour:g}/GPU-hour" if self.gpu else "") + f") + {c['storage_month']:,.2f} {p.currency}/month "
            f"storage ({p.storage_tb_month:g}/TB-month); set them with --set price.*=",
            f"wall time        {self.wall_hours:.2f} h with {self.workers} worker(s)",
        ]
        return "\n".join(lines)


def _size(b: float) -> str:
    return f"{b / 1e12:.2f} TB" if b >= 1e12 else f"{b / 1e9:.3f} GB"


def estimate(spec: JobSpec, *, calibration_frames: int = 3, calibrate: bool = True, assets_total: int | None = None,
             assets_here: int | None = None, price: PriceSettings | None = None, unit: str = "frame",
             units_of: Callable[[Task], float] | None = None) -> Estimate:
    """Price a job before running it: run the first task in a sandbox (with ``calibration_frames`` frames when its
    parameters have ``frames``, e.g. a render; whole otherwise, e.g. a cache job's source shard) and extrapolate.

    ``assets_total``: price a corpus of that many assets instead of the ``assets_here`` the job was given (its tasks,
    shards and units scale by the ratio). ``unit``: what the per-unit figures count ("frame", "sample");
    ``units_of(task)``: a task's units when its ``frames`` do not say (a cache task's samples). The entry may
    return ``sizes`` ({encoding: bytes}) when asked with ``params["calibrate_encodings"]``: the bytes of the same
    sample in each encoding its kind has."""
    from loom.platform.sandbox import Sandbox

    def units(t: Task) -> float:
        return units_of(t) if units_of is not None else t.frames

    n_units = sum(units(t) for t in spec.tasks)
    n_tasks = len(spec.tasks)
    workers = spec.ray.workers or max(1, (os.cpu_count() or 1) // spec.ray.cpus_per_worker)
    spf = fixed = bpf = 0.0
    sizes: dict[str, float] = {}
    encoding, where = "", ""
    if calibrate and spec.tasks:
        task = spec.tasks[0]
        params = dict(spec.params(task))
        cf = units(task) or 1
        if units_of is None and isinstance(params.get("frames"), int):
            cf = min(calibration_frames, task.frames) or 1
            params["frames"] = cf
        scratch = tempfile.mkdtemp(prefix="loom-calibrate-")
        try:
            params.update(workdir=scratch, calibrate_encodings=True)
            if spec.fetch:
                params["asset_path"] = _resolve_fn(spec.fetch)(task.asset, os.path.join(scratch, "assets"))
            with Sandbox(spec.entry, env=spec.env, log_dir=scratch) as box:
                res = box.run(params, spec.timeout_s)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        where = f"{task.key} ({cf:g} {unit}s)"
        tm = res["timings"]
        samples = [res["files"]] if "files" in res else [f for _, f in res.get("samples", [])]
        if units_of is None:
            # Every stage but loading the asset and setting up the scene grows with the number of frames.
            per_frame = sum(v for k, v in tm.items() if k not in ("import", "scene", "load", "task"))
            spf = per_frame / cf
            fixed = max(tm.get("task", 0.0) - per_frame, 0.0)
        else:  # a task over samples: its whole time per sample
            spf = (tm.get("task", 0.0) or sum(tm.values())) / cf
        bpf = sum(len(b) for f in samples for b in f.values()) / cf
        sizes = {k: v / cf for k, v in (res.get("sizes") or {}).items()}
        encoding = res.get("encoding", "")
    n_shards = -(-n_tasks // spec.samples_per_shard)
    scaled = None
    if assets_total is not None:
        if not assets_here:
            raise ValueError("assets_total needs the number of assets the job was given (assets_here)")
        ratio = assets_total / assets_here
        n_tasks, n_units = round(n_tasks * ratio), round(n_units * ratio)
        n_shards, scaled = -(-n_tasks // spec.samples_per_shard), assets_total
    return Estimate(tasks=n_tasks, shards=n_shards, frames=int(n_units), seconds_per_frame=spf,
                    seconds_per_task_fixed=fixed, bytes_per_frame=bpf, threads=spec.ray.cpus_per_worker,
                    workers=workers, gpu=spec.ray.gpus_per_worker > 0, unit=unit, assets=scaled,
                    calibrated_on=where, bytes_by_encoding=sizes, encoding=encoding, price=price)
