"""Prediction renders (loom.corpora.meshes): projected vertex colours take the pixel each vertex projects to; the
sandboxed renderer gives what the bpy side renders in process, reuses its Blender across sequences, renders clay
without colours, and refuses early, saying how to install bpy, where it is missing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from loom.corpora.meshes import MeshRenderer, projected_colours
from loom.geometry.camera import intrinsics, look_at, project

W, H = 40, 32


def test_projected_colours_take_the_pixel_each_vertex_projects_to():
    K, c2w = intrinsics(0.8, 20, 10), look_at([2.0, 0.0, 0.0])
    frame = np.zeros((10, 20, 4), np.uint8)
    frame[:, :10] = (255, 0, 0, 255)  # left half red, right half transparent
    verts = np.array([[0.0, -0.3, 0.0], [0.0, 0.3, 0.0], [3.0, 0.0, 0.0], [0.0, 50.0, 0.0]])
    uv, _ = project(verts, K, c2w)
    assert uv[0, 0] < 10 < uv[1, 0]  # seen from +x with +z up, -y is on the left
    col = projected_colours(verts, K, c2w, frame, outside=(0.5, 0.5, 0.5))
    np.testing.assert_allclose(col, [[1, 0, 0], [0.5] * 3, [0.5] * 3, [0.5] * 3])  # object / empty / behind / off


def test_missing_blender_is_refused_with_what_needed_it_and_what_to_do(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bpy" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"^render.enabled=true needs Blender: .*make setup.* Or pass --renders"):
        MeshRenderer.check("render.enabled=true needs Blender", "Or pass --renders DIR")
    with pytest.raises(RuntimeError, match="rendering meshes needs Blender: .*bpy"):
        MeshRenderer(str(tmp_path))


def _sequence():
    import trimesh

    box = trimesh.creation.box(extents=(0.6, 0.4, 0.3))
    meshes = [(np.asarray(box.vertices) + [0.1 * t, 0.0, 0.0], np.asarray(box.faces)) for t in range(2)]
    colours = [np.tile(c, (len(box.vertices), 1)) for c in ([0.8, 0.2, 0.1], [0.1, 0.5, 0.9])]
    K = np.stack([intrinsics(0.9, W, H)] * 2)
    c2w = np.stack([look_at([1.6, -1.2, 0.9]), look_at([0.3, 1.9, 0.6])])
    return meshes, colours, K, c2w


@pytest.mark.integration
def test_sandboxed_renders_equal_the_in_process_ones_and_clay_needs_no_colours(tmp_path):
    pytest.importorskip("bpy")
    from loom.render.meshes import render_meshes

    meshes, colours, K, c2w = _sequence()
    with MeshRenderer(str(tmp_path / "scratch"), samples=4, threads=2) as renderer:
        video = renderer.render(meshes, K, c2w, W, H, colours=colours)
        box = renderer._box
        clay = renderer.render(meshes, K, c2w, W, H)
        assert renderer._box is box  # one Blender process for every sequence
    assert renderer._box is None and (tmp_path / "scratch" / "logs").is_dir()
    frames = [{"vertices": v, "faces": f, "colors": c} for (v, f), c in zip(meshes, colours, strict=True)]
    direct = render_meshes({"frames": frames, "K": K, "c2w": c2w, "width": W, "height": H, "samples": 4,
                            "threads": 2, "seed": 0, "workdir": str(tmp_path / "direct")})["video"]
    assert video.shape == (2, H, W, 4) and video.dtype == np.uint8
    np.testing.assert_array_equal(video, direct)
    solid = video[1, ..., 3] == 255
    assert solid.sum() > 50 and (np.abs(video[1][solid][:, :3].astype(int) - [26, 128, 230]) <= 1).all()
    # clay: the same silhouettes, lit grey instead of the vertex colours
    assert (np.abs(clay[..., 3].astype(int) - video[..., 3]) <= 2).mean() > 0.99
    lit = clay[0][clay[0, ..., 3] == 255][:, :3].astype(int)
    assert lit.mean() > 20 and lit[:, 0].std() > 2  # lit, and the faces are shaded differently
    assert np.abs(lit.mean(0) - [204, 51, 26]).max() > 30  # not the colours of the vertex render
