"""A renderer stand-in with the exact keys, shapes and dtypes of the Blender backend, for fast tests of the path
Ray Data -> sandbox -> shards -> reader (kubric's render mocks). It ray-casts an analytic sphere, so its passes
are geometrically consistent (position == unprojected depth, unit normals facing the camera). The real backend is
tested for real in tests/pipelines/test_render_ttv.py.
"""

from __future__ import annotations

import os
import time

import numpy as np

from loom.geometry import camera as cam
from loom.pipelines.errors import TaskError

SPHERE_RADIUS = 0.8


def render_sphere(params: dict) -> dict:
    """Same contract as ``loom.pipelines.render.ttv.render_ttv``. Extra params for tests: ``fake_delay_s`` or the
    environment variable LOOM_FAKE_DELAY_S (sleep per frame) and asset files whose first bytes are ``CRASH`` /
    ``FAIL!`` to simulate a native crash / a bad mesh."""
    path = params["asset_path"]
    if not os.path.exists(path):
        raise TaskError(f"asset file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(5)
    if head == b"CRASH":
        os.abort()
    if head == b"FAIL!":
        raise TaskError(f"{path}: the mesh has no faces (fake backend)")
    n, w, h = params["frames"], params["width"], params["height"]
    c2w = cam.orbit_c2w(n, params["radius"], params["height_z"])
    sphere_pts = np.random.default_rng(0).standard_normal((4096, 3))
    sphere_pts *= SPHERE_RADIUS / np.linalg.norm(sphere_pts, axis=1, keepdims=True)
    fov = cam.fit_fov(sphere_pts, c2w, w, h, params["fov_margin"])
    K = cam.intrinsics(fov, w, h)
    out = {k: [] for k in ("rgb", "normal", "position", "depth", "mask")}
    light = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    bg = np.asarray(params.get("background", (1.0, 1.0, 1.0)))
    for m in c2w:
        d = cam.pixel_rays(K, m, w, h)  # camera-space z = 1 along each ray
        o = m[:3, 3]
        # |o + s d|^2 = R^2, nearest root s: camera-space depth, since d has unit camera z.
        a = (d * d).sum(-1)
        b = 2 * (d @ o)
        c = o @ o - SPHERE_RADIUS**2
        disc = b * b - 4 * a * c
        hit = disc > 0
        s = np.where(hit, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), 0.0)
        pos = np.where(hit[..., None], o + s[..., None] * d, 0.0)
        nrm = np.where(hit[..., None], pos / SPHERE_RADIUS, 0.0)
        shade = np.clip(nrm @ light, 0, 1)[..., None] * 0.8 + 0.2
        albedo = 0.5 + 0.5 * np.sign(np.sin(8 * pos))  # a checker so motion is visible
        rgb = np.where(hit[..., None], shade * albedo, bg)
        out["rgb"].append((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8))
        out["normal"].append(nrm.astype(np.float32))
        out["position"].append(pos.astype(np.float32))
        out["depth"].append(s.astype(np.float32))
        out["mask"].append(hit)
        delay = float(params.get("fake_delay_s") or os.environ.get("LOOM_FAKE_DELAY_S", 0))
        if delay:
            time.sleep(delay)
    res = {k: np.stack(v) for k, v in out.items()}
    res["K"] = np.repeat(K[None], n, 0).astype(np.float32)
    res["c2w"] = c2w.astype(np.float32)
    res["info"] = {
        "normalization": np.eye(4).tolist(),
        "fov_x": fov,
        "blender_version": "fake",
        "warnings": [],
        "timings": {"import": 0.0, "scene": 0.0, "render_geometry": 0.0, "render_color": 0.0, "readback": 0.0},
        "mesh": {"vertices": 0, "faces": 0},
    }
    return res
