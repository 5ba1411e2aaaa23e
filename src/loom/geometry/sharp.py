"""Sharp-edge salient points of a mesh: the second point set of Step1X-3D's VAE (its ``cross_attn_sharp`` branch),
sampled as Dora's data pipeline samples it (Step1X-3D trains on Dora's data; ShapeGen4D 5.1: "we process the data
to match its distribution").

Pure functions, numpy in and numpy out (fpsample inside the function that needs it, as in
:mod:`loom.geometry.mesh`). A mesh is ``(V, F)``: vertices (N,3) float, faces (M,3) int; all randomness comes from
a ``numpy.random.Generator`` argument.

Upstream, read for the facts below (Dora's ``sharp_edge_sampling/sharp_sample.py`` by the Dora team, Seed3D/Dora,
read at its mirror azhir-physicsx/DORA_VAE commit 0a87bf6; Step1X-3D commit 20b5de2b). Step1X-3D does not release
its own preprocessing (its loader reads ``surface``, ``sharp_surface``, ``near_surface_points`` and
``volume_rand_points`` from its own .npz files, not Dora's keys); Dora's sampler is the method it cites:

- A sharp edge is an edge of two faces whose normals differ by more than 15 degrees: Blender's
  ``edges_select_sharp(sharpness=radians(15))`` (sharp_sample.py line 54; ``--angle_threshold 15`` in
  ``sharp_edge_sampling/README.md``). Blender considers only edges with exactly two faces; so does `sharp_edges`.
  Dora runs it on the WATERTIGHT mesh (its step 2 reads the remeshed .obj), as Loom does per frame.
- Points: every distinct vertex of the sharp edges, with its vertex normal (line 98; Blender's vertex normal, the
  corner-angle-weighted mean of the face normals), then, while fewer than the target, new points ON the edges
  with the edge's normal, the normalised mean of its two face normals (line 129, 163): ``k = need // E`` evenly
  spaced ones per edge at ``t = j / (k + 1)``, ``j = 1..k`` (lines 146-147), and ``need % E`` more on distinct
  random edges at a uniform random ``t`` (lines 156, 172). The new points come first, then the vertices.
  When the vertices alone exceed the target, farthest point sampling keeps the target (line 238).
  The target is ``point_number // 2`` = 32,768 (line 123, ``--point_number 65536``), the same count as the
  uniform surface points; Step1X-3D feeds ``n_samples`` = 32,768 of each (``step1x3d_geometry/data/base.py``
  lines 104-151, ``configs/train-geometry-diffusion/step1x-3d-geometry-1300m.yaml`` lines 23-24).
- A mesh without a sharp edge: Dora writes no sample at all (``no sharp edges!``, line 258), and Step1X-3D's
  loader (``with_sharp_data``) reads ``sharp_surface`` from every sample: such shapes are simply not in its
  training data. A 4D sequence cannot drop one frame, so `sample_sharp_edges` offers a documented fallback,
  uniform surface points with their face normals (``fallback="surface"``, the sharp branch then attends to a
  second draw of the surface), or upstream's refusal (``fallback="error"``); it reports how many sharp edges it
  found, so a caller can record which frames fell back.
"""

from __future__ import annotations

import math

import numpy as np

from loom.geometry.mesh import _FPS_TREE_HEIGHT, _check_mesh, _face_geometry, sample_surface

# Dora's threshold (sharp_sample.py, README --angle_threshold 15): the angle between the two face normals.
SHARP_ANGLE_DEGREES = 15.0
# Dora floors the norm of a mean of two opposite normals at this before dividing (sharp_sample.py lines 128-131).
_NORMAL_EPS = 1e-4


def sharp_edges(V: np.ndarray, F: np.ndarray, angle_degrees: float = SHARP_ANGLE_DEGREES
                ) -> tuple[np.ndarray, np.ndarray]:
    """Edges of exactly two faces whose unit normals differ by more than ``angle_degrees``.

    Returns (edges (E,2) int64, vertex ids with edges[:, 0] < edges[:, 1]; faces (E,2) int64, the two faces of
    each edge). Edges with one or more than two faces, and edges of a degenerate (zero-area) face, are never
    sharp (Blender's rule: the angle is defined for two faces with normals)."""
    v, f = _check_mesh(V, F)
    if not 0 <= angle_degrees < 180:
        raise ValueError(f"angle_degrees must be in [0, 180), got {angle_degrees}")
    area, normals = _face_geometry(v, f)
    directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])  # (3M, 2)
    face_of = np.tile(np.arange(len(f), dtype=np.int64), 3)  # (3M,)
    undirected = np.sort(directed, axis=1)
    key = undirected[:, 0] * np.int64(len(v)) + undirected[:, 1]
    order = np.argsort(key, kind="stable")
    _, start, count = np.unique(key[order], return_index=True, return_counts=True)
    two = start[count == 2]
    a, b = order[two], order[two + 1]  # the two half-edges of each manifold edge
    fa, fb = face_of[a], face_of[b]
    cos = np.einsum("ij,ij->i", normals[fa], normals[fb])
    sharp = (area[fa] > 0) & (area[fb] > 0) & (cos < math.cos(math.radians(angle_degrees)))
    return undirected[a[sharp]], np.stack([fa[sharp], fb[sharp]], axis=1)


def vertex_normals(V: np.ndarray, F: np.ndarray) -> np.ndarray:
    """Unit vertex normals (N,3) float64: the face normals weighted by the corner angle of each face at the vertex
    (Blender's vertex normal, which Dora's sharp vertices carry). A vertex of no face with area gets zeros."""
    v, f = _check_mesh(V, F)
    _, normals = _face_geometry(v, f)
    tri = v[f]  # (M, 3 corners, 3)
    out = np.zeros_like(v)
    for k in range(3):
        e1 = tri[:, (k + 1) % 3] - tri[:, k]
        e2 = tri[:, (k + 2) % 3] - tri[:, k]
        angle = np.arctan2(np.linalg.norm(np.cross(e1, e2), axis=1), np.einsum("ij,ij->i", e1, e2))  # (M,)
        np.add.at(out, f[:, k], angle[:, None] * normals)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norm, out=np.zeros_like(out), where=norm > 0)


def sample_sharp_edges(V: np.ndarray, F: np.ndarray, n: int, rng: np.random.Generator,
                       angle_degrees: float = SHARP_ANGLE_DEGREES, fallback: str = "surface"
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """``n`` salient points on the sharp edges of a (watertight) mesh with their normals, as Dora samples them (see
    the module docstring): the sharp edges' vertices with their vertex normals, plus points along the edges with
    the normalised mean of the edge's two face normals; FPS down to ``n`` when the vertices alone are more.

    Returns (points (n,3) float32, unit normals (n,3) float32, number of sharp edges found). With no sharp edge,
    ``fallback="surface"`` returns `sample_surface` points (and 0), ``fallback="error"`` raises ValueError."""
    v, f = _check_mesh(V, F)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if fallback not in ("surface", "error"):
        raise ValueError(f"fallback must be 'surface' or 'error', got {fallback!r}")
    edges, faces = sharp_edges(v, f, angle_degrees)
    e = len(edges)
    if e == 0:
        if fallback == "error":
            raise ValueError(f"the mesh has no sharp edge (no two faces differ by more than {angle_degrees} degrees):"
                             " Dora drops such shapes; use fallback='surface' to sample its surface instead")
        points, normals = sample_surface(v, f, n, rng)
        return points, normals, 0
    known = np.unique(edges)  # (K,) vertex ids
    known_pts, known_nrm = v[known], vertex_normals(v, f)[known]
    if len(known) >= n:
        chosen = _fps(known_pts, n, rng)
        return known_pts[chosen].astype(np.float32), known_nrm[chosen].astype(np.float32), e

    _, face_normals = _face_geometry(v, f)
    edge_normal = 0.5 * (face_normals[faces[:, 0]] + face_normals[faces[:, 1]])  # (E, 3)
    edge_normal /= np.maximum(np.linalg.norm(edge_normal, axis=1, keepdims=True), _NORMAL_EPS)
    p0, p1 = v[edges[:, 0]], v[edges[:, 1]]  # (E, 3) each
    need = n - len(known)
    per = need // e
    t_even = np.arange(1, per + 1) / (per + 1)  # (per,) evenly spaced inside every edge
    pts = [(p0[:, None] * (1 - t_even)[None, :, None] + p1[:, None] * t_even[None, :, None]).reshape(-1, 3)]
    nrm = [np.repeat(edge_normal, per, axis=0)]
    extra = need % e
    if extra:
        pick = rng.choice(e, extra, replace=False)
        t = rng.random(extra)[:, None]
        pts.append(p0[pick] * (1 - t) + p1[pick] * t)
        nrm.append(edge_normal[pick])
    points = np.concatenate(pts + [known_pts])  # new points first, then the vertices, as Dora
    normals = np.concatenate(nrm + [known_nrm])
    return points.astype(np.float32), normals.astype(np.float32), e


def _fps(points: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (n,) int64 of farthest point samples of points (K,3), K >= n (fpsample, as Dora)."""
    import fpsample

    if n == 0:
        return np.zeros(0, dtype=np.int64)
    start = int(rng.integers(len(points)))
    p = np.ascontiguousarray(points, dtype=np.float32)
    if len(points) < 2**_FPS_TREE_HEIGHT:  # too few points for the bucket tree
        chosen = fpsample.fps_sampling(p, n, start_idx=start)
    else:
        chosen = fpsample.bucket_fps_kdline_sampling(p, n, h=_FPS_TREE_HEIGHT, start_idx=start)
    return np.asarray(chosen, dtype=np.int64)
