"""Animated sequences: root-motion removal and one normalisation for a whole sequence (ShapeGen4D section 5.1).

World frame as everywhere in Loom (+Z up). The unit bounding box is the axis-aligned cube ``[-h, h]^3`` with
``h = half_extent`` (0.5 by default: side length 1).
"""

from __future__ import annotations

import numpy as np


def remove_root_motion(vertices: np.ndarray, root_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subtract the root's translation relative to the first frame from every frame.

    vertices (T,N,3), root_positions (T,3) (world position of the root bone's head, or of the root object).
    Returns (vertices without root motion (T,N,3), offsets (T,3) that were subtracted; offsets[0] == 0).
    """
    v = np.asarray(vertices, dtype=np.float64)
    r = np.asarray(root_positions, dtype=np.float64)
    if v.ndim != 3 or v.shape[-1] != 3 or r.shape != (v.shape[0], 3):
        raise ValueError(f"expected vertices (T,N,3) and root positions (T,3), got {v.shape} and {r.shape}")
    offsets = r - r[0]
    return v - offsets[:, None, :], offsets


def sequence_normalization(vertices: np.ndarray, half_extent: float = 0.5) -> np.ndarray:
    """4x4 similarity (uniform scale + translation) that puts the bounding box of ALL frames (T,N,3) at the origin
    and scales its longest side to ``2 * half_extent``: one transform for the sequence, so motion and size changes
    between frames are kept."""
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    if len(v) == 0 or not np.isfinite(v).all():
        raise ValueError("the sequence has no vertices or non-finite coordinates")
    lo, hi = v.min(axis=0), v.max(axis=0)
    extent = float((hi - lo).max())
    if extent <= 0:
        raise ValueError("the sequence has no extent: every vertex coincides")
    s = 2.0 * half_extent / extent
    m = np.eye(4)
    m[:3, :3] *= s
    m[:3, 3] = -0.5 * (lo + hi) * s
    return m


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine transform to points (...,3)."""
    return np.asarray(points) @ m[:3, :3].T + m[:3, 3]
