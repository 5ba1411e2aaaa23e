"""Cameras, orbits, normalisation, projection: the pure math behind every render job.

Conventions, written down once and used everywhere in Loom:

- **World**: right-handed, +Z up (Blender's world frame). Orbits circle the Z axis.
- **Camera**: OpenCV: +x right, +y down, +z forward (the viewing direction). ``c2w`` is the 4x4 camera-to-world
  matrix ``[R | t]``: its columns 0..2 are the camera axes in world coordinates and column 3 is the camera centre.
- **Pixels**: pixel ``(row v, column u)`` covers ``[u, u+1) x [v, v+1)`` in continuous image coordinates, so its
  centre is ``(u + 0.5, v + 0.5)``. ``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` with ``cx = W/2, cy = H/2`` for a
  centred principal point. Square pixels (``fx == fy``).
- **Depth**: camera-space z (distance along the optical axis), not the distance along the ray.

Blender's camera looks down its local -Z with +Y up; :func:`opencv_to_blender` converts.
"""

from __future__ import annotations

import math

import numpy as np

# Flip y and z: OpenCV camera axes <-> Blender/OpenGL camera axes.
_CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])


def similarity_to_unit_sphere(points: np.ndarray) -> np.ndarray:
    """4x4 similarity that moves the bounding-box centre of ``points`` (N,3) to the origin and scales the farthest
    point onto the unit sphere. Refuses empty or non-finite input rather than guessing."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
        raise ValueError(f"expected a non-empty (N, 3) array of points, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{int((~np.isfinite(pts)).any(axis=1).sum())} of {len(pts)} points are NaN or infinite")
    centre = 0.5 * (pts.min(axis=0) + pts.max(axis=0))
    radius = float(np.linalg.norm(pts - centre, axis=1).max())
    if radius <= 0.0:
        raise ValueError("all points coincide: the mesh has no extent and cannot be normalised")
    s = 1.0 / radius
    m = np.eye(4)
    m[:3, :3] *= s
    m[:3, 3] = -centre * s
    return m


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A 3x3 rotation drawn uniformly from SO(3) (normalised Gaussian quaternion, Shoemake 1992)."""
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV camera-to-world matrix of a camera at ``eye`` looking at ``target`` with world ``up`` pointing to the
    top of the image."""
    eye = np.asarray(eye, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - eye
    n = np.linalg.norm(forward)
    if n == 0:
        raise ValueError("camera position equals its target")
    forward /= n
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(right) < 1e-9:
        raise ValueError(f"view direction {forward.tolist()} is parallel to up {list(up)}: choose another up vector")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def orbit_c2w(frames: int, radius: float, height: float, phase: float = 0.0) -> np.ndarray:
    """(N,4,4) camera-to-world matrices of TAPESTRY's circular orbit (eq. 1): the camera at frame t sits at
    ``(r cos(2 pi t / N + phase), r sin(2 pi t / N + phase), z)`` and looks at the origin."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    out = np.empty((frames, 4, 4))
    for t in range(frames):
        a = 2.0 * math.pi * t / frames + phase
        out[t] = look_at((radius * math.cos(a), radius * math.sin(a), height))
    return out


def world_to_camera(points: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Points (...,3) in world coordinates -> OpenCV camera coordinates of the camera ``c2w`` (4,4)."""
    r, t = c2w[:3, :3], c2w[:3, 3]
    return (np.asarray(points) - t) @ r


def fit_fov(points: np.ndarray, c2w: np.ndarray, width: int, height: int, margin: float = 0.05) -> float:
    """Smallest horizontal field of view (radians) at which every point (N,3) projects inside every camera
    (F,4,4) of the sequence, with ``margin`` (a fraction of the half-width) to spare on the tightest side.
    One FOV for the whole video, so the object keeps its apparent size as the camera orbits."""
    c2w = np.asarray(c2w).reshape(-1, 4, 4)
    worst = 0.0
    for m in c2w:
        pc = world_to_camera(points, m)
        if (pc[:, 2] <= 1e-6).any():
            raise ValueError("the camera is inside or behind the object: increase the orbit radius")
        tx = np.abs(pc[:, 0] / pc[:, 2]).max()
        ty = np.abs(pc[:, 1] / pc[:, 2]).max() * width / height
        worst = max(worst, tx, ty)
    return 2.0 * math.atan(worst * (1.0 + margin))


def intrinsics(fov_x: float, width: int, height: int) -> np.ndarray:
    """3x3 pinhole intrinsics for a horizontal FOV (radians), square pixels, centred principal point."""
    if not 0 < fov_x < math.pi:
        raise ValueError(f"fov_x must be in (0, pi) radians, got {fov_x}")
    f = 0.5 * width / math.tan(0.5 * fov_x)
    return np.array([[f, 0.0, 0.5 * width], [0.0, f, 0.5 * height], [0.0, 0.0, 1.0]])


def project(points: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (...,3) -> (continuous pixel coordinates (...,2) as (u, v), camera-space depth (...))."""
    pc = world_to_camera(points, c2w)
    z = pc[..., 2]
    uv = (pc[..., :2] / z[..., None]) * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])
    return uv, z


def pixel_rays(K: np.ndarray, c2w: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H,W,3) world-space directions through pixel centres, scaled so their camera-space z is 1."""
    u = np.arange(width) + 0.5
    v = np.arange(height) + 0.5
    uu, vv = np.meshgrid(u, v)
    x = (uu - K[0, 2]) / K[0, 0]
    y = (vv - K[1, 2]) / K[1, 1]
    d_cam = np.stack([x, y, np.ones_like(x)], axis=-1)
    return d_cam @ c2w[:3, :3].T


def unproject_depth(depth: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Camera-space depth (H,W) -> world points (H,W,3) at pixel centres: the inverse of :func:`project`."""
    h, w = depth.shape
    return c2w[:3, 3] + pixel_rays(K, c2w, w, h) * depth[..., None]


def opencv_to_blender(c2w: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world -> Blender camera object's matrix_world (camera looks down local -Z, +Y up)."""
    return np.asarray(c2w) @ _CV_TO_GL


def blender_to_opencv(matrix_world: np.ndarray) -> np.ndarray:
    """Inverse of :func:`opencv_to_blender` (the flip is its own inverse)."""
    return np.asarray(matrix_world) @ _CV_TO_GL
