"""Prediction renders: Loom's own Blender renders of predicted mesh sequences, for the rendering metrics of
``loom eval 4d`` (ShapeGen4D Tab. 2), from the ground truth's cameras.

The bpy side is :func:`loom.render.meshes.render_meshes`; this module drives it the way every render job does, in
a sandboxed child process (:class:`loom.platform.sandbox.Sandbox`), so that a Blender crash or hang costs one
sequence, not the evaluation. :func:`projected_colours` paints a predicted mesh with the colours of the frame it
is compared with (the predictions carry no texture of their own).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

ENTRY = "loom.render.meshes:render_meshes"


def projected_colours(verts: np.ndarray, K: np.ndarray, c2w: np.ndarray, frame: np.ndarray,
                      outside=(0.5, 0.5, 0.5)) -> np.ndarray:  # fmt: skip
    """(V,3) sRGB colours in [0,1]: each vertex takes the colour of the pixel of ``frame`` ((H,W,4) straight-alpha
    uint8) it projects to through the OpenCV camera ``K``, ``c2w`` (pixel centres at u+0.5, so the pixel is the
    floor of the projection); ``outside`` where it falls behind the camera, off the image or on a pixel of alpha
    < 0.5 (not the object). No visibility test: seen from this camera a hidden vertex is covered anyway."""
    from loom.geometry.camera import project

    uv, depth = project(np.asarray(verts, np.float64), np.asarray(K, np.float64), np.asarray(c2w, np.float64))
    h, w = frame.shape[:2]
    with np.errstate(invalid="ignore"):
        u, v = np.floor(uv[:, 0]), np.floor(uv[:, 1])
        ok = (depth > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    col = np.tile(np.asarray(outside, np.float64), (len(verts), 1))
    idx = np.flatnonzero(ok)
    px = frame[v[idx].astype(np.int64), u[idx].astype(np.int64)]
    solid = px[:, 3] >= 128
    col[idx[solid]] = px[solid, :3] / 255.0
    return col


class MeshRenderer:
    """Renders of mesh sequences in one sandboxed Blender process, started at the first sequence and reused (bpy's
    import is paid once). Close it (or use it as a context manager) to end that process."""

    def __init__(self, scratch: str, *, samples: int = 8, hdri: str = "studio", device: str = "CPU",
                 threads: int = 0, timeout_s: float = 600.0):  # fmt: skip
        """``scratch``: folder of the child's log and its intermediate EXR frames; ``samples``: Cycles samples per
        pixel; ``hdri``: environment map of clay shading (a bundled name or a path); ``threads``: Blender's render
        threads (0 = all cores); ``timeout_s``: seconds one sequence may take before the child is killed."""
        self.check()
        self.scratch = scratch
        self.options = {"samples": samples, "hdri": hdri, "device": device, "threads": threads}
        self.timeout_s = timeout_s
        self._box = None

    @staticmethod
    def check(needed_by: str = "rendering meshes needs Blender", instead: str = "") -> None:
        """Refuse early where bpy is not installed (before any work starts): the message says what needed Blender
        (``needed_by``), how to install it, and ``instead``, what else the user can do."""
        from loom.render import bpy_missing_message

        if importlib.util.find_spec("bpy") is None:
            raise RuntimeError(f"{needed_by}: {bpy_missing_message()}" + (f" {instead}" if instead else ""))

    def render(self, meshes: list[tuple[np.ndarray, np.ndarray]], K: np.ndarray, c2w: np.ndarray, width: int,
               height: int, *, colours: list[np.ndarray] | None = None) -> np.ndarray:  # fmt: skip
        """(T,H,W,4) straight-alpha uint8 of mesh t seen by the OpenCV camera ``K[t]``, ``c2w[t]``. With
        ``colours`` ((V,3) sRGB per mesh) each surface shows its vertex colours unlit; without, grey clay under
        the environment map."""
        from loom.platform.sandbox import Sandbox

        if self._box is None:
            self._box = Sandbox(ENTRY, log_dir=os.path.join(self.scratch, "logs"),
                                env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}, preload=("bpy",))
        frames = [{"vertices": v, "faces": f, **({"colors": colours[t]} if colours is not None else {})}
                  for t, (v, f) in enumerate(meshes)]
        params = {"frames": frames, "K": np.asarray(K), "c2w": np.asarray(c2w), "width": width, "height": height,
                  "workdir": os.path.join(self.scratch, "frames"), "seed": 0, **self.options,
                  "shading": "vertex" if colours is not None else "clay"}
        return self._box.run(params, self.timeout_s)["video"]

    def close(self) -> None:
        if self._box is not None:
            self._box.close()
            self._box = None

    def __enter__(self) -> MeshRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
