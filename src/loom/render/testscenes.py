"""Small static test scenes written with Blender (bpy), for the scene-video renderer (``scene.py``) and its tests.

- :func:`make_test_scene`: ``scene.glb``, four objects with different colours so that every edge kind appears:
  a ground plane (an open mesh: its rim is a silhouette/border), a cube resting on it (its edges are creases, its
  bottom meets the ground), a bar pushed through the cube (intersection lines where the two boxes meet) and a
  sphere floating in front (its outline over the ground and the cube is an object boundary).
- :func:`make_cube_scene`: ``cube.glb``, one axis-aligned cube of side ``CUBE_SIZE`` centred at the origin.

Coordinates below are Blender world coordinates (+Z up); the glTF exporter converts to +Y up and the importer back.
Each call resets Blender to an empty factory scene.
"""

from __future__ import annotations

from pathlib import Path

CUBE_SIZE = 1.0
# name: (kind, size or radius, location (Blender world), sRGB-ish base colour)
SCENE_OBJECTS = {
    "ground": ("plane", 4.0, (0.0, 0.0, 0.0), (0.6, 0.6, 0.6)),
    "cube": ("cube", (1.0, 1.0, 1.0), (0.0, 0.0, 0.5), (0.8, 0.2, 0.2)),
    "bar": ("cube", (0.4, 1.2, 0.4), (0.0, 0.7, 0.6), (0.2, 0.3, 0.8)),
    "sphere": ("sphere", 0.35, (1.3, -1.2, 0.9), (0.2, 0.7, 0.3)),  # >= 0.45 from the cube: a clear gap
}


def make_test_scene(out_dir) -> str:
    import bpy  # only here: importing this module must not need bpy

    _reset(bpy)
    for name, (kind, size, loc, colour) in SCENE_OBJECTS.items():
        _add(bpy, name, kind, size, loc, colour)
    return _export(bpy, Path(out_dir) / "scene.glb")


def make_cube_scene(out_dir) -> str:
    import bpy

    _reset(bpy)
    _add(bpy, "cube", "cube", (CUBE_SIZE,) * 3, (0.0, 0.0, 0.0), (0.8, 0.8, 0.8))
    return _export(bpy, Path(out_dir) / "cube.glb")


def _reset(bpy) -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False


def _add(bpy, name, kind, size, loc, colour) -> None:
    if kind == "plane":
        bpy.ops.mesh.primitive_plane_add(size=size, location=loc)
    elif kind == "cube":
        bpy.ops.mesh.primitive_cube_add(size=1.0, location=loc, scale=size)
        bpy.ops.object.transform_apply(location=False, rotation=False, scale=True)
    elif kind == "sphere":
        bpy.ops.mesh.primitive_uv_sphere_add(radius=size, location=loc, segments=32, ring_count=16)
        bpy.ops.object.shade_smooth()
    else:
        raise ValueError(kind)
    obj = bpy.context.active_object
    obj.name = obj.data.name = name
    mat = bpy.data.materials.new(f"{name}_material")
    bsdf = mat.node_tree.nodes.get("Principled BSDF")
    if bsdf is not None:
        bsdf.inputs["Base Color"].default_value = (*colour, 1.0)
    mat.diffuse_color = (*colour, 1.0)
    obj.data.materials.append(mat)


def _export(bpy, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.export_scene.gltf(filepath=str(path), export_format="GLB", export_materials="EXPORT", export_yup=True,
                              export_apply=False, export_animations=False)
    _reset(bpy)
    return str(path)
