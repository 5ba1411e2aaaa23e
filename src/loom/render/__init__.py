"""Blender-backed renderers. The only package in Loom that imports bpy (inside the sandboxed worker process)."""

from __future__ import annotations

import glob
import importlib.util
import os

BUNDLED_HDRIS = ("city", "courtyard", "forest", "interior", "night", "studio", "sunrise", "sunset")


def bpy_missing_message() -> str:
    return ("Blender's Python module `bpy` is not installed in this environment. It needs Python 3.11: "
            "run `make setup` (or `pip install -e '.[render]'`) in a Python 3.11 virtual environment.")


def bpy_root() -> str:
    """Folder of the installed bpy package, found without importing it (importing bpy takes seconds)."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(bpy_missing_message())
    return os.path.dirname(spec.origin)


def hdri_path(name_or_path: str) -> str:
    """An environment map: one of the CC0 HDRIs bundled with Blender (by name) or a path to an .exr/.hdr file."""
    if os.path.sep in name_or_path or name_or_path.endswith((".exr", ".hdr")):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"environment map {name_or_path} does not exist")
        return name_or_path
    hits = glob.glob(os.path.join(bpy_root(), "*", "datafiles", "studiolights", "world", f"{name_or_path}.exr"))
    if not hits:
        raise ValueError(f"unknown environment map {name_or_path!r}: use one of {list(BUNDLED_HDRIS)} or a file path")
    return hits[0]
