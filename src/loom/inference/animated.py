"""The animated, textured output of ``loom generate 4d`` (ShapeGen4D section 4 and appendix A; SPEC section 3; issue
21): a topology-consistent mesh sequence with ONE texture, as an animated glTF binary and as per-frame OBJs.

Texturisation: frame 1 is unwrapped (`unwrap_first_frame`, xatlas) and textured; its UVs and its map are reused for
every frame. The sequence is topology-consistent (the same vertices and triangles in every frame), so a UV map is a
property of the triangles, not of a frame: every frame carries exactly the same ``vt`` / TEXCOORD_0 values.

Layouts. Meshes come as ``vertices`` (T, V, 3), ``faces`` (F, 3) into V, and the UVs in one of three ways:
``uv_faces`` (F, 3) into ``uv`` (U, 2), OBJ's layout (what `unwrap_first_frame` returns); or ``vmapping`` (V',) and
``faces`` (F, 3) into the V' split vertices, xatlas's layout (split vertex i is vertex ``vmapping[i]``, UV ``uv[i]``);
or neither, one UV per vertex (``uv`` (V, 2)). UVs have v up and texture row 0 is the top of the image (v = 1), as
OBJ, trimesh and `loom.inference.texture` have them; glTF's TEXCOORD_0 has v down, so 1 - v is written.

GLB (`write_animated_glb`): one mesh whose base is frame 0 and whose T-1 morph targets are the POSITION (and
NORMAL) deltas of frames 1..T-1; one animation on the node's ``weights`` with keyframes at t / fps, target t-1 at
weight 1 and the others at 0 in keyframe t (STEP: the frames as generated; LINEAR: positions interpolated between
frames); the texture as the material's baseColorTexture (not metallic, fully rough, as `write_textured_mesh`);
``mesh.extras.targetNames`` = ``frame_001`` ... (Blender names the shape keys from it). The writer is Loom's own
(json + struct, about a hundred lines): trimesh (the mesh library Loom has) does not export morph targets or
animations, and pygltflib is not a dependency. Written to a temporary file, then renamed over ``path``.

Vertex positions are written as given: glTF is +Y up, so a caller with +Z-up meshes converts first
(``loom generate 4d --video`` does: its registered meshes live in Loom's +Z-up world, `loom.inference.shape4d_video`).
"""

from __future__ import annotations

import json
import os
import struct
from typing import NamedTuple

import numpy as np

GLB_MAGIC, GLB_VERSION = 0x46546C67, 2
CHUNK_JSON, CHUNK_BIN = 0x4E4F534A, 0x004E4942
FLOAT, UINT32 = 5126, 5125
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
INTERPOLATIONS = ("STEP", "LINEAR")
_COMPONENTS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}
_DTYPES = {5126: np.float32, 5125: np.uint32, 5123: np.uint16, 5121: np.uint8}


class AnimatedMesh(NamedTuple):
    """What `read_animated_glb` reads back (in the split-vertex layout the GLB stores)."""

    base: np.ndarray  # (V', 3) float64 frame 0 (the mesh's own positions)
    frames: np.ndarray  # (T, V', 3) float64 every keyframe: base + the weighted morph targets
    faces: np.ndarray  # (F, 3) int64
    uv: np.ndarray  # (V', 2) float64, v up
    texture: np.ndarray  # (H, W, 3|4) uint8 base-colour texture
    times: np.ndarray  # (T,) seconds of the keyframes


# ---------------------------------------------------------------------------------------------------------- UV layout


def unwrap_first_frame(vertices: np.ndarray, faces: np.ndarray, resolution: int = 1024,
                       padding: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Frame 1's UV atlas for the whole sequence: (uv (U, 2) v up, uv_faces (F, 3) into ``uv``), by xatlas on
    ``vertices[0]`` (charts packed for a ``resolution``^2 texture with ``padding`` texels between them, as
    `loom.inference.texture.unwrap`). The same arrays serve every frame: a texture made on frame 1 maps onto all."""
    from loom.inference.texture import atlas

    v = np.asarray(vertices, np.float64)
    _, idx, uv = atlas(v[0] if v.ndim == 3 else v, np.asarray(faces, np.int64), resolution, padding, check=True)
    return uv, idx


def _corners(n_vertices: int, faces, uv, uv_faces, vmapping):
    """Any accepted layout -> (faces (F,3) into V, uv (U,2), uv_faces (F,3) into uv), checked."""
    faces = np.asarray(faces, np.int64).reshape(-1, 3)
    uv = np.asarray(uv, np.float64).reshape(-1, 2)
    if uv_faces is not None and vmapping is not None:
        raise ValueError("pass uv_faces (OBJ layout) or vmapping (xatlas layout), not both")
    if vmapping is not None:
        vmapping = np.asarray(vmapping, np.int64).reshape(-1)
        if len(vmapping) != len(uv):
            raise ValueError(f"vmapping has {len(vmapping)} entries but uv has {len(uv)} rows: one UV per split vertex")
        if faces.size and faces.max() >= len(vmapping):
            raise ValueError(f"with vmapping, faces index the {len(vmapping)} split vertices; got index {faces.max()}")
        uv_faces, faces = faces, vmapping[faces]
    elif uv_faces is None:
        if len(uv) != n_vertices:
            raise ValueError(f"uv has {len(uv)} rows for {n_vertices} vertices: pass uv_faces or vmapping")
        uv_faces = faces
    uv_faces = np.asarray(uv_faces, np.int64).reshape(-1, 3)
    if uv_faces.shape != faces.shape:
        raise ValueError(f"uv_faces {uv_faces.shape} and faces {faces.shape} differ: one UV index per face corner")
    if faces.size and (faces.min() < 0 or faces.max() >= n_vertices):
        raise ValueError(f"faces index outside the {n_vertices} vertices")
    if uv_faces.size and (uv_faces.min() < 0 or uv_faces.max() >= len(uv)):
        raise ValueError(f"uv_faces index outside the {len(uv)} UVs")
    return faces, uv, uv_faces


def _split(faces: np.ndarray, uv_faces: np.ndarray):
    """One glTF vertex per distinct (vertex, uv) corner pair -> (vertex of each (V',), uv of each (V',), faces)."""
    pairs = np.stack([faces.reshape(-1), uv_faces.reshape(-1)], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return uniq[:, 0], uniq[:, 1], inverse.reshape(-1, 3)


def _check_sequence(vertices, texture) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(vertices, np.float64)
    if v.ndim == 2:
        v = v[None]
    if v.ndim != 3 or v.shape[-1] != 3 or len(v) == 0:
        raise ValueError(f"vertices must be (T, V, 3), got {np.shape(vertices)}")
    if not np.isfinite(v).all():
        raise ValueError("vertices hold NaN or infinity")
    tex = np.asarray(texture)
    if tex.dtype != np.uint8 or tex.ndim != 3 or tex.shape[-1] not in (3, 4):
        raise ValueError(f"texture must be (H, W, 3|4) uint8, got {tex.shape} {tex.dtype}")
    return v, tex


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V,3) area-weighted unit vertex normals ((0,0,1) for a vertex of no area)."""
    tri = vertices[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(n, faces[:, k], fn)
    length = np.linalg.norm(n, axis=1, keepdims=True)
    return np.where(length > 0, n / np.maximum(length, 1e-30), np.array([0.0, 0.0, 1.0]))


# -------------------------------------------------------------------------------------------------------------- GLB


def _png(texture: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(texture)).save(buf, "PNG")
    return buf.getvalue()


class _Buffer:
    """The BIN chunk and the bufferViews / accessors that point into it (4-byte aligned)."""

    def __init__(self):
        self.data = bytearray()
        self.views: list[dict] = []
        self.accessors: list[dict] = []

    def view(self, raw: bytes, target: int | None = None) -> int:
        self.data += b"\0" * (-len(self.data) % 4)
        view = {"buffer": 0, "byteOffset": len(self.data), "byteLength": len(raw)}
        if target is not None:
            view["target"] = target
        self.data += raw
        self.views.append(view)
        return len(self.views) - 1

    def accessor(self, array: np.ndarray, kind: str, target: int | None = None, bounds: bool = False) -> int:
        ctype = UINT32 if array.dtype.kind in "iu" else FLOAT
        array = np.ascontiguousarray(array, np.uint32 if ctype == UINT32 else np.float32)
        acc = {"bufferView": self.view(array.tobytes(), target), "componentType": ctype,
               "count": int(array.size // _COMPONENTS[kind]), "type": kind}
        if bounds:  # required for POSITION (base and targets) and animation inputs
            flat = array.reshape(acc["count"], _COMPONENTS[kind])
            acc["min"], acc["max"] = flat.min(0).tolist(), flat.max(0).tolist()
        self.accessors.append(acc)
        return len(self.accessors) - 1


def write_animated_glb(path: str, vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray,
                       uv_faces: np.ndarray | None = None, texture: np.ndarray | None = None, fps: float = 12.0, *,
                       vmapping: np.ndarray | None = None, normals: bool = True,
                       interpolation: str = "STEP") -> str:
    """One glTF 2.0 binary: frame 0 as the base mesh, frames 1..T-1 as morph targets (POSITION deltas; NORMAL deltas
    with ``normals``), an animation of the node's weights at ``fps`` (``interpolation`` STEP or LINEAR), the texture
    as baseColorTexture. Layouts: module docstring. Returns ``path``."""
    if texture is None:
        raise ValueError("texture is required: the (H, W, 3|4) uint8 base-colour map of frame 1")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r}: use one of {INTERPOLATIONS}")
    if not fps > 0:
        raise ValueError(f"fps={fps} must be > 0")
    v, tex = _check_sequence(vertices, texture)
    faces, uv, uv_faces = _corners(v.shape[1], faces, uv, uv_faces, vmapping)
    vsel, uvsel, tris = _split(faces, uv_faces)
    seq = v[:, vsel]  # (T, V', 3) positions of the glTF vertices
    t_count = len(seq)
    buf = _Buffer()
    base = seq[0].astype(np.float32)
    attrs = {"POSITION": buf.accessor(base, "VEC3", ARRAY_BUFFER, bounds=True)}
    normal_seq = np.stack([vertex_normals(f, tris) for f in seq]) if normals else None
    if normals:
        attrs["NORMAL"] = buf.accessor(normal_seq[0], "VEC3", ARRAY_BUFFER)
    texcoord = np.stack([uv[uvsel, 0], 1.0 - uv[uvsel, 1]], axis=1)  # glTF's v points down
    attrs["TEXCOORD_0"] = buf.accessor(texcoord, "VEC2", ARRAY_BUFFER)
    primitive = {"attributes": attrs, "indices": buf.accessor(tris.reshape(-1).astype(np.uint32), "SCALAR",
                                                              ELEMENT_ARRAY_BUFFER), "material": 0, "mode": 4}
    targets = []
    for t in range(1, t_count):
        # The delta from the STORED base (float32), so base + delta gives frame t back to float32 rounding.
        target = {"POSITION": buf.accessor(seq[t] - base.astype(np.float64), "VEC3", ARRAY_BUFFER, bounds=True)}
        if normals:
            target["NORMAL"] = buf.accessor(normal_seq[t] - normal_seq[0], "VEC3", ARRAY_BUFFER)
        targets.append(target)
    mesh = {"name": "sequence", "primitives": [primitive]}
    node = {"name": "sequence", "mesh": 0}
    doc: dict = {"asset": {"version": "2.0", "generator": "loom.inference.animated"}}
    if targets:
        primitive["targets"] = targets
        mesh["weights"] = [0.0] * len(targets)
        mesh["extras"] = {"targetNames": [f"frame_{t:03d}" for t in range(1, t_count)]}
        times = np.arange(t_count, dtype=np.float64) / fps
        weights = np.zeros((t_count, t_count - 1), np.float32)
        weights[np.arange(1, t_count), np.arange(t_count - 1)] = 1.0  # keyframe t: target t-1 only
        doc["animations"] = [{"name": "sequence", "samplers": [{
            "input": buf.accessor(times, "SCALAR", bounds=True), "output": buf.accessor(weights, "SCALAR"),
            "interpolation": interpolation}], "channels": [{"sampler": 0, "target": {"node": 0, "path": "weights"}}]}]
    image_view = buf.view(_png(tex))
    doc.update({
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [node], "meshes": [mesh],
        "materials": [{"name": "texture", "pbrMetallicRoughness": {
            "baseColorTexture": {"index": 0, "texCoord": 0}, "metallicFactor": 0.0, "roughnessFactor": 1.0}}],
        "textures": [{"sampler": 0, "source": 0}],
        "samplers": [{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}],
        "images": [{"bufferView": image_view, "mimeType": "image/png"}],
        "accessors": buf.accessors, "bufferViews": buf.views,
    })
    buf.data += b"\0" * (-len(buf.data) % 4)
    doc["buffers"] = [{"byteLength": len(buf.data)}]
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    total = 12 + 8 + len(text) + 8 + len(buf.data)
    blob = b"".join([struct.pack("<III", GLB_MAGIC, GLB_VERSION, total), struct.pack("<II", len(text), CHUNK_JSON),
                     text, struct.pack("<II", len(buf.data), CHUNK_BIN), bytes(buf.data)])
    _write_atomic(path, blob)
    return path


def _write_atomic(path: str, data: bytes | str) -> None:
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_animated_glb(path: str) -> AnimatedMesh:
    """Read back a GLB that `write_animated_glb` wrote (one mesh, one primitive, uncompressed float / uint
    accessors): the base, every keyframe's positions (base + weighted targets), faces, UVs (v up) and texture."""
    import io

    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 20:
        raise ValueError(f"{path!r} is not a glTF binary (too short)")
    magic, version, total = struct.unpack_from("<III", data, 0)
    if magic != GLB_MAGIC or version != 2:
        raise ValueError(f"{path!r} is not a glTF 2.0 binary (magic {magic:#x}, version {version})")
    json_len, kind = struct.unpack_from("<II", data, 12)
    if kind != CHUNK_JSON:
        raise ValueError(f"{path!r}: the first chunk is not JSON")
    doc = json.loads(data[20:20 + json_len])
    off = 20 + json_len
    bin_len, kind = struct.unpack_from("<II", data, off)
    if kind != CHUNK_BIN:
        raise ValueError(f"{path!r}: the second chunk is not BIN")
    blob = data[off + 8: off + 8 + bin_len]

    def view_bytes(i: int) -> bytes:
        v = doc["bufferViews"][i]
        start = v.get("byteOffset", 0)
        return blob[start:start + v["byteLength"]]

    def accessor(i: int) -> np.ndarray:
        a = doc["accessors"][i]
        n = _COMPONENTS[a["type"]]
        view = doc["bufferViews"][a["bufferView"]]
        if view.get("byteStride"):
            raise ValueError(f"{path!r}: interleaved accessors are not read here")
        raw = view_bytes(a["bufferView"])
        arr = np.frombuffer(raw, _DTYPES[a["componentType"]], a["count"] * n, a.get("byteOffset", 0))
        return arr.reshape(a["count"], n) if n > 1 else arr

    prim = doc["meshes"][0]["primitives"][0]
    base = accessor(prim["attributes"]["POSITION"]).astype(np.float64)
    targets = prim.get("targets") or []
    deltas = (np.stack([accessor(t["POSITION"]).astype(np.float64) for t in targets]) if targets
              else np.zeros((0,) + base.shape))
    faces = accessor(prim["indices"]).astype(np.int64).reshape(-1, 3)
    tc = accessor(prim["attributes"]["TEXCOORD_0"]).astype(np.float64)
    uv = np.stack([tc[:, 0], 1.0 - tc[:, 1]], axis=1)
    mat = doc["materials"][prim["material"]]
    tex_index = mat["pbrMetallicRoughness"]["baseColorTexture"]["index"]
    image = doc["images"][doc["textures"][tex_index]["source"]]
    with Image.open(io.BytesIO(view_bytes(image["bufferView"]))) as im:
        texture = np.asarray(im)
    anims = doc.get("animations") or []
    if anims and len(deltas):
        sampler = anims[0]["samplers"][anims[0]["channels"][0]["sampler"]]
        times = accessor(sampler["input"]).astype(np.float64)
        weights = accessor(sampler["output"]).astype(np.float64).reshape(len(times), len(deltas))
        frames = base[None] + np.einsum("tk,kvc->tvc", weights, deltas)
    else:
        times, frames = np.zeros(1), base[None]
    return AnimatedMesh(base=base, frames=frames, faces=faces, uv=uv, texture=texture, times=times)


# -------------------------------------------------------------------------------------------------------------- OBJ


def write_obj_sequence(folder: str, vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray,
                       uv_faces: np.ndarray | None = None, texture: np.ndarray | None = None, *,
                       vmapping: np.ndarray | None = None, material: str = "material.mtl",
                       image: str = "texture.png") -> list[str]:
    """``folder/frame_000.obj`` ... one per frame, each with the frame's ``v`` lines and the SAME ``vt`` and
    ``f v/vt`` lines, all using one material (``material.mtl``) and one texture (``texture.png``) written once.
    Layouts: module docstring. Returns the OBJ paths."""
    if texture is None:
        raise ValueError("texture is required: the (H, W, 3|4) uint8 base-colour map of frame 1")
    v, tex = _check_sequence(vertices, texture)
    faces, uv, uv_faces = _corners(v.shape[1], faces, uv, uv_faces, vmapping)
    os.makedirs(folder, exist_ok=True)
    _write_atomic(os.path.join(folder, image), _png(tex))
    _write_atomic(os.path.join(folder, material),
                  f"# loom.inference.animated: one texture for every frame\nnewmtl texture\nKa 1 1 1\nKd 1 1 1\n"
                  f"Ks 0 0 0\nillum 1\nmap_Kd {image}\n")
    # Shared text: the UVs and the faces are the same in every frame; only the positions change.
    vt = "".join(f"vt {a:.9g} {b:.9g}\n" for a, b in uv)
    corners = np.stack([faces + 1, uv_faces + 1], axis=2).reshape(len(faces), 6)
    f_lines = "".join("f %d/%d %d/%d %d/%d\n" % tuple(c) for c in corners)
    paths = []
    for t, frame in enumerate(v):
        text = (f"# frame {t} of {len(v)}: loom.inference.animated\nmtllib {material}\no frame_{t:03d}\n"
                + "".join(f"v {a:.9g} {b:.9g} {c:.9g}\n" for a, b, c in frame) + vt + "usemtl texture\n" + f_lines)
        p = os.path.join(folder, f"frame_{t:03d}.obj")
        _write_atomic(p, text)
        paths.append(p)
    return paths
