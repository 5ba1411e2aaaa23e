"""Blender render of one scene video (SPEC section 2; VideoFrom3D, sections 3.1 and 3.3): a scene file (several
objects) seen along a camera trajectory; per frame RGB, camera-space depth, world normals and positions, mask,
object ids and four structural edge maps (silhouette, crease, object boundary, intersection), plus the cameras.

``render_scene(params) -> dict`` runs inside a sandbox worker process and may be called many times there; every call
starts from Blender's factory settings with script auto-execution off (``common.reset_blender``) and imports the
file with the checks of ``common.import_asset``. The caller samples the trajectory
(:mod:`loom.geometry.trajectory`) and passes ``K`` (T,3,3) and ``c2w`` (T,4,4, OpenCV camera-to-world, world +Z up):
the renderer does not parse trajectories. The scene is rendered in its own coordinates (no normalisation).

Passes per frame (why: see ``ttv.py``; same exact-geometry recipe):

- **Geometry pass**: Cycles, 1 sample, 0.01 px box filter, no bounces, no world, every material replaced by one
  override material. Position, Normal (interpolated shading normal) and IndexOB passes; ``pass_index`` is set to
  1..N on the mesh objects sorted by name (``info["objects"]`` lists them in that order; 0 = background). The
  override material adds an emission of ``0.5 * true_normal + 0.5`` (Geometry node, *True Normal*: the flat face
  normal, ignoring smooth shading and normal maps) to a diffuse BSDF; with no light the Combined pass is exactly that
  emission, so the face normals needed for creases come out of the same render. Depth is camera-space z of
  the Position pass (``world_to_camera``), so ``position == unproject_depth(depth, K, c2w)`` by construction.
- **Colour pass**: the scene's own materials, environment light (``hdri_path``, with ``params["lighting"]``'s
  ``strength`` and ``rotation``; a uniform grey world if none),
  requested samples/denoising, composited over ``background`` and sRGB-encoded as in ``ttv.py``.
- **Camera**: horizontal sensor fit, ``angle_x = 2 atan(W / (2 fx))``; a principal point off the image centre maps
  to ``shift_x = (W/2 - cx) / W`` and ``shift_y = (cy - H/2) / W`` (Blender's shifts are fractions of the fitted,
  here horizontal, sensor size). Square pixels (``fx == fy``) are required.

Edge maps, ``edges`` (T,H,W,4) bool in the order ``EDGE_KINDS`` = silhouette, crease, boundary, intersection.
``params["edges"]`` holds ``method``, ``crease_angle_deg`` and ``line_width_px``. Two methods:

- ``"gbuffer"`` (**default**): from the exact per-pixel passes, comparing each pixel with its right and lower
  neighbour. Two neighbouring surface pixels are *continuous* when each one's 3D point lies within
  ``DISCONTINUITY_PX`` pixel footprints (``z / fx``) of the other's face plane (the smaller of the two point-to-plane
  distances: robust for surfaces seen at grazing angles, where depth itself changes fast). Then:
  silhouette = object pixels next to background, plus depth discontinuities within one object (the nearer pixel);
  crease = same object, continuous, face normals turning by more than ``crease_angle_deg``;
  boundary = different objects with a depth discontinuity (marked on the nearer, occluding pixel);
  intersection = different objects, continuous (surfaces meeting or touching: a box pushed through another, a
  cube standing on the ground). Lines are 1 px, on the object/occluder side; ``line_width_px > 1`` dilates them
  with a disc. Exact, deterministic, no extra render: the cost is numpy on the passes (~50 ms a 256x256 frame).
  Limitation: two objects closer than ``DISCONTINUITY_PX`` pixel footprints along the view (e.g. a 0.15 gap seen at
  ~0.08 per pixel) count as touching, so their outline is labelled intersection rather than boundary; at higher
  resolution the footprint shrinks and the labels sharpen.
- ``"freestyle"``: Blender Freestyle line sets, rendered as the Freestyle render pass (``as_render_pass``) over the
  geometry-pass settings, one render per line set per frame (overlapping strokes in one render cannot be separated
  by colour), view map cached between the line sets of a frame: silhouette = Freestyle silhouette | border |
  external contour; crease = crease (``FreestyleSettings.crease_angle`` is the *dihedral* angle, so it is set to
  ``180 - crease_angle_deg``); boundary = contour AND NOT external contour (outlines of an object over another).
  Freestyle has no intersection edge type (Line Art has one, but Line Art is a Grease Pencil modifier whose strokes
  need the GPU draw engine to render), so the intersection map comes from the g-buffer method in this mode too.
  Strokes are anti-aliased: a pixel is on a line when the pass alpha exceeds ``FREESTYLE_ALPHA``.
  Measured (bpy 5.0.1, CPU, 2 threads, test scene, 256x256, 3 frames, 8 samples): Freestyle works headless, but
  its three line-set renders cost ~0.9 s a frame (edges 2.69 s in all) against ~0.05 s a frame for gbuffer (0.15 s;
  geometry pass 0.18 s, colour pass 1.7 s, import 0.09 s, readback 0.12 s), its strokes follow mesh edges
  (anti-aliased, can sit a pixel off the exact occluding contour), cube outline edges come out as both silhouette
  and crease, and it has no intersections; hence gbuffer is the default.

Crease angle default: 45 degrees of normal turn (a dihedral angle of 135 degrees): every box edge (90 degrees) is a
crease, a tessellated sphere or cylinder with 16 or more segments (<= 22.5 degrees between facets) has none, and it
is the value of Freestyle's own default (134.43 degrees dihedral).

Returns ``rgb`` (T,H,W,3) uint8, ``depth`` (T,H,W) float32 camera z (0 on background), ``mask`` (T,H,W) bool,
``normal`` (T,H,W,3) float32 world, ``position`` (T,H,W,3) float32 world, ``object_id`` (T,H,W) uint16,
``edges`` (T,H,W,4) bool, ``K`` (T,3,3) and ``c2w`` (T,4,4) float32, ``info`` (blender_version, warnings, timings,
objects, edges_method, crease_angle_deg).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from loom.geometry.camera import world_to_camera
from loom.platform.errors import TaskError
from loom.render.common import (
    check_cameras,
    color_pass_settings,
    common_render_settings,
    exact_geometry_pass_settings,
    import_asset,
    make_camera_covering,
    make_world,
    missing_texture_warnings,
    render_sequence,
    render_still,
    reset_blender,
    set_opencv_camera,
    to_srgb8,
)

EDGE_KINDS = ("silhouette", "crease", "boundary", "intersection")
EDGE_METHODS = ("gbuffer", "freestyle")
DEFAULT_CREASE_ANGLE_DEG = 45.0
# Neighbouring pixels are on one continuous surface if their point-to-plane distance is below this many pixel
# footprints (z / fx). A crease seen at 80 degrees from the normal has distances of ~1/cos(80) = 6 footprints on the
# grazing side, but the other side's plane gives ~1: the test takes the smaller of the two.
DISCONTINUITY_PX = 3.0
FREESTYLE_ALPHA = 0.5


def render_scene(params: dict) -> dict:
    """Render one scene video; see the module docstring. Raises :class:`TaskError` for a scene file that cannot
    produce a sample, ``ValueError`` for bad parameters."""
    import bpy  # only here: importing this module must work without bpy

    timings: dict[str, float] = {}
    warnings: list[str] = []
    asset = Path(params["asset_path"])
    width, height = int(params["width"]), int(params["height"])
    workdir = Path(params["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    K, c2w = check_cameras(params["K"], params["c2w"], width, height)
    frames = len(K)
    edges = params.get("edges", {})
    method = str(edges.get("method", "gbuffer"))
    if method not in EDGE_METHODS:
        raise ValueError(f"params['edges']['method'] must be one of {EDGE_METHODS}, got {method!r}")
    crease_deg = float(edges.get("crease_angle_deg", DEFAULT_CREASE_ANGLE_DEG))
    if not 0.0 < crease_deg < 180.0:
        raise ValueError(f"params['edges']['crease_angle_deg'] must be in (0, 180), got {crease_deg}")
    line_width = float(edges.get("line_width_px", 1.0))
    if line_width < 1.0:
        raise ValueError(f"params['edges']['line_width_px'] must be >= 1, got {line_width}")

    # ---- import --------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    reset_blender(bpy)
    mesh_objects = import_asset(bpy, asset)
    from loom.render.ttv import (
        _evaluated_vertices,  # NaN/no-face checks shared with the turntable
    )

    verts, _ = _evaluated_vertices(bpy, asset, mesh_objects)
    warnings += missing_texture_warnings(bpy)
    mesh_objects = sorted(mesh_objects, key=lambda o: o.name)
    if len(mesh_objects) > 65535:
        raise TaskError(f"{asset}: {len(mesh_objects)} mesh objects; object_id is uint16 (at most 65535)")
    for i, obj in enumerate(mesh_objects):
        obj.pass_index = i + 1
    timings["import"] = time.perf_counter() - t0

    # ---- scene: camera, light, settings ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    scene = bpy.context.scene
    cam_obj = make_camera_covering(bpy, scene, verts, c2w)
    hdri, light = params.get("hdri_path"), params.get("lighting", {})
    if hdri:
        make_world(bpy, scene, str(hdri), float(light.get("strength", 1.0)), float(light.get("rotation", 0.0)))
    else:
        _grey_world(bpy, scene, float(light.get("strength", 1.0)))
    params = {"samples": 16, **params}
    common_render_settings(bpy, scene, params, width, height, warnings)
    timings["scene"] = time.perf_counter() - t0

    # ---- geometry pass -------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    _geometry_pass_settings(bpy, scene)
    world = scene.world
    scene.world = None
    def set_camera(t: int) -> None:
        set_opencv_camera(cam_obj, K[t], c2w[t], width, height)

    geo_paths = render_sequence(bpy, scene, frames, set_camera, workdir, "scene_geo", asset)
    timings["render_geometry"] = time.perf_counter() - t0

    # ---- Freestyle line sets (edges_method="freestyle") -------------------------------------------------------------
    t0 = time.perf_counter()
    fs_paths: list[dict[str, Path]] = []
    if method == "freestyle":
        linesets = _freestyle_settings(bpy, scene, crease_deg, line_width)
        for t in range(frames):
            set_opencv_camera(cam_obj, K[t], c2w[t], width, height)
            paths = {}
            for kind, ls in linesets.items():
                for other in linesets.values():
                    other.show_render = other is ls
                path = workdir / f"scene_fs_{kind}_{t:04d}.exr"
                render_still(bpy, scene, path, asset)
                paths[kind] = path
            fs_paths.append(paths)
        scene.render.use_freestyle = False
    t_freestyle = time.perf_counter() - t0

    # ---- colour pass ---------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    scene.world = world
    color_pass_settings(bpy, scene, params, warnings)
    scene.view_layers[0].use_pass_object_index = False
    rgb_paths = render_sequence(bpy, scene, frames, set_camera, workdir, "scene_rgb", asset)
    timings["render_color"] = time.perf_counter() - t0

    # ---- readback and edges ----------------------------------------------------------------------------------------
    t_read, t_edges = 0.0, t_freestyle
    out = {
        "rgb": np.empty((frames, height, width, 3), np.uint8),
        "depth": np.empty((frames, height, width), np.float32),
        "mask": np.empty((frames, height, width), bool),
        "normal": np.empty((frames, height, width, 3), np.float32),
        "position": np.empty((frames, height, width, 3), np.float32),
        "object_id": np.empty((frames, height, width), np.uint16),
        "edges": np.empty((frames, height, width, 4), bool),
    }
    background = np.asarray(params.get("background", (1.0, 1.0, 1.0)), dtype=np.float32)
    for t in range(frames):
        t0 = time.perf_counter()
        g = _read_layers(geo_paths[t])
        mask = g["Combined"][..., 3] > 0.5
        pos = np.where(mask[..., None], g["Position"], 0.0)
        nrm = g["Normal"]
        nrm = nrm / np.maximum(np.linalg.norm(nrm, axis=-1, keepdims=True), 1e-12)
        true_n = g["Combined"][..., :3] * 2.0 - 1.0
        true_n = true_n / np.maximum(np.linalg.norm(true_n, axis=-1, keepdims=True), 1e-12)
        depth = np.where(mask, world_to_camera(pos.astype(np.float64), c2w[t])[..., 2], 0.0)
        oid = np.where(mask, np.rint(g["Object Index"][..., 0]), 0).astype(np.uint16)
        out["mask"][t] = mask
        out["position"][t] = pos
        out["normal"][t] = np.where(mask[..., None], nrm, 0.0)
        out["depth"][t] = depth
        out["object_id"][t] = oid
        out["rgb"][t] = to_srgb8(_read_layers(rgb_paths[t])["Combined"], background)
        t_read += time.perf_counter() - t0

        t0 = time.perf_counter()
        e = gbuffer_edges(mask, pos, true_n, oid, depth, float(K[t][0, 0]), crease_deg)
        if method == "freestyle":
            for i, kind in enumerate(EDGE_KINDS[:3]):
                e[..., i] = _read_layers(fs_paths[t][kind])["Freestyle"][..., 3] > FREESTYLE_ALPHA
        elif line_width > 1.0:
            e = _dilate(e, (line_width - 1.0) / 2.0)
        if method == "freestyle" and line_width > 1.0:
            e[..., 3] = _dilate(e[..., 3:], (line_width - 1.0) / 2.0)[..., 0]
        out["edges"][t] = e
        t_edges += time.perf_counter() - t0
        for p in [geo_paths[t], rgb_paths[t], *(fs_paths[t].values() if fs_paths else [])]:
            p.unlink(missing_ok=True)
    timings["edges"] = t_edges
    timings["readback"] = t_read

    out["K"] = K.astype(np.float32)
    out["c2w"] = c2w.astype(np.float32)
    out["info"] = {
        "blender_version": bpy.app.version_string,
        "warnings": warnings,
        "timings": timings,
        "objects": [o.name for o in mesh_objects],
        "edges_method": method,
        "crease_angle_deg": crease_deg,
        "edge_kinds": list(EDGE_KINDS),
    }
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Edges from the g-buffer (pure numpy)
# ---------------------------------------------------------------------------------------------------------------------


def gbuffer_edges(mask, position, face_normal, object_id, depth, fx: float, crease_angle_deg: float) -> np.ndarray:
    """(H,W,4) bool edge maps in ``EDGE_KINDS`` order from one frame's exact passes (see the module docstring)."""
    h, w = mask.shape
    edges = np.zeros((h, w, 4), bool)
    cos_crease = math.cos(math.radians(crease_angle_deg))
    pos = position.astype(np.float64)
    for axis in (0, 1):  # neighbour below, neighbour to the right
        a = (slice(0, h - 1), slice(None)) if axis == 0 else (slice(None), slice(0, w - 1))
        b = (slice(1, h), slice(None)) if axis == 0 else (slice(None), slice(1, w))
        ma, mb = mask[a], mask[b]
        # Silhouette against the background: the object pixel.
        edges[a + (0,)] |= ma & ~mb
        edges[b + (0,)] |= mb & ~ma
        both = ma & mb
        d = pos[b] - pos[a]
        dist = np.minimum(np.abs((face_normal[a] * d).sum(-1)), np.abs((face_normal[b] * d).sum(-1)))
        footprint = np.maximum(depth[a], depth[b]) / fx
        disc = both & (dist > DISCONTINUITY_PX * footprint)
        cont = both & ~disc
        same = object_id[a] == object_id[b]
        a_near = depth[a] <= depth[b]
        # Depth discontinuities: silhouette within one object, boundary between objects; on the nearer pixel.
        for kind, sel in ((0, disc & same), (2, disc & ~same)):
            edges[a + (kind,)] |= sel & a_near
            edges[b + (kind,)] |= sel & ~a_near
        turn = (face_normal[a] * face_normal[b]).sum(-1) < cos_crease
        edges[a + (1,)] |= cont & same & turn
        edges[a + (3,)] |= cont & ~same
    return edges


def _dilate(edges: np.ndarray, radius: float) -> np.ndarray:
    """Dilate (H,W,C) bool maps with a disc of ``radius`` pixels."""
    r = math.floor(radius + 1e-9)
    if r <= 0:
        return edges
    h, w = edges.shape[:2]
    out = edges.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dx or dy) and dx * dx + dy * dy <= radius * radius + 1e-9:
                out[max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] |= \
                    edges[max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Blender set-up
# ---------------------------------------------------------------------------------------------------------------------


def _grey_world(bpy, scene, strength: float) -> None:
    world = bpy.data.worlds.new("loom_world")
    scene.world = world
    nt = world.node_tree
    nt.nodes.clear()
    bg = nt.nodes.new("ShaderNodeBackground")
    bg.inputs["Color"].default_value = (0.8, 0.8, 0.8, 1.0)
    bg.inputs["Strength"].default_value = strength
    out = nt.nodes.new("ShaderNodeOutputWorld")
    nt.links.new(bg.outputs["Background"], out.inputs["Surface"])


def _geometry_pass_settings(bpy, scene) -> None:
    """1 sample through the pixel centre, no bounces; Position, Normal, IndexOB; Combined = encoded face normal."""
    exact_geometry_pass_settings(scene, _geometry_material(bpy), object_index=True)


def _geometry_material(bpy):
    """Diffuse (gives the Normal pass its shading normal; black without lights) + emission of the true (face)
    normal encoded as 0.5 n + 0.5."""
    mat = bpy.data.materials.new("loom_scene_geometry")
    # Not a light: otherwise the emissive objects light each other's diffuse (direct light is bounce 0) and the
    # Combined pass is no longer the encoded normal alone.
    mat.cycles.emission_sampling = "NONE"
    nt = mat.node_tree
    nt.nodes.clear()
    geo = nt.nodes.new("ShaderNodeNewGeometry")
    enc = nt.nodes.new("ShaderNodeVectorMath")
    enc.operation = "MULTIPLY_ADD"
    enc.inputs[1].default_value = (0.5, 0.5, 0.5)
    enc.inputs[2].default_value = (0.5, 0.5, 0.5)
    emit = nt.nodes.new("ShaderNodeEmission")
    emit.inputs["Strength"].default_value = 1.0
    diffuse = nt.nodes.new("ShaderNodeBsdfDiffuse")
    diffuse.inputs["Color"].default_value = (0.0, 0.0, 0.0, 1.0)  # a black BSDF: only its normal is used
    add = nt.nodes.new("ShaderNodeAddShader")
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    nt.links.new(geo.outputs["True Normal"], enc.inputs[0])
    nt.links.new(enc.outputs["Vector"], emit.inputs["Color"])
    nt.links.new(diffuse.outputs["BSDF"], add.inputs[0])
    nt.links.new(emit.outputs["Emission"], add.inputs[1])
    nt.links.new(add.outputs["Shader"], out.inputs["Surface"])
    return mat


def _freestyle_settings(bpy, scene, crease_deg: float, line_width: float) -> dict:
    r = scene.render
    r.use_freestyle = True
    r.line_thickness_mode = "ABSOLUTE"
    r.line_thickness = 1.0
    vl = scene.view_layers[0]
    vl.use_freestyle = True
    fs = vl.freestyle_settings
    fs.mode = "EDITOR"
    fs.as_render_pass = True
    fs.use_view_map_cache = True
    fs.use_culling = False
    fs.crease_angle = math.radians(180.0 - crease_deg)  # Freestyle's is the dihedral angle
    while len(fs.linesets):
        fs.linesets.remove(fs.linesets[0])
    spec = {
        "silhouette": ("OR", {"silhouette": False, "border": False, "external_contour": False}),
        "crease": ("OR", {"crease": False}),
        "boundary": ("AND", {"contour": False, "external_contour": True}),
    }
    out = {}
    for kind, (combination, types) in spec.items():
        ls = fs.linesets.new(kind)
        style = bpy.data.linestyles.new(f"loom_{kind}")
        style.color = (1.0, 1.0, 1.0)
        style.thickness = line_width
        style.use_chaining = True
        ls.linestyle = style
        ls.select_by_visibility = True
        ls.visibility = "VISIBLE"
        ls.select_by_edge_types = True
        ls.select_by_collection = ls.select_by_face_marks = ls.select_by_image_border = False
        ls.edge_type_combination = combination
        for name in ("silhouette", "border", "crease", "ridge_valley", "suggestive_contour", "material_boundary",
                     "contour", "external_contour", "edge_mark"):
            setattr(ls, f"select_{name}", name in types)
            setattr(ls, f"exclude_{name}", bool(types.get(name, False)))
        out[kind] = ls
    return out


def _read_layers(path: Path) -> dict[str, np.ndarray]:
    """Pass name -> (H,W,C) float32 from a (multi-part, multilayer or single-layer) EXR written by Blender."""
    import OpenEXR

    with OpenEXR.File(str(path), separate_channels=True) as f:
        ch = {name: np.asarray(c.pixels, dtype=np.float32) for part in f.parts for name, c in part.channels.items()}
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in ch.items():
        parts = name.split(".")
        layer = parts[-2] if len(parts) >= 2 else "Combined"
        groups.setdefault(layer, {})[parts[-1]] = arr
    out = {}
    for layer, chans in groups.items():
        order = [c for c in ("R", "G", "B", "A", "X", "Y", "Z", "V") if c in chans] or sorted(chans)
        out[layer] = np.stack([chans[c] for c in order], axis=-1)
    if "Combined" not in out and {"R", "G", "B", "A"} <= set(ch):
        out["Combined"] = np.stack([ch[c] for c in "RGBA"], axis=-1)
    return out
