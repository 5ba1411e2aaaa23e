"""Tests of the scene-video Blender render (loom.render.scene): edge maps, depth/cameras, object ids.

Integration tests render tiny scenes written by ``loom.render.testscenes`` (64x64, 3-4 frames, Cycles on
the CPU) along trajectories from ``loom.geometry.trajectory``.
"""

from __future__ import annotations

import numpy as np
import pytest

from loom.geometry.camera import project, unproject_depth
from loom.platform.errors import TaskError

W = H = 64
SIL, CREASE, BOUNDARY, INTER = range(4)


def _params(asset, workdir, K, c2w, **kw):
    p = dict(asset_path=str(asset), workdir=str(workdir), width=W, height=H, K=np.asarray(K).tolist(),  # noqa: C408
             c2w=np.asarray(c2w).tolist(), samples=2, denoise=False, threads=2, seed=0, background=[1, 1, 1])
    p.update(kw)
    return p


def _segment_distance(pts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of points (N,2) to segment a-b."""
    ab = b - a
    t = np.clip(((pts - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return np.linalg.norm(pts - (a + t[:, None] * ab), axis=1)


def _hull(points: np.ndarray) -> np.ndarray:
    """2D convex hull (monotone chain), counter-clockwise, (M,2)."""
    pts = sorted(map(tuple, points))

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and np.cross(np.subtract(out[-1], out[-2]), np.subtract(p, out[-2])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(reversed(pts))
    return np.array(lower[:-1] + upper[:-1])


def _pixel_centres(sel: np.ndarray) -> np.ndarray:
    v, u = np.nonzero(sel)
    return np.stack([u + 0.5, v + 0.5], axis=1)


@pytest.fixture(scope="module")
def cube_render(tmp_path_factory):
    pytest.importorskip("bpy")
    from loom.geometry.trajectory import orbit
    from loom.render.scene import render_scene
    from loom.render.testscenes import make_cube_scene

    d = tmp_path_factory.mktemp("cube")
    asset = make_cube_scene(d)
    K, c2w, _ = orbit(3.5, 1.8, 40.0, phase=0.3).sample(4, W, H)
    return render_scene(_params(asset, d, K, c2w))


@pytest.fixture(scope="module")
def scene_render(tmp_path_factory):
    pytest.importorskip("bpy")
    from loom.geometry.trajectory import load_trajectory
    from loom.render.scene import render_scene
    from loom.render.testscenes import make_test_scene

    d = tmp_path_factory.mktemp("scene")
    asset = make_test_scene(d)
    traj = load_trajectory({"keyframes": [
        {"time": 0, "position": [4.0, 3.5, 3.0], "look_at": [0, 0.2, 0.4], "fov_deg": 55},
        {"time": 1, "position": [1.0, 5.0, 2.5], "look_at": [0, 0.2, 0.4], "fov_deg": 55},
        {"time": 2, "position": [4.5, -1.0, 2.0], "look_at": [0, 0.0, 0.4], "fov_deg": 60},
    ]})
    K, c2w, _ = traj.sample(3, W, H)
    return render_scene(_params(asset, d, K, c2w))


# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------------


def test_module_import_does_not_import_bpy():
    import subprocess
    import sys

    code = "import sys, loom.render.scene; assert 'bpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gbuffer_edges_on_a_synthetic_frame():
    """Two fronto-parallel squares, one in front of the other, plus a fold on the far one."""
    from loom.render.scene import gbuffer_edges

    h = w = 16
    mask = np.zeros((h, w), bool)
    oid = np.zeros((h, w), np.uint16)
    depth = np.zeros((h, w))
    normal = np.zeros((h, w, 3))
    mask[2:14, 2:14], oid[2:14, 2:14], depth[2:14, 2:14] = True, 1, 10.0
    normal[2:14, 2:14] = [0, 0, -1]
    normal[2:14, 8:14] = [1, 0, 0]  # a crease at column 8 (positions kept on one plane: continuous)
    mask[4:8, 4:7], oid[4:8, 4:7], depth[4:8, 4:7] = True, 2, 5.0  # a nearer object
    normal[4:8, 4:7] = [0, 0, -1]
    fx = 20.0
    v, u = np.mgrid[0:h, 0:w] + 0.5
    pos = np.stack([(u - 8) / fx * depth, (v - 8) / fx * depth, depth], -1)
    e = gbuffer_edges(mask, pos, normal, oid, depth, fx, 45.0)
    assert not (e.any(-1) & ~mask).any()  # nothing on the background
    assert e[2, 2:14, SIL].all() and e[13, 2:14, SIL].all()  # outline of the big square
    assert e[4:14, 7, CREASE].all() and e[..., CREASE].sum() == 12 - 4 * (False)  # column 7 | 8, rows 2..13
    assert e[4:8, 4, BOUNDARY].all() and e[4, 4:7, BOUNDARY].all()  # outline of the near object, on its side
    assert not e[..., BOUNDARY][oid == 1].any()
    assert not e[..., INTER].any()


# ---------------------------------------------------------------------------------------------------------------------
# Integration (real bpy)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_silhouette_edges_of_a_cube_fall_on_its_projected_outline(cube_render):
    from loom.render.testscenes import CUBE_SIZE

    out = cube_render
    s = CUBE_SIZE / 2
    corners = np.array([[x, y, z] for x in (-s, s) for y in (-s, s) for z in (-s, s)])
    for t in range(len(out["K"])):
        K, c2w = out["K"][t].astype(np.float64), out["c2w"][t].astype(np.float64)
        uv, _ = project(corners, K, c2w)
        hull = _hull(uv)
        segs = list(zip(hull, np.roll(hull, -1, axis=0)))
        sil = out["edges"][t, ..., SIL]
        assert sil.sum() > 20
        pts = _pixel_centres(sil)
        dist = np.min([_segment_distance(pts, a, b) for a, b in segs], axis=0)
        assert dist.max() <= 1.5, f"frame {t}: a silhouette pixel {dist.max():.2f} px off the projected outline"
        # Coverage: points every 0.5 px along the outline have a silhouette pixel within 1.5 px.
        samples = np.concatenate([a + np.linspace(0, 1, int(np.linalg.norm(b - a) * 2) + 2)[:, None] * (b - a)
                                  for a, b in segs])
        d2 = np.linalg.norm(samples[:, None] - pts[None], axis=-1).min(axis=1)
        assert (d2 <= 1.5).mean() > 0.95, f"frame {t}: outline coverage {(d2 <= 1.5).mean():.2f}"
        # The silhouette is the outline only: no silhouette pixels deep inside the cube's image.
        assert out["mask"][t].sum() > 100


@pytest.mark.integration
def test_scene_yields_all_edge_kinds_and_nothing_on_background(scene_render):
    out = scene_render
    e = out["edges"]
    assert e.shape == (3, H, W, 4) and e.dtype == bool
    for k, name in enumerate(("silhouette", "crease", "boundary", "intersection")):
        assert e[..., k].sum() > 5, f"no {name} edges"
    assert not (e.any(-1) & ~out["mask"]).any()
    assert out["info"]["edges_method"] == "gbuffer"
    assert set(out["info"]["timings"]) >= {"import", "scene", "render_geometry", "render_color", "edges", "readback"}


@pytest.mark.integration
def test_crease_edges_lie_on_the_cube_edges_and_intersections_where_boxes_meet(scene_render):
    from loom.render.testscenes import SCENE_OBJECTS

    out = scene_render
    ids = {name: i + 1 for i, name in enumerate(out["info"]["objects"])}
    _, size, loc, _ = SCENE_OBJECTS["cube"]
    lo, hi = np.subtract(loc, np.divide(size, 2)), np.add(loc, np.divide(size, 2))
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    cube_edges = [(i, j) for i in range(8) for j in range(i + 1, 8) if np.count_nonzero(corners[i] != corners[j]) == 1]
    n_cube_crease = 0
    for t in range(len(out["K"])):
        K, c2w = out["K"][t].astype(np.float64), out["c2w"][t].astype(np.float64)
        uv, _ = project(corners, K, c2w)
        sel = out["edges"][t, ..., CREASE] & (out["object_id"][t] == ids["cube"])
        n_cube_crease += sel.sum()
        if sel.any():
            pts = _pixel_centres(sel)
            dist = np.min([_segment_distance(pts, uv[i], uv[j]) for i, j in cube_edges], axis=0)
            assert dist.max() <= 2.0, f"frame {t}: a cube crease pixel lies {dist.max():.2f} px from every cube edge"
    assert n_cube_crease > 20
    # Intersections of the bar with the cube: on the cube's +y face (y = 0.5) within the bar's cross-section.
    inter = out["edges"][..., INTER]
    pos = out["position"][inter]
    oid = out["object_id"][inter]
    # (z > 0.1: not the cube's bottom edge, where it meets the ground.)
    on_face = (np.abs(pos[:, 1] - hi[1]) < 0.02) & np.isin(oid, [ids["cube"], ids["bar"]]) & (pos[:, 2] > 0.1)
    assert on_face.sum() >= 3
    _, bsize, bloc, _ = SCENE_OBJECTS["bar"]
    p = pos[on_face]
    # Within ~3 pixel footprints (~0.1 world units each at 64x64 here: DISCONTINUITY_PX) of the bar's section.
    assert (np.abs(p[:, 0] - bloc[0]) <= bsize[0] / 2 + 0.3).all()
    assert (np.abs(p[:, 2] - bloc[2]) <= bsize[2] / 2 + 0.3).all()
    # Every intersection pixel is where two objects meet: next to a pixel of another object.
    for t in range(len(out["K"])):
        o = out["object_id"][t].astype(int)
        pad = np.pad(o, 1, mode="edge")
        other = np.zeros_like(o, bool)
        for dv, du in ((0, 1), (1, 0), (1, 2), (2, 1)):
            other |= pad[dv:dv + H, du:du + W] != o
        assert not (out["edges"][t, ..., INTER] & ~other).any()


@pytest.mark.integration
def test_depth_positions_cameras_and_object_ids(scene_render):
    from loom.render.testscenes import SCENE_OBJECTS

    out = scene_render
    assert out["rgb"].shape == (3, H, W, 3) and out["rgb"].dtype == np.uint8
    assert out["depth"].dtype == np.float32 and out["object_id"].dtype == np.uint16
    assert out["K"].shape == (3, 3, 3) and out["c2w"].shape == (3, 4, 4)
    for t in range(3):
        m = out["mask"][t]
        recon = unproject_depth(out["depth"][t].astype(np.float64), out["K"][t].astype(np.float64),
                                out["c2w"][t].astype(np.float64))
        err = np.linalg.norm(recon - out["position"][t], axis=-1)[m]
        assert err.max() < 1e-3
        assert (out["depth"][t][m] > 0).all() and (out["depth"][t][~m] == 0).all()
        assert ((out["object_id"][t] > 0) == m).all()
        n = np.linalg.norm(out["normal"][t][m], axis=-1)
        assert np.allclose(n, 1.0, atol=1e-4)
    assert sorted(out["info"]["objects"]) == sorted(SCENE_OBJECTS)
    for name, (kind, size, loc, _) in SCENE_OBJECTS.items():
        i = out["info"]["objects"].index(name) + 1
        pos = out["position"][out["object_id"] == i]
        assert len(pos) > 10, name
        half = np.full(3, size) if kind == "sphere" else (np.array([size / 2, size / 2, 0.0]) if kind == "plane"
                                                          else np.asarray(size) / 2)
        assert (np.abs(pos - np.asarray(loc)) <= half + 1e-3).all(), name
    # The background shows the requested colour (away from the anti-aliased outlines of the colour pass).
    m = out["mask"]
    near = m.copy()
    for ax in (1, 2):
        for sh in (-2, -1, 1, 2):
            near |= np.roll(m, sh, axis=ax)
    assert (out["rgb"][~near] == 255).all(-1).mean() > 0.99


@pytest.mark.integration
def test_freestyle_method_matches_the_outline(tmp_path):
    pytest.importorskip("bpy")
    from loom.geometry.trajectory import orbit
    from loom.render.scene import render_scene
    from loom.render.testscenes import make_cube_scene

    asset = make_cube_scene(tmp_path)
    K, c2w, _ = orbit(3.5, 1.8, 40.0, phase=0.3).sample(1, W, H)
    out = render_scene(_params(asset, tmp_path, K, c2w, edges={"method": "freestyle"}))
    assert out["info"]["edges_method"] == "freestyle"
    sil = out["edges"][0, ..., SIL]
    assert sil.sum() > 20
    # Freestyle strokes are anti-aliased and drawn along mesh edges: within 2 px of the mask boundary.
    m = out["mask"][0]
    pad = np.pad(m, 1)
    boundary = m & ~(pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:])
    bd = _pixel_centres(boundary)
    d = np.linalg.norm(_pixel_centres(sil)[:, None] - bd[None], axis=-1).min(axis=1)
    assert (d <= 2.0).mean() > 0.95


@pytest.mark.integration
def test_bad_scene_files_raise_task_error(tmp_path):
    pytest.importorskip("bpy")
    from loom.render.scene import render_scene

    K = np.array([[[50.0, 0, 32], [0, 50.0, 32], [0, 0, 1]]])
    c2w = np.eye(4)[None]
    bad = tmp_path / "broken.glb"
    bad.write_bytes(b"glTF this is not a real binary gltf file")
    with pytest.raises(TaskError, match="broken.glb"):
        render_scene(_params(bad, tmp_path, K, c2w))
    with pytest.raises(TaskError, match="unsupported format"):
        render_scene(_params(tmp_path / "scene.xyz", tmp_path, K, c2w))
    with pytest.raises(ValueError, match="square pixels"):
        render_scene(_params(bad, tmp_path, np.array([[[50.0, 0, 32], [0, 40.0, 32], [0, 0, 1]]]), c2w))
