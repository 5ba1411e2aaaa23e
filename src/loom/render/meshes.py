"""Render a sequence of meshes from given cameras: the renders of predicted 4D shapes that ShapeGen4D's rendering
metrics (Tab. 2) compare with the ground-truth video.

``render_meshes(params)`` runs inside the sandboxed worker (it imports bpy) that
:class:`loom.corpora.meshes.MeshRenderer` starts. Per frame ``t`` it shows mesh ``t`` (``vertices`` (V,3),
``faces`` (F,3), optional per-vertex ``colors`` (V,3) sRGB in [0,1]) and renders it with Cycles from the OpenCV
camera ``K[t]``, ``c2w[t]`` (the conventions of the 4D shards: pixel centres at u+0.5, camera looking along +z,
world +Z up) at ``width`` x ``height``, film transparent.

Shading (``params["shading"]``):

- ``"vertex"``: the colour attribute is shown as it is: an emission of the interpolated vertex colours, no light,
  no bounces, so a pixel's colour is the surface's colour and nothing else (the look of the ground truth is
  baked into the colours by whoever computed them, e.g. projected from the conditioning video).
- ``"clay"``: a grey diffuse surface under one of Blender's bundled environment maps (``hdri``), for shapes
  without colour.

Returns ``{"video": (T,H,W,4) uint8 straight-alpha sRGB (colour 0 where alpha rounds to 0), "info": {...}}``, the
encoding of the 4D shards' ``video``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from loom.platform.errors import TaskError
from loom.render.common import (
    check_cameras,
    color_pass_settings,
    common_render_settings,
    make_camera_covering,
    make_world,
    read_exr,
    render_still,
    reset_blender,
    set_opencv_camera,
    srgb_decode,
    to_straight_rgba8,
)

SHADINGS = ("vertex", "clay")
DEFAULTS = {"shading": "vertex", "samples": 8, "hdri": "studio", "hdri_strength": 1.0, "threads": 0, "seed": 0,
            "device": "CPU", "clay_color": (0.6, 0.6, 0.6)}


def _check_frames(frames: list[dict]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    out = []
    for t, fr in enumerate(frames):
        v = np.asarray(fr["vertices"], np.float64)
        f = np.asarray(fr["faces"], np.int64)
        if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0 or not np.isfinite(v).all():
            raise TaskError(f"frame {t}: vertices must be a finite (V,3) array with V >= 1, got {v.shape}")
        if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0 or f.min() < 0 or f.max() >= len(v):
            raise TaskError(f"frame {t}: faces must be (F,3) indices into its {len(v)} vertices (F >= 1)")
        c = fr.get("colors")
        if c is not None:
            c = np.asarray(c, np.float64)
            if c.shape != v.shape:
                raise TaskError(f"frame {t}: colors must be (V,3) like its vertices {v.shape}, got {c.shape}")
        out.append((v, f, c))
    return out


def _mesh(bpy, name: str, v: np.ndarray, f: np.ndarray, c: np.ndarray | None):
    """A Blender mesh from arrays (``foreach_set``: a 100k-face mesh in milliseconds, not Python lists)."""
    me = bpy.data.meshes.new(name)
    me.vertices.add(len(v))
    me.vertices.foreach_set("co", v.astype(np.float32).ravel())
    me.loops.add(3 * len(f))
    me.loops.foreach_set("vertex_index", f.astype(np.int32).ravel())
    me.polygons.add(len(f))
    me.polygons.foreach_set("loop_start", np.arange(0, 3 * len(f), 3, dtype=np.int32))
    me.polygons.foreach_set("loop_total", np.full(len(f), 3, np.int32))
    me.update()
    if c is not None:
        attr = me.color_attributes.new("loom_color", "FLOAT_COLOR", "POINT")
        # FLOAT_COLOR holds scene-linear values; the 'Standard' view transform encodes them back to the sRGB given
        rgba = np.concatenate([srgb_decode(c), np.ones((len(c), 1))], 1).astype(np.float32)
        attr.data.foreach_set("color", rgba.ravel())
    if me.validate(verbose=False):
        raise TaskError(f"{name}: invalid mesh (repeated or out-of-range indices)")
    return me


def _vertex_material(bpy):
    mat = bpy.data.materials.new("loom_vertex_colour")
    mat.cycles.emission_sampling = "NONE"  # not a light source for the other surfaces
    nt = mat.node_tree
    nt.nodes.clear()
    attr = nt.nodes.new("ShaderNodeAttribute")
    attr.attribute_type = "GEOMETRY"
    attr.attribute_name = "loom_color"
    emit = nt.nodes.new("ShaderNodeEmission")
    emit.inputs["Strength"].default_value = 1.0
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    nt.links.new(attr.outputs["Color"], emit.inputs["Color"])
    nt.links.new(emit.outputs["Emission"], out.inputs["Surface"])
    return mat


def _clay_material(bpy, rgb):
    mat = bpy.data.materials.new("loom_clay")
    nt = mat.node_tree
    nt.nodes.clear()
    bsdf = nt.nodes.new("ShaderNodeBsdfDiffuse")
    bsdf.inputs["Color"].default_value = (*srgb_decode(np.asarray(rgb, np.float64)).tolist(), 1.0)
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    nt.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    return mat


def render_meshes(params: dict) -> dict:
    """See the module docstring. ``params``: ``frames`` (list of dicts), ``K``, ``c2w``, ``width``, ``height``,
    ``workdir`` and the optional ``shading``, ``samples``, ``hdri``, ``hdri_strength``, ``threads``, ``seed``,
    ``device``, ``clay_color``."""
    import bpy

    from loom.render import hdri_path

    p = {**DEFAULTS, **params}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    width, height = int(p["width"]), int(p["height"])
    if width < 1 or height < 1:
        raise ValueError(f"params width/height must be >= 1, got {width}x{height}")
    shading = str(p["shading"])
    if shading not in SHADINGS:
        raise ValueError(f"params['shading'] must be one of {SHADINGS}, got {shading!r}")
    frames = _check_frames(p["frames"])
    K, c2w = check_cameras(p["K"], p["c2w"], width, height)
    if len(K) != len(frames):
        raise ValueError(f"{len(frames)} meshes but {len(K)} cameras: one camera per frame")
    if shading == "vertex" and any(c is None for _, _, c in frames):
        raise ValueError("shading 'vertex' needs colors for every frame's vertices (or use shading 'clay')")
    workdir = Path(p["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)

    reset_blender(bpy)
    scene = bpy.context.scene
    warnings: list[str] = []
    meshes = [_mesh(bpy, f"loom_frame_{t:04d}", v, f, c) for t, (v, f, c) in enumerate(frames)]
    mat = _vertex_material(bpy) if shading == "vertex" else _clay_material(bpy, p["clay_color"])
    for me in meshes:
        me.materials.append(mat)
    obj = bpy.data.objects.new("loom_prediction", meshes[0])
    scene.collection.objects.link(obj)
    cam = make_camera_covering(bpy, scene, np.concatenate([v for v, _, _ in frames]), c2w)
    if shading == "clay":
        make_world(bpy, scene, hdri_path(str(p["hdri"])), float(p["hdri_strength"]), 0.0)
    common_render_settings(bpy, scene, {**p, "denoise": False}, width, height, warnings)
    color_pass_settings(bpy, scene, {**p, "max_bounces": 0 if shading == "vertex" else 4}, warnings)
    timings["setup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    video = np.empty((len(frames), height, width, 4), np.uint8)
    for t, me in enumerate(meshes):
        obj.data = me
        set_opencv_camera(cam, K[t], c2w[t], width, height)
        bpy.context.view_layer.update()
        path = workdir / f"meshes_{t:04d}.exr"
        render_still(bpy, scene, path, Path(f"predicted frame {t}"))
        video[t] = to_straight_rgba8(read_exr(path)["rgba"])
        path.unlink(missing_ok=True)
    timings["render"] = time.perf_counter() - t0
    return {"video": video, "info": {"shading": shading, "frames": len(frames), "warnings": warnings,
                                     "timings": timings, "blender_version": bpy.app.version_string}}
