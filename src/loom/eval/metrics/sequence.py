"""Geometric scores of one predicted shape sequence against the ground truth's oriented surface samples: ShapeGen4D
Tab. 1 (section 5.2), per frame, after registration.

1. ``points`` points are sampled uniformly on each predicted mesh (a point cloud is subsampled to at most that
   many), from one generator seeded with ``seed``, frame after frame.
2. **Registration** (:func:`loom.eval.metrics.registration.register_sequence`, given its keyword arguments; None
   scores the prediction where it stands): a similarity from the first frame plus a translation per frame,
   applied to the samples and to the mesh vertices.
3. Per frame: **Chamfer** and **F-score** at ``f_threshold`` between the registered samples and the ground-truth
   samples (:mod:`loom.eval.metrics.chamfer`, 3DShape2VecSet's definitions; one nearest-neighbour pass for both).
4. Per frame: **IoU** of the registered mesh's exact occupancy and the occupancy the ground truth's oriented
   samples give (:func:`loom.eval.metrics.iou.mesh_samples_iou`). Ray parity needs closed meshes: if any frame is
   a point cloud or not watertight, the sequence gets no IoU, and :attr:`SequenceScores.note` says which frame
   (as ShapeGen4D omits IoU for point-based baselines).

Inputs must already be in one unit (the caller rescales both sides); nothing here reads files or renders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from loom.eval.metrics.registration import SequenceRegistration

METRICS = ("chamfer", "iou", "f_score")

Mesh = tuple[np.ndarray, np.ndarray | None]  # vertices (V,3), faces (F,3) or None for a point cloud


@dataclass(frozen=True)
class SequenceScores:
    """What :func:`score_sequence` found for one sequence: per-frame rows, the registration and what it moved."""

    frames: list[dict[str, Any]]  # per frame k: {"frame": k, and each metric asked for that it has}
    registration: SequenceRegistration | None
    samples: list[np.ndarray]  # (P,3) registered points sampled on each predicted frame
    vertices: list[np.ndarray]  # (V,3) registered vertices of each predicted frame
    note: str  # why the sequence has no IoU, or ""

    def means(self) -> dict[str, float]:
        """Each metric's mean over the frames that have it, in :data:`METRICS` order."""
        out = {}
        for m in METRICS:
            vals = [fr[m] for fr in self.frames if m in fr]
            if vals:
                out[m] = float(np.mean(vals))
        return out


def sample_points(vertices: np.ndarray, faces: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniformly on a mesh's surface, or at most ``n`` of a point cloud's points (faces None)."""
    from loom.geometry.mesh import sample_surface

    if faces is None:
        return vertices if len(vertices) <= n else vertices[rng.choice(len(vertices), n, replace=False)]
    return sample_surface(vertices, faces, n, rng)[0].astype(np.float64)


def iou_obstacle(pred: Sequence[Mesh]) -> str:
    """Why IoU cannot be computed for this sequence ("" when it can): the first frame that is a point cloud or
    not watertight, and how many such frames there are."""
    from loom.eval.metrics.iou import is_watertight

    bad = [k for k, (_, f) in enumerate(pred) if f is None or not is_watertight(f)]
    if not bad:
        return ""
    kind = "a point cloud" if pred[bad[0]][1] is None else "not watertight"
    return f"no IoU: frame {bad[0]} is {kind}" + (f" ({len(bad)} such frames)" if len(bad) > 1 else "")


def score_sequence(pred: Sequence[Mesh], gt_points: Sequence[np.ndarray], gt_normals: Sequence[np.ndarray], *,
                   registration: Mapping[str, Any] | None, metrics: Sequence[str] = METRICS,
                   points: int = 100_000, f_threshold: float = 0.02, iou_resolution: int = 128,
                   seed: int = 0) -> SequenceScores:  # fmt: skip
    """Register a predicted sequence (meshes or point clouds) to the ground-truth samples of the same frames and
    score every frame; see the module docstring. ``registration``: keyword arguments of ``register_sequence``
    other than ``seed``, or None for no registration."""
    from loom.eval.metrics.registration import register_sequence

    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}: choose from {list(METRICS)}")
    rng = np.random.default_rng(seed)
    samples = [sample_points(v, f, points, rng) for v, f in pred]
    reg = None
    verts = [v for v, _ in pred]
    if registration is not None:
        reg = register_sequence(samples, gt_points, seed=seed, **registration)
        samples = [reg.apply_frame(k, s) for k, s in enumerate(samples)]
        verts = [reg.apply_frame(k, v) for k, v in enumerate(verts)]
    note = iou_obstacle(pred) if "iou" in metrics else ""
    per_frame = [m for m in metrics if not (m == "iou" and note)]
    frames = [_score_frame(k, samples[k], verts[k], pred[k][1], gt_points[k], gt_normals[k], metrics=per_frame,
                           f_threshold=f_threshold, iou_resolution=iou_resolution)
              for k in range(len(pred))]  # fmt: skip
    return SequenceScores(frames=frames, registration=reg, samples=samples, vertices=verts, note=note)


def _score_frame(k: int, samples: np.ndarray, verts: np.ndarray, faces: np.ndarray | None, gt_points: np.ndarray,
                 gt_normals: np.ndarray, *, metrics: Sequence[str], f_threshold: float,
                 iou_resolution: int) -> dict[str, Any]:  # fmt: skip
    """One frame's row of the ``metrics`` asked for (IoU only where every frame is a closed mesh)."""
    from loom.eval.metrics.chamfer import chamfer_from_distances, f_score_from_distances, nearest_distances
    from loom.eval.metrics.iou import mesh_samples_iou

    row: dict[str, Any] = {"frame": k}
    if {"chamfer", "f_score"} & set(metrics):
        d_pg, d_gp = nearest_distances(samples, gt_points)
        if "chamfer" in metrics:
            row["chamfer"] = chamfer_from_distances(d_pg, d_gp)
        if "f_score" in metrics:
            row["f_score"] = f_score_from_distances(d_pg, d_gp, f_threshold)
    if "iou" in metrics:
        # score_sequence asks for IoU only after iou_obstacle found every frame watertight: no second check
        row["iou"] = mesh_samples_iou(verts, faces, gt_points, gt_normals, resolution=iou_resolution,
                                      check_watertight=False)
    return row
