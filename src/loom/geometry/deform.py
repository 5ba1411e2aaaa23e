"""Topology-consistent 4D geometry: carry one mesh through a sequence of per-frame meshes of DIFFERENT topology
(ShapeGen4D appendix A.2 step 1, "Topology-consistent geometry conversion").

The per-frame meshes of a generated 4D shape come from marching cubes, so their vertex counts and triangles change
from frame to frame and a texture made for one frame cannot be reused on the next. :func:`topology_consistent`
starts at frame 0's mesh, registers it to frame 1 (first as a rigid body with scale, :func:`fit_similarity`, then
non-rigidly, :func:`refine_nonrigid`), carries the result to frame 2, and so on, exactly the paper's scheme: every
output frame has frame 0's vertices-to-faces structure.

Design choices (why):

- **Chamfer distance** is the symmetric mean of SQUARED nearest-neighbour distances between points sampled on the
  moving mesh and points sampled once on the target surface. The moving samples are fixed barycentric combinations
  of the vertices (faces and weights drawn once, area-weighted on the rest shape), so they are differentiable in
  the vertices. Nearest neighbours are found with a scipy kd-tree under no_grad (the assignment is piecewise
  constant, so the gradient is the same as that of a dense ``min``) and cost O(n log n) instead of the O(n^2)
  memory of ``torch.cdist``.
- **Similarity** (:func:`fit_similarity`): axis-angle rotation (``matrix_exp`` of the skew matrix: smooth at 0),
  translation and log-scale, about the moving mesh's centroid, optimised with Adam; the start aligns the centroids
  and the RMS extents. Translation is optimised in units of the mesh's RMS radius so one learning rate suits every
  size.
- **Non-rigid refinement** is Nicolet et al. 2021 ("Large Steps in Inverse Rendering of Geometry"): Adam
  optimises ``u = (I + lambda L) x`` and ``x`` is recovered by a sparse solve with the same symmetric positive
  definite matrix in forward and backward (:class:`LargeStepsSolve`). ``L`` is the UNIFORM (combinatorial) graph
  Laplacian ``D - A``, as the paper recommends: it does not depend on the geometry, so badly shaped marching-cubes
  triangles do not make it ill-conditioned. The input mesh should be welded (marching-cubes meshes are): split
  vertices are not coupled by ``L`` and may drift apart.
- **Solver**: the ``largesteps`` package cannot be used on CPU: its matrix builders (``compute_matrix``,
  ``laplacian_uniform``) create their tensors with ``device='cuda'`` (checked with largesteps 0.2.2 and a CPU-only
  torch: "Torch not compiled with CUDA enabled"). Its solver ``cholespy`` (2.2.0) DOES install from PyPI as a CPU
  wheel and solves with CPU torch tensors, so ``solver="auto"`` uses cholespy's sparse Cholesky factorisation when
  it is importable and scipy's sparse LU (``splu``, SuperLU) otherwise; both factor once per frame and give the
  same result (float64). cholespy is not among Loom's dependencies; install it to get the faster solve.
- **ARAP** (Sorkine and Alexa 2007) with uniform edge weights: ``sum_i sum_{j in N(i)} |(x_i - x_j) -
  R_i (r_i - r_j)|^2`` over the one-ring edges, divided by ``sum |r_i - r_j|^2`` so the weight does not depend on
  the mesh's size or resolution. The per-vertex best rotations ``R_i`` are recomputed every step from the current
  vertices by SVD under no_grad (the local step of ARAP; the gradient of the energy with R fixed is its true
  gradient, since R is optimal). The REST shape is the PREVIOUS frame's result after this frame's similarity (so
  neither the rigid motion nor the global scale change is penalised, only the non-rigid part of this step);
  ``arap_rest="first"`` uses frame 0's mesh, scaled by the accumulated similarity scale, instead (less drift of
  local shape over long sequences, but large deformations then cost more).
- **Silhouettes** (optional, ``w_sil > 0``): soft silhouettes from ``loom.geometry.raster.soft_silhouette`` (imported
  only when used) of the moving mesh and of the target mesh, in a few fixed views on a ring around the target;
  the targets are rendered once without grad. The term is the mean squared difference of the masks. It is OFF by
  default: with that pure-torch rasteriser one step (forward + backward) costs ~1.5 s for 2 views of 32 px and
  ~2.4 s for 4 views of 48 px on a ~3k-face mesh (1 core), against ~8 ms for the rest of a step, so on CPU it
  suits small meshes or few steps; the Chamfer distance alone already tracks the bundled arm (tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from scipy.spatial import cKDTree

from loom.geometry.camera import intrinsics, look_at
from loom.geometry.mesh import _check_mesh, _sample_faces, sample_surface

SOLVERS = ("auto", "scipy", "cholespy")
ARAP_RESTS = ("previous", "first")


@dataclass(frozen=True, kw_only=True)
class TrackSettings:
    """How :func:`topology_consistent` registers each frame to the next. Defaults are for CPU and meshes of a few
    thousand vertices; :meth:`fast` is a cheaper variant for tests and previews."""

    points: int = 5000  # surface samples per mesh for the Chamfer distance (moving and target)
    rigid_iters: int = 150  # Adam steps of the similarity fit
    rigid_lr: float = 0.01  # rotation in radians, translation in RMS radii, log-scale
    fit_scale: bool = True  # optimise the scale (the paper's "rotation, translation, and scale")
    nonrigid_iters: int = 200  # Adam steps of the large-steps refinement
    nonrigid_lr: float = 0.01  # Adam step on u = (I + lambda L) x, in units of the mesh's RMS radius
    lam: float = 10.0  # lambda of (I + lambda L); larger: smoother, more global steps
    w_arap: float = 0.1  # weight of the normalised ARAP energy against the Chamfer distance (in RMS radii^2)
    arap_rest: str = "previous"  # "previous" | "first": see the module docstring
    w_sil: float = 0.0  # silhouette weight; 0 turns the silhouette term (and the rasteriser) off
    sil_views: int = 4  # views on a ring around the target for the silhouette term
    sil_size: int = 64  # silhouette resolution (square)
    sil_sigma: float = 1.0  # edge softness of soft_silhouette, in pixels
    solver: str = "auto"  # "auto" (cholespy if importable, else scipy) | "scipy" | "cholespy"
    seed: int = 0  # samples of frame t use seed + t

    def __post_init__(self):
        for name in ("points", "sil_views", "sil_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrackSettings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rigid_iters", "nonrigid_iters"):  # 0 skips that stage
            if int(getattr(self, name)) < 0:
                raise ValueError(f"TrackSettings.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rigid_lr", "nonrigid_lr", "lam", "sil_sigma"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"TrackSettings.{name} must be > 0, got {getattr(self, name)}")
        for name in ("w_arap", "w_sil"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"TrackSettings.{name} must be >= 0, got {getattr(self, name)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"TrackSettings.solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.arap_rest not in ARAP_RESTS:
            raise ValueError(f"TrackSettings.arap_rest must be one of {ARAP_RESTS}, got {self.arap_rest!r}")

    @classmethod
    def fast(cls, **overrides) -> "TrackSettings":
        """Fewer samples and steps (about 10x cheaper): tests and previews."""
        base = dict(points=1500, rigid_iters=60, rigid_lr=0.02, nonrigid_iters=80, nonrigid_lr=0.02)
        return cls(**{**base, **overrides})


# ---- small pieces ------------------------------------------------------------------------------------------------


def _rms_radius(points: np.ndarray) -> float:
    p = np.asarray(points, dtype=np.float64)
    r = float(np.sqrt(((p - p.mean(axis=0)) ** 2).sum(axis=1).mean()))
    if not r > 0:
        raise ValueError("all points coincide: the shape has no extent to register")
    return r


def _axis_angle_matrix(w: torch.Tensor) -> torch.Tensor:
    """(3,) axis-angle -> (3,3) rotation, via the matrix exponential of the skew matrix (smooth at w = 0)."""
    zero = w.new_zeros(())
    k = torch.stack([
        torch.stack([zero, -w[2], w[1]]),
        torch.stack([w[2], zero, -w[0]]),
        torch.stack([-w[1], w[0], zero]),
    ])
    return torch.linalg.matrix_exp(k)


def _transform(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    return v @ m[:3, :3].T + m[:3, 3]


class _Chamfer:
    """Symmetric Chamfer distance (mean squared nearest distances, both ways) between fixed barycentric samples of a
    moving mesh and fixed target points. The target's kd-tree is built once."""

    def __init__(self, F: np.ndarray, rest: np.ndarray, target_points: np.ndarray, n: int,
                 rng: np.random.Generator):
        face_ids, bary, _ = _sample_faces(rest, F, n, rng)
        self.corners = torch.as_tensor(F[face_ids], dtype=torch.long)  # (n, 3)
        self.bary = torch.as_tensor(bary, dtype=torch.float32)  # (n, 3)
        self.target = torch.as_tensor(np.asarray(target_points, np.float32))  # (P, 3)
        self.tree = cKDTree(self.target.numpy().astype(np.float64))

    def samples(self, x: torch.Tensor) -> torch.Tensor:
        return (x[self.corners] * self.bary[..., None]).sum(dim=1)  # (n, 3)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.samples(x)
        s_np = s.detach().numpy().astype(np.float64)
        _, to_target = self.tree.query(s_np)  # nearest target point of each sample
        _, to_source = cKDTree(s_np).query(self.target.numpy())  # nearest sample of each target point
        d_st = ((s - self.target[torch.as_tensor(to_target)]) ** 2).sum(dim=1).mean()
        d_ts = ((self.target - s[torch.as_tensor(to_source)]) ** 2).sum(dim=1).mean()
        return d_st + d_ts


class _Silhouettes:
    """Soft silhouettes of the moving mesh against those of the target mesh in a few fixed views (ring around the
    target's centre, 20 degrees above the horizon, the whole target in view)."""

    def __init__(self, F: np.ndarray, target_mesh, views: int, size: int, sigma: float):
        try:
            from loom.geometry.raster import soft_silhouette
        except ImportError as e:  # the rasteriser is a separate module; without it the term cannot be computed
            raise ImportError(
                f"w_sil > 0 needs loom.geometry.raster.soft_silhouette ({e}); set TrackSettings(w_sil=0) to "
                "register with the Chamfer distance alone"
            ) from e
        vt, ft = _check_mesh(*target_mesh, name="target mesh")
        centre = 0.5 * (vt.min(axis=0) + vt.max(axis=0))
        radius = float(np.linalg.norm(vt - centre, axis=1).max())
        dist = 3.0 * radius
        elev = math.radians(20.0)
        c2w = np.stack([
            look_at(centre + dist * np.array([math.cos(a) * math.cos(elev), math.sin(a) * math.cos(elev),
                                              math.sin(elev)]), centre)
            for a in np.linspace(0.0, 2.0 * math.pi, views, endpoint=False) + 0.3
        ])
        # The target's bounding sphere fills 70% of the half-width: room for the moving mesh to be off a little.
        fov = 2.0 * math.atan(radius / math.sqrt(dist * dist - radius * radius) / 0.7)
        self.fn = soft_silhouette
        self.K = torch.as_tensor(intrinsics(fov, size, size), dtype=torch.float32)
        self.c2w = torch.as_tensor(c2w, dtype=torch.float32)
        self.size, self.sigma = (size, size), sigma
        self.faces = torch.as_tensor(F, dtype=torch.long)
        with torch.no_grad():
            self.target = self.fn(torch.as_tensor(vt, dtype=torch.float32), torch.as_tensor(ft, dtype=torch.long),
                                  self.K, self.c2w, self.size, sigma=sigma)  # (B, H, W)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sil = self.fn(x, self.faces, self.K, self.c2w, self.size, sigma=self.sigma)
        return ((sil - self.target) ** 2).mean()


# ---- rigid: similarity --------------------------------------------------------------------------------------------


def _silhouette_term(f: np.ndarray, target_mesh, settings: TrackSettings):
    """The silhouette term of a fit (None when ``settings.w_sil`` is 0)."""
    if settings.w_sil <= 0:
        return None
    if target_mesh is None:
        raise ValueError("settings.w_sil > 0 needs target_mesh=(Vt, Ft) to render the target silhouettes")
    return _Silhouettes(f, target_mesh, settings.sil_views, settings.sil_size, settings.sil_sigma)


def fit_similarity(V: np.ndarray, F: np.ndarray, target_points: np.ndarray, *, target_mesh=None,
                   settings: TrackSettings = TrackSettings(), rng: np.random.Generator | None = None,
                   rest: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Best similarity (rotation, translation, scale) taking the mesh (V (N,3), F (M,3)) onto ``target_points``
    (P,3) (samples of the target surface), by Adam on the symmetric Chamfer distance (+ ``settings.w_sil`` times the
    silhouette term against ``target_mesh`` = (Vt, Ft), which it then needs).

    Starts from the centroid and RMS-extent alignment. Returns (M (4,4) float64 with ``x' = M[:3,:3] x + M[:3,3]``,
    final Chamfer distance (float, squared units of the input)). ``rest`` (N,3) is where the fixed samples are drawn
    (default V)."""
    v, f = _check_mesh(V, F)
    tp = np.asarray(target_points, dtype=np.float64)
    if tp.ndim != 2 or tp.shape[1] != 3 or len(tp) == 0 or not np.isfinite(tp).all():
        raise ValueError(f"target_points must be a finite, non-empty (P,3) array, got shape {tp.shape}")
    rng = np.random.default_rng(settings.seed) if rng is None else rng
    chamfer = _Chamfer(f, v if rest is None else np.asarray(rest, np.float64), tp, settings.points, rng)
    sil = _silhouette_term(f, target_mesh, settings)

    c_src = v.mean(axis=0)
    r_src = _rms_radius(v)
    c_tgt = tp.mean(axis=0)
    scale0 = _rms_radius(tp) / r_src if settings.fit_scale else 1.0
    x0 = torch.as_tensor(v - c_src, dtype=torch.float32)  # (N, 3) about the centroid
    rot = torch.zeros(3, requires_grad=True)
    trans = torch.as_tensor((c_tgt - c_src) / r_src, dtype=torch.float32).clone().requires_grad_(True)
    log_s = torch.tensor(math.log(scale0), dtype=torch.float32, requires_grad=settings.fit_scale)
    params = [rot, trans] + ([log_s] if settings.fit_scale else [])
    opt = torch.optim.Adam(params, lr=settings.rigid_lr)
    c_src_t = torch.as_tensor(c_src, dtype=torch.float32)

    def moved():
        return torch.exp(log_s) * x0 @ _axis_angle_matrix(rot).T + c_src_t + trans * r_src

    for _ in range(settings.rigid_iters):
        opt.zero_grad()
        x = moved()
        loss = chamfer(x)
        if sil is not None:
            loss = loss + settings.w_sil * sil(x)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(chamfer(moved()))
        r = _axis_angle_matrix(rot).double().numpy()
        s = float(torch.exp(log_s))
        t = trans.double().numpy() * r_src
    m = np.eye(4)
    m[:3, :3] = s * r
    m[:3, 3] = c_src + t - s * r @ c_src
    return m, final


# ---- non-rigid: large steps + ARAP --------------------------------------------------------------------------------


def mesh_edges(F: np.ndarray) -> np.ndarray:
    """Unique undirected edges (E,2) int64 (i < j) of a triangle mesh."""
    f = np.asarray(F, dtype=np.int64)
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    e = np.sort(e, axis=1)
    e = e[e[:, 0] != e[:, 1]]
    return np.unique(e, axis=0)


def uniform_laplacian(n: int, F: np.ndarray) -> sp.csr_matrix:
    """Combinatorial Laplacian ``D - A`` (n,n) of the mesh graph (symmetric, positive semi-definite)."""
    e = mesh_edges(F)
    a = sp.coo_matrix((np.ones(2 * len(e)), (np.r_[e[:, 0], e[:, 1]], np.r_[e[:, 1], e[:, 0]])), shape=(n, n))
    a = a.tocsr()
    return (sp.diags(np.asarray(a.sum(axis=1)).ravel()) - a).tocsr()


def _cholespy():
    try:
        import cholespy
    except ImportError:
        return None
    return cholespy


class SparseSPDSolver:
    """Factor a sparse symmetric positive definite matrix once; ``solve(b)`` for b (n,k) float64 numpy.

    Backend: cholespy's sparse Cholesky (``"cholespy"``) or scipy's SuperLU (``"scipy"``); ``"auto"`` takes
    cholespy when it is importable."""

    def __init__(self, m: sp.spmatrix, backend: str = "auto"):
        if backend not in SOLVERS:
            raise ValueError(f"backend must be one of {SOLVERS}, got {backend!r}")
        cs = _cholespy() if backend in ("auto", "cholespy") else None
        if backend == "cholespy" and cs is None:
            raise ImportError("solver='cholespy' needs the cholespy package (pip install cholespy); or use 'scipy'")
        self.n = m.shape[0]
        if cs is not None:
            coo = sp.coo_matrix(m)
            self._chol = cs.CholeskySolverD(self.n, torch.as_tensor(coo.row, dtype=torch.int32),
                                            torch.as_tensor(coo.col, dtype=torch.int32),
                                            torch.as_tensor(coo.data, dtype=torch.float64), cs.MatrixType.COO)
            self.backend = "cholespy"
        else:
            self._lu = spla.splu(sp.csc_matrix(m))
            self.backend = "scipy"

    def solve(self, b: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(b, dtype=np.float64)
        if self.backend == "cholespy":
            bt = torch.from_numpy(b.reshape(self.n, -1).copy())
            x = torch.zeros_like(bt)
            self._chol.solve(bt, x)
            return x.numpy().reshape(b.shape)
        return self._lu.solve(b)


class LargeStepsSolve(torch.autograd.Function):
    """x = M^-1 u for the symmetric matrix M = I + lambda L of :class:`SparseSPDSolver`: the gradient is
    M^-T g = M^-1 g, the same solve (Nicolet et al. 2021, section 4)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, solver: SparseSPDSolver) -> torch.Tensor:
        ctx.solver = solver
        x = solver.solve(u.detach().cpu().double().numpy())
        return torch.from_numpy(x).to(u.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return torch.from_numpy(ctx.solver.solve(g.detach().cpu().double().numpy())).to(g.dtype), None


def _arap_setup(F: np.ndarray):
    e = mesh_edges(F)
    src = np.r_[e[:, 0], e[:, 1]]
    dst = np.r_[e[:, 1], e[:, 0]]
    return torch.as_tensor(src, dtype=torch.long), torch.as_tensor(dst, dtype=torch.long)


def best_rotations(x: torch.Tensor, rest: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """ARAP's local step: per vertex i the rotation (N,3,3) closest to mapping its rest one-ring edges onto its
    current ones, ``argmin_R sum_j |(x_i - x_j) - R (r_i - r_j)|^2`` (SVD, reflection fixed)."""
    with torch.no_grad():
        er = (rest[src] - rest[dst]).double()  # (2E, 3) rest edges out of each vertex
        ex = (x[src] - x[dst]).double()  # (2E, 3)
        cov = torch.zeros(len(rest), 3, 3, dtype=torch.float64)
        cov.index_add_(0, src, er[:, :, None] * ex[:, None, :])  # S_i = sum e_r e_x^T
        # numpy's batched 3x3 SVD is ~25% faster than torch's on CPU; this runs every step.
        u, _, vt = np.linalg.svd(cov.numpy())
        r = np.transpose(vt, (0, 2, 1)) @ np.transpose(u, (0, 2, 1))  # R = V U^T
        flip = np.linalg.det(r) < 0
        if flip.any():  # a reflection: negate the axis of the smallest singular value (Sorkine-Alexa, eq. 6)
            vf = np.transpose(vt[flip], (0, 2, 1)).copy()
            vf[:, :, 2] *= -1
            r[flip] = vf @ np.transpose(u[flip], (0, 2, 1))
        r = torch.from_numpy(r)
        return r.to(x.dtype)


def arap_energy(x: torch.Tensor, rest: torch.Tensor, F: np.ndarray | tuple) -> torch.Tensor:
    """Normalised ARAP energy (Sorkine and Alexa 2007, uniform weights) of vertices x (N,3) against ``rest`` (N,3):
    ``sum_i sum_j |(x_i - x_j) - R_i (r_i - r_j)|^2 / sum |r_i - r_j|^2`` with the best R_i (no grad). 0 for a
    rigid motion of the rest shape, > 0 otherwise. ``F`` may be the faces or the ``(src, dst)`` directed edges."""
    src, dst = F if isinstance(F, tuple) else _arap_setup(np.asarray(F))
    r = best_rotations(x, rest, src, dst)
    er = rest[src] - rest[dst]  # (2E, 3)
    ex = x[src] - x[dst]
    res = ex - (r[src] @ er[:, :, None])[..., 0]
    return (res ** 2).sum() / (er ** 2).sum()


def refine_nonrigid(V: np.ndarray, F: np.ndarray, target_points: np.ndarray, *, rest: np.ndarray | None = None,
                    target_mesh=None, settings: TrackSettings = TrackSettings(),
                    rng: np.random.Generator | None = None) -> tuple[np.ndarray, float]:
    """Deform the mesh (V (N,3), F) towards ``target_points`` (P,3) with large steps: Adam on u = (I + lambda L) x,
    loss = Chamfer + w_arap * ARAP(x; rest) + w_sil * silhouette (the latter needs ``target_mesh``). ``rest`` (N,3)
    is the ARAP rest shape (default V). Returns (vertices (N,3) float64, final Chamfer distance)."""
    v, f = _check_mesh(V, F)
    rest_np = v if rest is None else np.asarray(rest, dtype=np.float64)
    if rest_np.shape != v.shape:
        raise ValueError(f"rest must have the shape of V {v.shape}, got {rest_np.shape}")
    rng = np.random.default_rng(settings.seed) if rng is None else rng
    chamfer = _Chamfer(f, v, target_points, settings.points, rng)
    sil = _silhouette_term(f, target_mesh, settings)
    # Work in units of the RMS radius about the centroid: lambda, the learning rate and the Chamfer scale do not
    # depend on the object's size.
    c = v.mean(axis=0)
    s = _rms_radius(v)
    m = sp.identity(len(v), format="csr") + settings.lam * uniform_laplacian(len(v), f)
    solver = SparseSPDSolver(m, settings.solver)
    u = torch.as_tensor(m @ ((v - c) / s), dtype=torch.float32).clone().requires_grad_(True)
    c_t = torch.as_tensor(c, dtype=torch.float32)
    rest_t = torch.as_tensor(rest_np, dtype=torch.float32)
    edges = _arap_setup(f)
    opt = torch.optim.Adam([u], lr=settings.nonrigid_lr)

    def vertices():
        return LargeStepsSolve.apply(u, solver) * s + c_t

    for _ in range(settings.nonrigid_iters):
        opt.zero_grad()
        x = vertices()
        loss = chamfer(x) / (s * s)
        if settings.w_arap > 0:
            loss = loss + settings.w_arap * arap_energy(x, rest_t, edges)
        if sil is not None:
            loss = loss + settings.w_sil * sil(x)
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = vertices()
        return x.double().numpy(), float(chamfer(x))


# ---- the sequence -------------------------------------------------------------------------------------------------


def topology_consistent(frames, settings: TrackSettings = TrackSettings(),
                        progress: Callable[[int, int, dict], None] | None = None) -> np.ndarray:
    """Carry frame 0's mesh through ``frames`` = [(V_t (N_t,3), F_t (M_t,3)), ...] (any topology per frame).

    Frame t's mesh is registered to frame t+1 (similarity, then large-steps + ARAP refinement) and replaces it;
    the result is carried on. Returns vertices (T, N_0, 3) float32 that all use frame 0's faces ``F_0``; frame 0 is
    the input frame 0 unchanged. ``progress(t, T, info)`` is called after each frame with the Chamfer distances
    (``rigid``, ``nonrigid``) and the similarity ``M`` (4,4)."""
    if len(frames) == 0:
        raise ValueError("frames is empty: nothing to track")
    checked = [_check_mesh(v, f, name=f"frame {t}") for t, (v, f) in enumerate(frames)]
    v0, f0 = checked[0]
    out = np.empty((len(frames), len(v0), 3), dtype=np.float32)
    out[0] = np.asarray(frames[0][0], dtype=np.float32)
    cur = v0
    total_scale = 1.0
    for t in range(1, len(frames)):
        vt, ft = checked[t]
        rng = np.random.default_rng(settings.seed + t)
        target_points, _ = sample_surface(vt, ft, settings.points, rng)
        sil_mesh = (vt, ft) if settings.w_sil > 0 else None
        m, rigid_loss = fit_similarity(cur, f0, target_points, target_mesh=sil_mesh, settings=settings, rng=rng)
        moved = _transform(m, cur)
        total_scale *= float(np.cbrt(np.linalg.det(m[:3, :3])))
        if settings.arap_rest == "previous":
            rest = moved
        else:
            rest = v0 * total_scale
        cur, nonrigid_loss = refine_nonrigid(moved, f0, target_points, rest=rest, target_mesh=sil_mesh,
                                             settings=settings, rng=rng)
        out[t] = cur.astype(np.float32)
        if progress is not None:
            progress(t, len(frames), {"rigid": rigid_loss, "nonrigid": nonrigid_loss, "M": m})
    return out


__all__ = [
    "TrackSettings", "fit_similarity", "refine_nonrigid", "topology_consistent", "arap_energy", "best_rotations",
    "uniform_laplacian", "mesh_edges", "SparseSPDSolver", "LargeStepsSolve",
]
