"""Scene videos from coarse geometry (VideoFrom3D sections 3.1-3.4): ``loom render scene``.

One task per (scene, lighting variant). The camera trajectory (a YAML/JSON keyframe file or a preset) is sampled
here, in the driver, into per-frame ``K`` and ``c2w``; the sandboxed Blender worker renders rgb, exact depth,
object ids and the four edge maps; then, still in the worker, the geometric flow between frames (each pixel's 3D
point reprojected into the other camera, with a depth test) and the warped noise (frame 0's Gaussian noise carried
along the flow at latent resolution). The job is the render-job base's
(``loom.corpora.base``); shards, manifests, resume and failure rows are ``loom.platform.jobs``'.
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar, Literal

import numpy as np

from loom.corpora.base import (
    EncodeSettings,
    LightingSettings,
    RenderJob,
    RenderSettings,
    RenderTask,
    common_fields,
    run_task,
    task_seed,
)
from loom.platform.config import config, field, recipe, require
from loom.platform.jobs import ShardSettings


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
class RenderSceneJob(RenderJob):
    KIND: ClassVar[str] = "scene"
    SOURCE: ClassVar[str] = "scene"
    NON_SAMPLE_FIELDS: ClassVar[tuple[str, ...]] = ("scene", "out", "ray", "shards", "price")

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

    def __post_init__(self):
        require(self.render.width % self.noise.downsample == 0 and self.render.height % self.noise.downsample == 0,
                "noise.downsample", self.noise.downsample, "must divide render.width and render.height")

    def task(self, asset: dict, variant: int, chash: str) -> SceneTask:
        seed = task_seed(self.seed, asset["sha256"], variant)
        rng = np.random.default_rng(seed)
        K, c2w = sample_trajectory(self)
        return SceneTask(**common_fields(self, asset, variant, seed, rng, chash, self.camera.frames),
                         K=K.tolist(), c2w=c2w.tolist(), trajectory=self.trajectory, edges=self.edges,
                         noise=self.noise, rgb_codec=self.encode.rgb_codec)


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class SceneTask(RenderTask):
    META: ClassVar[tuple[str, ...]] = ("lighting", "edges", "trajectory")

    K: list  # (T,3,3) intrinsics of the sampled trajectory
    c2w: list  # (T,4,4) OpenCV camera-to-world
    trajectory: str  # the keyframe file or preset they were sampled from
    edges: EdgeSettings
    noise: NoiseSettings
    rgb_codec: str


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


def render(params: dict) -> dict:
    if params["backend"] == "fake":
        from loom.render.fake import scene_frames

        return scene_frames(params)
    from loom.render.scene import render_scene

    return render_scene(params)


def to_arrays(params: dict, res: dict, info: dict, timings: dict) -> tuple[dict, dict]:
    """Add the geometric flow between frames and the warped noise to the render."""
    from loom.geometry.flow import sequence_flows

    t1 = time.monotonic()
    flows = sequence_flows(res["depth"], res["K"], res["c2w"], res["mask"])
    t2 = time.monotonic()
    noise = warped_noise(flows["flow_fwd"], flows["occlusion_fwd"], params["height"], params["width"],
                         params["noise"], params["seed"])
    timings.update(flow=t2 - t1, noise=time.monotonic() - t2)
    arrays = {k: res[k] for k in ("rgb", "depth", "mask", "object_id", "edges", "K", "c2w")}
    arrays.update({k: flows[k] for k in ("flow_fwd", "flow_bwd", "flow_last_to_first", "occlusion_fwd",
                                         "occlusion_bwd")})
    arrays["noise"] = noise
    return arrays, {"objects": info.get("objects", []), "edges_method": info.get("edges_method", ""),
                    "edge_kinds": ["silhouette", "crease", "boundary", "intersection"],
                    # Also in meta["edges"]; kept at the top level, where samples of earlier versions have it.
                    "crease_angle_deg": params["edges"]["crease_angle_deg"]}


def encode(arrays: dict, meta: dict, params: dict) -> dict[str, bytes]:
    from loom.datasets.scene import encode_sample

    return encode_sample(arrays, meta, params["rgb_codec"])


def render_entry(params: dict) -> dict:
    """The sandbox entry: render the scene along the trajectory, add flow and warped noise, encode."""
    return run_task(params, meta_fields=SceneTask.META, render=render, to_arrays=to_arrays, encode=encode)
