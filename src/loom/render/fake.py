"""A renderer stand-in with the exact keys, shapes and dtypes of the Blender backend, for fast tests of the path
Ray Data -> sandbox -> shards -> reader (kubric's render mocks). It ray-casts an analytic sphere, so its passes
are geometrically consistent (position == unprojected depth, unit normals facing the camera). The real backend is
tested for real in tests/render/test_render_ttv.py.
"""

from __future__ import annotations

import os
import time

import numpy as np

from loom.geometry import camera as cam
from loom.platform.errors import TaskError

SPHERE_RADIUS = 0.8


def render_sphere(params: dict) -> dict:
    """Same contract as ``loom.render.ttv.render_ttv``. Extra params for tests: ``fake_delay_s`` or the
    environment variable LOOM_FAKE_DELAY_S (sleep per frame) and asset files whose first bytes are ``CRASH`` /
    ``FAIL!`` to simulate a native crash / a bad mesh. With ``params["albedo"]`` it also returns ``albedo``: the
    unlit checker colour (the ``rgb`` before shading) over the background; with ``params["partial"]``, ``known``."""
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
    orbit = params["orbit"]
    c2w = cam.orbit_c2w(n, orbit["radius"], orbit["height"])
    sphere_pts = np.random.default_rng(0).standard_normal((4096, 3))
    sphere_pts *= SPHERE_RADIUS / np.linalg.norm(sphere_pts, axis=1, keepdims=True)
    fov = cam.fit_fov(sphere_pts, c2w, w, h, orbit["fov_margin"])
    K = cam.intrinsics(fov, w, h)
    keys = ("rgb", "normal", "position", "depth", "mask") + (("albedo",) if params.get("albedo") else ())
    out = {k: [] for k in keys}
    light = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    bg = np.asarray(params.get("background", (1.0, 1.0, 1.0)))
    for m in c2w:
        pos, nrm, s, hit = _cast_sphere(K, m, w, h)
        shade = np.clip(nrm @ light, 0, 1)[..., None] * 0.8 + 0.2
        albedo = 0.5 + 0.5 * np.sign(np.sin(8 * pos))  # a checker so motion is visible
        rgb = np.where(hit[..., None], shade * albedo, bg)
        out["rgb"].append((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8))
        if "albedo" in out:  # the unlit checker over the background, as the Blender backend's albedo pass
            out["albedo"].append((np.clip(np.where(hit[..., None], albedo, bg), 0, 1) * 255 + 0.5).astype(np.uint8))
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
    partial = {}
    if params.get("partial"):  # the Blender backend's earlier orbit, ray-cast
        from loom.geometry.texture import earlier_orbit, known_pixels

        c2w_e = earlier_orbit(cam.orbit_c2w(params["partial"]["views"], orbit["radius"], orbit["height"]),
                              params["partial"]["tilt"])
        K_e = cam.intrinsics(cam.fit_fov(sphere_pts, c2w_e, w, h, orbit["fov_margin"]), w, h)
        early = [_cast_sphere(K_e, m, w, h) for m in c2w_e]
        res["known"] = known_pixels(res["position"], res["normal"], res["mask"], np.stack([e[2] for e in early]),
                                    np.stack([e[3] for e in early]), np.repeat(K_e[None], len(c2w_e), 0), c2w_e)
        partial = {"partial": {"known_fraction": float(res["known"].sum() / max(res["mask"].sum(), 1))}}
    res["info"] = {
        **partial,
        "normalization": np.eye(4).tolist(),
        "fov_x": fov,
        "blender_version": "fake",
        "warnings": [],
        "timings": {"import": 0.0, "scene": 0.0, "render_geometry": 0.0, "render_color": 0.0, "readback": 0.0},
        "mesh": {"vertices": 0, "faces": 0},
    }
    return res


def _cast_sphere(K: np.ndarray, c2w: np.ndarray, w: int, h: int):
    """One camera's rays against the analytic sphere -> (position (H,W,3), normal, camera-space depth (H,W), hit)."""
    d = cam.pixel_rays(K, c2w, w, h)  # camera-space z = 1 along each ray
    o = c2w[:3, 3]
    # |o + s d|^2 = R^2, nearest root s: camera-space depth, since d has unit camera z.
    a = (d * d).sum(-1)
    b = 2 * (d @ o)
    c = o @ o - SPHERE_RADIUS**2
    disc = b * b - 4 * a * c
    hit = disc > 0
    s = np.where(hit, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), 0.0)
    pos = np.where(hit[..., None], o + s[..., None] * d, 0.0)
    return pos, np.where(hit[..., None], pos / SPHERE_RADIUS, 0.0), s, hit


def _box(lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Closed box mesh (8 vertices, 12 outward triangles)."""
    x0, y0, z0 = lo
    x1, y1, z1 = hi
    v = np.array([[x0, y0, z0], [x1, y0, z0], [x1, y1, z0], [x0, y1, z0],
                  [x0, y0, z1], [x1, y0, z1], [x1, y1, z1], [x0, y1, z1]], dtype=np.float64)
    f = np.array([[0, 2, 1], [0, 3, 2], [4, 5, 6], [4, 6, 7], [0, 1, 5], [0, 5, 4],
                  [1, 2, 6], [1, 6, 5], [2, 3, 7], [2, 7, 6], [3, 0, 4], [3, 4, 7]], dtype=np.int64)
    return v, f


def arm_sequence(params: dict) -> dict:
    """Same contract as ``loom.render.anim.extract_sequence``: a two-part arm (two overlapping boxes, the
    forearm swinging 90 degrees about the elbow), already normalised into the unit box, seen by a fixed camera. The
    video is a flat-shaded splat of the vertices, enough to test the pipeline, not a render."""
    from loom.geometry.sequence import ROOT_ROTATION_MODES, apply, sequence_normalization

    path = params["asset_path"]
    if not os.path.exists(path):
        raise TaskError(f"asset file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"STATIC":
        raise TaskError(f"{path}: no animation (no actions, armature or shape-key animation): not a 4D asset")
    n, w, h = params["frames"], params["width"], params["height"]
    mode = params.get("root_rotation", "none")
    if mode not in ROOT_ROTATION_MODES:
        raise ValueError(f"params['root_rotation'] must be one of {ROOT_ROTATION_MODES}, got {mode!r}")
    # Dense enough for surface sampling to look like a mesh: subdivide each box face into a grid.
    v1, f1 = _box((-1.0, -0.2, -0.2), (0.0, 0.2, 0.2))
    v2, f2 = _box((-0.1, -0.15, -0.15), (1.0, 0.15, 0.15))
    faces = np.concatenate([f1, f2 + len(v1)])
    seq = []
    for t in range(n):
        a = 0.5 * np.pi * t / max(n - 1, 1)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        seq.append(np.concatenate([v1, v2 @ rot.T]))
    seq = np.stack(seq)
    norm = sequence_normalization(seq, float(params.get("half_extent", 0.5)))
    seq = apply(norm, seq)
    az, el = params["camera"]["azimuth"], params["camera"]["elevation"]
    eye = 2.5 * np.array([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)])
    c2w = cam.look_at(eye)
    fov = cam.fit_fov(seq.reshape(-1, 3), c2w[None], w, h, 1.0 / float(params["camera"].get("fill", 0.85)) - 1.0)
    K = cam.intrinsics(fov, w, h)
    video = np.zeros((n, h, w, 4), np.uint8)
    for t in range(n):
        uv, _ = cam.project(seq[t], K, c2w)
        u = np.clip(uv[:, 0].astype(int), 0, w - 1)
        v = np.clip(uv[:, 1].astype(int), 0, h - 1)
        video[t, v, u] = (200, 120, 60, 255)
    return {
        "vertices": seq.astype(np.float32), "faces": faces.astype(np.int32), "video": video,
        "K": np.repeat(K[None], n, 0).astype(np.float32), "c2w": np.repeat(c2w[None], n, 0).astype(np.float32),
        "frame_times": np.arange(n, dtype=np.float64),
        # The arm's root (the shoulder's part) never moves: nothing to remove whatever params["root_rotation"] says.
        "info": {"normalization": norm.tolist(), "root_offsets": np.zeros((n, 3)).tolist(),
                 "root_rotations": np.broadcast_to(np.eye(3), (n, 3, 3)).tolist(), "root_origin": [-1.0, 0.0, 0.0],
                 "root_rotation_mode": mode,
                 "animation": {"kinds": ["fake"], "frame_range": [0, n - 1]}, "blender_version": "fake",
                 "warnings": [], "timings": {"import": 0.0, "animation": 0.0, "render": 0.0, "readback": 0.0},
                 "mesh": {"vertices": int(seq.shape[1]), "faces": int(len(faces))}},
    }


def _raycast_plane_and_box(o: np.ndarray, d: np.ndarray, lo=(-1.0, -1.0, 0.0), hi=(1.0, 1.0, 2.0), plane_half=6.0):
    """Nearest hit of rays o + s d (d with unit camera z, so s is depth) with a ground square (z=0, |x|,|y| <=
    plane_half, object 1) and a box (object 2). Returns depth (H,W), object id (H,W), normal (H,W,3)."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (lo - o) / d
        t2 = (hi - o) / d
    tmin = np.nanmax(np.minimum(t1, t2), axis=-1)
    tmax = np.nanmin(np.maximum(t1, t2), axis=-1)
    box_hit = (tmax >= tmin) & (tmin > 1e-6)
    s_box = np.where(box_hit, tmin, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_plane = -o[2] / d[..., 2]
    p = o + s_plane[..., None] * d
    plane_hit = (s_plane > 1e-6) & (np.abs(p[..., 0]) <= plane_half) & (np.abs(p[..., 1]) <= plane_half)
    s_plane = np.where(plane_hit, s_plane, np.inf)
    depth = np.minimum(s_box, s_plane)
    oid = np.where(np.isinf(depth), 0, np.where(s_box <= s_plane, 2, 1)).astype(np.uint16)
    hit_p = o + np.where(np.isinf(depth), 0, depth)[..., None] * d
    # Box normal: the axis whose face the hit lies on.
    rel = (hit_p - 0.5 * (lo + hi)) / (0.5 * (hi - lo))
    axis = np.argmax(np.abs(rel), axis=-1)
    nb = np.zeros_like(hit_p)
    np.put_along_axis(nb, axis[..., None], np.sign(np.take_along_axis(rel, axis[..., None], -1)), -1)
    normal = np.where((oid == 2)[..., None], nb, np.where((oid == 1)[..., None], [0.0, 0.0, 1.0], 0.0))
    return np.where(np.isinf(depth), 0.0, depth), oid, normal, hit_p


def scene_frames(params: dict) -> dict:
    """Same contract as ``loom.render.scene.render_scene``: a ground square and a box ray-cast along the
    given cameras, with a smooth texture so flow warping can be checked; edges from the exact passes (silhouette = object or
    background change, boundary = object change with a depth jump, crease = box edges)."""
    path = params["asset_path"]
    if not os.path.exists(path):
        raise TaskError(f"scene file {path} does not exist")
    w, h = params["width"], params["height"]
    K_all, c2w_all = np.asarray(params["K"]), np.asarray(params["c2w"])
    out = {k: [] for k in ("rgb", "depth", "mask", "object_id", "edges")}
    for K, m in zip(K_all, c2w_all, strict=True):
        d = cam.pixel_rays(K, m, w, h)
        depth, oid, normal, p = _raycast_plane_and_box(m[:3, 3], d)
        # A smooth texture (not a checker): bilinear warping of hard texture edges would blur the flow test.
        checker = 0.5 + 0.5 * np.sin(1.7 * p[..., 0]) * np.sin(1.3 * p[..., 1] + 0.9 * p[..., 2])
        base = np.where((oid == 2)[..., None], [0.8, 0.3, 0.2], [0.3, 0.6, 0.3])
        rgb = np.where((oid > 0)[..., None], base * (0.6 + 0.4 * checker[..., None]), 1.0)
        change = np.zeros((h, w), bool)
        change[:, 1:] |= oid[:, 1:] != oid[:, :-1]
        change[1:, :] |= oid[1:, :] != oid[:-1, :]
        sil = change & ((oid == 0) | np.roll(oid == 0, 1, 1) | np.roll(oid == 0, 1, 0))
        edges = np.stack([sil, np.zeros_like(sil), change & ~sil, np.zeros_like(sil)], -1)
        out["rgb"].append((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8))
        out["depth"].append(depth.astype(np.float32))
        out["mask"].append(oid > 0)
        out["object_id"].append(oid)
        out["edges"].append(edges)
    res = {k: np.stack(v) for k, v in out.items()}
    res["K"], res["c2w"] = K_all.astype(np.float32), c2w_all.astype(np.float32)
    res["info"] = {"blender_version": "fake", "warnings": [], "objects": ["ground", "box"], "edges_method": "fake",
                   "timings": {"import": 0.0, "scene": 0.0, "render_geometry": 0.0, "render_color": 0.0,
                               "edges": 0.0, "readback": 0.0}}
    return res
