"""``loom eval 4d``: ShapeGen4D Tab. 1 (Chamfer, IoU, F-score after registration) and Tab. 2 (LPIPS, CLIP, FVD on
renders).

Inputs. The ground truth is 4D shards (``loom render 4d``): per frame, ``surface`` holds points sampled on the
frame's watertight mesh with their outward normals, in the box ``[-h, h]^3`` (``meta["half_extent"]``). The
predictions are, per ground-truth key, a folder ``pred/<key>/`` of one mesh per frame, ``frame_000.obj``,
``frame_001.obj``, ... (``.obj``/``.ply``/``.off``/``.stl``, as ``loom generate 4d`` writes them), or, with ``run``,
the meshes that ``loom generate 4d`` makes from the sample's conditioning video into ``<out>/pred/<key>/``. A file
without faces is a point cloud (Gaussian-splat baselines): Chamfer and F-score only. When the prediction has fewer
frames than the ground truth, ``frame_select=uniform`` compares it with evenly spread ground-truth frames (what
``loom generate 4d --frames`` takes; automatic with ``run``); otherwise a mismatch is refused.

Per sequence (ShapeGen4D section 5.2):

1. Both sides are rescaled by ``scale_to / h`` (default: the ground-truth box becomes ``[-1, 1]^3``, where
   3DShape2VecSet's F-score threshold 0.02 applies; ``scale_to=0`` keeps the stored units).
2. ``pred_points`` points (default 100k) are sampled uniformly on each predicted mesh (seeded).
3. **Registration** (:func:`loom.eval.metrics.register_sequence`): a similarity from the first frame (grid search
   over azimuth, scale and translation by truncated Chamfer, then ICP) applied to every frame, plus a translation
   per frame. ``registration.enabled=false`` skips it (predictions already in the ground truth's frame).
4. Per frame: **Chamfer** (sum of the two mean Euclidean nearest-neighbour distances) and **F-score** at
   ``f_threshold`` between the registered prediction samples and the stored ground-truth surface points
   (:mod:`loom.eval.metrics.chamfer`, 3DShape2VecSet's definitions).
5. Per frame: **IoU** of occupancies on a ``iou_resolution^3`` grid (default 128^3) over the smallest cube that
   holds both shapes (1% margin). The prediction's occupancy is exact (ray parity of the registered mesh,
   :func:`loom.eval.metrics.occupancy_grid`); it needs a closed mesh, and a sequence with a non-watertight frame or
   a point cloud gets no IoU (as ShapeGen4D omits IoU for point-based baselines): the item's ``note`` says why and
   ``iou_items`` counts the sequences that have one. **The shards hold no ground-truth mesh**, only oriented
   surface samples, so the ground truth's occupancy comes from them
   (:func:`loom.eval.metrics.iou.occupancy_from_oriented_points`): a cell centre is inside when its
   distance-weighted signed distance to the tangent planes of its 8 nearest samples is negative. Against the
   exact occupancy of the mesh the samples came from this agrees to IoU > 0.99 at 128^3 with the shards' 32,768
   samples per frame, every differing cell within 2 cells of the surface (tested on a sphere, a box and a thin
   plate), which bounds what a perfect prediction can score.

Steps 2 to 5 are :func:`loom.eval.metrics.sequence.score_sequence` (no Blender); this module reads the files,
rescales, renders and aggregates. The sequence's values are means over its frames; the benchmark's are means over
sequences. A sequence that cannot be evaluated (an unreadable or empty mesh) is a row with its ``error``, counted
by the metric ``failed`` and left out of the means; a missing prediction folder stops the job.

**Renders** (Tab. 2, "aligned" rendering metrics), from one of two sources:

- ``render.enabled=true``: Loom renders each registered predicted sequence itself, with Blender
  (:class:`loom.corpora.meshes.MeshRenderer` runs :mod:`loom.render.meshes` in a sandboxed child process), from
  the shard's own cameras (``K``, ``c2w`` of the compared frames) at the video's resolution. The registration of
  step 3 puts the prediction in the ground truth's frame, so the render is aligned with the conditioning video as
  ShapeGen4D's "Aligned" columns are. Loom's predictions carry no texture (ShapeGen4D textures its meshes with a
  separate model), so ``render.shading`` says how they look: ``projected`` (default) paints every vertex with the
  conditioning frame's colour at the pixel it projects to (``render.outside``, grey by default, where it projects
  outside the object or the image): seen from that same camera this is exactly the input painted onto the
  predicted surface (an occluded vertex takes its occluder's colour but is itself hidden in this view), so the
  metrics measure how well the predicted shape covers the object's pixels, not a texture model; ``clay`` renders
  a grey diffuse surface under Blender's bundled ``render.hdri``; ``textured`` is what ShapeGen4D renders for
  Tab. 2: the prediction AS GENERATED goes through appendix A (`loom.inference.shape4d_video.texture_sequence`:
  posed to the conditioning video from the shard's camera and frame 1, made topology-consistent, textured from
  frame 1) and Loom's torch rasteriser renders the textured sequence from the shard's cameras (no Blender; rows
  gain ``textured_reg_scale`` and ``textured_coverage``). A point-cloud prediction is not rendered (its
  row says so) and the rendering metrics are means over the rendered sequences (``render_items``). Per item
  ``render_mask_iou``: the IoU of the rendered and the ground-truth alpha masks (alpha >= 0.5).
- ``renders=DIR``: ``DIR/<key>.mp4`` (or ``.mkv``), the predictions rendered by the user from the ground truth's
  camera.

Against ``gt_renders/<key>.mp4`` or by default the shard's conditioning video, both composited over
``background``: LPIPS (mean over frames, then sequences), CLIP (cosine of CLIP image embeddings of each frame and
its ground truth, the papers' [0, 1] scale) and FVD (I3D statistics over all sequences; at least 2 sequences of 9
frames, else it is left out and the run's notes and the console say why), logged as ``render/lpips``,
``render/clip``, ``render/fvd``. DreamSim (the paper's fourth column) needs
weights no registry ships; it is not computed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from loom.corpora.meshes import MeshRenderer, projected_colours
from loom.datasets.transforms import composite
from loom.eval.benchmarks import (check_eval_ray, eval_ray, EvalTracking, FeatureSettings, Features, Generated,
                                  find_video, merge_stats, read_video, run_parts, to_unit, warn_if_tiny, where,
                                  write_media)
from loom.inference.shape4d import FRAME_FILE as _FRAME
from loom.inference.shape4d import SEQUENCE_MESH_EXTS, read_mesh
from loom.inference.shape4d import frame_files as _frame_files
from loom.platform.ray import RaySettings
from loom.platform.config import config, field, recipe, require

if TYPE_CHECKING:  # the metrics package loads torch: imported where a sequence is scored
    from loom.eval.metrics.sequence import SequenceScores

METRICS = ("chamfer", "iou", "f_score")  # = loom.eval.metrics.sequence.METRICS (importing it here loads torch)
RENDER_METRICS = ("lpips", "clip", "fvd")
MESH_EXTS = SEQUENCE_MESH_EXTS


@config
class RegistrationSettings:
    enabled: bool = field(True, help="register each predicted sequence to the ground truth first (ShapeGen4D 5.2)")
    azimuths: int = field(24, help="azimuth steps of the first-frame grid search (about the up axis, Z)")
    scales: tuple[float, ...] = field((0.8, 0.9, 1.0, 1.1, 1.25), help="relative scales of the grid search")
    translation_step: float = field(0.1, help="translation offsets of the grid search, x the RMS radius")
    truncation: float = field(0.1, help="truncated-Chamfer and ICP pair distance, x the RMS radius")
    points: int = field(2048, help="points per frame used by the registration")
    icp_iterations: int = field(30, help="ICP iterations (similarity, then per-frame translation)")

    def __post_init__(self):
        require(self.azimuths >= 1, "registration.azimuths", self.azimuths, "must be at least 1")
        require(len(self.scales) > 0 and all(s > 0 for s in self.scales), "registration.scales", self.scales,
                "must be positive")
        require(self.points >= 16, "registration.points", self.points, "must be at least 16")


@config
class PredictionRenderSettings:  # the section `render`: how Loom renders the predictions (not a corpus render job)
    enabled: bool = field(False, help="render the registered predictions with Blender from the shards' cameras "
                          "for the rendering metrics (ShapeGen4D Tab. 2); needs the render extra (bpy)")
    shading: Literal["projected", "clay", "textured"] = field("projected", help="'projected': vertices painted "
                                                              "with the conditioning frame's colours; 'clay': grey "
                                                              "under an HDRI (both Blender); 'textured': ShapeGen4D's "
                                                              "appendix A (pose registered to the video, topology-"
                                                              "consistent, textured from frame 1; Loom's torch "
                                                              "rasteriser, no Blender)")
    fast: bool = field(False, help="textured: the small registration and tracking settings (a quick look; tests)")
    texture_resolution: int = field(512, help="textured: texture size in texels")
    similarity: Literal["dino", "iou"] = field("iou", help="textured: how registration compares renders with the "
                                               "frame ('dino' needs model.image_encoder of a run: with pred "
                                               "folders, 'iou')")
    outside: tuple[float, float, float] = field((0.5, 0.5, 0.5), help="sRGB of vertices that project outside "
                                                "the object or the image (projected shading)")
    samples: int = field(8, help="Cycles samples per pixel")
    hdri: str = field("studio", help="environment map of clay shading: a bundled name or an .exr path")
    device: Literal["CPU", "GPU"] = field("CPU", help="Cycles device")
    threads: int = field(0, help="Blender render threads (0 = all cores; with parallel workers, their CPUs)")
    timeout_s: float = field(600.0, help="seconds one sequence may take to render before it fails")

    def __post_init__(self):
        require(self.samples >= 1, "render.samples", self.samples, "must be at least 1")
        require(all(0 <= c <= 1 for c in self.outside), "render.outside", self.outside, "RGB values in [0,1]")
        require(self.timeout_s > 0, "render.timeout_s", self.timeout_s, "must be positive")


@config
class Tracking4D(EvalTracking):
    experiment: str = field("bench/4d", help="MLflow experiment (`loom leaderboard 4d` reads it)")


@config
class Eval4DJob:
    gt: str = field("", help="ground truth: 4D shards (`loom render 4d` output folder, a shard or a URL)")
    pred: str = field("", help="predictions: a folder with one folder per ground-truth key of frame_000.obj, ...")
    run: str = field("", help="or a `loom train shape4d` run folder: generate the meshes into <out>/pred")
    renders: str = field("", help="folder of <key>.mp4 renders of the predictions from the ground truth's camera "
                         "(enables the rendering metrics, ShapeGen4D Tab. 2; or let Loom render: render.enabled)")
    render: PredictionRenderSettings = field(default_factory=PredictionRenderSettings, help="Loom's own renders of "
                                             "the predictions (rendering metrics without a renders folder)")
    gt_renders: str = field("", help="folder of <key>.mp4 ground-truth renders ('' = the shards' conditioning "
                            "video over background)")
    background: tuple[float, float, float] = field((1.0, 1.0, 1.0), help="RGB in [0,1] under the shards' video")
    out: str = field("out/eval-4d", help="output folder: config.yaml, metrics.json, items.csv, frames.csv, media/")
    model: str = field("", help="model name in the leaderboard (default: the run's or the pred folder's name)")
    metrics: tuple[str, ...] = field(METRICS, help="geometric metrics, of chamfer, iou, f_score")
    render_metrics: tuple[str, ...] = field(RENDER_METRICS, help="rendering metrics (with renders), of lpips, "
                                            "clip, fvd")
    scale_to: float = field(1.0, help="rescale so the ground-truth box [-h,h]^3 becomes [-s,s]^3 (0 = as stored)")
    pred_points: int = field(100_000, help="points sampled on each predicted mesh (3DShape2VecSet: 100k)")
    f_threshold: float = field(0.02, help="F-score distance threshold (after rescaling)")
    iou_resolution: int = field(128, help="occupancy grid resolution of IoU")
    frame_select: Literal["same", "uniform"] = field("same", help="'same': prediction and ground truth have one "
                                                     "frame count; 'uniform': compare with evenly spread "
                                                     "ground-truth frames (automatic with run)")
    registration: RegistrationSettings = field(default_factory=RegistrationSettings, help="similarity registration")
    limit: int = field(0, help="evaluate the first N ground-truth sequences (0 = all)")
    media: int = field(4, help="pred | gt point renders (and render videos) logged for the first N sequences")
    steps: int = field(0, help="with run: sampler steps (0 = the run's)")
    baseline: Literal["", "step1x3d", "step1x3d-shared"] = field("", help="with run: generate Tab. 1's baseline "
                                                                "instead, the run's base without its "
                                                                "spatiotemporal layers per frame on independent "
                                                                "(step1x3d) or shared (step1x3d-shared) noise")
    seed: int = field(0, help="seed of the surface sampling, the registration and (with run) the generation")
    features: FeatureSettings = field(default_factory=FeatureSettings, help="feature networks (LPIPS, CLIP, I3D)")
    ray: RaySettings = field(default_factory=eval_ray, help="Ray: workers sharing the sequences (1 = in this process)")
    tracking: Tracking4D = field(default_factory=Tracking4D, help="MLflow")

    def __post_init__(self):
        check_eval_ray(self.ray)
        for name, allowed in (("metrics", METRICS), ("render_metrics", RENDER_METRICS)):
            bad = sorted(set(getattr(self, name)) - set(allowed))
            require(not bad, name, list(getattr(self, name)), f"choose from {list(allowed)}")
        require(len(self.metrics) + len(self.render_metrics) > 0, "metrics", list(self.metrics), "nothing to compute")
        require(not (self.pred and self.run), "pred", self.pred, "give predictions (pred) or a run, not both")
        require(not self.baseline or self.run, "baseline", self.baseline, "generates from a run: pass --run")
        require(not (self.renders and self.render.enabled), "renders", self.renders,
                "give a renders folder or render.enabled=true, not both")
        require(self.scale_to >= 0, "scale_to", self.scale_to, "must be >= 0")
        require(self.pred_points >= 16, "pred_points", self.pred_points, "must be at least 16")
        require(self.f_threshold > 0, "f_threshold", self.f_threshold, "must be positive")
        require(self.iou_resolution >= 8, "iou_resolution", self.iou_resolution, "must be at least 8")
        require(all(0 <= c <= 1 for c in self.background), "background", self.background, "RGB values in [0,1]")
        for name in ("limit", "media", "steps"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")


@recipe(Eval4DJob, "default", help="ShapeGen4D Tab. 1/2: 100k points, 128^3 IoU, real LPIPS, CLIP and I3D")
def _default() -> Eval4DJob:
    return Eval4DJob()


@recipe(Eval4DJob, "tiny", help="10k points, 64^3 IoU, tiny random LPIPS/CLIP/I3D on CPU: NOT comparable (tests)")
def _tiny() -> Eval4DJob:
    return Eval4DJob(pred_points=10_000, iou_resolution=64, features=FeatureSettings(networks="tiny-random",
                                                                                     device="cpu"))


# ------------------------------------------------------------------------------------------------ predictions


def _generate(cfg: Eval4DJob, key: str, folder: str) -> None:
    from loom.inference.shape4d import generate_4d  # the `loom generate 4d` of the trained run

    generate_4d(cfg.run, cfg.gt, folder, key=key, steps=cfg.steps or None, seed=cfg.seed,
                baseline=cfg.baseline or None)


def _ensure_generated(cfg: Eval4DJob, key: str, folder: str, done: Generated) -> None:
    """With ``run``: generate the sequence's meshes, unless an earlier evaluation with the same settings did."""
    if done.has(key) and _frame_files(folder):
        return
    done.forget(key)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if _FRAME.match(name):  # frames of another generation must not mix with this one's
            os.remove(os.path.join(folder, name))
    _generate(cfg, key, folder)
    done.mark(key)


def _compared_frames(cfg: Eval4DJob, folder: str, key: str, t_gt: int, t_pred: int) -> np.ndarray:
    """The ground-truth frame that each predicted frame is compared with (a mismatch stops the job)."""
    from loom.datasets.transforms import frame_indices

    select = "uniform" if cfg.run else cfg.frame_select
    if t_pred == t_gt:
        return np.arange(t_gt)
    if select == "uniform" and t_pred < t_gt:
        return frame_indices(t_gt, t_pred, "uniform")
    raise ValueError(f"{folder}: {t_pred} predicted frames but the ground truth {key} has {t_gt}"
                     + ("" if t_pred > t_gt else "; --set frame_select=uniform compares with evenly spread "
                        "ground-truth frames"))  # fmt: skip


def _scale_factor(cfg: Eval4DJob, key: str, meta: dict[str, Any]) -> float:
    """What both sides are multiplied by: ``scale_to / half_extent``, or 1 with ``scale_to=0``."""
    half = float(meta.get("half_extent", 0.0))
    if cfg.scale_to and not half > 0:
        raise ValueError(f"{key}: the sample's meta has no half_extent to rescale by; --set scale_to=0")
    return cfg.scale_to / half if cfg.scale_to else 1.0


# ------------------------------------------------------------------------------------------------ geometry


@dataclasses.dataclass(frozen=True)
class _Scored:
    """One sequence after the geometric metrics, in the evaluation's units (the files' times ``factor``)."""

    key: str
    idx: np.ndarray  # (T,) the ground-truth frame of each predicted frame
    factor: float
    pred: list[tuple[np.ndarray, np.ndarray | None]]  # per predicted frame: vertices, faces (None: point cloud)
    gt_points: list[np.ndarray]  # (S,3) ground-truth surface samples of the compared frames
    scores: SequenceScores


def _registration_args(r: RegistrationSettings) -> dict[str, Any] | None:
    if not r.enabled:
        return None
    return {"truncation": r.truncation, "n_points": r.points, "icp_iterations": r.icp_iterations,
            "azimuths": r.azimuths, "scales": r.scales, "translation_step": r.translation_step}  # fmt: skip


def _score(cfg: Eval4DJob, key: str, files: list[str], surface: np.ndarray, idx: np.ndarray,
           factor: float) -> _Scored:  # fmt: skip
    """Read, rescale and score one predicted sequence; a ValueError is this sequence's failure, not the job's."""
    from loom.eval.metrics.sequence import score_sequence

    pred = [(v * factor, f) for v, f in (read_mesh(f) for f in files)]
    gt_p = [surface[j, :, :3].astype(np.float64) * factor for j in idx]  # surface: (T,S,6) points, normals
    gt_n = [surface[j, :, 3:6].astype(np.float64) for j in idx]
    scores = score_sequence(pred, gt_p, gt_n, registration=_registration_args(cfg.registration),
                            metrics=cfg.metrics, points=cfg.pred_points, f_threshold=cfg.f_threshold,
                            iou_resolution=cfg.iou_resolution, seed=cfg.seed)  # fmt: skip
    return _Scored(key=key, idx=idx, factor=factor, pred=pred, gt_points=gt_p, scores=scores)


def _geometry_row(seq: _Scored) -> dict[str, Any]:
    """The sequence's row in items.csv: the metrics' means over its frames, the registration found, a note."""
    row: dict[str, Any] = {"key": seq.key, "frames": len(seq.pred), **seq.scores.means()}
    if seq.scores.registration is not None:
        sim = seq.scores.registration.similarity
        row.update(reg_scale=float(sim.scale), reg_azimuth_deg=sim.azimuth_deg)
    if seq.scores.note:
        row["note"] = seq.scores.note
    return row


def splat(points: np.ndarray, lo: np.ndarray, half: float, size: int = 128, colour=(0.9, 0.5, 0.2),
          azimuth: float = 35.0, elevation: float = 20.0) -> np.ndarray:  # fmt: skip
    """A (size,size,3) uint8 orthographic view of a point cloud (2x2-pixel splats, z-buffered, shaded by depth)
    of the cube centred at ``lo`` with half side ``half``: enough to see pred against gt side by side."""
    a, e = np.radians(azimuth), np.radians(elevation)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(e), -np.sin(e)], [0, np.sin(e), np.cos(e)]])
    q = (np.asarray(points, np.float64) - lo) @ (rx @ rz).T / (half * np.sqrt(3))  # x right, y depth, z up
    img = np.full((size, size, 3), 255, np.uint8)
    u = np.clip(((q[:, 0] + 1) / 2 * (size - 2)).astype(int), 0, size - 2)
    v = np.clip(((1 - q[:, 2]) / 2 * (size - 2)).astype(int), 0, size - 2)
    order = np.argsort(-q[:, 1])  # far (large y) first, near last: the nearest write wins
    shade = (0.45 + 0.55 * (1 - (q[:, 1] + 1) / 2)).clip(0.2, 1.0)
    rgb = (np.asarray(colour)[None] * shade[:, None] * 255).astype(np.uint8)
    for du in (0, 1):
        for dv in (0, 1):
            img[v[order] + dv, u[order] + du] = rgb[order]
    return img


def _point_media(media_dir: str, seq: _Scored) -> list:
    """Registered prediction samples | ground-truth samples, one frame per compared frame."""
    lo = np.min([g.min(0) for g in seq.gt_points], 0)
    hi = np.max([g.max(0) for g in seq.gt_points], 0)
    c, hw = 0.5 * (lo + hi), 0.6 * float((hi - lo).max())
    pv = np.stack([splat(p, c, hw) for p in seq.scores.samples])
    gv = np.stack([splat(g, c, hw, colour=(0.2, 0.45, 0.9)) for g in seq.gt_points])
    return write_media(media_dir, f"{seq.key}-points", pv, gv, fps=4)


# ------------------------------------------------------------------------------------------------ renders


def _renders(cfg: Eval4DJob) -> bool:
    return (bool(cfg.renders) or cfg.render.enabled) and len(cfg.render_metrics) > 0


def _renderer(cfg: Eval4DJob, rank: int, parts: int) -> MeshRenderer | None:
    """Part ``rank``'s own Blender (``render.enabled``), or None."""
    if not (_renders(cfg) and cfg.render.enabled) or cfg.render.shading == "textured":
        return None
    r = cfg.render
    threads = r.threads
    if parts > 1 and threads == 0:  # N workers on one machine: Blender's "all cores" each would oversubscribe
        threads = max(1, int(cfg.ray.cpus_per_worker))
    return MeshRenderer(os.path.join(os.path.abspath(cfg.out), "render-scratch", str(rank)), samples=r.samples,
                        hdri=r.hdri, device=r.device, threads=threads, timeout_s=r.timeout_s)  # fmt: skip


def _render_prediction(cfg: Eval4DJob, renderer: MeshRenderer, seq: _Scored, sample: dict[str, Any]) -> np.ndarray:
    """Loom's render of the registered prediction from the shard's cameras of the compared frames: (T,H,W,4)
    uint8."""
    video, K, c2w = sample["video"][seq.idx], sample["K"][seq.idx], sample["c2w"][seq.idx]
    # back to the shard's units, where its cameras are
    meshes = [(v / seq.factor, f) for v, (_, f) in zip(seq.scores.vertices, seq.pred, strict=True)]
    colours = None
    if cfg.render.shading == "projected":
        colours = [projected_colours(v, K[t], c2w[t], video[t], cfg.render.outside) for t, (v, _) in enumerate(meshes)]
    return renderer.render(meshes, K, c2w, video.shape[2], video.shape[1], colours=colours)


def _textured_prediction(cfg: Eval4DJob, seq: _Scored, sample: dict[str, Any], row: dict[str, Any]) -> np.ndarray:
    """ShapeGen4D's renders (Tab. 2): the prediction as generated (not the Tab. 1 registration to the ground truth)
    posed to the conditioning video by appendix A.1 from the shard's camera and frame 1, made topology-consistent,
    textured from frame 1 (`loom.inference.shape4d_video.texture_sequence`), rendered from the shard's cameras of
    the compared frames: (T,H,W,4) uint8. Adds the registration's scale and the texture's coverage to the row."""
    from loom.inference.shape4d_video import Video4DSettings, render_textured, texture_sequence

    r = cfg.render
    video, K, c2w = sample["video"][seq.idx], sample["K"][seq.idx], sample["c2w"][seq.idx]
    meshes = [(v / seq.factor, f) for v, f in seq.pred]  # the files' own units and pose: the shard's cameras' units
    st = Video4DSettings(fast=r.fast, texture_resolution=r.texture_resolution, similarity=r.similarity, turntable=0,
                         size=max(video.shape[1:3]))
    done = texture_sequence(meshes, video, K[0], c2w[0], st, seed=cfg.seed)
    row.update(textured_reg_scale=float(done.registration["scale"]), textured_coverage=done.coverage_frame1)
    h, w = video.shape[1:3]
    return np.stack([render_textured(done.vertices[t], done.faces, done.uv, done.texture, K[t], c2w[t], (h, w))[0]
                     for t in range(len(video))])


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a >= 128, b >= 128
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def _prediction_video(cfg: Eval4DJob, renderer: MeshRenderer | None, seq: _Scored, sample: dict[str, Any],
                      row: dict[str, Any]) -> tuple[np.ndarray, str] | None:  # fmt: skip
    """The prediction's video for the rendering metrics and what to call it in errors: Loom's render (adding
    ``render_mask_iou`` to the row; None, with a note, for a point cloud) or the user's ``renders`` file."""
    textured = cfg.render.enabled and cfg.render.shading == "textured"
    if renderer is None and not textured:
        path = find_video(cfg.renders, seq.key)
        if path is None:
            raise FileNotFoundError(f"{cfg.renders} has no render of {seq.key} (<key>.mp4 or .mkv)")
        return read_video(path), path
    if any(f is None for _, f in seq.pred):
        row["note"] = "; ".join(filter(None, [row.get("note"), "not rendered: a point cloud"]))
        return None
    rgba = _textured_prediction(cfg, seq, sample, row) if textured else _render_prediction(cfg, renderer, seq, sample)
    row["render_mask_iou"] = float(np.mean([_mask_iou(rgba[t, ..., 3], sample["video"][j, ..., 3])
                                            for t, j in enumerate(seq.idx)]))  # fmt: skip
    return composite(rgba, cfg.background), f"Loom's render of {seq.key}"


def _gt_video(cfg: Eval4DJob, seq: _Scored, sample: dict[str, Any], video_frames: int) -> np.ndarray:
    """The ground truth the prediction's video is compared with: ``gt_renders/<key>`` or the shard's conditioning
    video over ``background``, cut to the compared frames when the prediction has one video frame per frame."""
    if cfg.gt_renders:
        path = find_video(cfg.gt_renders, seq.key)
        if path is None:
            raise FileNotFoundError(f"{cfg.gt_renders} has no ground-truth render of {seq.key} (<key>.mp4)")
        gt_v = read_video(path)
    else:
        gt_v = composite(sample["video"], cfg.background)
    if len(gt_v) != video_frames and video_frames == len(seq.idx) and len(gt_v) == len(sample["surface"]):
        gt_v = gt_v[seq.idx]
    return gt_v


def _render_metrics(cfg: Eval4DJob, features: Features, key: str, pred_v: np.ndarray, gt_v: np.ndarray,
                    path: str, row: dict[str, Any], stats: dict[str, Any]) -> None:  # fmt: skip
    from loom.eval.metrics import lpips
    from loom.eval.metrics.fvd import video_stats

    if pred_v.shape != gt_v.shape:
        raise ValueError(f"{path}: render of (T,H,W,C)={pred_v.shape} but the ground truth of {key} is {gt_v.shape}")
    p, g = to_unit(pred_v), to_unit(gt_v)
    if "lpips" in cfg.render_metrics:
        row["render/lpips"] = lpips(p, g, network=features.get("lpips"), batch_size=cfg.features.batch_size)
    if "clip" in cfg.render_metrics:
        net, dev, bs = features.get("clip"), features.device, cfg.features.batch_size
        cos = [(net.image_embeds(p[i : i + bs].to(dev)) * net.image_embeds(g[i : i + bs].to(dev))).sum(-1).cpu()
               for i in range(0, len(p), bs)]  # fmt: skip
        row["render/clip"] = float(np.mean(np.maximum(np.concatenate([c.numpy() for c in cos]), 0.0)))
    if "fvd" in cfg.render_metrics:
        from loom.eval.networks.i3d import MIN_FRAMES

        if len(p) < MIN_FRAMES:  # I3D's minimum: this sequence cannot enter FVD (said in the run's notes)
            stats["short"] = stats.get("short", 0) + 1
            return
        i3d = features.get("i3d")
        for side, v in (("pred", p), ("gt", g)):
            s = video_stats(v[None], i3d, 1)
            stats[side] = s if stats.get(side) is None else stats[side].merge(s)


# ------------------------------------------------------------------------------------------------ job


def evaluate_part(cfg: Eval4DJob, rank: int, parts: int) -> dict[str, Any]:
    """The sequences ``rank``, ``rank + parts``, ... (see :func:`loom.eval.benchmarks.run_parts`): rows, per-frame
    rows, media, render statistics and the keys without a prediction."""
    renderer = _renderer(cfg, rank, parts)
    try:
        return _evaluate_part(cfg, rank, parts, Features(cfg.features), renderer)
    finally:
        if renderer is not None:
            renderer.close()


def _sample_keys(cfg: Eval4DJob) -> tuple[str, ...]:
    """The shard arrays a part reads: the surface samples, and the video (with its cameras) that renders need."""
    if _renders(cfg) and cfg.render.enabled:
        return ("surface", "video", "K", "c2w")
    if _renders(cfg) and not cfg.gt_renders:
        return ("surface", "video")
    return ("surface",)


def _evaluate_part(cfg: Eval4DJob, rank: int, parts: int, features: Features,
                   renderer: MeshRenderer | None) -> dict[str, Any]:  # fmt: skip
    from loom.datasets.shape4d import iter_samples
    from loom.platform import storage

    out = os.path.abspath(cfg.out)
    pred_dir = os.path.join(out, "pred") if cfg.run else cfg.pred
    media_dir = os.path.join(out, "media")
    items, frames_rows, media, missing = [], [], [], []
    stats: dict[str, Any] = {}
    done = Generated(pred_dir, cfg.run, bench="4d", steps=cfg.steps, seed=cfg.seed,
                     **({"baseline": cfg.baseline} if cfg.baseline else {})) if cfg.run else None
    for s in iter_samples(cfg.gt, keys=_sample_keys(cfg), part=(rank, parts)):
        i, key = s["__index__"], s["__key__"]
        if cfg.limit and i >= cfg.limit:
            break
        folder = storage.join(pred_dir, key)
        if done is not None:
            _ensure_generated(cfg, key, folder, done)
        files = _frame_files(folder)
        if not files:
            missing.append((i, key))
            continue
        idx = _compared_frames(cfg, folder, key, len(s["surface"]), len(files))
        factor = _scale_factor(cfg, key, s["meta"])
        try:
            seq = _score(cfg, key, files, s["surface"], idx, factor)
        except ValueError as e:
            items.append((i, {"key": key, "frames": len(files), "error": str(e)}))
            print(f"FAILED {key}: {e}", flush=True)
            continue
        frames_rows.append((i, [{"key": key, "gt_frame": int(idx[fr["frame"]]), **fr} for fr in seq.scores.frames]))
        row = _geometry_row(seq)
        video = _prediction_video(cfg, renderer, seq, s, row) if _renders(cfg) else None
        if video is not None:
            pred_v, name = video
            gt_v = _gt_video(cfg, seq, s, len(pred_v))
            _render_metrics(cfg, features, key, pred_v, gt_v, name, row, stats)
            row["rendered"] = True
            if i < cfg.media:
                media += write_media(media_dir, f"{key}-render", pred_v, gt_v)
        if i < cfg.media:
            media += _point_media(media_dir, seq)
        items.append((i, row))
        print(f"{key}: " + ", ".join(f"{m} {row[m]:.4f}" for m in METRICS if m in row), flush=True)
    return {"items": items, "frames": frames_rows, "media": media, "missing": missing, "stats": stats,
            "reused": done.reused if done else 0}


def evaluate(cfg: Eval4DJob) -> dict[str, Any]:
    """Run the benchmark, write ``cfg.out``, log the MLflow run; returns :func:`loom.eval.record.finish`'s dict."""
    from loom.eval.record import Evaluation, finish

    if not cfg.gt:
        raise ValueError("no ground truth: pass --gt SHARDS (4D shards from `loom render 4d`)")
    if not (cfg.pred or cfg.run):
        raise ValueError("no predictions: pass --pred FOLDER (<key>/frame_000.obj ...) or --run TRAIN_RUN")
    out = os.path.abspath(cfg.out)
    features = Features(cfg.features)
    renders = _renders(cfg)
    if renders:
        features.check([{"lpips": "lpips", "clip": "clip", "fvd": "i3d"}[m] for m in cfg.render_metrics])
        warn_if_tiny(features)
    if renders and cfg.render.enabled and cfg.render.shading != "textured":
        MeshRenderer.check("render.enabled=true renders the predictions with Blender",
                           "Or pass --renders DIR, or --set render.enabled=false")
    pred_dir = os.path.join(out, "pred") if cfg.run else cfg.pred
    media_dir = os.path.join(out, "media")
    if os.path.isdir(media_dir):
        for name in os.listdir(media_dir):
            os.remove(os.path.join(media_dir, name))

    parts = run_parts(evaluate_part, cfg, cfg.ray)
    items = [row for _, row in sorted((x for p in parts for x in p["items"]), key=lambda x: x[0])]
    frames_rows = [r for _, rows in sorted((x for p in parts for x in p["frames"]), key=lambda x: x[0])
                   for r in rows]
    missing = [key for _, key in sorted(x for p in parts for x in p["missing"])]
    media = [m for p in parts for m in p["media"]]
    Generated.report(parts, pred_dir)
    stats = {side: merge_stats(*(p["stats"].get(side) for p in parts)) for side in ("pred", "gt")}
    short = sum(p["stats"].get("short", 0) for p in parts)
    if missing:
        raise FileNotFoundError(f"{pred_dir} has no frames for {len(missing)} ground-truth key(s): "
                                f"{missing[:8]}{' ...' if len(missing) > 8 else ''} (expected <key>/frame_000.obj ...)")
    ok = [r for r in items if "error" not in r]
    if not items:
        raise ValueError(f"no samples in {cfg.gt}")
    if not ok:
        raise ValueError(f"every sequence failed: {items[0]['error']}")
    metrics, notes = _summary(cfg, items, ok, stats, short)
    model = cfg.model or (os.path.basename(os.path.abspath(cfg.run or cfg.pred).rstrip("/"))
                          + ({"step1x3d": " (Step1X-3D per frame)", "step1x3d-shared": " (Step1X-3D + shared noise)"}
                             .get(cfg.baseline, "")))
    ev = Evaluation(benchmark="4d", model=model, config=cfg, out=out, metrics=metrics, items=items,
                    tables={"frames": frames_rows}, media=media, notes=notes,
                    params={"checkpoint": where(cfg.run), "predictions": where(pred_dir), "renders": where(cfg.renders),
                            "data": where(cfg.gt)})  # fmt: skip
    return finish(ev, cfg.tracking, features)


def _summary(cfg: Eval4DJob, items: list[dict[str, Any]], ok: list[dict[str, Any]], stats: dict[str, Any],
             short: int) -> tuple[dict[str, float], list[str]]:  # fmt: skip
    """The benchmark's metrics (means over the sequences that have each) and the notes that say what they cover;
    takes the ``rendered`` marks off the rows."""
    from loom.eval.metrics.fvd import fvd_from_stats

    renders = _renders(cfg)
    metrics: dict[str, float] = {}
    for m in METRICS:
        vals = [r[m] for r in ok if m in r]
        if vals:
            metrics[m] = float(np.mean(vals))
    notes = []
    if "iou" in cfg.metrics:
        metrics["iou_items"] = float(sum("iou" in r for r in ok))
        if metrics["iou_items"] < len(ok):
            notes.append(f"IoU over {int(metrics['iou_items'])} of {len(ok)} sequences (the others are point clouds "
                         "or not watertight)")
    rendered = [r for r in ok if r.pop("rendered", False)]
    if renders:
        metrics["render_items"] = float(len(rendered))
        if len(rendered) < len(ok):
            notes.append(f"rendering metrics over {len(rendered)} of {len(ok)} sequences (point clouds are not "
                         "rendered)")
        if cfg.render.enabled:
            notes.append(f"renders: Loom's Blender renders of the registered predictions from the shards' cameras, "
                         f"{cfg.render.shading} shading (the predictions have no texture of their own)")
            if rendered:
                metrics["render/mask_iou"] = float(np.mean([r["render_mask_iou"] for r in rendered]))
    for m in RENDER_METRICS[:2]:
        if rendered and m in cfg.render_metrics:
            metrics[f"render/{m}"] = float(np.mean([r[f"render/{m}"] for r in rendered]))
    if renders and "fvd" in cfg.render_metrics:
        if len(rendered) >= 2 and not short:
            metrics["render/fvd"] = fvd_from_stats(stats["pred"], stats["gt"])
        else:  # known only now: keep the rest of the evaluation rather than fail it
            why = (f"{short} rendered sequence(s) have fewer than the 9 frames I3D needs" if short else
                   f"it needs at least 2 rendered sequences, there are {len(rendered)}")
            notes.append(f"render FVD not computed: {why} (--set render_metrics=[lpips,clip] leaves it out)")
            print(f"WARNING: {notes[-1]}", file=sys.stderr, flush=True)
    metrics["items"], metrics["failed"] = float(len(ok)), float(len(items) - len(ok))
    if len(ok) < len(items):
        notes.append(f"{len(items) - len(ok)} sequence(s) failed and are left out of the means (see items.csv)")
    if cfg.ray.workers > 1:
        notes.append(f"evaluated on {cfg.ray.workers} workers")
    notes.append("ground-truth occupancy for IoU from the oriented surface samples (tangent planes of the 8 nearest); "
                 "the shards hold no mesh")
    if cfg.registration.enabled:
        notes.append("predictions registered to the ground truth (similarity from frame 0 + per-frame translation)")
    return metrics, notes
