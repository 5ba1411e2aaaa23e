"""Root rotation removal on Blender's side (loom.render.anim, ``root_rotation="yaw"``): a box skinned to the only bone
of an armature whose root bone points up (a character's hips) and both spins about world +Z and wanders. After
extraction the root is fixed in position and heading, so the box, carried rigidly by it, does not move at all.
Real bpy, one tiny render (32x32, 3 frames, 1 sample)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = [pytest.mark.blender, pytest.mark.integration]

SPIN = 2.0  # radians about world +Z between the first and last key
WANDER = (2.0, 1.0, 0.0)  # world translation of the root between the first and last key
START, END, FRAMES = 1, 24, 3


def _write_env_map(path) -> None:
    import OpenEXR

    env = np.full((8, 16, 3), 0.5, np.float32)
    OpenEXR.File({"type": OpenEXR.scanlineimage, "compression": OpenEXR.ZIP_COMPRESSION}, {"RGB": env}).write(str(path))


def _build_spinning_root(path) -> None:
    import bpy
    from mathutils import Vector

    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.context.preferences.edit.keyframe_new_interpolation_type = "LINEAR"  # motion proportional to time
    scene = bpy.context.scene
    scene.frame_start, scene.frame_end = START, END
    arm_data = bpy.data.armatures.new("Rig")
    rig = bpy.data.objects.new("Rig", arm_data)
    scene.collection.objects.link(rig)
    bpy.context.view_layer.objects.active = rig
    bpy.ops.object.mode_set(mode="EDIT")
    hips = arm_data.edit_bones.new("hips")
    hips.head, hips.tail = (0.0, 0.0, 0.0), (0.0, 0.0, 1.0)  # bone +Y = world +Z
    bpy.ops.object.mode_set(mode="OBJECT")

    # A box off the root's axis (so a spin moves its vertices), weighted fully to the root bone.
    (x0, y0, z0), (x1, y1, z1) = (0.5, -0.2, 0.0), (1.5, 0.3, 0.6)
    verts = [(x, y, z) for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)]
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    me = bpy.data.meshes.new("Box")
    me.from_pydata(verts, [], quads)
    me.update()
    box = bpy.data.objects.new("Box", me)
    scene.collection.objects.link(box)
    box.vertex_groups.new(name="hips").add(list(range(8)), 1.0, "REPLACE")
    box.parent = rig
    box.modifiers.new("Armature", "ARMATURE").object = rig

    pb = rig.pose.bones["hips"]
    pb.rotation_mode = "XYZ"
    rest_inv = arm_data.bones["hips"].matrix_local.to_3x3().inverted()
    for frame, s in ((START, 0.0), (END, 1.0)):
        pb.rotation_euler = (0.0, SPIN * s, 0.0)  # about the bone's +Y: world +Z
        pb.location = rest_inv @ (s * Vector(WANDER))
        pb.keyframe_insert("rotation_euler", frame=frame)
        pb.keyframe_insert("location", frame=frame)
    bpy.ops.wm.save_as_mainfile(filepath=str(path), copy=True)


def test_yaw_removal_fixes_a_spinning_wandering_root(tmp_path):
    pytest.importorskip("bpy")
    from loom.render.anim import extract_sequence

    asset, env = tmp_path / "spin.blend", tmp_path / "env.exr"
    _build_spinning_root(asset)
    _write_env_map(env)
    out = extract_sequence({
        "asset_path": str(asset), "workdir": str(tmp_path), "frames": FRAMES, "width": 32, "height": 32,
        "camera": {"azimuth": 0.5, "elevation": 0.3, "fill": 0.85, "distance": 2.5}, "half_extent": 0.5,
        "hdri_path": str(env), "lighting": {"hdri": "env", "strength": 1.0, "rotation": 0.0}, "samples": 1,
        "denoise": False, "threads": 2, "seed": 0, "root_rotation": "yaw",
    })
    info = out["info"]
    s = (out["frame_times"] - START) / (END - START)
    # What was removed: the root's heading and translation since frame 0, as keyed.
    assert info["root_rotation_mode"] == "yaw"
    angles = SPIN * s
    expect = np.zeros((FRAMES, 3, 3))
    expect[:, 0, 0] = expect[:, 1, 1] = np.cos(angles)
    expect[:, 1, 0], expect[:, 0, 1], expect[:, 2, 2] = np.sin(angles), -np.sin(angles), 1.0
    np.testing.assert_allclose(info["root_rotations"], expect, atol=1e-4)
    np.testing.assert_allclose(info["root_offsets"], s[:, None] * np.array(WANDER), atol=1e-4)
    np.testing.assert_allclose(info["root_origin"], 0.0, atol=1e-5)
    assert abs(angles[-1]) > math.radians(90)  # a real turn, not a wobble
    # The root is fixed in position and heading: the box it carries is still in every frame (normalised units).
    v = out["vertices"].astype(np.float64)
    assert np.abs(v - v[:1]).max() < 1e-4
    assert info["render_vertex_error"] < 1e-5  # and the render shows those still vertices
