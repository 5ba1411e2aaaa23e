"""Blender render of one turntable video (TAPESTRY, sections 3.1 and 4.1): one asset in, per-frame RGB, world-space
normals and positions, camera-space depth, mask and cameras out.

``render_ttv(params) -> dict`` runs inside a dedicated worker process and may be called many times there, once per
asset; every call starts from Blender's factory settings so no state leaks from one asset to the next.

Design choices (why):

- **Safety first.** Blender can run Python embedded in files (auto-run scripts, Python drivers). Every call turns
  auto-execution off after the factory reset (which resets preferences too) and refuses to go on if it is still on.
- **Normalisation** (paper 3.1): the world-space vertices of the *evaluated* meshes (modifiers and skinning applied,
  i.e. what actually renders) define a similarity onto the unit sphere (``similarity_to_unit_sphere``), followed by
  the task's rotation. The product is applied once, by parenting every root object under an empty, so hierarchies,
  armatures and instancing move rigidly. ``info["normalization"]`` is that 4x4 matrix.
- **Only meshes render.** Non-mesh renderable objects (curves, text, point clouds, volumes) are hidden from render
  because they are not part of the normalised bounds; imported lights and cameras are deleted so the environment map
  is the only light and our camera the only camera.
- **Two passes per frame.** The geometry pass (Cycles, 1 sample, box filter of width 0.01 px, no bounces, every
  material replaced by one opaque diffuse material) writes Position, Normal and Depth at the pixel centre: a filter
  of normal width would average positions of neighbouring surfaces across silhouettes. The colour pass uses the
  asset's own materials, the requested samples, adaptive sampling, OIDN denoising and the default pixel filter.
  Overriding materials in the geometry pass makes the mask the geometric silhouette (alpha-cut-out texels count as
  object) and the normals the mesh's interpolated normals, without normal or bump maps: the geometry conditions
  describe the shape, not the texture.
- **Depth is computed, not read.** Loom's depth is OpenCV camera-space z. It is computed from the world-space
  Position pass as ``z`` of ``world_to_camera(position, c2w)``, so ``position == unproject_depth(depth, K, c2w)``
  holds by construction up to the camera's sub-pixel sampling (Blender 5.0's Cycles Z pass is also camera-space z,
  but this path does not depend on that).
- **Colour** is read as linear premultiplied RGBA (film transparent), composited in linear light over
  ``background`` (given as display, i.e. sRGB-encoded, values in 0..1), clipped to [0, 1] and encoded with the
  standard sRGB transfer function (the 'Standard' view transform, no AgX/Filmic tone mapping), then rounded to uint8.
- **Albedo** (optional, ``params["albedo"]``): the colour pass also writes Cycles' Diffuse Color pass ("DiffCol";
  Blender 5.0 names it "Diffuse Color" in the EXR): the weight of the material's diffuse closures at the first visible
  surface as Cycles evaluates it, unlit, i.e. the base colour (whatever the material's nodes feed into it: the
  base-colour texture sampled at that point, vertex colours, ...). For a Principled BSDF Cycles also scales that
  weight by ``(1 - metallic) * (1 - transmission)`` (from Cycles' closure set-up, not measured here) and by the light
  the dielectric specular layer above it does not reflect (1 - its Fresnel albedo, which grows towards grazing
  angles): a metal's albedo is dark, a glossy dielectric's a few percent darker than its base colour. Measured (32x32
  Cycles renders of a box): an OBJ material Kd (0.8, 0.3, 0.1) with Ks 0 gives exactly sRGB (231, 149, 89) on every
  fully covered pixel (tests/render/test_render_ttv.py); with Ks 0.5, (227, 146, 87) on most of them and darker on
  faces seen at grazing angles. It is read from the same EXR as the colour (multilayer then, half float) and averaged
  over the same pixel-filter samples, background samples adding 0, so it is premultiplied by the same coverage: it is
  composited with the colour pass's alpha over ``background`` in linear light, clipped and sRGB-encoded exactly as
  ``rgb`` is (``to_srgb8``). It is not denoised (OIDN denoises only the combined pass) and needs no denoising: an
  unlit colour has no light-path noise, only anti-aliasing at texel and silhouette edges. Rendering it does not change
  ``rgb`` (tested: bit-identical). It does not depend on the lighting (tested: identical under two environment
  strengths and rotations), except that with adaptive sampling a pixel's sample count follows the lit image's noise,
  so anti-aliased edge pixels could in principle differ by a level between lightings.
- **Partial texture** (optional, ``params["partial"]``: TAPESTRY's 3D-aware inpainting trains on renders of a
  partially textured asset with the object rotated and the orbit kept): a second geometry pass along an earlier orbit
  (the same circle, ``views`` cameras) that sees the object as it was before one of texturing's base tilts; a pixel
  of the video is ``known`` when that earlier orbit saw its surface point facing it and unoccluded (the depth test
  of back-projection, ``loom.geometry.texture.seen_from``), i.e. exactly the texels an inpainting stage would have
  from the stage before it. Training masks the colour outside ``known`` to make the known and mask videos.
- **Environment light**: an Environment Texture node fed by a Mapping node; the map is rotated by ``hdri_rotation``
  radians about world +Z (positive = counter-clockwise seen from above), i.e. the lookup vector is rotated by minus
  that angle.

Measured precision (64x64, 4 frames, Blender 5.0.1, CPU, tests/render/test_render_ttv.py): inside the mask
``|position - unproject_depth(depth, K, c2w)|`` is at most ~3e-5 (median ~1.7e-5) for an object in the unit sphere
seen from distance ~2.6, and every position projects to within 1e-3 px of its pixel centre: what remains is the
offset of Cycles' single sample inside the 0.01 px box filter plus float32 storage. Normals are unit to ~1e-7.
Blender 5.0.1's Cycles Depth (Z) pass equals camera-space z here to ~3e-7 (it is not the ray length).

Blender 5.0 pitfalls met here: multilayer EXR needs ``image_settings.media_type = 'MULTI_LAYER_IMAGE'`` before
``OPEN_EXR_MULTILAYER`` is an allowed file format, and is written as a multi-part EXR (one part per pass); the Eevee
engine id is ``BLENDER_EEVEE`` again (``BLENDER_EEVEE_NEXT`` in 4.2-4.4); ``World.use_nodes`` is deprecated (always
on); the OBJ, PLY and STL importers silently turn NaN/inf coordinates into 0, hence :func:`_prescan_nonfinite`.
Eevee runs headless through EGL but, without a GPU, spends ~15 s per 64x64 frame compiling shaders: use Cycles.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from loom.geometry.camera import (
    fit_fov,
    intrinsics,
    opencv_to_blender,
    orbit_c2w,
    similarity_to_unit_sphere,
    world_to_camera,
)
from loom.platform.errors import TaskError

# The import, safety, lighting, render-setting and EXR helpers live in common.py (shared with anim.py); imported
# back under their old names here.
from loom.render.common import (  # noqa: F401  (re-exported: tests and callers use these names)
    FOV_FIT_MAX_POINTS,
    MAX_ABS_COORD,
    SUPPORTED_FORMATS,
    _prescan_nonfinite,
)
from loom.render.common import color_pass_settings as _color_pass_settings
from loom.render.common import (
    common_render_settings as _common_render_settings,
)
from loom.render.common import fov_fit_points as _fov_fit_points
from loom.render.common import import_asset as _import_asset
from loom.render.common import make_world as _make_world
from loom.render.common import (
    missing_texture_warnings as _missing_texture_warnings,
)
from loom.render.common import exact_geometry_pass_settings, parent_roots_under_empty, render_sequence
from loom.render.common import read_exr as _read_exr
from loom.render.common import reset_blender as _reset_blender
from loom.render.common import srgb_decode as _srgb_decode  # noqa: F401
from loom.render.common import srgb_encode as _srgb_encode  # noqa: F401
from loom.render.common import to_matrix as _to_matrix
from loom.render.common import to_srgb8 as _to_srgb8


def render_ttv(params: dict) -> dict:
    """Render one turntable video of ``params["asset_path"]``. See the module docstring and the Loom SPEC, section 1.
    Reads ``params["orbit"]`` (``radius``, ``height``: camera height z, ``fov_margin``), ``params["lighting"]``
    (``strength``, ``rotation``) with the map at ``params["hdri_path"]``, and the flat render settings
    (``loom.corpora.base.RenderTask``).

    Returns ``rgb`` (T,H,W,3) uint8, ``normal`` (T,H,W,3) float32 world space, ``position`` (T,H,W,3) float32 world,
    ``depth`` (T,H,W) float32 camera-space z, ``mask`` (T,H,W) bool, ``K`` (T,3,3) float32, ``c2w`` (T,4,4) float32
    OpenCV camera-to-world, and ``info`` (normalization, fov_x, blender_version, warnings, timings, mesh). With
    ``params["albedo"]`` true, also ``albedo`` (T,H,W,3) uint8: the unlit diffuse colour, sRGB, over the background;
    with ``params["partial"]``, also ``known`` (T,H,W) bool (``_earlier_orbit_pass``). Raises :class:`TaskError`
    for an asset that cannot produce a sample.
    """
    import bpy  # only here: `import loom.render.ttv` must work without bpy installed

    timings: dict[str, float] = {}
    warnings: list[str] = []
    asset = Path(params["asset_path"])
    width, height, frames = int(params["width"]), int(params["height"]), int(params["frames"])
    albedo = bool(params.get("albedo", False))
    workdir = Path(params["workdir"])

    # ---- import --------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    _reset_blender(bpy)
    mesh_objects = _import_asset(bpy, asset)
    verts_world, n_faces = _evaluated_vertices(bpy, asset, mesh_objects)
    warnings += _missing_texture_warnings(bpy)
    timings["import"] = time.perf_counter() - t0

    # ---- scene: normalise, cameras, light, render settings ---------------------------------------------------------
    t0 = time.perf_counter()
    rotation = np.asarray(params["rotation"], dtype=np.float64)
    if rotation.shape != (3, 3) or not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-5):
        raise ValueError(f"params['rotation'] must be a 3x3 rotation matrix, got {rotation.tolist()}")
    rot4 = np.eye(4)
    rot4[:3, :3] = rotation
    try:
        normalization = rot4 @ similarity_to_unit_sphere(verts_world)
    except ValueError as e:  # all vertices coincide: nothing to normalise
        raise TaskError(f"{asset}: degenerate mesh: {e}; the asset has no extent to render") from None
    _apply_world_transform(bpy, normalization)
    verts = verts_world @ normalization[:3, :3].T + normalization[:3, 3]

    orbit, light = params["orbit"], params["lighting"]
    radius, height_z = float(orbit["radius"]), float(orbit["height"])
    c2w = orbit_c2w(frames, radius, height_z)
    fov_x = fit_fov(_fov_fit_points(verts, int(params.get("seed", 0))), c2w, width, height,
                    float(orbit["fov_margin"]))
    K = intrinsics(fov_x, width, height)

    scene = bpy.context.scene
    cam_obj = _make_camera(bpy, scene, fov_x, radius, height_z)
    _make_world(bpy, scene, params["hdri_path"], float(light["strength"]), float(light["rotation"]))
    _common_render_settings(bpy, scene, params, width, height, warnings)
    timings["scene"] = time.perf_counter() - t0

    # ---- geometry pass ------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    _geometry_pass_settings(bpy, scene)
    world = scene.world
    scene.world = None  # the geometry pass needs no light: skip syncing the environment map for it
    def set_camera(t: int) -> None:
        cam_obj.matrix_world = _to_matrix(opencv_to_blender(c2w[t]))

    geo_paths = render_sequence(bpy, scene, frames, set_camera, workdir, "geo", asset)
    timings["render_geometry"] = time.perf_counter() - t0
    if params.get("partial"):
        t0 = time.perf_counter()
        early = _earlier_orbit_pass(bpy, scene, cam_obj, params, verts, workdir, asset)
        cam_obj.data.angle_x = fov_x
        timings["render_partial"] = time.perf_counter() - t0

    # ---- colour pass ---------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    scene.world = world
    _color_pass_settings(bpy, scene, params, warnings)
    rgb_paths = render_sequence(bpy, scene, frames, set_camera, workdir, "rgb", asset)
    timings["render_color"] = time.perf_counter() - t0

    # ---- readback ----------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    out = {
        "rgb": np.empty((frames, height, width, 3), np.uint8),
        "normal": np.empty((frames, height, width, 3), np.float32),
        "position": np.empty((frames, height, width, 3), np.float32),
        "depth": np.empty((frames, height, width), np.float32),
        "mask": np.empty((frames, height, width), bool),
    }
    if albedo:
        out["albedo"] = np.empty((frames, height, width, 3), np.uint8)
    background = np.asarray(params.get("background", (1.0, 1.0, 1.0)), dtype=np.float32)
    for t in range(frames):
        g = _read_exr(geo_paths[t])
        mask = g["alpha"] > 0.5
        pos = np.where(mask[..., None], g["position"], 0.0)
        nrm = g["normal"]
        nrm = nrm / np.maximum(np.linalg.norm(nrm, axis=-1, keepdims=True), 1e-12)
        depth = world_to_camera(pos.astype(np.float64), c2w[t])[..., 2]
        out["mask"][t] = mask
        out["position"][t] = pos
        out["normal"][t] = np.where(mask[..., None], nrm, 0.0)
        out["depth"][t] = np.where(mask, depth, 0.0)
        c = _read_exr(rgb_paths[t])
        out["rgb"][t] = _to_srgb8(c["rgba"], background)
        if albedo:
            # DiffCol is averaged over the same samples as the colour, background samples adding 0: premultiplied
            # by the same coverage, so the colour's alpha composites it.
            out["albedo"][t] = _to_srgb8(np.concatenate([c["diffcol"], c["rgba"][..., 3:]], axis=-1), background)
        for p in (geo_paths[t], rgb_paths[t]):
            p.unlink(missing_ok=True)
    timings["readback"] = time.perf_counter() - t0
    partial = {}
    if params.get("partial"):
        from loom.geometry.texture import known_pixels

        t0 = time.perf_counter()
        out["known"] = known_pixels(out["position"], out["normal"], out["mask"], *early)
        partial = {"partial": {"known_fraction": float(out["known"].sum() / max(out["mask"].sum(), 1))}}
        timings["known"] = time.perf_counter() - t0

    out["K"] = np.repeat(K[None].astype(np.float32), frames, axis=0)
    out["c2w"] = c2w.astype(np.float32)
    out["info"] = {
        **partial,
        "normalization": normalization.tolist(),
        "fov_x": float(fov_x),
        "blender_version": bpy.app.version_string,
        "warnings": warnings,
        "timings": timings,
        "mesh": {"vertices": int(len(verts_world)), "faces": int(n_faces)},
    }
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Geometry checks and normalisation (import helpers: common.py)
# ---------------------------------------------------------------------------------------------------------------------


def _evaluated_vertices(bpy, asset: Path, mesh_objects: list) -> tuple[np.ndarray, int]:
    """World-space vertices (N,3) float64 of the evaluated meshes (modifiers, skinning), and their face count."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    chunks, n_faces = [], 0
    for obj in mesh_objects:
        ev = obj.evaluated_get(depsgraph)
        me = ev.to_mesh()
        try:
            n = len(me.vertices)
            n_faces += len(me.polygons)
            if n == 0 or len(me.polygons) == 0:
                continue  # points/edges-only objects do not render: keep them out of the bounds
            co = np.empty(n * 3, np.float32)
            me.vertices.foreach_get("co", co)
            m = np.array(ev.matrix_world, dtype=np.float64)
            chunks.append(co.reshape(-1, 3).astype(np.float64) @ m[:3, :3].T + m[:3, 3])
        finally:
            ev.to_mesh_clear()
    if not mesh_objects or n_faces == 0 or not chunks:
        raise TaskError(
            f"{asset}: no faces: the file has {len(mesh_objects)} mesh object(s) and {n_faces} faces "
            "(a point cloud, an empty scene or only non-mesh objects); Loom renders surface meshes only"
        )
    verts = np.concatenate(chunks)
    bad = ~np.isfinite(verts).all(axis=1) | (np.abs(verts) > MAX_ABS_COORD).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TaskError(
            f"{asset}: non-finite or absurd coordinates: {int(bad.sum())} of {len(verts)} vertices are NaN, infinite "
            f"or beyond {MAX_ABS_COORD:g} (first: {verts[i].tolist()}); the file is corrupt: re-export it"
        )
    return verts, n_faces


def _apply_world_transform(bpy, matrix: np.ndarray) -> None:
    """Left-multiply every object's world transform by ``matrix`` (all root objects parented under one empty)."""
    root = parent_roots_under_empty(bpy, "loom_normalization")
    root.matrix_world = _to_matrix(matrix)
    bpy.context.view_layer.update()


# ---------------------------------------------------------------------------------------------------------------------
# Scene set-up
# ---------------------------------------------------------------------------------------------------------------------


def _make_camera(bpy, scene, fov_x: float, radius: float, height_z: float):
    cam = bpy.data.cameras.new("loom_camera")
    cam.sensor_fit = "HORIZONTAL"
    cam.angle_x = fov_x
    cam.shift_x = cam.shift_y = 0.0
    # The object lies inside the unit sphere; the camera is sqrt(r^2 + z^2) from its centre.
    dist = math.hypot(radius, height_z)
    cam.clip_start = max(1e-3, 0.1 * (dist - 1.0)) if dist > 1.0 else 1e-3
    cam.clip_end = dist + 2.0
    obj = bpy.data.objects.new("loom_camera", cam)
    scene.collection.objects.link(obj)
    scene.camera = obj
    return obj


def _earlier_orbit_pass(bpy, scene, cam_obj, params: dict, verts: np.ndarray, workdir: Path, asset: Path):
    """The partial-texture pass's earlier orbit (``params["partial"]``: a base tilt and a camera count): the geometry
    pass along ``views`` cameras of the same circle that see the object as it was before the tilt
    (``loom.geometry.texture.earlier_orbit``), with a FOV fitted to them. Returns (depths (E,H,W), masks, K (E,3,3),
    c2w (E,4,4)) for ``known_pixels``. Leaves the camera's FOV changed: the caller restores it."""
    from loom.geometry.texture import earlier_orbit

    width, height = int(params["width"]), int(params["height"])
    orbit, views = params["orbit"], int(params["partial"]["views"])
    c2w = earlier_orbit(orbit_c2w(views, float(orbit["radius"]), float(orbit["height"])), params["partial"]["tilt"])
    fov = fit_fov(_fov_fit_points(verts, int(params.get("seed", 0))), c2w, width, height, float(orbit["fov_margin"]))
    cam_obj.data.angle_x = fov

    def set_camera(e: int) -> None:
        cam_obj.matrix_world = _to_matrix(opencv_to_blender(c2w[e]))

    paths = render_sequence(bpy, scene, views, set_camera, workdir, "early", asset)
    depths, masks = np.zeros((views, height, width), np.float64), np.zeros((views, height, width), bool)
    for e, path in enumerate(paths):
        g = _read_exr(path)
        masks[e] = g["alpha"] > 0.5
        depths[e] = np.where(masks[e], world_to_camera(g["position"].astype(np.float64), c2w[e])[..., 2], 0.0)
        path.unlink(missing_ok=True)
    return depths, masks, np.repeat(intrinsics(fov, width, height)[None], views, axis=0), c2w


def _geometry_pass_settings(bpy, scene) -> None:
    """Exact per-pixel-centre geometry. One opaque material for everything: the silhouette is the geometry's, and no
    alpha/transparency can hide it."""
    mat = bpy.data.materials.get("loom_geometry") or bpy.data.materials.new("loom_geometry")
    exact_geometry_pass_settings(scene, mat)
