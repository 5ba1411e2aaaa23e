"""One render job, several kinds: what turntable videos (``ttv``), 4D sequences (``4d``) and scene videos (``scene``)
share, and the runner that turns one task into one sample.

A kind is a small module beside this one. It supplies

- its root config, a subclass of :class:`RenderJob` (which holds ``out``, ``seed``, ``render``, ``lighting``,
  ``shards`` and ``ray``), with a ``task(asset, variant, chash)`` method: the kind's frozen task-parameter dataclass
  (a subclass of :class:`RenderTask`), a pure function of (asset sha256, variant, job seed);
- ``render(params)``: the fake or Blender renderer of its tasks, and ``to_arrays(params, rendered, info, timings)``:
  the renderer's output -> the sample's arrays and what the render adds to meta (flow, warped noise, mesh
  sampling, ...);
- ``render_entry(params)``, the sandbox entry: ``run_task(params, ...)`` with those steps.

The task's nested sections (``lighting``, a turntable's ``orbit``, a 4D sequence's ``camera``, a scene's ``edges``)
are what the renderer reads and what the sample's ``meta.json`` records, under the same names: nothing is renamed on
the way in and nested back on the way out. The renderer-wide settings (width, height, engine, samples, seed,
threads, ...) stay flat: they are the contract that ``loom.render.common`` shares with every renderer.

    config --job_spec--> tasks (pure) --plan--> sandbox: render_entry -> run_task: render -> to_arrays -> encode
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from typing import Any, Callable, ClassVar, Literal

import numpy as np

import loom
from loom.platform.config import config, config_hash, field, require, to_dict
from loom.platform.jobs import JobSpec, PriceSettings, ShardSettings, Task
from loom.platform.ray import RaySettings

# ------------------------------------------------------------------------------------------------------ settings


@config
class RenderSettings:
    backend: Literal["blender", "fake"] = field("blender", help="'blender' renders with bpy; 'fake' ray-casts a "
                                                "sphere with the same outputs (for fast tests of the pipeline)")
    engine: Literal["CYCLES", "BLENDER_EEVEE"] = field("CYCLES", help="Blender render engine")
    device: Literal["CPU", "GPU"] = field("CPU", help="Cycles device")
    width: int = field(512, help="image width in pixels")
    height: int = field(512, help="image height in pixels")
    samples: int = field(16, help="Cycles samples per pixel of the colour pass (the geometry passes use 1)")
    denoise: bool = field(True, help="denoise the colour pass (OpenImageDenoise)")
    adaptive_threshold: float = field(0.05, help="Cycles adaptive-sampling noise threshold; 0 disables it")
    max_bounces: int = field(4, help="bound on light path bounces of the colour pass")
    background: tuple[float, float, float] = field((1.0, 1.0, 1.0), help="RGB in 0..1 behind the object")
    timeout_s: float = field(900.0, help="seconds one task may take before its worker is killed (failure row)")

    def __post_init__(self):
        require(16 <= self.width <= 8192, "render.width", self.width, "must be in 16..8192")
        require(16 <= self.height <= 8192, "render.height", self.height, "must be in 16..8192")
        require(self.samples >= 1, "render.samples", self.samples, "must be >= 1")
        require(self.adaptive_threshold >= 0, "render.adaptive_threshold", self.adaptive_threshold, "must be >= 0")
        require(self.max_bounces >= 0, "render.max_bounces", self.max_bounces, "must be >= 0")
        require(all(0 <= c <= 1 for c in self.background), "render.background", self.background, "each in 0..1")
        require(self.timeout_s > 0, "render.timeout_s", self.timeout_s, "must be > 0")


@config
class LightingSettings:
    variants: int = field(4, help="lighting variants rendered per asset (the paper: 4 -> 30K assets = 120K videos)")
    hdris: tuple[str, ...] = field(("studio", "city", "courtyard", "sunset"),
                                   help="environment maps: variant v uses hdris[v % len]; names of Blender's "
                                   "bundled HDRIs or paths to .exr/.hdr files")
    strength: tuple[float, float] = field((0.6, 1.4), help="environment strength drawn from [min, max]")
    random_rotation: bool = field(True, help="rotate the environment about the up axis by a random angle")

    def __post_init__(self):
        require(self.variants >= 1, "lighting.variants", self.variants, "must be >= 1")
        require(len(self.hdris) >= 1, "lighting.hdris", self.hdris, "name at least one environment map")
        require(0 <= self.strength[0] <= self.strength[1], "lighting.strength", self.strength, "need 0 <= min <= max")


@config
class EncodeSettings:
    rgb_codec: Literal["ffv1", "h264"] = field("ffv1", help="rgb video codec: ffv1 (lossless) or h264 (CRF 18)")


@config
class RenderJob:
    """The root-config fields every render job has. A kind subclasses it (re-declaring a field changes its default
    but keeps its place) and sets the class attributes below."""

    KIND: ClassVar[str]  # "ttv", "4d", "scene": the shard name prefix and the task's ``kind``
    SOURCE: ClassVar[str] = "assets"  # the field that names the asset source
    # Fields that do not change what a task renders: left out of the provenance hash.
    NON_SAMPLE_FIELDS: ClassVar[tuple[str, ...]] = ("out", "ray", "shards", "price")

    out: str = field("out/render", help="output folder or fsspec URL for shards and manifests")
    seed: int = field(0, help="job seed; a task's seed derives from it, the asset's sha256 and the variant")
    render: RenderSettings = field(default_factory=RenderSettings, help="renderer settings")
    lighting: LightingSettings = field(default_factory=LightingSettings, help="environment lighting")
    shards: ShardSettings = field(default_factory=ShardSettings, help="sharding")
    ray: RaySettings = field(default_factory=RaySettings, help="Ray: address, workers, CPUs and GPUs per worker")
    price: PriceSettings = field(default_factory=PriceSettings, help="prices a --dry-run costs the job at")

    def task(self, asset: dict, variant: int, chash: str) -> RenderTask:
        """The parameters of one (asset, variant): pure and deterministic."""
        raise NotImplementedError(f"{type(self).__name__} must define task(asset, variant, chash)")


# ------------------------------------------------------------------------------------------------------ tasks


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lighting:
    """One task's environment light: written into meta as ``lighting``."""

    hdri: str  # a bundled HDRI's name or a file path (the worker resolves it to ``params["hdri_path"]``)
    strength: float
    rotation: float  # radians about +Z

    @classmethod
    def draw(cls, s: LightingSettings, variant: int, rng: np.random.Generator) -> Lighting:
        return cls(hdri=s.hdris[variant % len(s.hdris)], strength=float(rng.uniform(*s.strength)),
                   rotation=float(rng.uniform(0, 2 * math.pi)) if s.random_rotation else 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RenderTask:
    """The fields every kind's task parameters share. ``to_dict`` of it is the JSON the sandbox receives (the job
    runner adds ``asset_path`` and ``workdir``; it may shorten ``frames`` to calibrate a dry run)."""

    # Task fields written into the sample's meta under their own names (besides ``meta`` itself).
    META: ClassVar[tuple[str, ...]] = ("lighting",)

    kind: str
    backend: str
    frames: int
    seed: int  # the renderer's seed: the task seed folded into 31 bits (Cycles takes an int)
    threads: int  # CPU threads of one worker (ray.cpus_per_worker)
    width: int
    height: int
    engine: str
    device: str
    samples: int
    denoise: bool
    adaptive_threshold: float
    max_bounces: int
    background: tuple[float, float, float]
    lighting: Lighting
    meta: dict  # provenance: asset, variant, seeds, code version, config hash


def task_seed(job_seed: int, asset_sha256: str, variant: int) -> int:
    """A 63-bit seed that depends only on (job seed, asset content, variant)."""
    h = hashlib.sha256(f"{job_seed}:{asset_sha256}:{variant}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def common_fields(cfg: RenderJob, asset: dict, variant: int, seed: int, rng: np.random.Generator, chash: str,
                  frames: int) -> dict[str, Any]:
    """The :class:`RenderTask` fields of one task. Draws the lighting from ``rng``: call it after the kind's own
    draws, so that a task's random numbers (and so its render) are those of earlier Loom versions."""
    r = cfg.render
    return dict(
        kind=cfg.KIND, backend=r.backend, frames=frames, seed=seed % (2**31 - 1), threads=cfg.ray.cpus_per_worker,
        width=r.width, height=r.height, engine=r.engine, device=r.device, samples=r.samples, denoise=r.denoise,
        adaptive_threshold=r.adaptive_threshold, max_bounces=r.max_bounces, background=r.background,
        lighting=Lighting.draw(cfg.lighting, variant, rng),
        meta={"kind": cfg.KIND, "uid": asset["uid"], "source": asset["source"], "license": asset.get("license", ""),
              "asset_sha256": asset["sha256"], "variant": variant, "seed": seed, "job_seed": cfg.seed,
              "loom_version": loom.__version__, "config_hash": chash},
    )


def sample_config_hash(cfg: RenderJob) -> str:
    """The hash of the settings that decide what a sample holds. A section added to a job later (``OPTIONAL``, e.g.
    turntables' ``passes``) enters it only when set away from its defaults, so corpora begun before it existed keep
    their hash and resume."""
    optional = tuple(n for n in getattr(cfg, "OPTIONAL_SECTIONS", ()) if getattr(cfg, n) == type(getattr(cfg, n))())
    return config_hash(cfg, exclude=cfg.NON_SAMPLE_FIELDS + optional)


def build_tasks(cfg: RenderJob, records: list) -> list[Task]:
    """One task per (asset, lighting variant), keyed ``<uid>_v<variant>``. Each task's parameters are drawn here
    once (a bad setting fails before anything runs) but not kept: :func:`expand_task` makes them again where they
    are used, so the driver's memory does not grow with them."""
    chash = sample_config_hash(cfg)
    tasks = []
    for rec in records:
        a = rec.to_dict()
        a.pop("annotations", None)  # the plan keeps what a task needs; annotations stay in the asset manifest
        for v in range(cfg.lighting.variants):
            t = cfg.task(a, v, chash)
            tasks.append(Task(key=f"{rec.uid}_v{v}", asset=a, frames=t.frames, variant=v))
    return tasks


def expand_task(cfg: RenderJob, chash: str, asset: dict, variant: int) -> dict:
    """The entry's parameters of the task (asset, variant): ``to_dict(cfg.task(...))``, pure."""
    return to_dict(cfg.task(asset, variant, chash))


def job_spec(cfg: RenderJob, records: list) -> JobSpec:
    """The job of ``cfg`` over ``records``: its tasks, its sandbox entry (the kind module's ``render_entry``) and
    how it runs."""
    if cfg.render.backend == "blender":
        check_hdris(cfg.lighting.hdris)
    blender = cfg.render.backend == "blender"
    return JobSpec(
        kind=cfg.KIND,
        # The sandbox imports the entry by name in its own process (bpy must never load in the driver).
        entry=f"{type(cfg).__module__}:render_entry",
        tasks=build_tasks(cfg, records),
        out=cfg.out,
        config=to_dict(cfg),
        config_hash=sample_config_hash(cfg),
        timeout_s=cfg.render.timeout_s,
        ray=cfg.ray,
        samples_per_shard=cfg.shards.samples_per_shard,
        env={"OMP_NUM_THREADS": str(cfg.ray.cpus_per_worker)},
        fetch="loom.corpora.base:fetch_asset",
        preload=("bpy",) if blender else (),
        expand=functools.partial(expand_task, cfg, sample_config_hash(cfg)),
    )


def check_hdris(hdris: tuple[str, ...]) -> None:
    """Resolve every environment map before any task starts: a typo is one clear error, not a failure row per
    task. Needs bpy installed (found without importing it)."""
    from loom.render import hdri_path

    for name in hdris:
        try:
            hdri_path(name)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"lighting.hdris: {e}") from None


def fetch_asset(asset: dict, dest_dir: str) -> str:
    """The default fetch hook: a local path to the task's mesh asset (copied from remote storage if needed)."""
    from loom.corpora.assets import AssetRecord, fetch_local

    return fetch_local(AssetRecord.from_dict(asset), dest_dir)


# ------------------------------------------------------------------------------------------------------ runner

# The renderer-wide settings recorded in every sample's meta as ``render``.
RENDER_META = ("engine", "device", "samples", "denoise", "width", "height", "adaptive_threshold", "max_bounces",
               "background")


def run_task(params: dict, *, meta_fields: tuple[str, ...], render: Callable[[dict], dict],
             to_arrays: Callable[[dict, dict, dict, dict], tuple[dict, dict]],
             encode: Callable[[dict, dict, dict], dict[str, bytes]],
             encodings: dict[str, dict] | None = None, encoding: str = "") -> dict:
    """Runs inside the sandbox: render one task, turn the result into the sample's arrays, encode them with their
    meta. ``meta_fields``: the task fields written into meta unchanged (the kind's ``RenderTask.META``);
    ``to_arrays(params, rendered, info, timings)`` returns the arrays and what the render adds to meta, and may add
    its own stages to ``timings``.

    ``encodings``: the kind's encodings, {name: the params that choose it}, and ``encoding`` the task's own: a dry
    run's calibration (``params["calibrate_encodings"]``) returns the sample's bytes in each as ``sizes``."""
    t0 = time.monotonic()
    if params["backend"] == "blender":
        from loom.render import hdri_path

        params = {**params, "hdri_path": hdri_path(params["lighting"]["hdri"])}
    rendered = render(params)
    info = rendered.pop("info")
    timings = dict(info["timings"])
    arrays, extra = to_arrays(params, rendered, info, timings)
    t1 = time.monotonic()
    meta = {
        **params["meta"],
        **{k: params[k] for k in meta_fields},
        "render": {k: params[k] for k in RENDER_META},
        "blender_version": info["blender_version"],
        "warnings": info["warnings"],
        **extra,
    }
    files = encode(arrays, meta, params)
    timings.update(encode=time.monotonic() - t1, task=time.monotonic() - t0)
    out = {"files": files, "timings": timings, "warnings": info["warnings"]}
    if params.get("calibrate_encodings"):
        out["encoding"] = encoding
        out["sizes"] = {name: sum(len(b) for b in encode(arrays, meta, {**params, **choice}).values())
                        for name, choice in (encodings or {}).items()}
    return out
