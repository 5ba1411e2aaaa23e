"""Evaluation metrics, one per file, each a plain function.

Conventions: images are float tensors (N,3,H,W) in [0,1]; videos (N,T,3,H,W) in [0,1]; point clouds (P,3); meshes
``(vertices (V,3), faces (F,3))``. Each function's module docstring states its exact definition.

- :func:`psnr`, :func:`ssim`, :func:`lpips`: paired images or videos (per frame), mean over items.
- :func:`fid`, :func:`kid`, :func:`fvd`: distribution distances with feature networks from the local weights
  directory (:mod:`loom.eval.weights`); FID/FVD stream float64 statistics that merge across processes.
- :func:`clip_score`: CLIP similarity of images to captions or reference images.
- :func:`chamfer_distance`, :func:`f_score`: point clouds, 3DShape2VecSet's definitions.
- :func:`volume_iou`: watertight meshes on a 128^3 grid; :func:`mesh_samples_iou`: a mesh against oriented surface
  samples (:func:`occupancy_from_oriented_points`), for ground truth stored without its mesh.
- :func:`register_sequence`: ShapeGen4D's similarity registration before the geometric metrics.
- :func:`score_sequence`: ShapeGen4D Tab. 1 for one predicted sequence (sampling, registration, then Chamfer,
  F-score and IoU per frame).
"""

from loom.eval.metrics.chamfer import chamfer_distance, f_score, nearest_distances
from loom.eval.metrics.clip_score import clip_score
from loom.eval.metrics.fid import FeatureStats, fid, frechet_distance
from loom.eval.metrics.fvd import fvd
from loom.eval.metrics.iou import mesh_samples_iou, occupancy_from_oriented_points, occupancy_grid, volume_iou
from loom.eval.metrics.kid import kid
from loom.eval.metrics.lpips import lpips
from loom.eval.metrics.psnr import psnr
from loom.eval.metrics.registration import Similarity, SequenceRegistration, register_first_frame, register_sequence
from loom.eval.metrics.sequence import SequenceScores, score_sequence
from loom.eval.metrics.ssim import ssim

__all__ = [
    "FeatureStats",
    "SequenceRegistration",
    "SequenceScores",
    "Similarity",
    "chamfer_distance",
    "clip_score",
    "f_score",
    "fid",
    "frechet_distance",
    "fvd",
    "kid",
    "lpips",
    "mesh_samples_iou",
    "nearest_distances",
    "occupancy_from_oriented_points",
    "occupancy_grid",
    "psnr",
    "register_first_frame",
    "register_sequence",
    "score_sequence",
    "ssim",
    "volume_iou",
]
