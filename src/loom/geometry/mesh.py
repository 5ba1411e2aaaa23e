"""Mesh processing of the 4D data pipeline: watertight meshes, surface and SDF samples, aligned query points
(ShapeGen4D sections 3.1 "Aligning latents" and 5.1 "Data curation"; SPEC section 3).

Pure functions, numpy in and numpy out. A mesh is ``(V, F)``: vertices (N,3) float, faces (M,3) int. All
randomness comes from a ``numpy.random.Generator`` argument, so a task is deterministic for its seed.

Design choices:

- **Watertight**: point-cloud-utils' ``make_mesh_watertight`` (the Manifold algorithm, Huang et al. 2018): an
  octree of the surface is flood-filled from outside and only the outside boundary is kept, so internal surfaces
  (a body inside clothing, overlapping parts) disappear and the result is a closed, oriented 2-manifold. It
  offsets the surface outward: for a side-1 object the original surface lies ~0.011 inside the watertight one at
  ``resolution=20000`` (0.022 at 5000, 0.006 at 50000; measured). The ``inner_threshold`` of
  :func:`aligned_queries` (0.02) must stay above that offset, or the real outer surface is dropped too.
  ``resolution`` is a lower bound on the octree's occupied leaves: the tree is split one level at a time until it
  has that many, so a frame gets 1-4x the target and the cost grows faster than the faces (1 thread, bundled
  arm: 40k faces 0.4 s, 69k 1.3 s, 156k 7 s at 20,000). A frame whose leaves overshoot dominates a sequence's
  time, which is why the 4D job's default is 10,000 (a frame either keeps its mesh exactly or drops one level).
- **Signed distance**: exact unsigned distance (pcu ``closest_points_on_mesh``, an AABB tree) with the sign from
  the fast winding number (pcu ``triangle_soup_fast_winding_number``, the same inside test that pcu's
  ``signed_distance_to_mesh`` uses). When the result is clipped (``clip``, the SDF truncation), points provably
  farther than the clip skip the AABB query: a point whose nearest mesh VERTEX is farther than ``clip + L`` (``L``
  the longest edge, the diameter of every face) is farther than ``clip`` from every face, so its clipped value is
  exactly ``+-clip`` (a bounded scipy KD-tree query decides it). Far points are the expensive ones for pcu's
  query (0.33 s for 49k uniform points against 0.12 s for 49k near-surface points on a 45k-face mesh, 1 thread),
  so the SDF samples' distances cost 3-3.7x less with identical values (about a third of them are far). pcu's
  ``signed_distance_to_mesh`` returns negative inside (Loom's convention)
  but its magnitude was off by up to ~0.5% of the distance (2e-4 at 0.03, measured against a brute-force
  point-triangle distance) for about the same time (~0.55 s for 65k points on a 47k-face mesh, 2 cores).
- **Farthest point sampling**: fpsample's ``bucket_fps_kdline_sampling`` (QuickFPS, a kd-tree with buckets):
  ~7 ms for 1,024 of 32,768 points against ~1 s for a naive numpy loop (2 cores), with the same result (it is
  exact FPS: checked against the loop started from its first pick). In fpsample 1.0.2 its ``start_idx`` indexes
  the kd-tree's internal order, not the input, so the first pick is not ``points[start_idx]``; the selection is
  still deterministic for the seed.
- **Surface sampling** is our own vectorised numpy, not pcu's ``sample_mesh_random``: the draws come from the
  Generator itself (pcu re-seeds a C++ generator from one int, and seed 0 means "the clock"), zero-area faces
  get a zero-width interval of the area CDF so they can never be chosen, and :func:`aligned_queries` needs the
  same face ids and barycentric coordinates. It costs ~18 ms for 32,768 samples on a 47k-face mesh (pcu: ~5 ms),
  small beside the watertight conversion (~0.5 s) and the distances (~0.6 s).

pcu, fpsample and friends are imported inside the functions that use them, so ``import loom.geometry`` needs
numpy alone (they come with the ``render`` extra).
"""

from __future__ import annotations

import numpy as np

# Uniform volume samples cover the unit box and a little air around it, so the field is supervised up to
# (and a bit beyond) the box that every normalised frame fits in.
_VOLUME_PADDING = 1.05
# Bucket size 2**5 = 32 points: fpsample's authors recommend h=5..7 for medium workloads (32k points); h=5 was
# as fast as 6 and 7 here (7 ms), faster than 3 and 9.
_FPS_TREE_HEIGHT = 5


def _check_mesh(V: np.ndarray, F: np.ndarray, name: str = "mesh") -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(V)
    f = np.asarray(F)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"{name}: expected vertices (N,3) and faces (M,3), got {v.shape} and {f.shape}")
    if len(v) == 0 or len(f) == 0:
        raise ValueError(f"{name} is empty ({len(v)} vertices, {len(f)} faces): nothing to process")
    if not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"{name}: faces must be integer indices, got dtype {f.dtype}")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"{name}: face indices must lie in [0, {len(v)}), got [{f.min()}, {f.max()}]")
    v = np.ascontiguousarray(v, dtype=np.float64)
    if not np.isfinite(v).all():
        raise ValueError(f"{name} has non-finite vertex coordinates")
    return v, np.ascontiguousarray(f, dtype=np.int64)


def _face_geometry(v: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per face: area (M,) with 0 for degenerate faces, and unit normal (M,3) (zero for degenerate faces)."""
    tri = v[f]  # (M, 3 corners, 3)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # (M, 3), |cross| = 2 * area
    norm = np.linalg.norm(cross, axis=1)
    ok = np.isfinite(norm) & (norm > 0)
    normals = np.zeros_like(cross)
    normals[ok] = cross[ok] / norm[ok, None]
    return np.where(ok, 0.5 * norm, 0.0), normals


def _sample_faces(v: np.ndarray, f: np.ndarray, n: int, rng: np.random.Generator):
    """Area-weighted uniform samples: (face ids (n,) int64, barycentric coordinates (n,3) float64, unit face
    normals of the whole mesh (M,3))."""
    area, normals = _face_geometry(v, f)
    cdf = np.cumsum(area)
    total = cdf[-1]
    if not total > 0:
        raise ValueError(f"the mesh has no surface: all {len(f)} faces are degenerate (zero area)")
    u = rng.random(n) * total
    # side="right": a zero-area face has an empty interval [cdf[i-1], cdf[i]) and is never picked; u < total
    # except by rounding, which the clip sends to the last face with area.
    face_ids = np.searchsorted(cdf, u, side="right")
    face_ids = np.minimum(face_ids, np.flatnonzero(area > 0)[-1]).astype(np.int64)
    # Uniform on a triangle: (1 - sqrt(r1), sqrt(r1) (1 - r2), sqrt(r1) r2) (Osada et al. 2002).
    r1 = np.sqrt(rng.random(n))
    r2 = rng.random(n)
    bary = np.stack([1.0 - r1, r1 * (1.0 - r2), r1 * r2], axis=1)
    return face_ids, bary, normals


def _interpolate(v: np.ndarray, f: np.ndarray, face_ids: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """Points sum_k bary[:, k] * v[f[face_ids, k]]; v may carry leading frame axes: (..., N, 3) -> (..., n, 3)."""
    corners = v[..., f[face_ids], :]  # (..., n, 3 corners, 3)
    return np.einsum("nk,...nkd->...nd", bary, corners)


def is_watertight(V: np.ndarray, F: np.ndarray) -> bool:
    """True if every edge is shared by exactly two faces that traverse it in opposite directions (a closed,
    consistently oriented edge-manifold). Faces with a repeated vertex make the mesh not watertight."""
    v, f = _check_mesh(V, F)
    if (f[:, 0] == f[:, 1]).any() or (f[:, 1] == f[:, 2]).any() or (f[:, 2] == f[:, 0]).any():
        return False
    directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])  # (3M, 2)
    n = np.int64(len(v))
    keys = np.sort(directed[:, 0] * n + directed[:, 1])
    if (np.diff(keys) == 0).any():
        # A directed edge used twice: more than two faces on the edge, or two neighbours with opposite winding.
        return False
    reverse = directed[:, 1] * n + directed[:, 0]
    pos = np.minimum(np.searchsorted(keys, reverse), len(keys) - 1)
    return bool((keys[pos] == reverse).all())


def make_watertight(V: np.ndarray, F: np.ndarray, resolution: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Watertight manifold version of a mesh with its internal surfaces removed (pcu's Manifold).

    ``resolution`` is the number of octree leaves (higher: finer, more faces, slower, and a smaller outward offset:
    see the module docstring). Returns (Vw (N',3) float64, Fw (M',3) int64), outward oriented. Deterministic
    (fixed seed)."""
    import point_cloud_utils as pcu

    v, f = _check_mesh(V, F)
    if not resolution > 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    vw, fw = pcu.make_mesh_watertight(v, f, resolution=resolution, seed=0)
    if len(vw) == 0 or len(fw) == 0:
        raise ValueError(f"the watertight mesh of a mesh with {len(v)} vertices and {len(f)} faces came out empty")
    return np.asarray(vw, dtype=np.float64), np.asarray(fw, dtype=np.int64)


def sample_surface(V: np.ndarray, F: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform over the surface area with the unit normals of their faces.

    Returns (points (n,3) float32, normals (n,3) float32). Degenerate (zero-area) faces are never chosen."""
    v, f = _check_mesh(V, F)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    face_ids, bary, normals = _sample_faces(v, f, n, rng)
    points = _interpolate(v, f, face_ids, bary)
    return points.astype(np.float32), normals[face_ids].astype(np.float32)


def signed_distance(points: np.ndarray, Vw: np.ndarray, Fw: np.ndarray, clip: float | None = None) -> np.ndarray:
    """Exact signed distance (P,) float64 from points (P,3) to a watertight, outward-oriented mesh: NEGATIVE
    INSIDE. Inside means winding number > 1/2.

    With ``clip``, the result is clipped to ``[-clip, clip]`` and points provably farther than ``clip`` skip the
    exact distance query (same values as clipping the unclipped result; see the module docstring)."""
    import point_cloud_utils as pcu

    v, f = _check_mesh(Vw, Fw, "watertight mesh")
    p = np.ascontiguousarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"expected points (P,3), got {p.shape}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive or None, got {clip}")
    if len(p) == 0:
        return np.zeros(0)
    # The sign always comes from the winding number: the pseudo-normal of the closest feature (Baerentzen and
    # Aanaes) would spare most of its cost, but pcu's watertight meshes can fold through themselves near concave
    # parts, where it disagreed with the winding number (0.13% of points near an L-shaped mesh, up to 0.004 deep).
    winding = np.asarray(pcu.triangle_soup_fast_winding_number(v, f, p), dtype=np.float64)
    if clip is None:
        distance = np.asarray(pcu.closest_points_on_mesh(p, v, f)[0], dtype=np.float64)
    else:
        from scipy.spatial import cKDTree

        tri = v[f]  # (M, 3 corners, 3)
        longest = float(np.linalg.norm(tri - tri[:, [1, 2, 0]], axis=2).max())  # a face lies within this of a corner
        bound = clip + longest
        nearest_vertex, _ = cKDTree(v).query(p, k=1, distance_upper_bound=bound)  # inf beyond the bound
        distance = np.full(len(p), float(clip))
        close = np.flatnonzero(nearest_vertex <= bound)
        if len(close):
            exact = np.asarray(pcu.closest_points_on_mesh(p[close], v, f)[0], dtype=np.float64)
            distance[close] = np.minimum(exact, clip)
    return np.where(winding > 0.5, -distance, distance)


def sdf_samples(
    Vw: np.ndarray,
    Fw: np.ndarray,
    n_near: int,
    n_volume: int,
    rng: np.random.Generator,
    sigma: tuple[float, float] = (0.005, 0.02),
    truncation: float = 0.05,
    half_extent: float = 0.5,
    skip_far: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Supervision for the shape VAE: truncated signed distances near the surface and in the volume.

    Near points: surface samples plus isotropic Gaussian noise, the first ``n_near // 2`` with ``sigma[0]`` and
    the rest with ``sigma[1]``. Volume points: uniform in ``[-h, h]^3`` padded by 5% (``h = half_extent``).
    Returns (points (n_near + n_volume, 3) float32, near first; sdf (n_near + n_volume,) float32), the signed
    distance to the watertight mesh (negative inside) clipped to ``[-truncation, truncation]``. ``skip_far=False``
    runs every point through the exact query (slower, same values)."""
    v, f = _check_mesh(Vw, Fw, "watertight mesh")
    if n_near < 0 or n_volume < 0:
        raise ValueError(f"n_near and n_volume must be >= 0, got {n_near} and {n_volume}")
    if len(sigma) != 2 or not all(s > 0 for s in sigma):
        raise ValueError(f"sigma must be two positive standard deviations, got {sigma}")
    if not truncation > 0 or not half_extent > 0:
        raise ValueError(f"truncation and half_extent must be positive, got {truncation} and {half_extent}")
    surface, _ = sample_surface(v, f, n_near, rng)
    scale = np.where(np.arange(n_near) < n_near // 2, sigma[0], sigma[1])[:, None]  # (n_near, 1)
    near = surface + rng.normal(size=(n_near, 3)) * scale
    box = _VOLUME_PADDING * half_extent
    volume = rng.uniform(-box, box, size=(n_volume, 3))
    # Distances of the float32 points that are returned, not of their float64 originals.
    points = np.concatenate([near, volume]).astype(np.float32)
    if skip_far:
        sdf = signed_distance(points, v, f, clip=truncation)
    else:  # the path before the far-point skip (benchmarks/render_4d.py --paths times it); same values
        sdf = np.clip(signed_distance(points, v, f), -truncation, truncation)
    return points, sdf.astype(np.float32)


def aligned_queries(
    V_seq: np.ndarray,
    F: np.ndarray,
    Vw0: np.ndarray,
    Fw0: np.ndarray,
    n_queries: int,
    rng: np.random.Generator,
    inner_threshold: float = 0.02,
    candidates: int = 32768,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ShapeGen4D's aligned query points: query i is the same physical point of the animated mesh in every frame.

    ``candidates`` points are sampled on the ORIGINAL (animated, non-watertight) mesh at frame 0 (``V_seq[0]``,
    ``F``); inner points, whose distance to the frame-0 watertight mesh (``Vw0``, ``Fw0``) exceeds
    ``inner_threshold``, are dropped; farthest point sampling picks ``n_queries`` of the rest (in FPS order:
    every prefix is spread out); each is carried to every frame by the animation itself, with the same face and
    barycentric coordinates: ``queries[t] = sum_k bary[:, k] * V_seq[t][F[face_ids, k]]``.

    V_seq (T,N,3): the vertices of every frame, one topology F (M,3).
    Returns (queries (T, n_queries, 3) float32, face_ids (n_queries,) int64, bary (n_queries, 3) float32); the
    queries are computed from the float32 ``bary`` returned, so the rule above holds to float32 rounding."""
    import fpsample
    import point_cloud_utils as pcu

    seq = np.asarray(V_seq, dtype=np.float64)
    if seq.ndim != 3 or seq.shape[-1] != 3 or seq.shape[0] == 0:
        raise ValueError(f"expected V_seq (T,N,3) with T >= 1, got {seq.shape}")
    if not np.isfinite(seq).all():
        raise ValueError("V_seq has non-finite vertex coordinates")
    v0, f = _check_mesh(seq[0], F, "frame-0 mesh")
    vw, fw = _check_mesh(Vw0, Fw0, "frame-0 watertight mesh")
    if n_queries < 1 or candidates < n_queries:
        raise ValueError(f"need 1 <= n_queries <= candidates, got n_queries={n_queries}, candidates={candidates}")

    face_ids, bary, _ = _sample_faces(v0, f, candidates, rng)
    points = _interpolate(v0, f, face_ids, bary)  # (candidates, 3)
    distance = np.asarray(pcu.closest_points_on_mesh(points, vw, fw)[0])
    keep = np.flatnonzero(distance <= inner_threshold)
    if len(keep) < n_queries:
        raise ValueError(
            f"only {len(keep)} of {candidates} candidate points lie within inner_threshold={inner_threshold} of the "
            f"watertight mesh, fewer than n_queries={n_queries}: raise candidates or inner_threshold, or check "
            "that the watertight mesh belongs to frame 0 of this sequence"
        )
    start = int(rng.integers(len(keep)))
    if len(keep) < 2**_FPS_TREE_HEIGHT:  # too few points for the bucket tree; only in tiny cases
        chosen = fpsample.fps_sampling(points[keep].astype(np.float32), n_queries, start_idx=start)
    else:
        chosen = fpsample.bucket_fps_kdline_sampling(
            points[keep].astype(np.float32), n_queries, h=_FPS_TREE_HEIGHT, start_idx=start
        )
    chosen = keep[np.asarray(chosen, dtype=np.int64)]
    if len(np.unique(chosen)) != n_queries:
        raise RuntimeError(
            f"farthest point sampling returned {len(np.unique(chosen))} distinct points for n_queries={n_queries} "
            "(fpsample issue #2: repeated indices); report the asset"
        )
    face_ids = face_ids[chosen]
    bary = bary[chosen].astype(np.float32)
    queries = _interpolate(seq, f, face_ids, bary.astype(np.float64))  # (T, n_queries, 3)
    return queries.astype(np.float32), face_ids, bary
