"""Volume IoU of two watertight meshes on a 128^3 occupancy grid (ShapeGen4D section 5.2, after 3DShape2VecSet).

Definition: both meshes are voxelised on the same grid of ``resolution^3`` cells covering the cube
``[lo, hi]^3`` (default ``[-1, 1]^3``, 3DShape2VecSet's evaluation cube, for shapes normalised into it); a cell is
occupied when its *centre* ``lo + (i + 0.5) (hi - lo) / resolution`` is inside the mesh;
``IoU = |A and B| / |A or B|`` over cells. ``bounds="joint"`` uses instead the smallest cube holding both meshes
(centred on their joint bounding box), for meshes not normalised into a fixed cube. A mesh that leaves the fixed
cube is refused (its outside part would silently not count).

Inside test: ray parity. For every (x, y) column of cell centres a ray goes along +z; its crossings with the
triangles are found by a vectorised 2D point-in-triangle test over the columns each triangle's xy bounding box
covers, and a centre is inside when an odd number of crossings lies below it (a bincount + cumulative sum per
column). Exact for closed meshes, O(columns covered + resolution^3), ~0.1-0.2 s for 128^3. The rays are shifted by
a fixed 1e-3 of a cell (irrational ratios in x and y) so that they practically never pass exactly through a mesh
edge or vertex, where a crossing could be counted twice. The same occupancy from the generalized winding number
(pcu's fast winding number) agrees to within a few boundary cells (tested) but takes ~3 s for 128^3 here. Parity
needs a closed surface: meshes whose edges are not each shared by an even number of faces are refused
(``check_watertight=False`` skips the check for closed meshes with duplicated vertices).

Ground truth without a mesh: Loom's 4D shards hold oriented surface samples, not the mesh they came from, so
:func:`occupancy_from_oriented_points` estimates the ground truth's occupancy from them (a cell centre is inside
when its distance-weighted signed distance to the tangent planes of its 8 nearest samples is negative), and
:func:`mesh_samples_iou` compares a closed mesh with such samples. Against the exact occupancy of the mesh the
samples came from this agrees to IoU > 0.99 at 128^3 with 32,768 samples, every differing cell within 2 cells of
the surface (tested on a sphere, a box and a thin plate), which bounds what a perfect prediction can score.
"""

from __future__ import annotations

import numpy as np

_JITTER = (1e-3 * 0.7071067811865476, 1e-3 * 0.5773502691896258)  # fractions of a cell, x and y


def _mesh(mesh, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        v, f = mesh
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a mesh (vertices (N,3), faces (M,3))") from None
    if hasattr(v, "detach"):
        v, f = v.detach().cpu().numpy(), f.detach().cpu().numpy()
    v, f = np.asarray(v, np.float64), np.asarray(f)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"{name}: expected vertices (N,3) and faces (M,3), got {v.shape} and {f.shape}")
    if not np.issubdtype(f.dtype, np.integer) or f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"{name}: faces must be integer indices into the {len(v)} vertices")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} has non-finite vertex coordinates")
    return v, f.astype(np.int64)


def is_watertight(faces: np.ndarray) -> bool:
    """Every undirected edge is used by an even number of faces (closed surface, index-wise)."""
    f = np.asarray(faces, np.int64)
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    n = int(f.max()) + 1
    _, counts = np.unique(e[:, 0] * n + e[:, 1], return_counts=True)
    return bool(np.all(counts % 2 == 0))


def occupancy_grid(vertices, faces, *, resolution: int = 128, bounds=(-1.0, 1.0),
                   check_watertight: bool = True) -> np.ndarray:  # fmt: skip
    """Boolean occupancy (R,R,R), indexed [ix, iy, iz], of the cell centres of the cube ``bounds``."""
    v, f = _mesh((vertices, faces), "mesh")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not hi > lo:
        raise ValueError(f"bounds must be (lo, hi) with hi > lo, got {bounds}")
    if check_watertight and not is_watertight(f):
        raise ValueError("mesh is not watertight (some edge is not shared by an even number of faces); make it "
                         "watertight first (loom.geometry.mesh) or pass check_watertight=False if it is closed")
    r = int(resolution)
    h = (hi - lo) / r
    x0, y0 = lo + 0.5 * h + _JITTER[0] * h, lo + 0.5 * h + _JITTER[1] * h  # first ray, jittered
    zc = lo + (np.arange(r) + 0.5) * h
    tri = v[f]  # (M,3,3)
    # Column index range each triangle's xy bounding box covers.
    i_lo = np.clip(np.ceil((tri[:, :, 0].min(1) - x0) / h), 0, r).astype(np.int64)
    i_hi = np.clip(np.floor((tri[:, :, 0].max(1) - x0) / h), -1, r - 1).astype(np.int64)
    j_lo = np.clip(np.ceil((tri[:, :, 1].min(1) - y0) / h), 0, r).astype(np.int64)
    j_hi = np.clip(np.floor((tri[:, :, 1].max(1) - y0) / h), -1, r - 1).astype(np.int64)
    ni, nj = np.maximum(i_hi - i_lo + 1, 0), np.maximum(j_hi - j_lo + 1, 0)
    count = ni * nj
    keep = count > 0
    t_id = np.repeat(np.nonzero(keep)[0], count[keep])  # one row per (triangle, covered column)
    start = np.repeat(np.cumsum(count[keep]) - count[keep], count[keep])
    local = np.arange(len(t_id)) - start
    ci = i_lo[t_id] + local // nj[t_id]
    cj = j_lo[t_id] + local % nj[t_id]
    px, py = x0 + ci * h, y0 + cj * h
    a, b, c = tri[t_id, 0], tri[t_id, 1], tri[t_id, 2]
    det = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        l0 = ((b[:, 1] - c[:, 1]) * (px - c[:, 0]) + (c[:, 0] - b[:, 0]) * (py - c[:, 1])) / det
        l1 = ((c[:, 1] - a[:, 1]) * (px - c[:, 0]) + (a[:, 0] - c[:, 0]) * (py - c[:, 1])) / det
        l2 = 1.0 - l0 - l1
    hit = (det != 0) & (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
    z = l0[hit] * a[hit, 2] + l1[hit] * b[hit, 2] + l2[hit] * c[hit, 2]
    col = ci[hit] * r + cj[hit]
    k = np.searchsorted(zc, z, side="right")  # the crossing toggles every centre from index k up
    toggles = np.bincount(col * (r + 1) + k, minlength=r * r * (r + 1)).reshape(r * r, r + 1)[:, :r]
    occ = (np.cumsum(toggles, axis=1, dtype=np.int32) & 1).astype(bool)
    return occ.reshape(r, r, r)


def _joint_cube(v1: np.ndarray, v2: np.ndarray) -> tuple[float, float, np.ndarray]:
    lo = np.minimum(v1.min(0), v2.min(0))
    hi = np.maximum(v1.max(0), v2.max(0))
    half = 0.5 * float((hi - lo).max()) * 1.01
    return -half, half, 0.5 * (lo + hi)


def volume_iou(mesh_pred, mesh_gt, *, resolution: int = 128, bounds=(-1.0, 1.0),
               check_watertight: bool = True) -> float:  # fmt: skip
    """IoU of the occupancy grids of two watertight meshes ``(vertices, faces)``, see the module docstring."""
    vp, fp = _mesh(mesh_pred, "mesh_pred")
    vg, fg = _mesh(mesh_gt, "mesh_gt")
    if isinstance(bounds, str):
        if bounds != "joint":
            raise ValueError(f"bounds must be (lo, hi) or 'joint', got {bounds!r}")
        lo, hi, centre = _joint_cube(vp, vg)
        vp, vg = vp - centre, vg - centre
    else:
        lo, hi = float(bounds[0]), float(bounds[1])
        for name, v in (("mesh_pred", vp), ("mesh_gt", vg)):
            if v.min() < lo or v.max() > hi:
                raise ValueError(f"{name} spans [{v.min():.4g}, {v.max():.4g}], outside the IoU cube [{lo}, {hi}]; "
                                 "normalise the meshes into it or pass bounds='joint'")  # fmt: skip
    a = occupancy_grid(vp, fp, resolution=resolution, bounds=(lo, hi), check_watertight=check_watertight)
    b = occupancy_grid(vg, fg, resolution=resolution, bounds=(lo, hi), check_watertight=check_watertight)
    union = np.count_nonzero(a | b)
    if union == 0:
        raise ValueError(f"both meshes occupy no cell of the {resolution}^3 grid (smaller than a cell?)")
    return np.count_nonzero(a & b) / union


def occupancy_from_oriented_points(points, normals, *, resolution: int, bounds: tuple[float, float],
                                   k: int = 8) -> np.ndarray:  # fmt: skip
    """Boolean occupancy (R,R,R), indexed [ix, iy, iz], of the cell centres ``lo + (i + 0.5)(hi - lo)/R`` of the
    cube ``bounds``, from surface samples with outward unit normals: a centre ``x`` is inside when the signed
    distances to the tangent planes of its ``k`` nearest samples, ``(x - p) . n``, weighted by ``1 / |x - p|^2``,
    sum to a negative number (Hoppe et al. 1992's tangent-plane distance, averaged). A majority vote of the signs
    instead fails beside edges (a point just off the extension of a face sees that face's samples as "inside") and
    inside thin parts: IoU 0.68 against 0.996 for a 0.06-thick plate, 32,768 samples, 128^3.

    Coarse to fine: blocks of 4^3 cells whose centre is farther from every sample than the block's half diagonal
    plus twice the samples' typical spacing hold no surface, and take their centre's value; only the cells of the
    other blocks are tested one by one."""
    from scipy.spatial import cKDTree

    pts, nrm = np.asarray(points, np.float64), np.asarray(normals, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or nrm.shape != pts.shape or len(pts) < k:
        raise ValueError(f"expected points and normals (N,3) with N >= {k}, got {pts.shape} and {nrm.shape}")
    lo, hi = float(bounds[0]), float(bounds[1])
    r = int(resolution)
    h = (hi - lo) / r
    tree = cKDTree(pts)

    def inside(q: np.ndarray) -> np.ndarray:
        d, idx = tree.query(q, k=k, workers=-1)
        d, idx = d.reshape(len(q), k), idx.reshape(len(q), k)
        side = np.einsum("nkd,nkd->nk", q[:, None, :] - pts[idx], nrm[idx])  # signed tangent-plane distances
        return (side / np.maximum(d, 1e-12) ** 2).sum(1) < 0

    b = 4 if r % 4 == 0 else 1
    nb = r // b
    bc = lo + (np.stack(np.meshgrid(*[np.arange(nb)] * 3, indexing="ij"), -1).reshape(-1, 3) * b + b / 2) * h
    spacing = float(np.median(tree.query(pts, k=2, workers=-1)[0][:, 1]))
    d, _ = tree.query(bc, k=1, workers=-1)
    near = d <= np.sqrt(3) * b / 2 * h + 2 * spacing
    occ = np.repeat(inside(bc), b**3).reshape(nb, nb, nb, b, b, b)  # (block xyz, cell xyz in block)
    blocks = np.argwhere(near.reshape(nb, nb, nb))
    if len(blocks):
        off = np.stack(np.meshgrid(*[np.arange(b)] * 3, indexing="ij"), -1).reshape(-1, 3)
        cells = (blocks[:, None, :] * b + off[None]).reshape(-1, 3)
        vals = inside(lo + (cells + 0.5) * h).reshape(len(blocks), b, b, b)
        occ[blocks[:, 0], blocks[:, 1], blocks[:, 2]] = vals
    return occ.transpose(0, 3, 1, 4, 2, 5).reshape(r, r, r)


def mesh_samples_iou(vertices, faces, points, normals, *, resolution: int = 128,
                     check_watertight: bool = True) -> float:  # fmt: skip
    """IoU of a closed mesh's exact occupancy (:func:`occupancy_grid`) and the occupancy that
    :func:`occupancy_from_oriented_points` estimates from oriented surface samples ``points``, ``normals`` (N,3),
    on a ``resolution^3`` grid over the smallest cube that holds both (1% margin); 0 when neither fills a cell."""
    v, f = _mesh((vertices, faces), "mesh")
    g = np.asarray(points, np.float64)
    lo, hi, centre = _joint_cube(v, g)
    a = occupancy_grid(v - centre, f, resolution=resolution, bounds=(lo, hi), check_watertight=check_watertight)
    b = occupancy_from_oriented_points(g - centre, normals, resolution=resolution, bounds=(lo, hi))
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0
