"""The animated, textured 4D output (`loom.inference.animated`): frame 1's UVs and texture reused on every frame, the
GLB's morph targets give every frame back, the OBJ sequence shares its UV and face lines, trimesh reads the base mesh
with its texture, and Blender imports the frames as shape keys."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from loom.inference.animated import (
    read_animated_glb,
    unwrap_first_frame,
    write_animated_glb,
    write_obj_sequence,
)

T = 5


def sequence():
    """(T,V,3) an icosphere that stretches, swells and moves: every frame differs; (F,3) faces; a texture."""
    import trimesh

    ico = trimesh.creation.icosphere(subdivisions=2)
    v, f = np.asarray(ico.vertices), np.asarray(ico.faces)
    seq = np.stack([v * [1 + 0.1 * t, 1.0, 1 - 0.05 * t] + np.sin(3 * v[:, :1] + t) * 0.02 + [0.03 * t, 0, 0]
                    for t in range(T)])
    tex = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    return seq, f, tex


def nearest(a, b):
    """For each row of a (N,3), the index of the nearest row of b (M,3)."""
    return np.argmin(((a[:, None] - b[None]) ** 2).sum(-1), axis=1)


def obj_lines(path, prefix):
    with open(path) as f:
        return [line for line in f if line.startswith(prefix)]


def test_glb_round_trip_gives_every_frame_back(tmp_path):
    seq, faces, tex = sequence()
    uv, uv_faces = unwrap_first_frame(seq, faces, resolution=64)
    assert uv_faces.shape == faces.shape and uv.min() >= 0 and uv.max() <= 1
    path = write_animated_glb(str(tmp_path / "seq.glb"), seq, faces, uv, uv_faces, tex, fps=8)
    got = read_animated_glb(path)
    assert got.frames.shape[0] == T and np.allclose(got.times, np.arange(T) / 8)
    assert len(got.base) >= seq.shape[1]  # vertices on UV seams are split
    src = nearest(got.base, seq[0])  # each GLB vertex is one vertex of the sequence
    assert np.abs(got.base - seq[0][src]).max() < 1e-6
    for t in range(T):
        assert np.abs(got.frames[t] - seq[t][src]).max() < 1e-6, t
    assert np.abs(got.frames[1] - got.frames[0]).max() > 0.05  # the frames really differ
    # The same triangles in the same order, and each corner carries the UV that frame 1's atlas gave it.
    assert np.array_equal(src[got.faces], faces)
    assert np.abs(got.uv[got.faces] - uv[uv_faces]).max() < 1e-6
    assert np.array_equal(got.texture, tex)
    # One TEXCOORD_0 for the mesh: no morph target carries UVs, so every frame has the same ones.
    with open(path, "rb") as f:
        data = f.read()
    doc = json.loads(data[20:20 + int.from_bytes(data[12:16], "little")])
    prim = doc["meshes"][0]["primitives"][0]
    assert len(prim["targets"]) == T - 1 and all(set(t) == {"POSITION", "NORMAL"} for t in prim["targets"])
    assert doc["animations"][0]["samplers"][0]["interpolation"] == "STEP"
    assert doc["meshes"][0]["extras"]["targetNames"][0] == "frame_001"


def test_trimesh_reads_the_base_mesh_with_its_texture(tmp_path):
    import trimesh

    seq, faces, tex = sequence()
    uv, uv_faces = unwrap_first_frame(seq, faces, resolution=64)
    path = write_animated_glb(str(tmp_path / "seq.glb"), seq, faces, uv, uv_faces, tex)
    scene = trimesh.load(path)
    (mesh,) = scene.geometry.values()
    got = read_animated_glb(path)
    assert np.abs(np.asarray(mesh.vertices) - got.base).max() < 1e-6
    assert np.array_equal(np.asarray(mesh.faces), got.faces)
    assert np.abs(np.asarray(mesh.visual.uv) - got.uv).max() < 1e-6
    assert np.array_equal(np.asarray(mesh.visual.material.baseColorTexture.convert("RGB")), tex)
    assert not os.path.exists(path + ".tmp") and sorted(os.listdir(tmp_path)) == ["seq.glb"]  # atomic, no leftovers


def test_obj_sequence_shares_uvs_faces_and_texture(tmp_path):
    import trimesh

    seq, faces, tex = sequence()
    uv, uv_faces = unwrap_first_frame(seq, faces, resolution=64)
    paths = write_obj_sequence(str(tmp_path), seq, faces, uv, uv_faces, tex)
    assert [os.path.basename(p) for p in paths] == [f"frame_{t:03d}.obj" for t in range(T)]
    vt0, f0 = obj_lines(paths[0], "vt "), obj_lines(paths[0], "f ")
    assert len(vt0) == len(uv) and len(f0) == len(faces)
    for t, p in enumerate(paths):
        assert obj_lines(p, "vt ") == vt0 and obj_lines(p, "f ") == f0  # identical UVs on every frame
        v = np.array([[float(x) for x in line.split()[1:]] for line in obj_lines(p, "v ")])
        assert np.abs(v - seq[t]).max() < 1e-6
        assert obj_lines(p, "mtllib ") == ["mtllib material.mtl\n"]
    parsed = np.array([[float(x) for x in line.split()[1:]] for line in vt0])
    assert np.abs(parsed - uv).max() < 1e-6
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(p) for p in paths] +
                                                  ["material.mtl", "texture.png"])
    uvs = []
    for p in paths[:2]:
        mesh = trimesh.load(p, process=False)
        uvs.append(np.asarray(mesh.visual.uv))
        assert np.array_equal(np.asarray(mesh.visual.material.image.convert("RGB")), tex)
    assert np.array_equal(uvs[0], uvs[1])


def test_layouts_agree_and_bad_input_is_refused(tmp_path):
    import xatlas

    seq, faces, tex = sequence()
    vmap, idx, uvx = xatlas.parametrize(seq[0].astype(np.float32), faces.astype(np.uint32))
    a = read_animated_glb(write_animated_glb(str(tmp_path / "a.glb"), seq, idx, uvx, None, tex, vmapping=vmap,
                                             interpolation="LINEAR"))
    b = read_animated_glb(write_animated_glb(str(tmp_path / "b.glb"), seq, faces, uvx, idx.astype(np.int64), tex))
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.uv, b.uv) and np.array_equal(a.faces, b.faces)
    one = read_animated_glb(write_animated_glb(str(tmp_path / "c.glb"), seq[:1], faces, np.zeros((len(seq[0]), 2)),
                                               texture=tex))
    assert one.frames.shape == (1, len(seq[0]), 3)  # a single frame: no targets, no animation
    with pytest.raises(ValueError, match="uv has 3 rows"):
        write_animated_glb(str(tmp_path / "x.glb"), seq, faces, np.zeros((3, 2)), texture=tex)
    with pytest.raises(ValueError, match="not both"):
        write_animated_glb(str(tmp_path / "x.glb"), seq, idx, uvx, idx, tex, vmapping=vmap)
    with pytest.raises(ValueError, match="texture must be"):
        write_obj_sequence(str(tmp_path / "o"), seq, faces, uvx, idx, tex.astype(np.float32))
    with pytest.raises(ValueError, match="interpolation"):
        write_animated_glb(str(tmp_path / "x.glb"), seq, faces, uvx, idx, tex, interpolation="CUBICSPLINE")
    assert not os.path.exists(tmp_path / "x.glb")
    (tmp_path / "bad.glb").write_bytes(b"glTF not really a binary")
    with pytest.raises(ValueError, match="not a glTF 2.0 binary"):
        read_animated_glb(str(tmp_path / "bad.glb"))


BLENDER_IMPORT = """
import json, sys
import bpy
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.import_scene.gltf(filepath=sys.argv[1])
(ob,) = [o for o in bpy.data.objects if o.type == "MESH"]
keys = ob.data.shape_keys
anim = keys.animation_data if keys else None
print("RESULT" + json.dumps({
    "keys": [k.name for k in keys.key_blocks] if keys else [],
    "co": [[list(v.co) for v in k.data] for k in keys.key_blocks] if keys else [],
    "action": bool(anim and anim.action), "uv_layers": len(ob.data.uv_layers),
    "images": [list(i.size) for i in bpy.data.images]}))
"""


@pytest.mark.blender
@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs Blender (bpy): pip install -e '.[render]'")
def test_blender_imports_the_frames_as_shape_keys(tmp_path):
    seq, faces, tex = sequence()
    uv, uv_faces = unwrap_first_frame(seq, faces, resolution=64)
    path = write_animated_glb(str(tmp_path / "seq.glb"), seq, faces, uv, uv_faces, tex)
    out = subprocess.run([sys.executable, "-c", BLENDER_IMPORT, path], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    got = json.loads(line[0][len("RESULT"):])
    assert got["keys"] == ["Basis"] + [f"frame_{t:03d}" for t in range(1, T)]
    assert got["action"] and got["uv_layers"] == 1 and got["images"] == [[48, 32]]
    y_up_to_z_up = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])  # Blender's glTF import
    for t in range(T):
        want = seq[t] @ y_up_to_z_up.T
        co = np.array(got["co"][t])
        # every shape key's vertex is a vertex of frame t (seam splits merge or not), and every vertex appears
        assert np.abs(co - want[nearest(co, want)]).max() < 1e-5, t
        assert len(np.unique(nearest(co, want))) == len(want)
