"""Animated 4D sequence extraction (ShapeGen4D, sections 3.1 and 5.1; Loom SPEC section 3): one animated asset in,
per-frame world-space vertices of the animated mesh (root motion removed, one normalisation for the whole
sequence), its triangles, and a fixed-view RGBA conditioning video with per-frame cameras out.

``extract_sequence(params) -> dict`` runs inside a dedicated worker process, like ``render_ttv``, and may be called
many times there: every call starts from Blender's factory settings with script auto-execution off.

Design choices (why):

- **Blender's own view of the file decides what is animated**: actions assigned to objects (armatures included),
  shape-key animation (``mesh.shape_keys.animation_data``) and *unmuted* NLA strips. Blender 5.0's glTF importer
  makes every animation an action, assigns the first one and also stores each in a *muted* NLA track: muted
  tracks do not play, so they do not count. The frame range is the union of the playing actions' ranges (NLA
  strips: their placement in scene time). No animation, an empty range, or an animation under which no vertex
  moves is a :class:`TaskError` (a failure row), not a crash.
- **Frames** are ``frames`` evenly spaced float frame numbers over ``[start, end]`` inclusive, evaluated with
  ``scene.frame_set(floor(f), subframe=f - floor(f))``; the render uses the same sub-frame.
- **Geometry** is what renders: the evaluated meshes (armature, shape keys and other modifiers applied) in world
  space, concatenated in name order; faces are the evaluated loop triangles, which must be the same every frame
  (a changing vertex count or triangle list is a TaskError: per-vertex correspondence over time is the point of a 4D
  sample). Meshes used as bone display shapes are never collected (the glTF import also passes
  ``disable_bone_shape=True`` so that icosphere is not created).
- **Root motion**: the root is the first parentless pose bone of the first armature (by name; its head and its
  world orientation, armature object transform included) or, without an armature, the top-level animated object
  (its world translation and orientation). Its translation since frame 0 is removed and, per
  ``params["root_rotation"]`` ("none" by default, "yaw" or "full"), its rotation since frame 0 (the heading about +Z,
  or all of it), about the root, with ``loom.geometry.sequence.remove_root_transform``; scale and mirrors in the
  world matrix are stripped first (``nearest_rotation``). ``info`` records ``root_offsets`` (T,3), ``root_rotations``
  (T,3,3, the rotations removed) and ``root_origin`` (3,) (the root at frame 0), world units, enough to undo it
  (``restore_root_transform``). Then ONE similarity (``sequence_normalization``) fits the bounding box of all
  frames into ``[-h, h]^3``.
- **The render shows exactly the returned vertices**: every root object is parented under one empty whose matrix is
  set per frame to ``normalization @ root_transform_t`` (``root_transforms``: ``x -> Q_t^T (x - r_t) + r_0``); after
  setting it the evaluated vertices are read again and compared with the returned ones (max error reported in
  ``info["render_vertex_error"]``).
- **Camera** (``params["camera"]``): one fixed OpenCV camera (``look_at``) at ``distance`` from the origin, at
  ``azimuth`` (about +Z, from +X) and ``elevation``; its horizontal FOV is fitted with ``fit_fov`` over the vertices of ALL frames with margin
  ``1/fill - 1``, so on the tightest side the sequence spans ``fill`` of the half-frame and the object keeps one
  scale over the video.
- **Video**: Cycles colour renders (film transparent, the asset's materials, the HDRI world like ``render_ttv``),
  read back as linear premultiplied RGBA, un-premultiplied, sRGB-encoded ('Standard' view transform) and returned
  as straight-alpha RGBA uint8 (colour is 0 where alpha rounds to 0).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from loom.geometry.camera import fit_fov, intrinsics, look_at, opencv_to_blender
from loom.geometry.sequence import (
    ROOT_ROTATION_MODES,
    apply,
    nearest_rotation,
    remove_root_transform,
    root_transforms,
    sequence_normalization,
)
from loom.platform.errors import TaskError
from loom.render.common import (
    MAX_ABS_COORD,
    color_pass_settings,
    common_render_settings,
    fov_fit_points,
    import_asset,
    make_world,
    missing_texture_warnings,
    parent_roots_under_empty,
    read_exr,
    render_still,
    reset_blender,
    to_matrix,
    to_straight_rgba8,
)

DEFAULTS = {
    "frames": 16, "width": 256, "height": 256, "half_extent": 0.5, "samples": 16, "denoise": False,
    "threads": 0, "seed": 0, "engine": "CYCLES", "device": "CPU", "root_rotation": "none",
}
# The nested sections as the 4D job writes them (``loom.corpora.shape4d.Task4D``), which leaves ``distance`` at 2.5.
CAMERA_DEFAULTS = {"azimuth": 0.0, "elevation": math.radians(15.0), "fill": 0.85, "distance": 2.5}
LIGHTING_DEFAULTS = {"strength": 1.0, "rotation": 0.0}
# Relative (to the sequence's extent) vertex displacement below which the animation counts as not moving anything.
MIN_MOTION = 1e-6


def extract_sequence(params: dict) -> dict:
    """Extract one 4D sequence from ``params["asset_path"]``. See the module docstring.

    Returns ``vertices`` (T,N,3) float32 normalised and root-fixed, ``faces`` (F,3) int32, ``video`` (T,H,W,4) uint8
    straight-alpha sRGB RGBA, ``K`` (T,3,3) float32, ``c2w`` (T,4,4) float32 OpenCV camera-to-world (the same camera
    every frame), ``frame_times`` (T,) float64 Blender frame numbers, and ``info``. Raises :class:`TaskError` for an
    asset that cannot give a sample (not animated, topology changing, corrupt, ...).
    """
    import bpy  # only here: importing this module must work without bpy

    p = {**DEFAULTS, **params}
    camera = {**CAMERA_DEFAULTS, **params.get("camera", {})}
    light = {**LIGHTING_DEFAULTS, **params.get("lighting", {})}
    timings: dict[str, float] = {}
    warnings: list[str] = []
    asset = Path(p["asset_path"])
    workdir = Path(p["workdir"])
    width, height, frames = int(p["width"]), int(p["height"]), int(p["frames"])
    half = float(p["half_extent"])
    fill = float(camera["fill"])
    if frames < 1:
        raise ValueError(f"params['frames'] must be >= 1, got {frames}")
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"params['camera']['fill'] must be in (0, 1], got {fill}")
    if half <= 0:
        raise ValueError(f"params['half_extent'] must be > 0, got {half}")
    root_rotation = p["root_rotation"]
    if root_rotation not in ROOT_ROTATION_MODES:
        raise ValueError(f"params['root_rotation'] must be one of {ROOT_ROTATION_MODES}, got {root_rotation!r}")

    # ---- import ----------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    reset_blender(bpy)
    mesh_objects = import_asset(bpy, asset)
    mesh_objects = _render_meshes(bpy, mesh_objects)
    warnings += missing_texture_warnings(bpy)
    timings["import"] = time.perf_counter() - t0

    # ---- animation: detect, sample, evaluate -------------------------------------------------------------------------
    t0 = time.perf_counter()
    scene = bpy.context.scene
    kinds, (start, end) = _detect_animation(bpy, asset)
    frame_times = np.linspace(start, end, frames, dtype=np.float64) if frames > 1 else np.array([start], np.float64)
    root_fn = _root_pose_fn(bpy)

    verts_list, roots, root_mats = [], [], []
    faces = None
    layout = None
    for f in frame_times:
        _set_frame(scene, f)
        depsgraph = bpy.context.evaluated_depsgraph_get()
        v, tri, lay = _frame_geometry(depsgraph, mesh_objects, layout, asset)
        if faces is None:
            faces, layout = tri, lay
            if len(v) == 0 or len(faces) == 0:
                raise TaskError(
                    f"{asset}: no faces: the file has {len(mesh_objects)} mesh object(s) but no triangles at frame "
                    f"{f:g}; Loom extracts surface meshes only"
                )
        elif len(v) != len(verts_list[0]) or tri.shape != faces.shape or not np.array_equal(tri, faces):
            raise TaskError(
                f"{asset}: topology changes over the animation ({len(verts_list[0])} vertices / {len(faces)} "
                f"triangles at frame {frame_times[0]:g}, {len(v)} / {len(tri)} at frame {f:g}); a 4D sequence needs "
                "the same vertices and faces in every frame"
            )
        _check_finite(v, asset, f)
        verts_list.append(v)
        position, linear = root_fn(depsgraph)
        roots.append(position)
        root_mats.append(linear)
    V = np.stack(verts_list)  # (T,N,3) float64, world
    root_positions = np.stack(roots)
    root_rotations = None  # under "none" the root's matrix is not needed (a root scaled to 0 somewhere is fine)
    if root_rotation != "none":
        try:
            root_rotations = nearest_rotation(np.stack(root_mats))
        except ValueError as e:
            raise TaskError(f"{asset}: the root's world matrix has no rotation part ({e}): the root is scaled to "
                            f"zero in some frame; root rotation {root_rotation!r} needs it, 'none' does not") from None

    extent = float((V.reshape(-1, 3).max(0) - V.reshape(-1, 3).min(0)).max())
    if extent <= 0:
        raise TaskError(f"{asset}: degenerate mesh: all vertices coincide in every frame; nothing to extract")
    motion = float(np.abs(V - V[:1]).max()) if frames > 1 else 0.0
    if frames > 1 and motion <= MIN_MOTION * extent:
        raise TaskError(
            f"{asset}: no animation: the file has {'/'.join(kinds)} animation over frames {start:g}..{end:g} but no "
            "vertex moves (the animated channels do not deform or move any mesh): not a 4D asset"
        )

    try:
        v_noroot, offsets, removed = remove_root_transform(V, root_positions, root_rotations, root_rotation)
    except ValueError as e:
        raise TaskError(f"{asset}: root rotation {root_rotation!r} cannot be removed: {e}") from None
    to_root = root_transforms(offsets, removed, root_positions[0])
    norm = sequence_normalization(v_noroot, half)
    verts = apply(norm, v_noroot)
    if np.abs(verts).max() > half * (1 + 1e-6) + 1e-9:
        raise RuntimeError(f"normalised sequence leaves the box: max |coord| {np.abs(verts).max()} > {half}")
    timings["animation"] = time.perf_counter() - t0

    # ---- scene + render ------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    root = parent_roots_under_empty(bpy, "loom_sequence_root")
    distance = float(camera["distance"])
    az, el = float(camera["azimuth"]), float(camera["elevation"])
    eye = distance * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    c2w = look_at(eye)
    if distance <= math.sqrt(3.0) * half:
        raise ValueError(f"params['camera']['distance'] {distance} puts the camera inside the unit box (half extent {half})")
    fov_x = fit_fov(fov_fit_points(verts.reshape(-1, 3), int(p["seed"])), c2w, width, height, 1.0 / fill - 1.0)
    K = intrinsics(fov_x, width, height)
    cam = _make_fixed_camera(bpy, scene, fov_x, distance, math.sqrt(3.0) * half)
    cam.matrix_world = to_matrix(opencv_to_blender(c2w))
    make_world(bpy, scene, p["hdri_path"], float(light["strength"]), float(light["rotation"]))
    common_render_settings(bpy, scene, p, width, height, warnings)
    color_pass_settings(bpy, scene, p, warnings)

    paths, render_err = [], 0.0
    for t, f in enumerate(frame_times):
        _set_frame(scene, f)
        root.matrix_world = to_matrix(norm @ to_root[t])
        bpy.context.view_layer.update()
        v_check, _, _ = _frame_geometry(bpy.context.evaluated_depsgraph_get(), mesh_objects, layout, asset)
        render_err = max(render_err, float(np.abs(v_check - verts[t]).max()))
        path = workdir / f"anim_{t:04d}.exr"
        render_still(bpy, scene, path, asset)
        paths.append(path)
    if render_err > 1e-4 * half:
        raise TaskError(
            f"{asset}: the scene does not follow the normalisation (rendered vertices differ from the extracted ones "
            f"by up to {render_err:.3g}); constraints or drivers tied to world space? The sequence cannot be rendered"
        )
    timings["render"] = time.perf_counter() - t0

    # ---- readback ------------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    video = np.empty((frames, height, width, 4), np.uint8)
    for t, path in enumerate(paths):
        video[t] = to_straight_rgba8(read_exr(path)["rgba"])
        path.unlink(missing_ok=True)
    timings["readback"] = time.perf_counter() - t0

    return {
        "vertices": verts.astype(np.float32),
        "faces": faces.astype(np.int32),
        "video": video,
        "K": np.repeat(K[None].astype(np.float32), frames, axis=0),
        "c2w": np.repeat(c2w[None].astype(np.float32), frames, axis=0),
        "frame_times": frame_times,
        "info": {
            "normalization": norm.tolist(),
            "root_offsets": offsets.tolist(),
            "root_rotations": removed.tolist(),
            "root_origin": root_positions[0].tolist(),
            "root_rotation_mode": root_rotation,
            "animation": {"kinds": kinds, "frame_range": [float(start), float(end)]},
            "fov_x": float(fov_x),
            "render_vertex_error": render_err,
            "blender_version": bpy.app.version_string,
            "warnings": warnings,
            "timings": timings,
            "mesh": {"vertices": int(V.shape[1]), "faces": len(faces)},
        },
    }


# ---------------------------------------------------------------------------------------------------------------------
# Animation
# ---------------------------------------------------------------------------------------------------------------------


def _render_meshes(bpy, mesh_objects: list) -> list:
    """Mesh objects that render, in name order, without bone display shapes (custom shapes of pose bones)."""
    shapes = set()
    for obj in bpy.context.scene.objects:
        if obj.type == "ARMATURE" and obj.pose is not None:
            for pb in obj.pose.bones:
                if pb.custom_shape is not None:
                    shapes.add(pb.custom_shape.name)
                    pb.custom_shape.hide_render = True  # e.g. the glTF importer's icosphere: not part of the asset
    return sorted((o for o in mesh_objects if o.name not in shapes), key=lambda o: o.name)


def _playing(anim_data):
    """(active action or None, [(action, scene start, scene end)] of unmuted NLA strips)."""
    if anim_data is None:
        return None, []
    strips = []
    for track in anim_data.nla_tracks:
        if track.mute:
            continue
        for s in track.strips:
            if not s.mute and s.action is not None:
                strips.append((s.action, float(s.frame_start), float(s.frame_end)))
    return anim_data.action, strips


def _detect_animation(bpy, asset: Path) -> tuple[list[str], tuple[float, float]]:
    """Kinds of playing animation and the union of their frame ranges (scene frames)."""
    kinds, ranges = set(), []

    def collect(anim_data, kind):
        action, strips = _playing(anim_data)
        if action is not None:
            kinds.add(kind)
            ranges.append(tuple(float(x) for x in action.frame_range))
        if strips:
            kinds.update((kind, "nla"))
            ranges.extend((a, b) for _, a, b in strips)

    for obj in bpy.context.scene.objects:
        collect(obj.animation_data, "armature" if obj.type == "ARMATURE" else "object")
        if obj.type == "MESH" and obj.data.shape_keys is not None:
            collect(obj.data.shape_keys.animation_data, "shape_key")
    if not kinds:
        raise TaskError(f"{asset}: no animation (no actions, armature or shape-key animation): not a 4D asset")
    start, end = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if not end > start:
        raise TaskError(f"{asset}: no animation: the animation's frame range {start:g}..{end:g} is empty: "
                        "not a 4D asset")
    return sorted(kinds), (start, end)


def _set_frame(scene, f: float) -> None:
    whole = math.floor(f)
    scene.frame_set(int(whole), subframe=float(f - whole))


def _root_pose_fn(bpy):
    """A function depsgraph -> ((3,) world position, (3,3) world linear map: rotation, maybe with scale) of the
    sequence's root (see the module docstring)."""
    objs = sorted(bpy.context.scene.objects, key=lambda o: o.name)
    arms = [o for o in objs if o.type == "ARMATURE" and o.pose is not None and len(o.pose.bones) > 0]
    if arms:
        arm = arms[0]
        bone = next(pb.name for pb in arm.pose.bones if pb.parent is None)

        def armature_root(depsgraph):
            ev = arm.evaluated_get(depsgraph)
            # Pose-space matrix of the bone (rest and pose; its translation is the head) taken to world.
            m = np.array(ev.matrix_world, dtype=np.float64) @ np.array(ev.pose.bones[bone].matrix, dtype=np.float64)
            return m[:3, 3].copy(), m[:3, :3].copy()

        return armature_root

    def depth(o):
        d = 0
        while o.parent is not None:
            o, d = o.parent, d + 1
        return d

    animated = [o for o in objs if o.animation_data is not None and any(_playing(o.animation_data)[i] for i in (0, 1))]
    if animated:
        top = min(animated, key=lambda o: (depth(o), o.name))

        def object_root(depsgraph):
            m = np.array(top.evaluated_get(depsgraph).matrix_world, dtype=np.float64)
            return m[:3, 3].copy(), m[:3, :3].copy()

        return object_root
    return lambda depsgraph: (np.zeros(3), np.eye(3))


def _frame_geometry(depsgraph, mesh_objects: list, layout, asset: Path):
    """World-space vertices (N,3) float64 and triangles (F,3) int32 of the evaluated meshes, concatenated in the
    order of ``mesh_objects``. ``layout`` (which objects have faces) is decided on the first frame and kept."""
    chunks, tris, used, offset = [], [], [], 0
    for i, obj in enumerate(mesh_objects):
        if layout is not None and i not in layout:
            continue
        ev = obj.evaluated_get(depsgraph)
        me = ev.to_mesh()
        try:
            n = len(me.vertices)
            if layout is None and (n == 0 or len(me.polygons) == 0):
                continue  # points/edges-only objects do not render
            co = np.empty(n * 3, np.float32)
            me.vertices.foreach_get("co", co)
            me.calc_loop_triangles()
            tri = np.empty(len(me.loop_triangles) * 3, np.int32)
            me.loop_triangles.foreach_get("vertices", tri)
            m = np.array(ev.matrix_world, dtype=np.float64)
        finally:
            ev.to_mesh_clear()
        chunks.append(co.reshape(-1, 3).astype(np.float64) @ m[:3, :3].T + m[:3, 3])
        tris.append(tri.reshape(-1, 3) + offset)
        used.append(i)
        offset += n
    if not chunks:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int32), set(used)
    return np.concatenate(chunks), np.concatenate(tris).astype(np.int32), set(used)


def _check_finite(v: np.ndarray, asset: Path, f: float) -> None:
    bad = ~np.isfinite(v).all(axis=1) | (np.abs(v) > MAX_ABS_COORD).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TaskError(
            f"{asset}: non-finite or absurd coordinates at frame {f:g}: {int(bad.sum())} of {len(v)} vertices are "
            f"NaN, infinite or beyond {MAX_ABS_COORD:g} (first: {v[i].tolist()}); the file is corrupt: re-export it"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Scene
# ---------------------------------------------------------------------------------------------------------------------


def _make_fixed_camera(bpy, scene, fov_x: float, distance: float, object_radius: float):
    cam = bpy.data.cameras.new("loom_camera")
    cam.sensor_fit = "HORIZONTAL"
    cam.angle_x = fov_x
    cam.shift_x = cam.shift_y = 0.0
    cam.clip_start = max(1e-3, 0.1 * (distance - object_radius))
    cam.clip_end = distance + object_radius + 1.0
    obj = bpy.data.objects.new("loom_camera", cam)
    scene.collection.objects.link(obj)
    scene.camera = obj
    return obj
