"""Turntable-video corpus (TAPESTRY sections 3.1 and 4.1): ``loom render ttv``.

Each (asset, lighting variant) is one task: the asset is normalised into the unit sphere, given a random initial
rotation, lit by one of the environment maps with random strength and rotation, and rendered along a circular
orbit of N frames (radius r and height z drawn from ranges, FOV fitted to the object). A task's parameters are a
pure function of (asset sha256, variant, job seed), so a rerun renders the same sample.
"""

from __future__ import annotations

import hashlib
import math
import time
import numpy as np

import loom
from loom.geometry.camera import random_rotation
from loom.platform.ray import RaySettings
from loom.platform.jobs import JobSpec, ShardSettings, Task
from loom.corpora.settings import EncodeSettings, LightingSettings, RenderSettings, check_hdris
from loom.platform.config import config, config_hash, field, recipe, require, to_dict


@config
class OrbitSettings:
    frames: int = field(61, help="frames per video (N in TAPESTRY eq. 1)")
    radius: tuple[float, float] = field((2.0, 3.0), help="orbit radius r drawn uniformly from [min, max]")
    height: tuple[float, float] = field((-0.3, 1.2), help="camera height z drawn uniformly from [min, max]")
    fov_margin: float = field(0.05, help="spare fraction of the half-width around the object when fitting the FOV")
    random_rotation: bool = field(True, help="apply a uniform random initial rotation to each asset")

    def __post_init__(self):
        require(self.frames >= 1, "orbit.frames", self.frames, "must be >= 1")
        require(0 < self.radius[0] <= self.radius[1], "orbit.radius", self.radius, "need 0 < min <= max")
        require(self.radius[0] > 1.0, "orbit.radius", self.radius,
                "must exceed 1: the object fills the unit sphere and the camera must stay outside it")
        require(self.height[0] <= self.height[1], "orbit.height", self.height, "need min <= max")
        require(0 <= self.fov_margin < 1, "orbit.fov_margin", self.fov_margin, "must be in [0, 1)")


@config
class RenderTTVJob:
    assets: str = field("bundled", help="asset source: 'bundled', a folder/URL of meshes, a manifest, or "
                        "'objaverse:...' (see loom.corpora.assets)")
    out: str = field("out/ttv", help="output folder or fsspec URL for shards and manifests")
    seed: int = field(0, help="job seed; a task's seed derives from it, the asset's sha256 and the variant")
    limit: int | None = field(None, help="render only the first N assets (after sorting)")
    render: RenderSettings = field(default_factory=RenderSettings, help="renderer settings")
    orbit: OrbitSettings = field(default_factory=OrbitSettings, help="camera orbit")
    lighting: LightingSettings = field(default_factory=LightingSettings, help="environment lighting")
    encode: EncodeSettings = field(default_factory=EncodeSettings, help="on-disk encoding")
    shards: ShardSettings = field(default_factory=ShardSettings, help="sharding")
    ray: RaySettings = field(default_factory=RaySettings, help="Ray: address, workers, CPUs and GPUs per worker")

    def __post_init__(self):
        require(self.limit is None or self.limit >= 1, "limit", self.limit, "must be >= 1 or unset")


# Fields that do not change what a task renders: excluded from the provenance hash.
NON_SAMPLE_FIELDS = ("assets", "out", "limit", "ray", "shards")


@recipe(RenderTTVJob, "default", help="the paper's settings: 61 frames, 4 lighting variants, 512x512")
def _default() -> RenderTTVJob:
    return RenderTTVJob()


@recipe(RenderTTVJob, "smoke", help="tiny: 64x64, 4 frames, 1 variant, 4 samples (tests and CI)")
def _smoke() -> RenderTTVJob:
    return RenderTTVJob(
        out="out/ttv-smoke",
        render=RenderSettings(width=64, height=64, samples=4, timeout_s=300.0),
        orbit=OrbitSettings(frames=4),
        lighting=LightingSettings(variants=1),
        shards=ShardSettings(samples_per_shard=2),
    )


@recipe(RenderTTVJob, "preview", help="quick look: 256x256, 16 frames, 2 variants (the README demo)")
def _preview() -> RenderTTVJob:
    return RenderTTVJob(
        out="out/ttv-preview",
        render=RenderSettings(width=256, height=256, samples=16),
        orbit=OrbitSettings(frames=16),
        lighting=LightingSettings(variants=2),
        shards=ShardSettings(samples_per_shard=2),
    )


def task_seed(job_seed: int, asset_sha256: str, variant: int) -> int:
    """A 63-bit seed that depends only on (job seed, asset content, variant)."""
    h = hashlib.sha256(f"{job_seed}:{asset_sha256}:{variant}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def task_params(cfg: RenderTTVJob, asset: dict, variant: int, chash: str) -> dict:
    """Everything the renderer needs for one (asset, variant): pure and deterministic."""
    seed = task_seed(cfg.seed, asset["sha256"], variant)
    rng = np.random.default_rng(seed)
    rot = random_rotation(rng) if cfg.orbit.random_rotation else np.eye(3)
    r = cfg.render
    return {
        "kind": "ttv",
        "width": r.width, "height": r.height, "frames": cfg.orbit.frames,
        "radius": float(rng.uniform(*cfg.orbit.radius)),
        "height_z": float(rng.uniform(*cfg.orbit.height)),
        "fov_margin": cfg.orbit.fov_margin,
        "rotation": rot.tolist(),
        "hdri": cfg.lighting.hdris[variant % len(cfg.lighting.hdris)],
        "hdri_strength": float(rng.uniform(*cfg.lighting.strength)),
        "hdri_rotation": float(rng.uniform(0, 2 * math.pi)) if cfg.lighting.random_rotation else 0.0,
        "engine": r.engine, "device": r.device, "threads": cfg.ray.cpus_per_worker,
        "samples": r.samples, "denoise": r.denoise, "adaptive_threshold": r.adaptive_threshold,
        "max_bounces": r.max_bounces, "background": list(r.background),
        "seed": seed % (2**31 - 1),
        "backend": r.backend,
        "rgb_codec": cfg.encode.rgb_codec,
        "meta": {
            "kind": "ttv", "uid": asset["uid"], "source": asset["source"], "license": asset.get("license", ""),
            "asset_sha256": asset["sha256"], "variant": variant, "seed": seed, "job_seed": cfg.seed,
            "loom_version": loom.__version__, "config_hash": chash,
        },
    }


def build_tasks(cfg: RenderTTVJob, records: list) -> list[Task]:
    chash = config_hash(cfg, exclude=NON_SAMPLE_FIELDS)
    tasks = []
    for rec in records:
        a = rec.to_dict()
        for v in range(cfg.lighting.variants):
            tasks.append(Task(key=f"{rec.uid}_v{v}", asset=a, params=task_params(cfg, a, v, chash),
                              frames=cfg.orbit.frames))
    return tasks


def render_entry(params: dict) -> dict:
    """Runs inside the sandbox: render one task and encode it into tar members."""
    from loom.datasets.ttv import encode_sample

    t0 = time.monotonic()
    if params.get("backend") == "fake":
        from loom.render.fake import render_sphere

        res = render_sphere(params)
    else:
        from loom.render import hdri_path
        from loom.render.ttv import render_ttv

        res = render_ttv({**params, "hdri_path": hdri_path(params["hdri"])})
    info = res.pop("info")
    t1 = time.monotonic()
    meta = {
        **params["meta"],
        "blender_version": info["blender_version"],
        "normalization": info["normalization"],
        "fov_x": info["fov_x"],
        "warnings": info["warnings"],
        "lighting": {"hdri": params["hdri"], "strength": params["hdri_strength"],
                     "rotation": params["hdri_rotation"]},
        "orbit": {"radius": params["radius"], "height": params["height_z"], "frames": params["frames"]},
        "render": {k: params[k] for k in ("engine", "device", "samples", "denoise", "width", "height")},
    }
    files = encode_sample(res, meta, params.get("rgb_codec", "ffv1"))
    timings = {**info["timings"], "encode": time.monotonic() - t1, "task": time.monotonic() - t0}
    return {"files": files, "timings": timings, "warnings": info["warnings"]}


def job_spec(cfg: RenderTTVJob, records: list) -> JobSpec:
    tasks = build_tasks(cfg, records)
    if cfg.render.backend == "blender":
        check_hdris(cfg.lighting.hdris)
    return JobSpec(
        kind="ttv",
        entry="loom.corpora.ttv:render_entry",
        tasks=tasks,
        out=cfg.out,
        config=to_dict(cfg),
        config_hash=config_hash(cfg, exclude=NON_SAMPLE_FIELDS),
        timeout_s=cfg.render.timeout_s,
        ray=cfg.ray,
        samples_per_shard=cfg.shards.samples_per_shard,
        env={"OMP_NUM_THREADS": str(cfg.ray.cpus_per_worker)},
        fetch="loom.corpora.settings:fetch_asset",
        preload=("bpy",) if cfg.render.backend == "blender" else (),
    )
