"""The baseline of ``benchmarks/render_ttv.py``: one asset rendered by a plain bpy script in a fresh process.

This is how the public Objaverse render scripts work (Objaverse-XL ``blender_script.py``, TRELLIS
``dataset_toolkits/blender_script/render.py``): the driver starts one Blender (here: one ``python`` that imports
``bpy``) per asset; the script resets the scene, imports the asset, sets up camera and light, and renders every view
with ``bpy.ops.render.render``, writing one file per pass per frame through the compositor's File Output node
(colour and mask as 8-bit PNG, depth, normal and position as 32-bit float EXR). Nothing is read back or packed.

It renders exactly the frames Loom rendered in the same benchmark run: the harness passes, per lighting variant,
Loom's normalisation matrix, field of view and camera-to-world matrices (read from Loom's output), and the lighting.
It does not compute the normalisation itself, which makes the baseline slightly cheaper than a real script.

Usage (the harness does this once per asset)::

    python benchmarks/_baseline_objaverse_loop.py job.json

``job.json``: ``asset_path``, ``out_dir``, ``width``, ``height``, ``threads``, ``mode`` ("passes": every pass in one
render, as the public scripts do; "color": colour only, for the quality reference), ``cycles`` (render settings,
see :func:`apply_cycles`), ``persistent_data`` (bool), and ``variants``: a list of ``{key, normalization (4x4),
fov_x, c2w (F,4,4 OpenCV), hdri_path, hdri_strength, hdri_rotation, seed}``. Prints one JSON line of timings,
prefixed ``BASELINE_RESULT``, as the last line of stdout.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

T_START = time.perf_counter()
import bpy  # timed: Blender's start-up is part of what the baseline pays per asset

T_BPY = time.perf_counter() - T_START

from mathutils import Matrix

# OpenCV camera axes -> Blender camera axes (flip y and z), as in loom.geometry.camera.opencv_to_blender.
_CV_TO_GL = Matrix(((1, 0, 0, 0), (0, -1, 0, 0), (0, 0, -1, 0), (0, 0, 0, 1)))


def import_asset(path: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".glb", ".gltf"):
        bpy.ops.import_scene.gltf(filepath=path)
    elif ext == ".obj":
        bpy.ops.wm.obj_import(filepath=path)
    elif ext == ".ply":
        bpy.ops.wm.ply_import(filepath=path)
    elif ext == ".stl":
        bpy.ops.wm.stl_import(filepath=path)
    elif ext == ".fbx":
        bpy.ops.import_scene.fbx(filepath=path)
    else:
        raise SystemExit(f"baseline: unsupported asset format {ext!r} ({path})")
    for obj in list(bpy.context.scene.objects):
        if obj.type in ("LIGHT", "CAMERA"):
            bpy.data.objects.remove(obj, do_unlink=True)


def parent_under_root():
    """All root objects under one empty, whose matrix then normalises the asset (as Loom does)."""
    root = bpy.data.objects.new("normalization", None)
    bpy.context.scene.collection.objects.link(root)
    for obj in bpy.context.scene.objects:
        if obj.parent is None and obj is not root:
            world = obj.matrix_world.copy()
            obj.parent = root
            obj.matrix_parent_inverse.identity()
            obj.matrix_basis = world
    return root


def make_world(scene):
    world = bpy.data.worlds.new("world")
    scene.world = world
    nt = world.node_tree
    nt.nodes.clear()
    coord = nt.nodes.new("ShaderNodeTexCoord")
    mapping = nt.nodes.new("ShaderNodeMapping")
    env = nt.nodes.new("ShaderNodeTexEnvironment")
    bg = nt.nodes.new("ShaderNodeBackground")
    out = nt.nodes.new("ShaderNodeOutputWorld")
    nt.links.new(coord.outputs["Generated"], mapping.inputs["Vector"])
    nt.links.new(mapping.outputs["Vector"], env.inputs["Vector"])
    nt.links.new(env.outputs["Color"], bg.inputs["Color"])
    nt.links.new(bg.outputs["Background"], out.inputs["Surface"])
    return env, mapping, bg


def apply_cycles(scene, s: dict) -> None:
    """Render settings from the job; keys left out keep Blender's defaults (as a public script would)."""
    c = scene.cycles
    c.samples = int(s["samples"])
    if "adaptive_threshold" in s:
        c.use_adaptive_sampling = s["adaptive_threshold"] > 0
        if s["adaptive_threshold"] > 0:
            c.adaptive_threshold = s["adaptive_threshold"]
    c.use_denoising = bool(s.get("denoise", False))
    if c.use_denoising:
        c.denoiser = "OPENIMAGEDENOISE"
        c.denoising_input_passes = "RGB_ALBEDO_NORMAL"
        c.denoising_prefilter = s.get("denoising_prefilter", "ACCURATE")
    for key in ("max_bounces", "diffuse_bounces", "glossy_bounces", "transmission_bounces", "volume_bounces",
                "transparent_max_bounces", "sample_clamp_indirect", "caustics_reflective", "caustics_refractive",
                "use_light_tree"):
        if key in s:
            setattr(c, key, s[key])


def file_outputs(scene, mode: str):
    """Compositor: Render Layers -> File Output, one file per pass per frame."""
    vl = scene.view_layers[0]
    passes = mode == "passes"
    vl.use_pass_z = vl.use_pass_normal = vl.use_pass_position = passes
    ng = bpy.data.node_groups.new("compositor", "CompositorNodeTree")
    scene.compositing_node_group = ng
    rl = ng.nodes.new("CompositorNodeRLayers")
    fo = ng.nodes.new("CompositorNodeOutputFile")
    fo.format.media_type = "IMAGE"
    fo.format.file_format = "OPEN_EXR"
    fo.format.color_depth = "32"
    items = fo.file_output_items
    if mode == "color":  # quality reference: linear half-float RGBA, converted exactly like Loom's colour pass
        it = items.new("RGBA", "rgba")
        it.override_node_format = True
        it.format.file_format = "OPEN_EXR"
        it.format.color_depth = "16"
        it.format.color_mode = "RGBA"
        ng.links.new(rl.outputs["Image"], fo.inputs["rgba"])
        return fo
    rgb = items.new("RGBA", "rgb")
    rgb.override_node_format = True
    rgb.format.file_format = "PNG"
    rgb.format.color_mode = "RGBA"
    mask = items.new("FLOAT", "mask")
    mask.override_node_format = True
    mask.format.file_format = "PNG"
    mask.format.color_mode = "BW"
    ng.links.new(rl.outputs["Image"], fo.inputs["rgb"])
    ng.links.new(rl.outputs["Alpha"], fo.inputs["mask"])
    for name, kind in (("Depth", "FLOAT"), ("Normal", "VECTOR"), ("Position", "VECTOR")):
        items.new(kind, name.lower())
        ng.links.new(rl.outputs[name], fo.inputs[name.lower()])
    return fo


WARMUP_S = [0.0]


def warm_up(scene, cam, fo, v: dict) -> None:
    """Quality reference only: one 1-sample render first, so that the timed frames are the steady state (BVH,
    textures and the environment's importance map built, kept by persistent data), like Loom's colour pass, which
    runs after its geometry pass."""
    c = scene.cycles
    samples, denoise = c.samples, c.use_denoising
    c.samples, c.use_denoising = 1, False
    cam.matrix_world = Matrix(v["c2w"][0]) @ _CV_TO_GL
    fo.file_name = f"warmup_{v['key']}_"
    t0 = time.perf_counter()
    bpy.ops.render.render(write_still=False)
    WARMUP_S[0] += time.perf_counter() - t0
    c.samples, c.use_denoising = samples, denoise


def main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    t = {"bpy_import": T_BPY}
    t0 = time.perf_counter()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    import_asset(job["asset_path"])
    root = parent_under_root()
    t["import"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scene = bpy.context.scene
    r = scene.render
    r.engine = "CYCLES"
    scene.cycles.device = "CPU"
    r.resolution_x, r.resolution_y, r.resolution_percentage = job["width"], job["height"], 100
    r.film_transparent = True
    r.threads_mode, r.threads = "FIXED", int(job["threads"])
    r.use_persistent_data = bool(job.get("persistent_data", False))
    scene.view_settings.view_transform = "Standard"
    apply_cycles(scene, job["cycles"])
    cam_data = bpy.data.cameras.new("camera")
    cam_data.sensor_fit = "HORIZONTAL"
    cam = bpy.data.objects.new("camera", cam_data)
    scene.collection.objects.link(cam)
    scene.camera = cam
    env, mapping, bg = make_world(scene)
    fo = file_outputs(scene, job["mode"])
    os.makedirs(job["out_dir"], exist_ok=True)
    fo.directory = job["out_dir"]
    t["scene"] = time.perf_counter() - t0

    frame_times = []
    t_render = time.perf_counter()
    for v in job["variants"]:
        root.matrix_world = Matrix(v["normalization"])
        cam_data.angle_x = v["fov_x"]
        dist = math.sqrt(sum(v["c2w"][0][k][3] ** 2 for k in range(3)))  # camera to object centre
        cam_data.clip_start = max(1e-3, 0.1 * (dist - 1.0)) if dist > 1.0 else 1e-3
        cam_data.clip_end = dist + 2.0
        env.image = bpy.data.images.load(v["hdri_path"], check_existing=True)
        mapping.inputs["Rotation"].default_value = (0.0, 0.0, -v["hdri_rotation"])
        bg.inputs["Strength"].default_value = v["hdri_strength"]
        scene.cycles.seed = int(v["seed"])
        if job["mode"] == "color":
            warm_up(scene, cam, fo, v)
        for i, c2w in enumerate(v["c2w"]):
            f0 = time.perf_counter()
            cam.matrix_world = Matrix(c2w) @ _CV_TO_GL
            fo.file_name = f"{v['key']}_{i:04d}_"
            bpy.ops.render.render(write_still=False)
            frame_times.append(time.perf_counter() - f0)
    t["warmup"] = WARMUP_S[0]
    t["render"] = time.perf_counter() - t_render - t["warmup"]
    t["frame_times"] = frame_times
    t["frames"] = len(frame_times)
    t["total_in_process"] = time.perf_counter() - T_START
    sys.stdout.flush()
    print("BASELINE_RESULT " + json.dumps(t), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
