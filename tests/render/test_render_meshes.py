"""Tests of the bpy side of the mesh-sequence render (loom.render.meshes, driven through the sandbox by
loom.corpora.meshes for ``loom eval 4d``'s rendering metrics; tests/corpora/test_meshes.py tests that driver): the
silhouette matches the OpenCV projection of the vertices (off-centre principal point included), vertex colours come
out as given, clay shading lights the surface, and bad input is refused with a message naming it."""

from __future__ import annotations

import numpy as np
import pytest

from loom.geometry.camera import intrinsics, look_at, project
from loom.platform.errors import TaskError

W, H = 48, 40


def _box(shift=(0.0, 0.0, 0.0)):
    import trimesh

    m = trimesh.creation.box(extents=(0.6, 0.4, 0.3))
    return np.asarray(m.vertices) + np.asarray(shift), np.asarray(m.faces)


def _inside_hull(uv: np.ndarray) -> np.ndarray:
    """(H,W) bool: pixel centres inside the convex hull of the projected points (a convex body's silhouette)."""
    from scipy.spatial import Delaunay

    vv, uu = np.mgrid[0:H, 0:W]
    centres = np.stack([uu.ravel() + 0.5, vv.ravel() + 0.5], 1)
    return (Delaunay(uv).find_simplex(centres) >= 0).reshape(H, W)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    pytest.importorskip("bpy")
    K0 = intrinsics(0.9, W, H)
    K1 = K0.copy()
    K1[0, 2] += 5.0  # an off-centre principal point: Blender's shift must follow it
    K1[1, 2] -= 3.0
    c2w = np.stack([look_at([1.6, -1.2, 0.9]), look_at([0.3, 1.9, 0.6], target=(0.1, 0.0, 0.0))])
    frames = []
    for t, shift in enumerate([(0.0, 0.0, 0.0), (0.1, 0.0, 0.0)]):
        v, f = _box(shift)
        frames.append({"vertices": v, "faces": f, "colors": np.tile([[0.8, 0.2, 0.1], [0.1, 0.5, 0.9]][t], (8, 1))})
    return {"frames": frames, "K": np.stack([K0, K1]), "c2w": c2w, "width": W, "height": H,
            "workdir": str(tmp_path_factory.mktemp("meshes")), "samples": 4, "threads": 2}


@pytest.mark.integration
def test_vertex_colours_and_silhouettes_follow_the_opencv_cameras(scene):
    from loom.render.meshes import render_meshes

    video = render_meshes(scene)["video"]
    assert video.shape == (2, H, W, 4) and video.dtype == np.uint8
    for t, fr in enumerate(scene["frames"]):
        uv, _ = project(fr["vertices"], scene["K"][t], scene["c2w"][t])
        want = _inside_hull(uv)
        got = video[t, ..., 3] >= 128
        iou = (want & got).sum() / (want | got).sum()
        assert iou > 0.93, (t, iou)
        # the pixels that differ are on the outline (anti-aliasing), never inside or far outside
        eroded = want & np.roll(want, 1, 0) & np.roll(want, -1, 0) & np.roll(want, 1, 1) & np.roll(want, -1, 1)
        assert got[eroded].all()
        solid = video[t, ..., 3] == 255
        colour = np.round(np.asarray(fr["colors"][0]) * 255)
        assert solid.sum() > 50 and np.abs(video[t][solid][:, :3].astype(int) - colour).max() <= 1
        assert (video[t][video[t, ..., 3] == 0][:, :3] == 0).all()  # straight alpha: no colour where transparent


@pytest.mark.integration
def test_clay_shading_lights_the_surface_and_keeps_the_silhouette(scene):
    from loom.render.meshes import render_meshes

    clay = render_meshes({**scene, "shading": "clay", "frames": [{k: v for k, v in f.items() if k != "colors"}
                                                                  for f in scene["frames"]]})["video"]
    vertex = render_meshes(scene)["video"]
    assert (np.abs(clay[..., 3].astype(int) - vertex[..., 3]) <= 2).mean() > 0.99
    lit = clay[0][clay[0, ..., 3] == 255][:, :3].astype(int)
    assert lit.mean() > 20 and lit[:, 0].std() > 2  # lit, and the faces are shaded differently


def test_bad_input_is_refused_with_a_message_naming_it(scene):
    pytest.importorskip("bpy")
    from loom.render.meshes import render_meshes

    bad = dict(scene["frames"][0], faces=np.array([[0, 1, 99]]))
    with pytest.raises(TaskError, match="frame 0: faces"):
        render_meshes({**scene, "frames": [bad, scene["frames"][1]]})
    with pytest.raises(ValueError, match="2 meshes but 1 cameras"):
        render_meshes({**scene, "K": scene["K"][:1], "c2w": scene["c2w"][:1]})
    with pytest.raises(ValueError, match="needs colors"):
        render_meshes({**scene, "frames": [{"vertices": f["vertices"], "faces": f["faces"]} for f in scene["frames"]]})
    with pytest.raises(ValueError, match="shading"):
        render_meshes({**scene, "shading": "toon"})
