"""Animated sequences: root-motion removal and one normalisation for a whole sequence (ShapeGen4D section 5.1).

World frame as everywhere in Loom (+Z up). The unit bounding box is the axis-aligned cube ``[-h, h]^3`` with
``h = half_extent`` (0.5 by default: side length 1).

Root motion (:func:`remove_root_transform`): per frame t the root (a bone's head and orientation, or an object's
origin and orientation) is at ``r_t`` with world rotation ``R_t``. Its translation since frame 0,
``offsets_t = r_t - r_0``, is always removed; of its rotation since frame 0, ``R_t R_0^T``, the part named by
``rotation`` is removed:

- ``"none"``: nothing (the root may turn; only its translation is removed).
- ``"yaw"``: the twist about +Z (swing-twist decomposition of ``R_t R_0^T``): the heading. A turning character
  keeps facing one way; a tilt or wobble of the root (pitch, roll) stays.
- ``"full"``: all of it: the root keeps its frame-0 position and orientation; everything it carries moves only
  relative to it.

The rotation removed at frame t is ``Q_t`` (world frame, about the root): ``v' = Q_t^T (v - r_t) + r_0``, so the root
stays at ``r_0``. ``(offsets, rotations, origin = r_0)`` undo it exactly (:func:`restore_root_transform`). Taking the
rotation relative to frame 0 makes it independent of the root's own axis convention (a bone's +Y, an object's
local axes): any constant local frame cancels.
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


ROOT_ROTATION_MODES = ("none", "yaw", "full")
UP = (0.0, 0.0, 1.0)
# Orthonormality error accepted in given root rotations (float32 matrices from Blender are ~1e-7 off).
ROTATION_TOLERANCE = 1e-4
# Below this |(w, v.up)| of a relative rotation its twist about up is undefined (a half turn about a level axis).
TWIST_EPS = 1e-6


def nearest_rotation(m: np.ndarray) -> np.ndarray:
    """The rotation part (...,3,3) of linear maps (...,3,3) that may carry scale (polar decomposition by SVD). A map
    with a mirror (det < 0) gives the negated orthogonal factor: a constant mirror of the root's local frame then
    cancels in the rotation relative to frame 0."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape[-2:] != (3, 3) or not np.isfinite(m).all():
        raise ValueError(f"expected finite (...,3,3) matrices, got shape {m.shape}")
    u, s, vt = np.linalg.svd(m)
    if (s[..., -1] <= 1e-12 * np.maximum(s[..., 0], 1e-300)).any():
        raise ValueError("a matrix is singular (zero scale on some axis): it has no rotation part")
    r = u @ vt
    return np.where((np.linalg.det(r) < 0)[..., None, None], -r, r)


def axis_rotation(axis, angles: np.ndarray) -> np.ndarray:
    """Rotations (T,3,3) by ``angles`` (T,) radians about the unit ``axis`` (3,) (right hand)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    th = np.asarray(angles, dtype=np.float64).reshape(-1)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    c, s = np.cos(th)[:, None, None], np.sin(th)[:, None, None]
    return np.eye(3) + s * k + (1 - c) * (k @ k)


def _quaternions(r: np.ndarray) -> np.ndarray:
    """Unit quaternions (T,4) as (w, x, y, z) of rotations (T,3,3) (Shepperd's method: the largest of w, x, y, z is
    found first, so no division by a small number)."""
    q = np.empty((len(r), 4))
    for t, m in enumerate(r):
        tr = np.trace(m)
        i = int(np.argmax([tr, m[0, 0], m[1, 1], m[2, 2]]))
        if i == 0:
            s = 2.0 * np.sqrt(1.0 + tr)
            q[t] = (0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s)
        elif i == 1:
            s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
            q[t] = ((m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s)
        elif i == 2:
            s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
            q[t] = ((m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s)
        else:
            s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
            q[t] = ((m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s)
    return q


def twist_angles(rotations: np.ndarray, up=UP) -> np.ndarray:
    """Angle (T,) in (-pi, pi] of the twist about ``up`` of each rotation (T,3,3): with the quaternion (w, v),
    ``2 atan2(v . up, w)``. For ``R = Rz(psi) @ S`` or ``S @ Rz(psi)`` with S a rotation about a level axis (a tilt)
    it is exactly psi. Raises ValueError where it is undefined: a half turn about a level axis."""
    u = np.asarray(up, dtype=np.float64)
    u = u / np.linalg.norm(u)
    q = _quaternions(np.asarray(rotations, dtype=np.float64))
    w, along = q[:, 0], q[:, 1:] @ u
    bad = np.hypot(w, along) < TWIST_EPS
    if bad.any():
        raise ValueError(f"the root's heading is undefined at frame {int(np.flatnonzero(bad)[0])}: its rotation since "
                         "frame 0 is a half turn about a level axis (it is upside down); use root rotation 'full' or "
                         "'none' for such an asset")
    psi = 2.0 * np.arctan2(along, w)
    return np.where(psi > np.pi, psi - 2 * np.pi, np.where(psi <= -np.pi, psi + 2 * np.pi, psi))


def _check_rotations(r: np.ndarray, t: int) -> np.ndarray:
    if r.shape != (t, 3, 3):
        raise ValueError(f"expected root rotations (T,3,3) with T={t} frames, got shape {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError("root rotations have non-finite entries")
    err = np.abs(r @ np.swapaxes(r, -1, -2) - np.eye(3)).max(axis=(1, 2))
    det = np.linalg.det(r)
    bad = (err > ROTATION_TOLERANCE) | (det <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"root rotation of frame {i} is not a rotation (|R R^T - I| = {err[i]:.3g}, "
                         f"det = {det[i]:.3g}); pass the rotation part of the root's world matrix "
                         "(nearest_rotation strips scale)")
    return nearest_rotation(r)  # exact rotations out of float32 noise


def root_rotations_removed(root_rotations: np.ndarray, rotation: str = "yaw", up=UP) -> np.ndarray:
    """The rotations (T,3,3) that ``rotation`` ("none" | "yaw" | "full") removes, from the root's world rotations
    (T,3,3): identity, the twist of ``R_t R_0^T`` about ``up``, or ``R_t R_0^T``. Index 0 is the identity."""
    if rotation not in ROOT_ROTATION_MODES:
        raise ValueError(f"root rotation must be one of {ROOT_ROTATION_MODES}, got {rotation!r}")
    r = np.asarray(root_rotations, dtype=np.float64)
    r = _check_rotations(r, r.shape[0] if r.ndim == 3 else -1)
    rel = r @ np.swapaxes(r[:1], -1, -2)  # (T,3,3): R_t R_0^T, the world rotation since frame 0
    if rotation == "none":
        return np.broadcast_to(np.eye(3), rel.shape).copy()
    if rotation == "full":
        rel[0] = np.eye(3)
        return rel
    return axis_rotation(up, twist_angles(rel, up))


def remove_root_transform(vertices: np.ndarray, root_positions: np.ndarray, root_rotations: np.ndarray | None = None,
                          rotation: str = "none", up=UP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remove the root's translation and (``rotation``: "none" | "yaw" | "full", see the module docstring) its
    rotation since frame 0, about the root, so the root stays at its frame-0 position (and orientation).

    vertices (T,N,3), root_positions (T,3), root_rotations (T,3,3) world rotations of the root (may be None with
    ``rotation="none"``). Returns (vertices (T,N,3), offsets (T,3) = r_t - r_0, rotations (T,3,3) removed, Q_t).
    With ``rotation="none"`` the vertices are those of :func:`remove_root_motion`."""
    v = np.asarray(vertices, dtype=np.float64)
    r = np.asarray(root_positions, dtype=np.float64)
    if v.ndim != 3 or v.shape[-1] != 3 or r.shape != (v.shape[0], 3):
        raise ValueError(f"expected vertices (T,N,3) and root positions (T,3), got {v.shape} and {r.shape}")
    if rotation not in ROOT_ROTATION_MODES:
        raise ValueError(f"root rotation must be one of {ROOT_ROTATION_MODES}, got {rotation!r}")
    if root_rotations is None:
        if rotation != "none":
            raise ValueError(f"root rotation {rotation!r} needs the root's rotations (T,3,3); got none")
        q = np.broadcast_to(np.eye(3), (v.shape[0], 3, 3)).copy()
    else:
        rr = np.asarray(root_rotations, dtype=np.float64)
        if rr.shape != (v.shape[0], 3, 3):
            raise ValueError(f"expected root rotations (T,3,3) with T={v.shape[0]} frames, got shape {rr.shape}")
        q = root_rotations_removed(rr, rotation, up)
    offsets = r - r[0]
    if rotation == "none":
        return v - offsets[:, None, :], offsets, q  # the arithmetic of remove_root_motion: same bits as before
    # Row vectors: (Q^T x)^T = x^T Q.
    out = np.einsum("tni,tij->tnj", v - r[:, None, :], q) + r[0]
    return out, offsets, q


def root_transforms(offsets: np.ndarray, rotations: np.ndarray, origin) -> np.ndarray:
    """The 4x4 maps (T,4,4) that :func:`remove_root_transform` applied: ``x -> Q_t^T (x - r_t) + r_0`` with
    ``r_t = origin + offsets_t`` (``origin`` = r_0, the root's frame-0 position)."""
    off = np.asarray(offsets, dtype=np.float64)
    q = np.asarray(rotations, dtype=np.float64)
    r0 = np.asarray(origin, dtype=np.float64).reshape(3)
    if off.ndim != 2 or off.shape[1] != 3 or q.shape != (len(off), 3, 3):
        raise ValueError(f"expected offsets (T,3) and rotations (T,3,3), got {off.shape} and {q.shape}")
    m = np.broadcast_to(np.eye(4), (len(off), 4, 4)).copy()
    qt = np.swapaxes(q, -1, -2)
    m[:, :3, :3] = qt
    m[:, :3, 3] = r0 - np.einsum("tij,tj->ti", qt, r0 + off)
    return m


def restore_root_transform(vertices: np.ndarray, offsets: np.ndarray, rotations: np.ndarray, origin) -> np.ndarray:
    """Undo :func:`remove_root_transform`: ``v = Q_t (v' - r_0) + r_t`` (vertices (T,N,3) in the same world units,
    i.e. before the sequence normalisation or after inverting it)."""
    m = np.linalg.inv(root_transforms(offsets, rotations, origin))
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 3 or v.shape[-1] != 3 or len(v) != len(m):
        raise ValueError(f"expected vertices (T,N,3) with T={len(m)}, got {v.shape}")
    return np.einsum("tni,tji->tnj", v, m[:, :3, :3]) + m[:, None, :3, 3]


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
