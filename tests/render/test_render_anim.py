"""Tests of the animated 4D-sequence extraction (loom.render.anim) on assets written with bpy
(loom.render.testassets): a skinned two-bone arm, the same arm walking (root motion), a shape-key blob and
a static cone. Real Blender in the test process (like test_render_ttv.py): 64x64, 5 frames, 2 samples, 2 threads.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from loom.geometry.camera import project
from loom.platform.errors import TaskError

W = H = 64
FRAMES = 5
HALF = 0.5
AZIMUTH, ELEVATION, FILL, DISTANCE = 0.9, 0.35, 0.85, 2.5


def _write_env_map(path) -> None:
    import OpenEXR

    h, w = 16, 32
    env = np.full((h, w, 3), 0.3, np.float32)
    env[: h // 2] *= 2.0
    env[..., 2] += np.linspace(0.0, 0.5, w, dtype=np.float32)[None]
    header = {"type": OpenEXR.scanlineimage, "compression": OpenEXR.ZIP_COMPRESSION}
    OpenEXR.File(header, {"RGB": env}).write(str(path))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    pytest.importorskip("bpy")
    from loom.render.testassets import make_test_assets

    d = tmp_path_factory.mktemp("anim_assets")
    env = d / "env.exr"
    _write_env_map(env)
    paths = make_test_assets(d)
    paths["env"] = str(env)
    return paths


def _params(assets, name, workdir, **overrides) -> dict:
    p = {
        "asset_path": assets[name], "workdir": str(workdir), "frames": FRAMES, "width": W, "height": H,
        "camera": {"azimuth": AZIMUTH, "elevation": ELEVATION, "fill": FILL, "distance": DISTANCE},
        "half_extent": HALF, "hdri_path": assets["env"], "lighting": {"hdri": "env", "strength": 1.0, "rotation": 0.0},
        "samples": 2, "denoise": False, "threads": 2, "seed": 0, "engine": "CYCLES", "device": "CPU",
    }
    p.update(overrides)
    return p


@pytest.fixture(scope="module")
def results(assets, tmp_path_factory):
    from loom.render.anim import extract_sequence

    out = {}
    for name in ("arm", "arm_walk", "blob"):
        out[name] = extract_sequence(_params(assets, name, tmp_path_factory.mktemp(name)))
    return out


def _components(faces: np.ndarray, n: int) -> list[np.ndarray]:
    """Vertex sets of the connected parts of a triangle mesh (glTF splits vertices at hard edges, so parts are
    joined through coincident positions too)."""
    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, c in faces:
        for x, y in ((a, b), (b, c)):
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[rx] = ry
    roots = np.array([find(i) for i in range(n)])
    return [np.flatnonzero(roots == r) for r in np.unique(roots)]


def _parts(out) -> list[np.ndarray]:
    """The arm's two rigid parts (by connectivity, merging split vertices at equal frame-0 positions), upper first."""
    v0 = out["vertices"][0]
    _, inverse = np.unique(np.round(v0, 5), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    comps = _components(inverse[out["faces"]], int(inverse.max()) + 1)
    parts = [np.flatnonzero(np.isin(inverse, c)) for c in comps]
    # Upper arm: the part whose vertices are closer to the shoulder (the root at frame 0 is the minimum x).
    return sorted(parts, key=lambda idx: v0[idx, 0].mean())


def _raster(verts, faces, K, c2w):
    """Pixel-centre coverage mask (H,W) of the projected triangles."""
    uv, _ = project(verts.astype(np.float64), K.astype(np.float64), c2w.astype(np.float64))
    m = np.zeros((H, W), bool)
    for tri in faces:
        p = uv[tri]
        lo, hi = np.floor(p.min(0)).astype(int), np.ceil(p.max(0)).astype(int)
        u0, v0, u1, v1 = max(lo[0], 0), max(lo[1], 0), min(hi[0] + 1, W), min(hi[1] + 1, H)
        if u1 <= u0 or v1 <= v0:
            continue
        uu, vv = np.meshgrid(np.arange(u0, u1) + 0.5, np.arange(v0, v1) + 0.5)
        a, b, c = p

        w0, w1, w2 = (_edge(p0, p1, uu, vv) for p0, p1 in ((b, c), (c, a), (a, b)))
        m[v0:v1, u0:u1] |= ((w0 >= 0) & (w1 >= 0) & (w2 >= 0)) | ((w0 <= 0) & (w1 <= 0) & (w2 <= 0))
    return m


def _edge(p0, p1, uu, vv):
    return (p1[0] - p0[0]) * (vv - p0[1]) - (p1[1] - p0[1]) * (uu - p0[0])


# ---------------------------------------------------------------------------------------------------------------------
# Without bpy
# ---------------------------------------------------------------------------------------------------------------------


def test_modules_import_without_bpy():
    import subprocess
    import sys

    code = ("import sys, loom.render.anim, loom.render.common, loom.render.testassets; "
            "assert 'bpy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_straight_alpha_conversion():
    from loom.render.common import to_straight_rgba8

    rgba = np.zeros((1, 4, 4), np.float32)
    rgba[0, 0] = [1.0, 1.0, 1.0, 1.0]  # opaque white
    rgba[0, 1] = [0.107, 0.107, 0.107, 0.5]  # half-covered linear 0.214 (sRGB ~0.5): colour is un-premultiplied
    rgba[0, 2] = [0.0, 0.0, 0.0, 0.0]  # empty
    rgba[0, 3] = [1e-4, 1e-4, 1e-4, 1e-4]  # alpha rounds to 0: colour 0 too
    out = to_straight_rgba8(rgba)
    assert out.dtype == np.uint8
    assert out[0, 0].tolist() == [255, 255, 255, 255]
    assert abs(int(out[0, 1, 0]) - 128) <= 1 and out[0, 1, 3] == 128
    assert out[0, 2].tolist() == [0, 0, 0, 0] and out[0, 3].tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Test assets
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_test_assets_reimport_with_their_animation(assets):
    import bpy

    from loom.render.anim import _detect_animation, _render_meshes
    from loom.render.common import import_asset, reset_blender

    expected = {"arm": ["armature"], "arm_walk": ["armature"], "blob": ["shape_key"]}
    for name in ("arm", "arm_walk", "blob", "static"):
        assert os.path.getsize(assets[name]) < 200_000
        reset_blender(bpy)
        meshes = _render_meshes(bpy, import_asset(bpy, __import__("pathlib").Path(assets[name])))
        assert len(meshes) == 1, name
        if name == "static":
            with pytest.raises(TaskError, match="no animation"):
                _detect_animation(bpy, assets[name])
            continue
        kinds, frame_range = _detect_animation(bpy, assets[name])
        assert kinds == expected[name] and frame_range == (1.0, 24.0), (name, kinds, frame_range)

    # Without disable_bone_shape the glTF importer adds an icosphere for drawing bones: never collected, not rendered.
    reset_blender(bpy)
    bpy.ops.import_scene.gltf(filepath=assets["arm"])
    all_meshes = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    assert len(all_meshes) == 2
    kept = _render_meshes(bpy, all_meshes)
    assert [o.name for o in kept] == ["ArmMesh"]
    assert all(o.hide_render for o in all_meshes if o.name != "ArmMesh")


# ---------------------------------------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_output_contract(results):
    out = results["arm"]
    n, f = out["info"]["mesh"]["vertices"], out["info"]["mesh"]["faces"]
    shapes = {
        "vertices": ((FRAMES, n, 3), np.float32), "faces": ((f, 3), np.int32), "video": ((FRAMES, H, W, 4), np.uint8),
        "K": ((FRAMES, 3, 3), np.float32), "c2w": ((FRAMES, 4, 4), np.float32), "frame_times": ((FRAMES,), np.float64),
    }
    for key, (shape, dtype) in shapes.items():
        assert out[key].shape == shape, key
        assert out[key].dtype == dtype, key
    assert f == 24  # two boxes, 12 triangles each
    assert out["faces"].min() == 0 and out["faces"].max() == n - 1
    info = out["info"]
    assert set(info["timings"]) == {"import", "animation", "render", "readback"}
    assert info["animation"] == {"kinds": ["armature"], "frame_range": [1.0, 24.0]}
    np.testing.assert_allclose(out["frame_times"], np.linspace(1.0, 24.0, FRAMES))
    assert np.array(info["normalization"]).shape == (4, 4) and np.array(info["root_offsets"]).shape == (FRAMES, 3)
    assert info["blender_version"].startswith("5.") and info["warnings"] == []
    assert info["render_vertex_error"] < 1e-5


@pytest.mark.integration
@pytest.mark.parametrize("name", ["arm", "arm_walk", "blob"])
def test_every_frame_fits_the_unit_box(results, name):
    v = results[name]["vertices"].astype(np.float64)
    assert np.abs(v).max() <= HALF + 1e-6
    # One normalisation for the whole sequence: the longest side of the all-frames box is exactly the box's side.
    flat = v.reshape(-1, 3)
    assert (flat.max(0) - flat.min(0)).max() == pytest.approx(2 * HALF, abs=1e-5)


@pytest.mark.integration
def test_arm_parts_are_rigid_and_forearm_moves(results):
    out = results["arm"]
    v = out["vertices"].astype(np.float64)
    upper, fore = _parts(out)
    assert len(upper) > 0 and len(fore) > 0 and len(upper) + len(fore) == v.shape[1]
    for idx in (upper, fore):
        d = np.linalg.norm(v[:, idx, None] - v[:, None, idx], axis=-1)  # (T, n, n) pairwise distances
        assert np.abs(d - d[:1]).max() < 1e-4
    assert np.abs(v[:, upper] - v[:1, upper]).max() < 1e-4  # the upper arm does not move
    assert np.linalg.norm(v[-1, fore] - v[0, fore], axis=-1).max() > 0.2  # the forearm swings
    np.testing.assert_allclose(out["info"]["root_offsets"], 0.0, atol=1e-6)


@pytest.mark.integration
def test_root_motion_removed(results):
    from loom.render.testassets import ROOT_TRANSLATION

    walk, arm = results["arm_walk"], results["arm"]
    offsets = np.array(walk["info"]["root_offsets"])
    # Offsets are world units (before normalisation): the root's translation since frame 0, linear in time here.
    t = (walk["frame_times"] - 1.0) / 23.0
    np.testing.assert_allclose(offsets, t[:, None] * np.array(ROOT_TRANSLATION), atol=1e-4)
    v = walk["vertices"].astype(np.float64)
    upper, _ = _parts(walk)
    assert np.abs(v[:, upper] - v[:1, upper]).max() < 1e-4  # attached to the root: still after removal
    # Without its root motion the walking arm is the bending arm, normalised the same way.
    np.testing.assert_allclose(walk["vertices"], arm["vertices"], atol=1e-4)
    np.testing.assert_allclose(walk["info"]["normalization"], arm["info"]["normalization"], atol=1e-5)


@pytest.mark.integration
def test_blob_shape_key_animation(results):
    out = results["blob"]
    assert out["info"]["animation"]["kinds"] == ["shape_key"]
    v = out["vertices"].astype(np.float64)
    assert np.linalg.norm(v[-1] - v[0], axis=-1).max() > 0.1
    # Taller at the end (the shape key stretches along Z) relative to its width.
    first, last = v[0].max(0) - v[0].min(0), v[-1].max(0) - v[-1].min(0)
    assert last[2] / last[0] > 2.0 * first[2] / first[0]


@pytest.mark.integration
def test_static_asset_is_a_task_error(assets, tmp_path):
    from loom.render.anim import extract_sequence

    with pytest.raises(TaskError) as exc:
        extract_sequence(_params(assets, "static", tmp_path))
    assert "no animation" in str(exc.value) and assets["static"] in str(exc.value)


@pytest.mark.integration
def test_animation_that_moves_nothing_is_a_task_error(assets, tmp_path):
    """An action whose keys hold one value plays but moves no vertex: not a 4D asset either."""
    import bpy

    from loom.render.anim import extract_sequence

    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    cube = bpy.context.active_object
    for frame in (1, 10):
        cube.keyframe_insert("location", frame=frame)
    path = tmp_path / "still.glb"
    bpy.ops.export_scene.gltf(filepath=str(path), export_format="GLB", export_animations=True,
                              export_optimize_animation_size=False, export_force_sampling=True)
    with pytest.raises(TaskError) as exc:
        extract_sequence(_params(assets, "arm", tmp_path, asset_path=str(path)))
    assert "no animation" in str(exc.value) and "no vertex moves" in str(exc.value)
    assert str(path) in str(exc.value)


@pytest.mark.integration
def test_missing_asset_is_a_task_error(assets, tmp_path):
    from loom.render.anim import extract_sequence

    with pytest.raises(TaskError, match="file not found"):
        extract_sequence(_params(assets, "arm", tmp_path, asset_path=str(tmp_path / "gone.glb")))


# ---------------------------------------------------------------------------------------------------------------------
# Video and cameras
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("name", ["arm", "arm_walk", "blob"])
def test_video_alpha(results, name):
    a = results[name]["video"][..., 3]
    assert (a > 0).any(axis=(1, 2)).all()
    assert a[:, 0].max() == 0 and a[:, -1].max() == 0 and a[:, :, 0].max() == 0 and a[:, :, -1].max() == 0
    rgb = results[name]["video"][..., :3]
    assert (rgb[a == 0] == 0).all()
    assert (rgb[a == 255].astype(int).sum(axis=-1) > 30).mean() > 0.9  # the lit object is not black


@pytest.mark.integration
@pytest.mark.parametrize("name", ["arm", "arm_walk", "blob"])
def test_cameras_and_projection(results, name):
    out = results[name]
    c2w = out["c2w"].astype(np.float64)
    np.testing.assert_array_equal(out["c2w"], np.repeat(out["c2w"][:1], FRAMES, axis=0))
    np.testing.assert_array_equal(out["K"], np.repeat(out["K"][:1], FRAMES, axis=0))
    centre = c2w[0, :3, 3]
    assert np.linalg.norm(centre) == pytest.approx(DISTANCE, abs=1e-5)
    assert math.atan2(centre[1], centre[0]) == pytest.approx(AZIMUTH, abs=1e-5)
    assert math.asin(centre[2] / DISTANCE) == pytest.approx(ELEVATION, abs=1e-5)
    np.testing.assert_allclose(c2w[0, :3, 2], -centre / DISTANCE, atol=1e-5)  # looks at the origin
    K = out["K"][0].astype(np.float64)
    assert K[0, 2] == W / 2 and K[1, 2] == H / 2

    worst = 0.0
    for t in range(FRAMES):
        uv, z = project(out["vertices"][t].astype(np.float64), K, c2w[t])
        assert (z > 0).all() and (uv >= 0).all() and (uv[:, 0] <= W).all() and (uv[:, 1] <= H).all()
        worst = max(worst, np.abs(uv[:, 0] - W / 2).max() / (W / 2), np.abs(uv[:, 1] - H / 2).max() / (H / 2))
        alpha = out["video"][t, ..., 3]
        # Vertices land on the object (3x3 neighbourhood: corners sit on the silhouette's anti-aliased edge).
        px = np.clip(np.floor(uv).astype(int), 1, [W - 2, H - 2])
        near = np.max([alpha[px[:, 1] + dv, px[:, 0] + du] for dv in (-1, 0, 1) for du in (-1, 0, 1)], axis=0)
        assert (near > 0).mean() > 0.95
        # The rendered silhouette is the returned geometry of THIS frame (sub-frame times included).
        cover = _raster(out["vertices"][t], out["faces"], K, c2w[t])
        solid = alpha > 127
        assert (cover & solid).sum() / (cover | solid).sum() > 0.85, (name, t)
    # The sequence fills `fill` of the half-frame on its tightest side.
    assert worst == pytest.approx(FILL, abs=1e-3)


@pytest.mark.integration
def test_same_call_twice_same_result(assets, results, tmp_path):
    """Nothing leaks from one call to the next in a process (the factory reset), and renders are seeded."""
    from loom.render.anim import extract_sequence

    again = extract_sequence(_params(assets, "arm", tmp_path))
    for key in ("vertices", "faces", "video", "K", "c2w", "frame_times"):
        np.testing.assert_array_equal(again[key], results["arm"][key], err_msg=key)
