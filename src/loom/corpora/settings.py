"""Settings shared by the render jobs (turntable videos, 4D sequences, scene videos)."""

from __future__ import annotations

from typing import Literal

from loom.platform.config import config, field, require


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
