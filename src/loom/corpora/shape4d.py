"""Animated 4D corpus with aligned query points (ShapeGen4D sections 3.1 and 5.1): ``loom render 4d``.

One task per animated asset (and lighting variant of its conditioning video). Inside the sandboxed worker:

    Blender: import, confirm animation, evaluate T frames (root motion removed, one normalisation for the
             sequence), render the fixed-view RGBA conditioning video     -> vertices (T,N,3), faces, video
    numpy:   per frame: watertight mesh -> surface points + normals, sharp-edge points + normals, truncated SDF
             samples
             frame 0: aligned queries by FPS on the original mesh, carried to every frame by barycentrics
    encode:  loom.datasets.shape4d.encode_sample -> tar members

The job is the render-job base's (``loom.corpora.base``); shards, manifests, resume and failure rows are
``loom.platform.jobs``'.

Data that matches the base (ShapeGen4D 5.1: "since our model builds on Step1X-3D, we process the data to match
its distribution"). The shards are written in the released Step1X-3D VAE's own frame, so no caller rescales
anything and old corpora stay what they were (their ``half_extent``/``sdf_truncation`` are in their meta and
config.yaml):

- Box: every frame fits ``[-1, 1]^3`` (``sequence.half_extent=1``): Step1X-3D normalises shapes to [-1, 1]^3 and
  extracts meshes in +-1.05 (``loom.models.shape_vae.DEFAULT_BOUNDS``); Dora's sampler draws its volume points in
  +-1.05 (Dora ``sharp_edge_sampling/sharp_sample.py`` line 218), as `loom.geometry.mesh.sdf_samples` does.
  Corpora written before this (0.5 box) have ``meta["half_extent"] = 0.5``.
- Truncation: tau = 0.01 in those units (``points.sdf_truncation``), Step1X-3D's ``tsdf_threshold`` default
  (``step1x3d_geometry/data/base.py`` line 49). The release does not record the tau it was trained with: 0.01 is
  the documented choice (Dora used 0.015); ``model.tau`` of ``loom train vae`` must not exceed it (checked; the
  step clips the targets to tau, as Step1X-3D clips its stored SDF, base.py lines 189-195).
- Near-surface SDF samples: surface points plus Gaussian noise of sigma 0.001 (half) and 0.005 (half), Dora's
  ``coarse_near_surface_points`` (sharp_sample.py lines 212-215); Dora's extra sharp near-surface set is not
  stored: Step1X-3D's loader reads only ``volume_rand_points`` and ``near_surface_points`` (base.py lines
  164-168).
- Sharp-edge points: ``points.sharp_points`` (32,768, as many as surface points, as Step1X-3D feeds) per frame on
  the watertight mesh, `loom.geometry.sharp.sample_sharp_edges` (Dora's rule: edges over 15 degrees). A frame
  with no sharp edge gets uniform surface points instead (upstream drops such shapes; a sequence cannot drop a
  frame): ``meta["sharp_edges"]`` counts the sharp edges of every frame, 0 marks a fallback;
  ``points.sharp_fallback=error`` makes such an asset a failure row instead, as upstream. The watertight
  conversion leaves small creases: its mesh of a smooth sphere (radius 0.9, resolution 20,000) has 2,525 edges over
  15 degrees (measured), so the fallback is rare and smooth shapes get points on those creases, as Dora's own
  watertight meshes would.
- Lengths that depend on the box scale with it: ``points.inner_threshold`` 0.04 (the watertight offset is ~0.022
  at resolution 20,000 in this box, and stays below 0.02 at the default 10,000 on the bundled assets: median
  distance of the watertight vertices to the animated mesh 0.005-0.014 per frame at either resolution).

Root motion ("root-body motion is removed from the animation", 5.1): the root's translation since frame 0 is always
removed; ``animation.root_rotation`` says what of its rotation since frame 0 is removed too, about the root
(``loom.geometry.sequence.remove_root_transform``):

- ``none`` (default): nothing; a character that turns still turns, a tumbling object still tumbles. The default
  because (a) it is what Loom wrote before the option existed, and the section enters the config hash only when
  set, so a default that changed samples would mix two kinds under one hash on resume; (b) the paper removes
  "root-body motion" without naming rotation, its 4D metric registers a prediction with one similarity plus
  per-frame translations only, keeping "frame-wise rotation" (5.2), and it names rigid global rotations as a
  limitation (6): its sequences still contain them.
- ``yaw``: the heading (twist about +Z) since frame 0: walking and turning characters keep facing one way (the body
  turns under the fixed camera no more), their lean and bob stay. For character corpora (Mixamo-like walk cycles
  that wander).
- ``full``: all of it: the root keeps its frame-0 orientation; what is left is the motion relative to the root. For
  assets whose global spin or tumble is not wanted (a spinning prop, a rolling object). ``yaw`` refuses an asset
  whose root turns upside down (its heading is undefined): a failure row that names ``full``/``none``.

Every sample's meta holds ``root_offsets`` (T,3), ``root_rotations`` (T,3,3, the rotations removed; identity under
``none``), ``root_origin`` (3,) and ``root_rotation_mode``, in world units before ``normalization``, so the removal can
be undone (``restore_root_transform`` on the vertices after inverting ``normalization``). Corpora written before
this have only ``root_offsets``: their rotations are the identity.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import ClassVar, Literal

import numpy as np

from loom.corpora.base import (
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
class SequenceSettings:
    frames: int = field(16, help="frames sampled evenly over the animation's range")
    half_extent: float = field(1.0, help="every frame fits the box [-h, h]^3 (1: Step1X-3D's [-1, 1]^3, the frame "
                               "of its released VAE)")
    elevation: tuple[float, float] = field((0.0, 30.0), help="conditioning camera elevation in degrees, drawn "
                                           "from [min, max]; the azimuth is drawn from [0, 360)")
    fill: float = field(0.85, help="share of the frame the object spans (over the whole sequence)")

    def __post_init__(self):
        require(self.frames >= 2, "sequence.frames", self.frames, "must be >= 2")
        require(self.half_extent > 0, "sequence.half_extent", self.half_extent, "must be > 0")
        require(0 < self.fill <= 1, "sequence.fill", self.fill, "must be in (0, 1]")
        require(-90 <= self.elevation[0] <= self.elevation[1] <= 90, "sequence.elevation", self.elevation,
                "need -90 <= min <= max <= 90")


@config
class AnimationSettings:
    root_rotation: Literal["none", "yaw", "full"] = field("none", help="root rotation since frame 0 removed besides "
                                                          "its translation: 'none', 'yaw' (heading about +Z: turning "
                                                          "characters face one way) or 'full' (the root keeps its "
                                                          "frame-0 orientation); recorded in meta.root_rotations")


@config
class PointSettings:
    surface: int = field(32768, help="points (with normals) sampled on each frame's watertight surface")
    queries: int = field(1024, help="aligned query points per frame")
    query_candidates: int = field(32768, help="points sampled on the original frame-0 mesh before FPS")
    inner_threshold: float = field(0.04, help="candidates farther than this from the watertight surface are "
                                   "inner points and dropped before FPS (box units; above the watertight offset)")
    watertight_resolution: int = field(10000, help="resolution of the watertight conversion (point-cloud-utils' "
                                       "octree leaves; 20,000 before 2026-12: 3-10x slower on frames whose octree "
                                       "overshoots, see benchmarks/README.md render_4d.py --paths)")
    sdf_near: int = field(32768, help="SDF samples near the surface, per frame")
    sdf_volume: int = field(16384, help="SDF samples uniform in the box, per frame")
    sdf_truncation: float = field(0.01, help="signed distances are clipped to [-t, t] (box units; Step1X-3D's "
                                  "tsdf_threshold 0.01; must be >= the VAE's model.tau)")
    sdf_sigma: tuple[float, float] = field((0.001, 0.005), help="noise of the near-surface SDF samples, half with "
                                           "each (box units; Dora's 0.001 and 0.005)")
    sharp_points: int = field(32768, help="sharp-edge points (with normals) per frame on the watertight mesh, the "
                              "input of the Step1X-3D VAE's sharp branch (0 = none written)")
    sharp_angle: float = field(15.0, help="an edge is sharp when its two face normals differ by more than this "
                               "(degrees; Dora's 15)")
    sharp_fallback: Literal["surface", "error"] = field("surface", help="a frame with no sharp edge: 'surface' "
                                                        "samples its surface instead (recorded in meta.sharp_edges), "
                                                        "'error' makes the asset a failure row (upstream drops it)")

    def __post_init__(self):
        for name in ("surface", "queries", "query_candidates", "watertight_resolution"):
            require(getattr(self, name) >= 1, f"points.{name}", getattr(self, name), "must be >= 1")
        require(self.queries <= self.query_candidates, "points.queries", self.queries,
                "must not exceed points.query_candidates")
        require(self.sdf_near >= 0 and self.sdf_volume >= 0 and self.sdf_near + self.sdf_volume > 0,
                "points.sdf_near", (self.sdf_near, self.sdf_volume), "need a positive number of SDF samples")
        require(self.sdf_truncation > 0, "points.sdf_truncation", self.sdf_truncation, "must be > 0")
        require(len(self.sdf_sigma) == 2 and all(x > 0 for x in self.sdf_sigma), "points.sdf_sigma", self.sdf_sigma,
                "need two positive standard deviations")
        require(self.sharp_points >= 0, "points.sharp_points", self.sharp_points, "must be >= 0 (0 = off)")
        require(0 <= self.sharp_angle < 180, "points.sharp_angle", self.sharp_angle, "must be in [0, 180)")


@config
class Render4DJob(RenderJob):
    KIND: ClassVar[str] = "4d"
    NON_SAMPLE_FIELDS: ClassVar[tuple[str, ...]] = ("assets", "out", "limit", "ray", "shards", "price")
    OPTIONAL_SECTIONS: ClassVar[tuple[str, ...]] = ("animation",)  # hashed only when set (corpora before it resume)

    assets: str = field("bundled-animated", help="asset source (see loom.corpora.assets); 'bundled-animated' "
                        "makes Loom's own animated test assets")
    out: str = field("out/4d", help="output folder or fsspec URL for shards and manifests")
    limit: int | None = field(None, help="process only the first N assets (after sorting)")
    sequence: SequenceSettings = field(default_factory=SequenceSettings, help="frames and normalisation")
    animation: AnimationSettings = field(default_factory=AnimationSettings, help="root motion removal")
    points: PointSettings = field(default_factory=PointSettings, help="surface, query and SDF sampling")
    render: RenderSettings = field(default_factory=lambda: RenderSettings(width=512, height=512),
                                   help="conditioning video renderer")
    lighting: LightingSettings = field(default_factory=lambda: LightingSettings(variants=1),
                                       help="environment lighting of the conditioning video")
    shards: ShardSettings = field(default_factory=lambda: ShardSettings(samples_per_shard=8), help="sharding")

    def __post_init__(self):
        require(self.limit is None or self.limit >= 1, "limit", self.limit, "must be >= 1 or unset")

    def task(self, asset: dict, variant: int, chash: str) -> Task4D:
        seed = task_seed(self.seed, asset["sha256"], variant)
        rng = np.random.default_rng(seed)
        s = self.sequence
        camera = Camera(azimuth=float(rng.uniform(0, 2 * math.pi)),
                        elevation=math.radians(float(rng.uniform(*s.elevation))), fill=s.fill)
        return Task4D(**common_fields(self, asset, variant, seed, rng, chash, s.frames), half_extent=s.half_extent,
                      camera=camera, points=self.points, root_rotation=self.animation.root_rotation)


@recipe(Render4DJob, "default", help="the paper's settings: 16 frames, 32,768 surface and 32,768 sharp-edge points, "
        "1,024 queries, Step1X-3D's [-1, 1] box and tau 0.01")
def _default() -> Render4DJob:
    return Render4DJob()


@recipe(Render4DJob, "smoke", help="tiny: 4 frames, 64x64 video, 2,048 points, 256 sharp points, 128 queries, "
        "truncation 0.05 (tests and CI)")
def _smoke() -> Render4DJob:
    # A wider band (0.05, noise 0.01 / 0.04) than the paper's: few near samples, and it serves any model.tau <= 0.05.
    return Render4DJob(
        out="out/4d-smoke",
        sequence=SequenceSettings(frames=4),
        points=PointSettings(surface=2048, queries=128, query_candidates=4096, watertight_resolution=5000,
                             inner_threshold=0.1, sdf_truncation=0.05, sdf_sigma=(0.01, 0.04), sharp_points=256,
                             sdf_near=2048, sdf_volume=1024),
        render=RenderSettings(width=64, height=64, samples=4, timeout_s=300.0),
        shards=ShardSettings(samples_per_shard=2),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Camera:
    """The conditioning video's fixed camera (angles in radians): written into meta as ``camera``."""

    azimuth: float  # about +Z, from +X
    elevation: float
    fill: float  # share of the frame the sequence spans


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task4D(RenderTask):
    META: ClassVar[tuple[str, ...]] = ("lighting", "camera", "half_extent")

    half_extent: float  # every frame fits [-h, h]^3
    camera: Camera
    points: PointSettings
    root_rotation: str = "none"  # animation.root_rotation: "none" | "yaw" | "full"


def process_sequence(seq: dict, p: dict, seed: int, timings: dict[str, float], *, skip_far: bool = True,
                     watertight_out: list | None = None) -> dict[str, np.ndarray]:
    """Mesh processing of one extracted sequence: watertight meshes, surface, sharp-edge and SDF samples, aligned
    queries. ``p`` is the job's ``points`` section as a dict; ``sharp_points`` and ``sdf_sigma`` may be absent
    (callers from before them: no sharp points, `mesh.sdf_samples`' own sigma). With sharp points the result
    also holds ``sharp_surface`` (T,S',6) and ``sharp_edges`` (T,) int64 (sharp edges found per frame).

    ``skip_far=False`` computes every SDF distance exactly before clipping (the path before 2026-12; same values,
    slower); ``watertight_out``, a list, receives each frame's watertight ``(Vw, Fw)`` (benchmarks, tests)."""
    from loom.geometry import mesh, sharp

    rng = np.random.default_rng(seed)
    V, F = seq["vertices"].astype(np.float64), seq["faces"].astype(np.int64)
    n_sharp = int(p.get("sharp_points", 0))
    sigma = {"sigma": tuple(p["sdf_sigma"])} if p.get("sdf_sigma") is not None else {}
    surface, sharp_surface, sharp_edges, sdf_pts, sdf, water0 = [], [], [], [], [], None
    t_w = t_s = 0.0
    for t in range(V.shape[0]):
        t0 = time.perf_counter()
        Vw, Fw = mesh.make_watertight(V[t], F, resolution=p["watertight_resolution"])
        t1 = time.perf_counter()
        pts, nrm = mesh.sample_surface(Vw, Fw, p["surface"], rng)
        if n_sharp:
            sp_, sn_, found = sharp.sample_sharp_edges(Vw, Fw, n_sharp, rng,
                                                       angle_degrees=float(p.get("sharp_angle", 15.0)),
                                                       fallback=p.get("sharp_fallback", "surface"))
            sharp_surface.append(np.concatenate([sp_, sn_], axis=1))
            sharp_edges.append(found)
        sp, sd = mesh.sdf_samples(Vw, Fw, p["sdf_near"], p["sdf_volume"], rng, truncation=p["sdf_truncation"],
                                  half_extent=float(seq.get("half_extent", 0.5)), skip_far=skip_far, **sigma)
        t_s += time.perf_counter() - t1
        t_w += t1 - t0
        surface.append(np.concatenate([pts, nrm], axis=1))
        sdf_pts.append(sp)
        sdf.append(sd)
        if t == 0:
            water0 = (Vw, Fw)
        if watertight_out is not None:
            watertight_out.append((Vw, Fw))
    t0 = time.perf_counter()
    queries, faces, bary = mesh.aligned_queries(V, F, water0[0], water0[1], p["queries"], rng,
                                                inner_threshold=p["inner_threshold"],
                                                candidates=p["query_candidates"])
    timings.update(watertight=t_w, sampling=t_s + time.perf_counter() - t0)
    out = {"surface": np.stack(surface), "sdf_points": np.stack(sdf_pts), "sdf": np.stack(sdf),
           "queries": queries, "query_faces": faces, "query_bary": bary}
    if n_sharp:
        out.update(sharp_surface=np.stack(sharp_surface), sharp_edges=np.asarray(sharp_edges, dtype=np.int64))
    return out


def render(params: dict) -> dict:
    if params["backend"] == "fake":
        from loom.render.fake import arm_sequence

        return arm_sequence(params)
    from loom.render.anim import extract_sequence

    return extract_sequence(params)


def to_arrays(params: dict, seq: dict, info: dict, timings: dict) -> tuple[dict, dict]:
    arrays = process_sequence({**seq, "half_extent": params["half_extent"]}, params["points"], params["seed"],
                              timings)
    arrays.update(video=seq["video"], K=seq["K"], c2w=seq["c2w"])
    meta = {"frame_times": [float(x) for x in seq["frame_times"]], "normalization": info["normalization"],
            "root_offsets": info["root_offsets"], "root_rotations": info["root_rotations"],
            "root_origin": info["root_origin"], "root_rotation_mode": info["root_rotation_mode"],
            "animation": info["animation"], "mesh": info["mesh"],
            "sdf_truncation": float(params["points"]["sdf_truncation"])}
    found = arrays.pop("sharp_edges", None)
    if found is not None:
        meta["sharp_edges"] = [int(x) for x in found]
    return arrays, meta


def encode(arrays: dict, meta: dict, params: dict) -> dict[str, bytes]:
    from loom.datasets.shape4d import encode_sample

    return encode_sample(arrays, meta)


def render_entry(params: dict) -> dict:
    """The sandbox entry: extract the sequence, process its meshes, encode the sample."""
    return run_task(params, meta_fields=Task4D.META, render=render, to_arrays=to_arrays, encode=encode)
