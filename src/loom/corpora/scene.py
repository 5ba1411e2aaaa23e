"""Scene videos from coarse geometry (VideoFrom3D sections 3.1-3.4): ``loom render scene``.

One task per (scene, lighting variant). The camera trajectory (a YAML/JSON keyframe file or a preset) is sampled
here, in the driver, into per-frame ``K`` and ``c2w``; the sandboxed Blender worker renders rgb, exact depth,
object ids and the four edge maps; then, still in the worker, the geometric flow between frames (each pixel's 3D
point reprojected into the other camera, with a depth test) and the warped noise (frame 0's Gaussian noise carried
along the flow at latent resolution). The job, shard, manifest, resume and failure machinery is the turntable
job's (``loom.platform.jobs``).
"""

from __future__ import annotations

import math
import time
from typing import Literal

import numpy as np

import loom
from loom.platform.ray import RaySettings
from loom.platform.jobs import JobSpec, ShardSettings, Task
from loom.corpora.settings import EncodeSettings, LightingSettings, RenderSettings, check_hdris
from loom.corpora.ttv import task_seed
from loom.platform.config import config, config_hash, field, recipe, require, to_dict


@config
class CameraSettings:
    frames: int = field(46, help="frames of the video (VideoFrom3D: N = 45, i.e. 46 frames)")
    orbit_radius: float = field(6.0, help="preset 'orbit': radius in scene units")
    orbit_height: float = field(3.0, help="preset 'orbit': camera height in scene units")
    fov_deg: float = field(60.0, help="preset trajectories: horizontal field of view in degrees")

    def __post_init__(self):
        require(self.frames >= 2, "camera.frames", self.frames, "must be >= 2 (flow needs two frames)")
        require(self.orbit_radius > 0, "camera.orbit_radius", self.orbit_radius, "must be > 0")
        require(0 < self.fov_deg < 180, "camera.fov_deg", self.fov_deg, "must be in (0, 180)")


@config
class EdgeSettings:
    crease_angle_deg: float = field(60.0, help="an edge between faces bent more than this is a crease")
    line_width_px: float = field(1.0, help="edge thickness in pixels")
    method: Literal["gbuffer", "freestyle"] = field("gbuffer", help="how edges are drawn: exact per-pixel passes "
                                                       "or Blender Freestyle (see loom.render.scene)")

    def __post_init__(self):
        require(0 < self.crease_angle_deg < 180, "edges.crease_angle_deg", self.crease_angle_deg, "must be in (0, 180)")
        require(self.line_width_px > 0, "edges.line_width_px", self.line_width_px, "must be > 0")


@config
class NoiseSettings:
    channels: int = field(16, help="channels of the warped noise (the video model's latent channels)")
    downsample: int = field(8, help="latent resolution = image resolution / downsample")
    upsample: int = field(4, help="sub-pixel factor of the noise warping (higher: closer to exact integral noise)")

    def __post_init__(self):
        require(self.channels >= 1, "noise.channels", self.channels, "must be >= 1")
        require(self.downsample >= 1, "noise.downsample", self.downsample, "must be >= 1")
        require(self.upsample >= 1, "noise.upsample", self.upsample, "must be >= 1")


@config
class RenderSceneJob:
    scene: str = field("bundled-scene", help="scene file (.glb/.gltf/.obj/.blend) or 'bundled-scene'")
    trajectory: str = field("orbit", help="camera keyframes file (.yaml/.json) or a preset: 'orbit'")
    out: str = field("out/scene", help="output folder or fsspec URL for shards and manifests")
    seed: int = field(0, help="job seed; a task's seed derives from it, the scene's sha256 and the variant")
    camera: CameraSettings = field(default_factory=CameraSettings, help="frames and preset trajectories")
    edges: EdgeSettings = field(default_factory=EdgeSettings, help="structural guidance")
    noise: NoiseSettings = field(default_factory=NoiseSettings, help="warped noise")
    render: RenderSettings = field(default_factory=lambda: RenderSettings(width=720, height=480),
                                   help="renderer settings (VideoFrom3D renders 720x480)")
    lighting: LightingSettings = field(default_factory=lambda: LightingSettings(variants=1),
                                       help="environment lighting")
    encode: EncodeSettings = field(default_factory=EncodeSettings, help="on-disk encoding")
    shards: ShardSettings = field(default_factory=lambda: ShardSettings(samples_per_shard=1), help="sharding")
    ray: RaySettings = field(default_factory=RaySettings, help="Ray: address, workers, CPUs and GPUs per worker")

    def __post_init__(self):
        require(self.render.width % self.noise.downsample == 0 and self.render.height % self.noise.downsample == 0,
                "noise.downsample", self.noise.downsample, "must divide render.width and render.height")


NON_SAMPLE_FIELDS = ("scene", "out", "ray", "shards")


@recipe(RenderSceneJob, "default", help="VideoFrom3D's settings: 46 frames at 720x480, latent 8x smaller")
def _default() -> RenderSceneJob:
    return RenderSceneJob()


@recipe(RenderSceneJob, "smoke", help="tiny: 4 frames at 64x64, 4 samples (tests and CI)")
def _smoke() -> RenderSceneJob:
    return RenderSceneJob(
        out="out/scene-smoke",
        camera=CameraSettings(frames=4),
        noise=NoiseSettings(channels=4, downsample=8),
        render=RenderSettings(width=64, height=64, samples=4, timeout_s=300.0),
    )


def sample_trajectory(cfg: RenderSceneJob) -> tuple[np.ndarray, np.ndarray]:
    """(K (T,3,3), c2w (T,4,4)) of the configured trajectory: a keyframe file or the 'orbit' preset."""
    from loom.geometry import trajectory as tr

    w, h, n = cfg.render.width, cfg.render.height, cfg.camera.frames
    if cfg.trajectory == "orbit":
        traj = tr.orbit(cfg.camera.orbit_radius, cfg.camera.orbit_height, cfg.camera.fov_deg)
    else:
        traj = tr.load_trajectory(cfg.trajectory)
    K, c2w, _ = traj.sample(n, w, h)
    return np.asarray(K), np.asarray(c2w)


def task_params(cfg: RenderSceneJob, asset: dict, variant: int, chash: str, K, c2w) -> dict:
    seed = task_seed(cfg.seed, asset["sha256"], variant)
    rng = np.random.default_rng(seed)
    r = cfg.render
    return {
        "kind": "scene", "backend": r.backend, "width": r.width, "height": r.height, "frames": cfg.camera.frames,
        "K": np.asarray(K).tolist(), "c2w": np.asarray(c2w).tolist(),
        "crease_angle_deg": cfg.edges.crease_angle_deg, "line_width_px": cfg.edges.line_width_px,
        "edges_method": cfg.edges.method,
        "engine": r.engine, "device": r.device, "samples": r.samples, "denoise": r.denoise,
        "adaptive_threshold": r.adaptive_threshold, "max_bounces": r.max_bounces, "background": list(r.background),
        "threads": cfg.ray.cpus_per_worker, "seed": seed % (2**31 - 1),
        "hdri": cfg.lighting.hdris[variant % len(cfg.lighting.hdris)],
        "hdri_strength": float(rng.uniform(*cfg.lighting.strength)),
        "hdri_rotation": float(rng.uniform(0, 2 * math.pi)) if cfg.lighting.random_rotation else 0.0,
        "noise": to_dict(cfg.noise), "rgb_codec": cfg.encode.rgb_codec,
        "meta": {
            "kind": "scene", "uid": asset["uid"], "source": asset["source"], "license": asset.get("license", ""),
            "asset_sha256": asset["sha256"], "variant": variant, "seed": seed, "job_seed": cfg.seed,
            "trajectory": cfg.trajectory, "loom_version": loom.__version__, "config_hash": chash,
        },
    }


def warped_noise(flow_fwd: np.ndarray, occluded: np.ndarray, height: int, width: int, p: dict,
                 seed: int) -> np.ndarray:
    """(T,C,h,w) noise: frame 0 drawn from ``seed``, carried along the forward flows at latent resolution (occluded
    pixels, whose flow is undefined, are left out of each latent cell's average)."""
    import torch

    from loom.geometry.noise import resize_flow, warp_noise

    h, w = height // p["downsample"], width // p["downsample"]
    g = torch.Generator().manual_seed(int(seed))
    flows = resize_flow(torch.from_numpy(np.ascontiguousarray(flow_fwd, dtype=np.float32)), (h, w),
                        valid=torch.from_numpy(~np.asarray(occluded, dtype=bool)))
    noise0 = torch.randn((p["channels"], h, w), generator=g)
    return warp_noise(noise0, flows, generator=g, upsample=p["upsample"]).numpy()


def render_entry(params: dict) -> dict:
    """Runs inside the sandbox: render the scene along the trajectory, add flow and warped noise, encode."""
    from loom.datasets.scene import encode_sample
    from loom.geometry.flow import sequence_flows

    t0 = time.monotonic()
    if params.get("backend") == "fake":
        from loom.render.fake import scene_frames

        res = scene_frames(params)
    else:
        from loom.render import hdri_path
        from loom.render.scene import render_scene

        res = render_scene({**params, "hdri_path": hdri_path(params["hdri"])})
    info = res.pop("info")
    timings = dict(info["timings"])
    t1 = time.monotonic()
    flows = sequence_flows(res["depth"], res["K"], res["c2w"], res["mask"])
    t2 = time.monotonic()
    noise = warped_noise(flows["flow_fwd"], flows["occlusion_fwd"], params["height"], params["width"], params["noise"], params["seed"])
    t3 = time.monotonic()
    arrays = {k: res[k] for k in ("rgb", "depth", "mask", "object_id", "edges", "K", "c2w")}
    arrays.update({k: flows[k] for k in ("flow_fwd", "flow_bwd", "flow_last_to_first", "occlusion_fwd",
                                         "occlusion_bwd")})
    arrays["noise"] = noise
    meta = {**params["meta"], "blender_version": info["blender_version"], "warnings": info["warnings"],
            "objects": info.get("objects", []), "edges_method": info.get("edges_method", ""),
            "edge_kinds": ["silhouette", "crease", "boundary", "intersection"],
            "crease_angle_deg": params["crease_angle_deg"],
            "lighting": {"hdri": params["hdri"], "strength": params["hdri_strength"],
                         "rotation": params["hdri_rotation"]}}
    files = encode_sample(arrays, meta, params.get("rgb_codec", "ffv1"))
    timings.update(flow=t2 - t1, noise=t3 - t2, encode=time.monotonic() - t3, task=time.monotonic() - t0)
    return {"files": files, "timings": timings, "warnings": info["warnings"]}


def job_spec(cfg: RenderSceneJob, records: list) -> JobSpec:
    if cfg.render.backend == "blender":
        check_hdris(cfg.lighting.hdris)
    K, c2w = sample_trajectory(cfg)
    chash = config_hash(cfg, exclude=NON_SAMPLE_FIELDS)
    tasks = []
    for rec in records:
        a = rec.to_dict()
        for v in range(cfg.lighting.variants):
            tasks.append(Task(key=f"{rec.uid}_v{v}", asset=a, params=task_params(cfg, a, v, chash, K, c2w),
                              frames=cfg.camera.frames))
    return JobSpec(
        kind="scene", entry="loom.corpora.scene:render_entry", tasks=tasks, out=cfg.out, config=to_dict(cfg),
        config_hash=chash, timeout_s=cfg.render.timeout_s, ray=cfg.ray,
        samples_per_shard=cfg.shards.samples_per_shard,
        env={"OMP_NUM_THREADS": str(cfg.ray.cpus_per_worker)},
        fetch="loom.corpora.settings:fetch_asset",
        preload=("bpy",) if cfg.render.backend == "blender" else (),
    )
