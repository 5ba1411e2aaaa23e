"""Blender helpers shared by the renderers (``ttv.py``: turntable videos, ``anim.py``: animated 4D sequences): a safe
factory reset, importing one asset with checks (formats, NaN pre-scan, lights/cameras removed), the environment
light, render settings, and reading back EXRs with sRGB conversion. See ``ttv.py``'s docstring for the reasons and the
Blender 5.0 pitfalls behind these choices. Importing this module does not import bpy: functions take ``bpy``.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from pathlib import Path

import numpy as np

from loom.geometry.camera import opencv_to_blender
from loom.platform.errors import TaskError

SUPPORTED_FORMATS = (".glb", ".gltf", ".obj", ".fbx", ".ply", ".stl", ".blend")


# Coordinates beyond this (in the file's units, after the file's own transforms) are treated as corrupt data.
MAX_ABS_COORD = 1e6


# A triangle whose sine of the angle between two edges is at most this is degenerate (collinear or repeated
# vertices): well above float32 rounding of collinear points, far below any face a modeller would make.
DEGENERATE_SINE = 1e-6


# Points used to fit the field of view: all vertices up to this count, else a subsample plus support points.
FOV_FIT_MAX_POINTS = 20000


def reset_blender(bpy) -> None:
    """Empty scene, factory preferences, and no execution of scripts embedded in assets."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    # The factory reset also resets preferences, so this must come after it, before any import.
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    if bpy.context.preferences.filepaths.use_scripts_auto_execute:
        raise RuntimeError("could not disable Blender's auto-execution of scripts; refusing to import untrusted assets")


def import_asset(bpy, asset: Path) -> list:
    """Import ``asset`` into the empty scene; return its mesh objects. Lights and cameras from the file are deleted and
    other renderable non-mesh objects are hidden from render. Refuses (TaskError) a file whose faces all have zero
    area (`check_surface`): it would render as an empty image, not fail."""
    ext = asset.suffix.lower()
    if ext not in SUPPORTED_FORMATS:
        raise TaskError(
            f"{asset}: unsupported format {ext or '(no extension)'!r}; supported: {', '.join(SUPPORTED_FORMATS)}. "
            "Convert the asset to one of these or drop it from the asset list."
        )
    if not asset.is_file():
        raise TaskError(f"{asset}: file not found; check the asset path and that the download completed")
    if asset.stat().st_size == 0:
        raise TaskError(f"{asset}: file is empty (0 bytes); re-download the asset")

    _prescan_nonfinite(asset, ext)
    path = str(asset)
    try:
        if ext in (".glb", ".gltf"):
            # disable_bone_shape: otherwise skinned files add an icosphere object used to draw bones.
            bpy.ops.import_scene.gltf(filepath=path, disable_bone_shape=True)
        elif ext == ".obj":
            bpy.ops.wm.obj_import(filepath=path)
        elif ext == ".fbx":
            bpy.ops.import_scene.fbx(filepath=path)
        elif ext == ".ply":
            bpy.ops.wm.ply_import(filepath=path)
        elif ext == ".stl":
            bpy.ops.wm.stl_import(filepath=path)
        elif ext == ".blend":
            _append_blend_objects(bpy, path)
    except TaskError:
        raise
    except Exception as e:  # importers raise RuntimeError, ValueError, struct.error, ... on corrupt files
        msg = str(e).strip().splitlines()
        raise TaskError(
            f"{asset}: Blender's {ext} importer failed ({type(e).__name__}: {msg[-1] if msg else e}); "
            f"the file is corrupt or not a valid {ext} file: re-export or re-download it"
        ) from None

    scene = bpy.context.scene
    for obj in list(scene.objects):
        if obj.type in ("LIGHT", "CAMERA", "LIGHT_PROBE", "SPEAKER"):
            bpy.data.objects.remove(obj, do_unlink=True)
        elif obj.type not in ("MESH", "EMPTY", "ARMATURE"):
            obj.hide_render = True  # curves, text, volumes, ...: not in the normalised bounds
    mesh_objects = [o for o in scene.objects if o.type == "MESH" and not o.hide_render]
    check_surface(bpy, asset, mesh_objects)
    return mesh_objects


def check_surface(bpy, asset: Path, mesh_objects: list) -> None:
    """Refuse meshes that have faces but no face with area (every triangle has repeated or collinear vertices, in
    world space after modifiers): Cycles renders them as an empty image, which would become a sample of nothing.
    Files without any face, and files with non-finite coordinates, are left to the renderers' own checks ("no faces",
    "non-finite"), which name those faults. Stops at the first object that has a real face."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    faces = 0
    for obj in mesh_objects:
        ev = obj.evaluated_get(depsgraph)
        me = ev.to_mesh()
        try:
            if len(me.polygons) == 0:
                continue
            faces += len(me.polygons)
            me.calc_loop_triangles()
            co = np.empty(len(me.vertices) * 3, np.float32)
            me.vertices.foreach_get("co", co)
            tri = np.empty(len(me.loop_triangles) * 3, np.int32)
            me.loop_triangles.foreach_get("vertices", tri)
            m = np.array(ev.matrix_world, dtype=np.float64)
        finally:
            ev.to_mesh_clear()
        v = co.reshape(-1, 3).astype(np.float64) @ m[:3, :3].T + m[:3, 3]
        if not np.isfinite(v).all():
            return  # the non-finite check names this fault
        t = v[tri.reshape(-1, 3)]
        e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
        twice_area = np.linalg.norm(np.cross(e1, e2), axis=1)
        if (twice_area > DEGENERATE_SINE * np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1)).any():
            return
    if faces:
        raise TaskError(
            f"{asset}: zero-area faces: all {faces} faces of its {len(mesh_objects)} mesh object(s) have zero area "
            "(repeated or collinear vertices), so it would render as an empty image; the file is corrupt or "
            "degenerate: re-export it with real surfaces"
        )


_NONFINITE_TEXT = {
    # Vertex lines holding a nan/inf token (also matches "-nan", "inf", "infinity", "1.#INF" variants of "inf").
    ".obj": re.compile(rb"(?im)^[ \t]*v[ \t][^\n]*?(nan|inf)"),
    ".stl": re.compile(rb"(?im)^[ \t]*vertex[ \t][^\n]*?(nan|inf)"),
}


def _prescan_nonfinite(asset: Path, ext: str) -> None:
    """Refuse files with NaN/inf vertex coordinates *before* Blender sees them: Blender 5.0's OBJ, PLY and STL
    importers silently replace NaN and inf by 0, which would render a distorted mesh instead of failing.
    (glTF is refused by the importer itself: its accessor bounds then hold NaN; other formats are checked after
    import.)"""
    if ext not in (".obj", ".stl", ".ply"):
        return
    with open(asset, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        bad = None
        if ext == ".obj":
            bad = _NONFINITE_TEXT[".obj"].search(data) is not None
        elif ext == ".stl":
            n = int.from_bytes(data[80:84], "little") if len(data) >= 84 else -1
            if len(data) == 84 + 50 * n:  # binary STL: 80-byte header, count, 50-byte triangles
                tris = np.frombuffer(data, dtype=np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]),
                                     count=n, offset=84)
                bad = not np.isfinite(tris["v"]).all()
                del tris  # a view into the mmap: it must go before the mmap closes
            else:
                bad = _NONFINITE_TEXT[".stl"].search(data) is not None
        else:
            bad = _ply_vertices_nonfinite(data)
    if bad:
        raise TaskError(
            f"{asset}: non-finite or absurd coordinates: the file has NaN or infinite vertex coordinates; "
            "the file is corrupt: re-export it"
        )


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def _ply_vertices_nonfinite(data) -> bool | None:
    """True if the PLY's vertex x/y/z hold NaN/inf; None when the layout is not the common one this reads (vertex
    element first, scalar properties only), in which case the post-import check is all there is."""
    end = data.find(b"end_header")
    if end < 0:
        return None  # not a PLY: the importer will refuse it
    body = data.find(b"\n", end) + 1
    header = bytes(data[:end]).decode("ascii", "replace").splitlines()
    fmt, elements = None, []
    for line in header:
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "format" and len(tok) > 1:
            fmt = tok[1]
        elif tok[0] == "element" and len(tok) == 3:
            elements.append((tok[1], int(tok[2]), []))
        elif tok[0] == "property" and elements:
            elements[-1][2].append(tok[1:])
    if not elements or elements[0][0] != "vertex":
        return None
    _, count, props = elements[0]
    if fmt == "ascii":
        # Only the vertex lines: face lines hold integers.
        lines = bytes(data[body:]).split(b"\n", count)[:count]
        return re.search(rb"(?i)(nan|inf)", b"\n".join(lines)) is not None
    if any(p[0] == "list" or p[0] not in _PLY_TYPES for p in props):
        return None
    order = "<" if fmt == "binary_little_endian" else ">"
    dtype = np.dtype([(p[1], order + _PLY_TYPES[p[0]]) for p in props])
    if body + dtype.itemsize * count > len(data):
        return None  # truncated: the importer will refuse it
    v = np.frombuffer(data, dtype=dtype, count=count, offset=body)
    names = [n for n in ("x", "y", "z") if n in v.dtype.names]
    return any(not np.isfinite(v[n]).all() for n in names)


def _append_blend_objects(bpy, path: str) -> None:
    """Append a .blend's objects without opening it as the main file (its scenes, worlds and UI stay out) and without
    running its scripts (auto-execution is off, so Python drivers and registered text blocks are inert)."""
    with bpy.data.libraries.load(path, link=False) as (data_from, data_to):
        data_to.objects = list(data_from.objects)
    collection = bpy.context.scene.collection
    for obj in data_to.objects:
        if obj is not None:
            collection.objects.link(obj)


def missing_texture_warnings(bpy) -> list[str]:
    """One warning per image whose file is missing or cannot be decoded. The asset still renders (Blender shows
    missing textures as magenta); the warning lets data engineers find and filter such samples."""
    warnings = []
    for img in bpy.data.images:
        if img.source not in ("FILE", "SEQUENCE", "TILED") or img.packed_file is not None:
            continue
        filepath = bpy.path.abspath(img.filepath, library=img.library)
        if not filepath or not os.path.isfile(filepath):
            warnings.append(f"missing texture: image {img.name!r} refers to {img.filepath!r}, which does not exist")
            continue
        # has_data is False until loaded; `size` loads the image and stays (0, 0) if decoding failed.
        if tuple(img.size) == (0, 0):
            warnings.append(f"unreadable texture: image {img.name!r} at {img.filepath!r} could not be decoded")
    return warnings


def fov_fit_points(verts: np.ndarray, seed: int) -> np.ndarray:
    """At most ~FOV_FIT_MAX_POINTS points for the field-of-view fit. Above that, a seeded random subsample plus the
    support points along 256 directions: the points that bound the projection lie on the convex hull, and support
    points sample it densely enough that the margin (``fov_margin``) absorbs what a subsample alone would miss."""
    if len(verts) <= FOV_FIT_MAX_POINTS:
        return verts
    rng = np.random.default_rng(seed)
    sub = verts[rng.choice(len(verts), FOV_FIT_MAX_POINTS, replace=False)]
    # Fibonacci sphere directions.
    n = 256
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    dirs = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)
    support = verts[np.argmax(verts.astype(np.float32) @ dirs.T.astype(np.float32), axis=0)]
    return np.concatenate([sub, support])


def to_matrix(m: np.ndarray):
    from mathutils import Matrix

    return Matrix(np.asarray(m, dtype=np.float64).tolist())


def make_world(bpy, scene, hdri_path: str, strength: float, rotation_z: float) -> None:
    if not os.path.isfile(hdri_path):
        # A job configuration error, not an asset error: every task would fail the same way.
        raise FileNotFoundError(f"environment map {hdri_path!r} not found; check the job's hdri list")
    world = bpy.data.worlds.new("loom_world")
    scene.world = world
    # Cycles' default ("AUTO") importance map is built from the full-resolution HDRI at the first render of every
    # asset: 4.6 s of a 5.1 s first frame at 1 thread (benchmarks/README.md). 256 px keeps sampling unbiased.
    world.cycles.sampling_method = "MANUAL"
    world.cycles.sample_map_resolution = 256
    nt = world.node_tree
    nt.nodes.clear()
    coord = nt.nodes.new("ShaderNodeTexCoord")
    mapping = nt.nodes.new("ShaderNodeMapping")
    mapping.vector_type = "POINT"
    # Rotating the lookup vector by -a rotates the environment by +a about world Z.
    mapping.inputs["Rotation"].default_value = (0.0, 0.0, -rotation_z)
    env = nt.nodes.new("ShaderNodeTexEnvironment")
    env.image = bpy.data.images.load(hdri_path, check_existing=True)
    bg = nt.nodes.new("ShaderNodeBackground")
    bg.inputs["Strength"].default_value = strength
    out = nt.nodes.new("ShaderNodeOutputWorld")
    nt.links.new(coord.outputs["Generated"], mapping.inputs["Vector"])
    nt.links.new(mapping.outputs["Vector"], env.inputs["Vector"])
    nt.links.new(env.outputs["Color"], bg.inputs["Color"])
    nt.links.new(bg.outputs["Background"], out.inputs["Surface"])


def common_render_settings(bpy, scene, params: dict, width: int, height: int, warnings: list[str]) -> None:
    r = scene.render
    r.resolution_x, r.resolution_y, r.resolution_percentage = width, height, 100
    r.pixel_aspect_x = r.pixel_aspect_y = 1.0
    r.film_transparent = True
    r.use_persistent_data = True  # keep the BVH and textures between the frames of one call
    r.use_motion_blur = False
    threads = int(params.get("threads", 0))
    if threads > 0:
        r.threads_mode = "FIXED"
        r.threads = threads
    else:
        r.threads_mode = "AUTO"
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    scene.cycles.seed = int(params.get("seed", 0))
    scene.cycles.use_animated_seed = False
    _set_device(bpy, scene, str(params.get("device", "CPU")).upper())


def _set_device(bpy, scene, device: str) -> None:
    scene.render.engine = "CYCLES"
    if device == "CPU":
        scene.cycles.device = "CPU"
        return
    if device != "GPU":
        raise ValueError(f"params['device'] must be 'CPU' or 'GPU', got {device!r}")
    prefs = bpy.context.preferences.addons["cycles"].preferences
    available = {t[0] for t in prefs.get_device_types(bpy.context)}
    for kind in ("OPTIX", "CUDA", "HIP", "ONEAPI", "METAL"):
        if kind not in available:
            continue
        prefs.compute_device_type = kind
        prefs.refresh_devices()
        gpus = [d for d in prefs.devices if d.type == kind]
        if gpus:
            for d in prefs.devices:
                d.use = d.type == kind  # GPUs only: mixing in the CPU slows small renders down
            scene.cycles.device = "GPU"
            return
    # Configuration error (every task would be affected): fail loudly rather than fall back to CPU silently.
    raise RuntimeError("device='GPU' was requested but Cycles finds no OptiX/CUDA/HIP/oneAPI/Metal GPU; "
                       "use device='CPU' or run on a GPU node")


def color_pass_settings(bpy, scene, params: dict, warnings: list[str]) -> None:
    engine = str(params.get("engine", "CYCLES")).upper()
    vl = scene.view_layers[0]
    vl.material_override = None
    vl.use_pass_z = vl.use_pass_normal = vl.use_pass_position = False
    samples = int(params["samples"])
    if engine == "CYCLES":
        c = scene.cycles
        c.samples = samples
        threshold = float(params.get("adaptive_threshold", 0.0))
        c.use_adaptive_sampling = threshold > 0
        if threshold > 0:
            c.adaptive_threshold = threshold
        c.pixel_filter_type = "BLACKMAN_HARRIS"
        c.filter_width = 1.5  # Blender's default anti-aliasing filter
        max_b = int(params.get("max_bounces", 8))
        # Bounded light paths: most of an object's look comes from the first few diffuse/glossy bounces.
        c.max_bounces = max_b
        c.diffuse_bounces = min(max_b, 2)
        c.glossy_bounces = min(max_b, 4)
        c.transmission_bounces = max_b
        c.volume_bounces = 0
        c.transparent_max_bounces = max(max_b, 8)  # alpha-blended leaves/decals need several
        c.sample_clamp_indirect = 10.0  # fireflies
        c.caustics_reflective = c.caustics_refractive = False
        c.use_light_tree = True
        c.use_denoising = False
        if params.get("denoise", False):
            import _cycles  # Blender's own module, present whenever Cycles is

            if getattr(_cycles, "with_openimagedenoise", False):
                c.use_denoising = True
                c.denoiser = "OPENIMAGEDENOISE"
                c.denoising_input_passes = "RGB_ALBEDO_NORMAL"
                # FAST: 8.0 instead of 13.0 s a 512x512 frame at 1 thread; quality checked by the benchmark's PSNR.
                c.denoising_prefilter = "FAST"
            else:
                warnings.append("denoise requested but this Blender build has no OpenImageDenoise; rendered without")
    elif engine in ("BLENDER_EEVEE", "EEVEE"):
        scene.render.engine = "BLENDER_EEVEE"
        scene.eevee.taa_render_samples = samples
    else:
        raise ValueError(f"params['engine'] must be 'CYCLES' or 'BLENDER_EEVEE', got {engine!r}")
    # The albedo pass (params["albedo"], turntables only) is Cycles' Diffuse Color pass ("DiffCol"): the diffuse
    # closures' colour at the first visible surface, unlit. It needs a multilayer EXR (a plain EXR holds Combined
    # only); without it the colour pass writes exactly what it always did.
    albedo = bool(params.get("albedo", False))
    vl.use_pass_diffuse_color = albedo
    im = scene.render.image_settings
    im.media_type = "MULTI_LAYER_IMAGE" if albedo else "IMAGE"
    im.file_format = "OPEN_EXR_MULTILAYER" if albedo else "OPEN_EXR"
    im.color_mode = "RGBA"
    im.color_depth = "16"  # half floats are plenty for an 8-bit result
    im.exr_codec = "NONE"


def render_still(bpy, scene, path: Path, asset: Path) -> None:
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    if not path.is_file():
        raise RuntimeError(f"Blender rendered {asset} but wrote no image to {path}")


def render_sequence(bpy, scene, frames: int, set_camera, workdir: Path, prefix: str, asset: Path) -> list[Path]:
    """Render ``frames`` stills with the scene's current settings, calling ``set_camera(t)`` before frame t;
    returns the written EXR paths (``workdir/<prefix>_0000.exr`` ...)."""
    paths = []
    for t in range(frames):
        set_camera(t)
        path = workdir / f"{prefix}_{t:04d}.exr"
        render_still(bpy, scene, path, asset)
        paths.append(path)
    return paths


def read_exr(path: Path) -> dict[str, np.ndarray]:
    """Read a geometry (multilayer) or colour EXR written above. Rows come top to bottom, as in the image.
    Geometry: ``position``, ``normal``, ``depth_z``, ``alpha``; colour: ``rgba`` (linear premultiplied), plus
    ``diffcol`` (linear RGB, Cycles' Diffuse Color pass) when the colour pass was rendered with the albedo pass."""
    import OpenEXR

    with OpenEXR.File(str(path), separate_channels=True) as f:
        # Blender 5.0 writes multilayer EXRs as multi-part files, one part per pass: gather channels of all parts.
        ch = {name: c for part in f.parts for name, c in part.channels.items()}
        names = set(ch)

        def get(name):
            return np.asarray(ch[name].pixels, dtype=np.float32)

        if any(n.endswith("Position.X") for n in names):
            prefix = next(n for n in names if n.endswith("Position.X"))[: -len("Position.X")]
            return {
                "position": np.stack([get(f"{prefix}Position.{a}") for a in "XYZ"], axis=-1),
                "normal": np.stack([get(f"{prefix}Normal.{a}") for a in "XYZ"], axis=-1),
                "depth_z": get(f"{prefix}Depth.Z"),
                "alpha": get(f"{prefix}Combined.A"),
            }
        # A colour pass with the albedo pass (multilayer). Blender 5.0 names the DiffCol pass "Diffuse Color" in
        # the file; older versions wrote "DiffCol".
        diff = next((n[: -len(".R")] for n in names if n.endswith(("Diffuse Color.R", "DiffCol.R"))), None)
        if diff is not None:
            prefix = diff[: diff.rindex(".") + 1] if "." in diff else ""
            return {
                "rgba": np.stack([get(f"{prefix}Combined.{c}") for c in "RGBA"], axis=-1),
                "diffcol": np.stack([get(f"{diff}.{c}") for c in "RGB"], axis=-1),
            }
        return {"rgba": np.stack([get(c) for c in "RGBA"], axis=-1)}


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    x = np.clip(linear, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def srgb_decode(encoded: np.ndarray) -> np.ndarray:
    x = np.clip(encoded, 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, np.power((x + 0.055) / 1.055, 2.4))


def to_srgb8(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Premultiplied linear RGBA (H,W,4) over an sRGB-encoded background colour -> sRGB uint8 (H,W,3)."""
    alpha = np.clip(rgba[..., 3:4], 0.0, 1.0)
    linear = rgba[..., :3] + (1.0 - alpha) * srgb_decode(background)
    return np.round(srgb_encode(linear) * 255.0).astype(np.uint8)



def parent_roots_under_empty(bpy, name: str):
    """Parent every root object of the scene under one new empty (identity), keeping their world transforms; the
    empty's matrix then moves everything rigidly (hierarchies, armatures and instances included)."""
    root = bpy.data.objects.new(name, None)
    bpy.context.scene.collection.objects.link(root)
    for obj in bpy.context.scene.objects:
        if obj.parent is None and obj is not root:
            world = obj.matrix_world.copy()
            obj.parent = root
            # The child's world = root @ parent_inverse @ basis; keep basis = old world, so world = root @ old.
            obj.matrix_parent_inverse.identity()
            obj.matrix_basis = world
    bpy.context.view_layer.update()
    return root


def exact_geometry_pass_settings(scene, material, object_index: bool = False) -> None:
    """Cycles settings of the geometry pass shared by every renderer: 1 sample through (within 0.005 px of) the
    pixel centre (box filter of the smallest width Blender allows), no bounces, one override material, and the
    Position / Normal / Depth (and optionally object index) passes into a 32-bit multilayer EXR."""
    scene.render.engine = "CYCLES"
    c = scene.cycles
    c.samples = 1
    c.use_adaptive_sampling = False
    c.use_denoising = False
    c.pixel_filter_type = "BOX"
    c.filter_width = 0.01
    c.max_bounces = 0
    c.transparent_max_bounces = 0
    c.use_light_tree = False
    vl = scene.view_layers[0]
    vl.use_pass_combined = True
    vl.use_pass_z = True
    vl.use_pass_normal = True
    vl.use_pass_position = True
    vl.use_pass_object_index = object_index
    vl.material_override = material
    im = scene.render.image_settings
    im.media_type = "MULTI_LAYER_IMAGE"  # Blender 5.0: OPEN_EXR_MULTILAYER is only offered for this media type
    im.file_format = "OPEN_EXR_MULTILAYER"
    im.color_depth = "32"
    im.exr_codec = "NONE"  # small files in a scratch dir: compression costs more than it saves


def check_cameras(K, c2w, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    K = np.asarray(K, dtype=np.float64)
    c2w = np.asarray(c2w, dtype=np.float64)
    if K.ndim != 3 or K.shape[1:] != (3, 3) or c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or len(K) != len(c2w):
        raise ValueError(f"params['K'] must be (T,3,3) and params['c2w'] (T,4,4) with the same T >= 1, got "
                         f"{K.shape} and {c2w.shape}")
    if len(K) == 0:
        raise ValueError("no frames: params['K'] and params['c2w'] are empty")
    if not (np.isfinite(K).all() and np.isfinite(c2w).all()):
        raise ValueError("params['K'] / params['c2w'] hold NaN or infinite values")
    for t in range(len(K)):
        fx, fy = K[t, 0, 0], K[t, 1, 1]
        if not fx > 0 or abs(fx - fy) > 1e-6 * fx or K[t, 0, 1] != 0 or not np.allclose(K[t, 2], [0, 0, 1]):
            raise ValueError(f"params['K'][{t}] must be a pinhole matrix with square pixels (fx == fy > 0, no "
                             f"skew), got {K[t].tolist()}")
        r = c2w[t, :3, :3]
        if not np.allclose(r @ r.T, np.eye(3), atol=1e-4) or np.linalg.det(r) < 0 \
                or not np.allclose(c2w[t, 3], [0, 0, 0, 1]):
            raise ValueError(f"params['c2w'][{t}] is not a rigid camera-to-world matrix")
    return K, c2w


def make_camera_covering(bpy, scene, verts: np.ndarray, c2w: np.ndarray):
    cam = bpy.data.cameras.new("loom_camera")
    cam.sensor_fit = "HORIZONTAL"
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    far = float(np.linalg.norm(corners[None] - c2w[:, None, :3, 3], axis=-1).max())
    cam.clip_end = 1.01 * far + 1e-3
    cam.clip_start = min(1e-3, 1e-5 * cam.clip_end) if far > 0 else 1e-5
    obj = bpy.data.objects.new("loom_camera", cam)
    scene.collection.objects.link(obj)
    scene.camera = obj
    return obj


def set_opencv_camera(cam_obj, K: np.ndarray, c2w: np.ndarray, width: int, height: int) -> None:
    cam = cam_obj.data
    cam.angle_x = 2.0 * math.atan(0.5 * width / K[0, 0])
    cam.shift_x = (0.5 * width - K[0, 2]) / width
    cam.shift_y = (K[1, 2] - 0.5 * height) / width
    cam_obj.matrix_world = to_matrix(opencv_to_blender(c2w))


def to_straight_rgba8(rgba: np.ndarray) -> np.ndarray:
    """Linear premultiplied RGBA (H,W,4) -> straight-alpha sRGB RGBA uint8; colour 0 where alpha rounds to 0."""
    alpha = np.clip(rgba[..., 3:4].astype(np.float64), 0.0, 1.0)
    a8 = np.round(alpha * 255.0)
    straight = np.where(alpha > 0, rgba[..., :3] / np.maximum(alpha, 1e-12), 0.0)
    rgb8 = np.round(srgb_encode(straight) * 255.0)
    rgb8 = np.where(a8 > 0, rgb8, 0.0)
    return np.concatenate([rgb8, a8], axis=-1).astype(np.uint8)
