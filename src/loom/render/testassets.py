"""Small animated test assets written with Blender (bpy), for the 4D-sequence extraction (``anim.py``) and its tests.

``make_test_assets(out_dir)`` writes four .glb files and returns ``{name: path}``:

- ``arm``: a skinned two-bone arm. Two separate boxes (upper arm along +X from the origin, forearm beyond it), each
  weighted 100% to its own bone, so each part moves rigidly. The forearm bone rotates 90 degrees about world +Z over
  frames 1..24 (one action, exported as a glTF animation).
- ``arm_walk``: the same arm whose root bone (``upper``) also translates by ``ROOT_TRANSLATION`` (world, Blender
  frame) over frames 1..24: root motion to be removed.
- ``blob``: an ico-sphere morphing into a stretched shape through one shape key animated 0 -> 1 (glTF morph target
  weights).
- ``static``: a mesh with no animation at all.

Everything is in Blender's world frame (+Z up); the glTF exporter converts to glTF's +Y up and the importer back.
Each call resets Blender to an empty factory scene (as the renderers do). Files are a few kB each.
"""

from __future__ import annotations

import math
from pathlib import Path

FRAME_START, FRAME_END = 1, 24
ROOT_TRANSLATION = (2.0, 0.0, 0.0)
FOREARM_ANGLE = math.pi / 2
# Upper arm: bone head at the origin, tail at (1, 0, 0); forearm: (1, 0, 0) -> (2, 0, 0). The boxes sit a little
# inside each bone's span, so the two parts are separate (no shared vertices) and do not touch.
UPPER_BOX = ((0.05, -0.15, -0.15), (0.95, 0.15, 0.15))
FORE_BOX = ((1.05, -0.1, -0.1), (1.95, 0.1, 0.1))


def make_test_assets(out_dir) -> dict[str, str]:
    import bpy  # only here: importing this module must not need bpy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, build in (("arm", lambda: _build_arm(bpy, walk=False)), ("arm_walk", lambda: _build_arm(bpy, walk=True)),
                        ("blob", lambda: _build_blob(bpy)), ("static", lambda: _build_static(bpy))):
        _reset(bpy)
        build()
        path = out / f"{name}.glb"
        _export(bpy, path, animated=name != "static")
        paths[name] = str(path)
    _reset(bpy)
    return paths


def _reset(bpy) -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    scene = bpy.context.scene
    scene.frame_start, scene.frame_end = FRAME_START, FRAME_END


def _export(bpy, path: Path, animated: bool) -> None:
    bpy.ops.export_scene.gltf(
        filepath=str(path), export_format="GLB", export_animations=animated, export_materials="EXPORT",
        export_yup=True, export_apply=False, export_skins=True, export_morph=True,
    )


def _material(bpy, name: str, rgb):
    mat = bpy.data.materials.new(name)
    bsdf = mat.node_tree.nodes.get("Principled BSDF")
    if bsdf is not None:
        bsdf.inputs["Base Color"].default_value = (*rgb, 1.0)
        bsdf.inputs["Roughness"].default_value = 0.6
    return mat


def _linear_keys(anim_data) -> None:
    """Linear interpolation on every key of the assigned action (motion proportional to time; the tests rely on it).
    Blender 5.0 actions are layered: F-curves live in the channel bag of the action slot in use."""
    from bpy_extras.anim_utils import action_get_channelbag_for_slot

    bag = action_get_channelbag_for_slot(anim_data.action, anim_data.action_slot)
    for fc in bag.fcurves:
        for kp in fc.keyframe_points:
            kp.interpolation = "LINEAR"


def _box(lo, hi):
    """8 vertices and 6 quads (outward) of an axis-aligned box."""
    (x0, y0, z0), (x1, y1, z1) = lo, hi
    verts = [(x, y, z) for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)]
    # index = 4*ix + 2*iy + iz
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return verts, quads


def _build_arm(bpy, walk: bool) -> None:
    from mathutils import Matrix, Vector

    scene = bpy.context.scene
    # Armature with two bones.
    arm_data = bpy.data.armatures.new("ArmRig")
    rig = bpy.data.objects.new("ArmRig", arm_data)
    scene.collection.objects.link(rig)
    bpy.context.view_layer.objects.active = rig
    bpy.ops.object.mode_set(mode="EDIT")
    upper = arm_data.edit_bones.new("upper")
    upper.head, upper.tail = (0.0, 0.0, 0.0), (1.0, 0.0, 0.0)
    fore = arm_data.edit_bones.new("fore")
    fore.head, fore.tail = (1.0, 0.0, 0.0), (2.0, 0.0, 0.0)
    fore.parent = upper
    fore.use_connect = True
    bpy.ops.object.mode_set(mode="OBJECT")

    # One mesh, two separate box parts, each weighted fully to its own bone.
    v1, q1 = _box(*UPPER_BOX)
    v2, q2 = _box(*FORE_BOX)
    verts = v1 + v2
    faces = q1 + [tuple(i + len(v1) for i in q) for q in q2]
    me = bpy.data.meshes.new("ArmMesh")
    me.from_pydata(verts, [], faces)
    me.update()
    me.materials.append(_material(bpy, "arm_red", (0.8, 0.2, 0.15)))
    obj = bpy.data.objects.new("ArmMesh", me)
    scene.collection.objects.link(obj)
    g_upper = obj.vertex_groups.new(name="upper")
    g_fore = obj.vertex_groups.new(name="fore")
    g_upper.add(list(range(len(v1))), 1.0, "REPLACE")
    g_fore.add(list(range(len(v1), len(verts))), 1.0, "REPLACE")
    obj.parent = rig
    mod = obj.modifiers.new("Armature", "ARMATURE")
    mod.object = rig

    # Action: the forearm rotates about world +Z (the bone's local axes: rotate about the bone-space axis that maps
    # to world +Z); in arm_walk the root bone also translates by ROOT_TRANSLATION (world).
    pb_fore = rig.pose.bones["fore"]
    pb_upper = rig.pose.bones["upper"]
    pb_fore.rotation_mode = "QUATERNION"
    rest_fore = arm_data.bones["fore"].matrix_local.to_3x3()
    axis_local = rest_fore.inverted() @ Vector((0.0, 0.0, 1.0))
    for frame, angle in ((FRAME_START, 0.0), (FRAME_END, FOREARM_ANGLE)):
        pb_fore.rotation_quaternion = Matrix.Rotation(angle, 3, axis_local).to_quaternion()
        pb_fore.keyframe_insert("rotation_quaternion", frame=frame)
    if walk:
        rest_upper = arm_data.bones["upper"].matrix_local.to_3x3()
        t_local = rest_upper.inverted() @ Vector(ROOT_TRANSLATION)
        for frame, loc in ((FRAME_START, Vector((0.0, 0.0, 0.0))), (FRAME_END, t_local)):
            pb_upper.location = loc
            pb_upper.keyframe_insert("location", frame=frame)
    rig.animation_data.action.name = "walk" if walk else "bend"
    _linear_keys(rig.animation_data)
    scene.frame_set(FRAME_START)


def _build_blob(bpy) -> None:
    scene = bpy.context.scene
    bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=2, radius=0.5, location=(0.0, 0.0, 0.0))
    obj = bpy.context.active_object
    obj.name = "Blob"
    obj.data.materials.append(_material(bpy, "blob_green", (0.2, 0.7, 0.3)))
    obj.shape_key_add(name="Basis", from_mix=False)
    key = obj.shape_key_add(name="stretch", from_mix=False)
    for p in key.data:
        x, y, z = p.co
        p.co = (0.6 * x, 0.6 * y, 2.0 * z + 0.3 * x)  # taller, thinner and sheared
    for frame, value in ((FRAME_START, 0.0), (FRAME_END, 1.0)):
        key.value = value
        key.keyframe_insert("value", frame=frame)
    _linear_keys(obj.data.shape_keys.animation_data)
    scene.frame_set(FRAME_START)


def _build_static(bpy) -> None:
    bpy.ops.mesh.primitive_cone_add(vertices=12, radius1=0.5, depth=1.0, location=(0.3, 0.0, 0.5))
    obj = bpy.context.active_object
    obj.name = "Cone"
    obj.data.materials.append(_material(bpy, "cone_blue", (0.2, 0.3, 0.8)))
