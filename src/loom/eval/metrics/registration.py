"""Similarity registration of a predicted shape sequence to the ground truth before geometric metrics.

ShapeGen4D section 5.2 (Metrics): "We first estimate a global similarity transformation from the first frame of
each sequence by grid-searching over azimuth angles, scaling, and translation (based on truncated Chamfer
distance), followed by iterative closest point (ICP). This transformation is applied to the full sequence, with
additional per-frame translations to ensure alignment while preserving original frame-wise rotation and scale
changes from the prediction." The paper gives no grid or truncation values; ours are below and are parameters.

1. **Grid search** on the first frame (``n_points`` random surface points of each cloud): rotations about the up
   axis (``up_axis``, Z in Loom/Blender) at ``azimuths`` equal steps x ``scales`` (relative to the ratio of the
   clouds' RMS radii), translation = centroid alignment; the ``top_k`` best are refined over translation offsets
   in ``{-1, 0, 1}^3 x translation_step`` (times the ground truth's RMS radius). The score is the truncated Chamfer
   distance ``mean_p min(d(p, G), tau) + mean_g min(d(g, P), tau)``, ``tau = truncation x RMS radius`` (so a
   partial overlap is not dominated by outliers).
2. **ICP** from the best candidate: symmetric nearest-neighbour pairs (both directions) closer than ``tau`` and a
   closed-form similarity (Umeyama 1991) per iteration: rotation (any axis), scale and translation.
3. The similarity ``x -> s R x + t`` is applied to **every frame**; then each frame k gets its own translation
   ``t_k``: centroid difference, refined by translation-only ICP with the same pairs. Frame-wise rotation and scale
   of the prediction are kept.

Point clouds are (P,3) arrays (sample them from the meshes); :class:`SequenceRegistration` applies the result to
any (N,3) array, e.g. mesh vertices, before :func:`chamfer_distance`, :func:`f_score` and :func:`volume_iou`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loom.eval.metrics.chamfer import _cloud


@dataclass(frozen=True)
class Similarity:
    """``x -> scale * rotation @ x + translation``."""

    scale: float
    rotation: np.ndarray  # (3,3)
    translation: np.ndarray  # (3,)

    def apply(self, points) -> np.ndarray:
        p = np.asarray(points, np.float64)
        return self.scale * p @ self.rotation.T + self.translation

    @property
    def azimuth_deg(self) -> float:
        """The rotation's angle about the up axis (Z) in degrees, in (-180, 180]: the grid search's azimuth."""
        return float(np.degrees(np.arctan2(self.rotation[1, 0], self.rotation[0, 0])))


@dataclass(frozen=True)
class SequenceRegistration:
    """One similarity for the sequence and one extra translation per frame."""

    similarity: Similarity
    frame_translations: np.ndarray  # (T,3)

    def apply(self, frames) -> list[np.ndarray]:
        if len(frames) != len(self.frame_translations):
            raise ValueError(f"{len(frames)} frames but a registration of {len(self.frame_translations)}")
        return [self.apply_frame(k, f) for k, f in enumerate(frames)]

    def apply_frame(self, k: int, points) -> np.ndarray:
        return self.similarity.apply(points) + self.frame_translations[k]


def _rot_about(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def umeyama(src: np.ndarray, dst: np.ndarray) -> Similarity:
    """Least-squares similarity mapping ``src`` onto ``dst`` (paired rows), Umeyama 1991."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    cov = b.T @ a / len(src)
    u, d, vt = np.linalg.svd(cov)
    e = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[2, 2] = -1.0
    r = u @ e @ vt
    var = (a * a).sum() / len(src)
    s = float(np.trace(np.diag(d) @ e) / var) if var > 0 else 1.0
    return Similarity(s, r, md - s * r @ ms)


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[rng.choice(len(x), n, replace=False)]


def _rms_radius(x: np.ndarray) -> float:
    return float(np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()))


def register_first_frame(pred, gt, *, azimuths: int = 24, scales=(0.8, 0.9, 1.0, 1.1, 1.25), top_k: int = 3,
                         translation_step: float = 0.1, truncation: float = 0.1, up_axis: int = 2,
                         n_points: int = 2048, icp_iterations: int = 30, seed: int = 0) -> Similarity:  # fmt: skip
    """The similarity that maps the predicted first frame ``pred`` (P,3) onto ``gt`` (G,3): grid search, then ICP."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    p = _subsample(_cloud(pred, "pred"), n_points, rng)
    g = _subsample(_cloud(gt, "gt"), n_points, rng)
    cp, cg = p.mean(0), g.mean(0)
    rg, rp = _rms_radius(g), _rms_radius(p)
    if rg == 0 or rp == 0:
        raise ValueError("a point cloud collapses to one point; nothing to register")
    tau = truncation * rg
    tree_g, tree_p = cKDTree(g), cKDTree(p)

    def score(sim: Similarity) -> float:
        d_pg = tree_g.query(sim.apply(p), k=1)[0]
        # d(g, sRp + t) = s * d(R^T (g - t) / s, p): query the fixed tree of p with the inverse-mapped g
        d_gp = sim.scale * tree_p.query(((g - sim.translation) @ sim.rotation) / sim.scale, k=1)[0]
        return float(np.minimum(d_pg, tau).mean() + np.minimum(d_gp, tau).mean())

    cands = []
    for a in range(azimuths):
        r = _rot_about(up_axis, 2 * np.pi * a / azimuths)
        for s_rel in scales:
            s = s_rel * rg / rp
            sim = Similarity(s, r, cg - s * r @ cp)
            cands.append((score(sim), sim))
    cands.sort(key=lambda c: c[0])
    best = cands[0]
    offsets = np.stack(np.meshgrid(*[np.array([-1.0, 0.0, 1.0])] * 3, indexing="ij"), -1).reshape(-1, 3)
    for _, sim in cands[:top_k]:
        for off in offsets * translation_step * rg:
            cand = Similarity(sim.scale, sim.rotation, sim.translation + off)
            sc = score(cand)
            if sc < best[0]:
                best = (sc, cand)
    sim = best[1]
    for _ in range(icp_iterations):
        q = sim.apply(p)
        d_pg, i_pg = tree_g.query(q, k=1)
        d_gp, i_gp = cKDTree(q).query(g, k=1)
        keep_p, keep_g = d_pg < tau, d_gp < tau
        if keep_p.sum() + keep_g.sum() < 3:
            break
        src = np.concatenate([p[keep_p], p[i_gp[keep_g]]])
        dst = np.concatenate([g[i_pg[keep_p]], g[keep_g]])
        new = umeyama(src, dst)
        moved = np.abs(new.apply(p) - q).max()
        sim = new
        if moved < 1e-7 * rg:
            break
    return sim


def _frame_translation(q: np.ndarray, g: np.ndarray, tau: float, iterations: int) -> np.ndarray:
    from scipy.spatial import cKDTree

    t = g.mean(0) - q.mean(0)
    tree_g = cKDTree(g)
    for _ in range(iterations):
        d_pg, i_pg = tree_g.query(q + t, k=1)
        d_gp, i_gp = cKDTree(q + t).query(g, k=1)
        kp, kg = d_pg < tau, d_gp < tau
        if kp.sum() + kg.sum() == 0:
            break
        step = np.concatenate([g[i_pg[kp]] - (q[kp] + t), g[kg] - (q[i_gp[kg]] + t)]).mean(0)
        t = t + step
        if np.abs(step).max() < 1e-9:
            break
    return t


def register_sequence(pred_frames, gt_frames, *, truncation: float = 0.1, n_points: int = 2048,
                      icp_iterations: int = 30, seed: int = 0, **grid) -> SequenceRegistration:  # fmt: skip
    """Register a predicted sequence of point clouds to the ground truth: the first-frame similarity for all frames,
    plus one translation per frame (see the module docstring). ``grid`` goes to :func:`register_first_frame`."""
    if len(pred_frames) != len(gt_frames) or len(pred_frames) == 0:
        raise ValueError(f"need two sequences of one non-zero length, got {len(pred_frames)} and {len(gt_frames)}")
    sim = register_first_frame(pred_frames[0], gt_frames[0], truncation=truncation, n_points=n_points,
                               icp_iterations=icp_iterations, seed=seed, **grid)  # fmt: skip
    rng = np.random.default_rng(seed + 1)
    ts = []
    for k, (pf, gf) in enumerate(zip(pred_frames, gt_frames, strict=True)):
        q = sim.apply(_subsample(_cloud(pf, f"pred frame {k}"), n_points, rng))
        g = _subsample(_cloud(gf, f"gt frame {k}"), n_points, rng)
        ts.append(_frame_translation(q, g, truncation * _rms_radius(g), icp_iterations))
    return SequenceRegistration(sim, np.stack(ts))
