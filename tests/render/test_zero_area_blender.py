"""A mesh whose every face has zero area is refused on import by Blender's path (every renderer imports through
``common.import_asset``), naming the file: a failure row, not an empty render. Real Blender, tiny files."""

import struct
from pathlib import Path

import numpy as np
import pytest

from loom.platform.errors import TaskError

pytestmark = pytest.mark.integration

# collinear vertices (a line), and a triangle whose three corners coincide
FLAT_OBJ = "v 0 0 0\nv 1 1 1\nv 2 2 2\nv 3 3 3\nv 5 5 5\nf 1 2 3\nf 2 3 4\nf 1 2 4\n"
POINT_TRI_OBJ = "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0.5 0.5 0\nv 0.5 0.5 0\nv 0.5 0.5 0\nf 4 5 6\nf 1 2 2\n"
REAL_TRI = "v 0 0 1\nv 1 0 1\nv 0 1 1\nf {a} {b} {c}\n"


def _binary_stl(triangles: np.ndarray) -> bytes:
    body = b"".join(struct.pack("<3f", 0, 0, 0) + t.astype("<f4").tobytes() + b"\0\0" for t in triangles)
    return b"\0" * 80 + struct.pack("<I", len(triangles)) + body


def _import(path: Path) -> list:
    import bpy

    from loom.render.common import import_asset, reset_blender

    reset_blender(bpy)
    return import_asset(bpy, path)


@pytest.mark.parametrize("name, content", [
    ("flat.obj", FLAT_OBJ),
    ("point_triangles.obj", POINT_TRI_OBJ),
    ("sliver.stl", _binary_stl(np.array([[[0, 0, 0], [1, 2, 3], [2, 4, 6]], [[1, 1, 1], [1, 1, 1], [4, 4, 4]]],
                                        np.float32))),
], ids=["collinear", "coincident", "stl"])
def test_a_mesh_whose_every_face_has_zero_area_is_refused(tmp_path, name, content):
    pytest.importorskip("bpy")
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TaskError) as err:
        _import(path)
    assert "zero-area faces" in str(err.value) and str(path) in str(err.value)


def test_one_real_face_is_enough_and_faceless_files_keep_their_own_error(tmp_path):
    pytest.importorskip("bpy")
    mixed = tmp_path / "mixed.obj"  # the degenerate faces of FLAT_OBJ plus one real triangle (vertices 6..8)
    mixed.write_text(FLAT_OBJ + REAL_TRI.format(a=6, b=7, c=8))
    assert len(_import(mixed)) == 1
    # a scaled-down but real mesh is not "zero area": the test is relative to the face, not absolute
    tiny = tmp_path / "tiny.obj"
    tiny.write_text("v 0 0 0\nv 1e-5 0 0\nv 0 1e-5 0\nf 1 2 3\n")
    assert len(_import(tiny)) == 1
    points = tmp_path / "points.obj"  # no face at all: not this check's fault to name (the renderers say "no faces")
    points.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    assert _import(points) is not None


def test_the_turntable_renderer_refuses_it_as_a_task_error(tmp_path):
    """The whole Blender task, as the sandbox runs it: the error comes back before any frame is rendered."""
    pytest.importorskip("bpy")
    from loom.render.ttv import render_ttv

    path = tmp_path / "flat.obj"
    path.write_text(FLAT_OBJ)
    params = {"asset_path": str(path), "workdir": str(tmp_path), "width": 16, "height": 16, "frames": 1}
    with pytest.raises(TaskError, match="zero-area faces"):
        render_ttv(params)
