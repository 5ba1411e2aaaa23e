"""Turntable-video corpus (TAPESTRY sections 3.1 and 4.1): ``loom render ttv``.

Each (asset, lighting variant) is one task: the asset is normalised into the unit sphere, given a random initial
rotation, lit by one of the environment maps with random strength and rotation, and rendered along a circular
orbit of N frames (radius r and height z drawn from ranges, FOV fitted to the object). A task's parameters are a
pure function of (asset sha256, variant, job seed), so a rerun renders the same sample.
"""

from __future__ import annotations

import dataclasses
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
from loom.geometry.camera import random_rotation
from loom.platform.config import ConfigError, config, field, recipe, require
from loom.platform.jobs import ShardSettings


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
class PassSettings:
    albedo: bool = field(False, help="also write the unlit diffuse colour (Cycles' Diffuse Color pass: the material's "
                         "base colour at the visible surface, sRGB over the background) as albedo.mkv (FFV1), for "
                         "checking back-projection and training or scoring texturing against albedo")
    partial: bool = field(False, help="also write known.npz, the partial-texture training target of TAPESTRY's "
                          "3D-aware inpainting: per pixel, whether the surface there was seen (facing, unoccluded) "
                          "along an earlier orbit with the object under another base rotation (one of texturing's "
                          "candidate tilts, drawn per sample), so the unknown part looks like real self-occlusion")
    partial_views: int = field(16, help="cameras of that earlier orbit (evenly spaced along the same circle; a second "
                               "geometry-only render of this many frames)")

    def __post_init__(self):
        require(self.partial_views >= 1, "passes.partial_views", self.partial_views, "must be >= 1")


@config
class EncodingSettings:
    geometry: Literal["auto", "precise", "model-input", "npz"] = field(
        "auto", help="how normal, position, depth and mask are stored (precision and sizes: loom.datasets.ttv): "
        "'precise' (15-bit fixed-point position, depth derived from it, 14-bit octahedral normals; ~0.3 MB per "
        "512x512 frame), 'model-input' (8-bit, what the video VAE sees; implies H.264 rgb whatever encode.rgb_codec "
        "says; ~0.1 MB), 'npz' (float16/float32 arrays, the layout of corpora begun before this setting; ~1.2 MB), "
        "or 'auto': 'precise' for a new --out, else the encoding of the samples already there")


def stored_geometry(out: str) -> str | None:
    """The geometry encoding of the samples already in ``out`` (the first sample of its first complete shard), or
    None where none is written yet. The shards, not plan.json or config.yaml: those are rewritten by every run."""
    from loom.datasets.ttv import geometry_encoding
    from loom.platform import shards, storage

    folder = storage.join(out, shards.SHARDS_DIR)
    if not storage.exists(folder):
        return None
    for name in sorted(n for n in storage.listdir(folder) if n.endswith(".tar")):
        if shards.read_sidecar(out, name) is not None:
            for _key, files in shards.iter_tar(shards.shard_url(out, name)):
                return geometry_encoding(files)
    return None


@config
class RenderTTVJob(RenderJob):
    KIND: ClassVar[str] = "ttv"
    # ``encoding`` decides how the samples are stored, not what is rendered: out of the hash like ``shards``, so a
    # corpus begun before the section existed keeps its hash and resumes. A rerun never mixes encodings in one
    # folder: ``geometry_encoding`` resolves 'auto' from the samples already there and refuses another explicit one.
    NON_SAMPLE_FIELDS: ClassVar[tuple[str, ...]] = ("assets", "out", "limit", "ray", "shards", "price", "encoding")
    OPTIONAL_SECTIONS: ClassVar[tuple[str, ...]] = ("passes",)  # hashed only when set (corpora before it resume)

    assets: str = field("bundled", help="asset source: 'bundled', a folder/URL of meshes, a manifest, or "
                        "'objaverse:...' (see loom.corpora.assets)")
    out: str = field("out/ttv", help="output folder or fsspec URL for shards and manifests")
    limit: int | None = field(None, help="render only the first N assets (after sorting)")
    orbit: OrbitSettings = field(default_factory=OrbitSettings, help="camera orbit")
    encode: EncodeSettings = field(default_factory=EncodeSettings, help="on-disk encoding")
    passes: PassSettings = field(default_factory=PassSettings, help="optional passes beyond the default sample")
    encoding: EncodingSettings = field(default_factory=EncodingSettings, help="how the geometry passes are stored")

    def __post_init__(self):
        require(self.limit is None or self.limit >= 1, "limit", self.limit, "must be >= 1 or unset")

    def geometry_encoding(self) -> str:
        """``encoding.geometry`` with 'auto' resolved against ``out`` (looked up once per config object): the
        encoding the tasks write. An explicit encoding other than that of the samples already in ``out`` is
        refused."""
        resolved = self.__dict__.get("_geometry")
        if resolved is None:
            stored, want = stored_geometry(self.out), self.encoding.geometry
            if stored is not None and want not in ("auto", stored):
                raise ConfigError(f"encoding.geometry={want!r}: {self.out} already holds turntable samples stored as "
                                  f"{stored!r}; rerun it with encoding.geometry=auto (or {stored}), or use a new "
                                  "--out", field="encoding.geometry")
            resolved = stored or ("precise" if want == "auto" else want)
            object.__setattr__(self, "_geometry", resolved)  # a cache, not a field: frozen config, same hash
        return resolved

    def task(self, asset: dict, variant: int, chash: str) -> TTVTask:
        """One (asset, variant): a pure function of (asset sha256, variant, job seed), and of the geometry encoding
        (:meth:`geometry_encoding`: with 'auto', that of the samples already in ``out``)."""
        seed = task_seed(self.seed, asset["sha256"], variant)
        rng = np.random.default_rng(seed)
        rot = random_rotation(rng) if self.orbit.random_rotation else np.eye(3)
        orbit = Orbit(radius=float(rng.uniform(*self.orbit.radius)), height=float(rng.uniform(*self.orbit.height)),
                      fov_margin=self.orbit.fov_margin)
        common = common_fields(self, asset, variant, seed, rng, chash, self.orbit.frames)
        partial = None
        if self.passes.partial:  # drawn last: the other draws (and so the render) are those without the pass
            from loom.geometry.texture import BASE_TILTS

            names = sorted(BASE_TILTS)
            partial = {"tilt": names[int(rng.integers(len(names)))], "views": self.passes.partial_views}
        geometry = self.geometry_encoding()
        # model-input stores rgb as H.264 too (8-bit lossy colour is what the VAE sees): the task says what is written
        rgb_codec = "h264" if geometry == "model-input" else self.encode.rgb_codec
        return TTVTask(**common, orbit=orbit, rotation=rot.tolist(), rgb_codec=rgb_codec,
                       albedo=self.passes.albedo, partial=partial, geometry=geometry)


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Orbit:
    """One task's camera circle (drawn from ``orbit.radius`` and ``orbit.height``): written into meta as
    ``orbit`` (with the frame count)."""

    radius: float
    height: float  # camera height z above the object's centre
    fov_margin: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class TTVTask(RenderTask):
    orbit: Orbit
    rotation: list  # 3x3 initial rotation of the asset
    rgb_codec: str
    albedo: bool  # also render and store the unlit diffuse colour (albedo.mkv)
    # known.npz: the earlier orbit's base tilt (a name of loom.geometry.texture.BASE_TILTS) and camera count; None: off
    partial: dict | None = None
    # how normal/position/depth/mask are stored (loom.datasets.ttv.GEOMETRY_ENCODINGS)
    geometry: str = "npz"


def render(params: dict) -> dict:
    if params["backend"] == "fake":
        from loom.render.fake import render_sphere

        return render_sphere(params)
    from loom.render.ttv import render_ttv

    return render_ttv(params)


def to_arrays(params: dict, rendered: dict, info: dict, timings: dict) -> tuple[dict, dict]:
    n = len(rendered["rgb"])  # the frames rendered (a dry run's calibration renders fewer)
    extra = {"normalization": info["normalization"], "fov_x": info["fov_x"], "orbit": {**params["orbit"], "frames": n}}
    if params.get("partial"):
        extra["partial"] = {**params["partial"], "known_fraction": info["partial"]["known_fraction"]}
    return rendered, extra


def encode(arrays: dict, meta: dict, params: dict) -> dict[str, bytes]:
    from loom.datasets.ttv import encode_sample

    return encode_sample(arrays, meta, params["rgb_codec"], params.get("geometry", "npz"))


def render_entry(params: dict) -> dict:
    """The sandbox entry: render one turntable task into tar members."""
    return run_task(params, meta_fields=TTVTask.META, render=render, to_arrays=to_arrays, encode=encode,
                    encodings=ENCODINGS, encoding=params.get("geometry", "npz"))


# What a dry run's calibration sizes (``run_task``'s ``encodings``): each geometry encoding with the rgb it writes.
ENCODINGS = {"precise": {"geometry": "precise"}, "model-input": {"geometry": "model-input", "rgb_codec": "h264"},
             "npz": {"geometry": "npz"}}
