"""Frechet distance between Gaussians fitted to features, streaming feature statistics, and FID.

**Frechet distance** (Dowson & Landau 1982; Heusel et al. 2017):
``d^2 = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})`` with ``S`` the unbiased (N-1) covariances,
as pytorch-fid and the TTUR code compute it. The trace term is computed without a general matrix square root, as
``tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i)`` over the eigenvalues of a symmetric PSD matrix similar to
``S_1 S_2``, found with ``eigvalsh`` (eigenvalues only):

- when one covariance, say ``S_1``, is numerically positive definite (its Cholesky factor ``S_1 = L L^T`` exists
  and no pivot is at rounding level, ``l_ii^2 <= D eps max_i S_1,ii``): the eigenvalues of ``L^T S_2 L``
  (``= L^{-1} (S_1 S_2) L``), formed by LAPACK's ``dsygst``. This is the usual case (more samples than feature
  dimensions) and two to three times as fast as the eigen-decomposition below;
- otherwise (fewer samples than dimensions, constant features): the eigenvalues of ``S_1^{1/2} S_2 S_1^{1/2}``
  with ``S_1^{1/2}`` the symmetric PSD root from ``eigh``, whose null directions are dropped exactly.

In both, eigenvalues at rounding level (``<= D eps lambda_max``, including negative ones) are set to 0 before the
square root. Everything is real and symmetric, so near-singular covariances cannot produce the complex parts or
negative distances that ``scipy.linalg.sqrtm`` on the non-symmetric ``S_1 S_2`` does with recent SciPy, the known
"negative FVD" failure. Measured against the exact value (the nuclear norm of the centred data product) with 40
and 50 samples of 256-d features: relative error 2e-16 (scipy 1.17 ``sqrtm``: 5e-8), and for two identical sets 0
(scipy: -2.3e-5, a negative distance); the two ways agree to ~1e-13 relative where both apply (tested). The
distance is finally clamped at 0 (it is a squared distance; only rounding can make it negative).

**Streaming statistics** (:class:`FeatureStats`): the count, the sum of features and the sum of outer products,
all float64. They never hold the features, and merging is addition, so statistics computed on N processes (or
chunks) and merged give the same mean and covariance as one pass over all features, up to float64 rounding of the
sums (tested: relative 1e-13). ``S = (sum xx^T - n mu mu^T) / (n - 1)``. To merge across processes, all-reduce
(SUM) the three arrays of :meth:`FeatureStats.state_dict`, or gather them and use :meth:`FeatureStats.merge`.

**FID**: the Frechet distance of Inception pool3 features (:mod:`loom.eval.networks.inception`) of two image sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loom.eval.metrics._common import batches


@dataclass
class FeatureStats:
    """Running count, sum and sum of outer products (float64) of D-dimensional features."""

    n: int
    total: np.ndarray  # (D,)
    outer: np.ndarray  # (D,D)

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def of(cls, features) -> FeatureStats:
        f = _as_features(features)
        s = cls.empty(f.shape[1])
        s.update(f)
        return s

    @property
    def dim(self) -> int:
        return self.total.shape[0]

    def update(self, features) -> FeatureStats:
        f = _as_features(features)
        if f.shape[1] != self.dim:
            raise ValueError(f"features of dimension {f.shape[1]} into statistics of dimension {self.dim}")
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f
        return self

    def merge(self, *others: FeatureStats) -> FeatureStats:
        """A new FeatureStats of this and ``others`` (e.g. the statistics of every process)."""
        out = FeatureStats(self.n, self.total.copy(), self.outer.copy())
        for o in others:
            if o.dim != self.dim:
                raise ValueError(f"cannot merge statistics of dimensions {self.dim} and {o.dim}")
            out.n += o.n
            out.total += o.total
            out.outer += o.outer
        return out

    @property
    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("no features were added")
        return self.total / self.n

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 features, got {self.n}")
        mu = self.mean
        c = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return 0.5 * (c + c.T)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"n": np.array(self.n, np.int64), "total": self.total, "outer": self.outer}

    @classmethod
    def from_state_dict(cls, d: dict) -> FeatureStats:
        return cls(int(np.asarray(d["n"])), np.asarray(d["total"], np.float64), np.asarray(d["outer"], np.float64))


def _as_features(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N,D), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f


def _drop_noise(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those at rounding level (<= D eps max) set to 0: the square root would
    otherwise turn each ~1e-16 relative rounding error of a null direction into ~1e-8."""
    return np.where(w > len(w) * np.finfo(np.float64).eps * max(float(w.max()), 0.0), w, 0.0)


def _tr_sqrt_cholesky(s1: np.ndarray, s2: np.ndarray) -> float | None:
    """``tr((S1 S2)^{1/2})`` from the eigenvalues of ``L^T S2 L`` with ``S1 = L L^T``; None when ``S1`` is not
    numerically positive definite (Cholesky fails, or a pivot is at rounding level)."""
    from scipy.linalg import eigh, lapack

    low, info = lapack.dpotrf(s1, lower=1, clean=1)
    if info != 0:
        return None
    pivots = np.diagonal(low) ** 2
    if pivots.min() <= len(pivots) * np.finfo(np.float64).eps * np.diagonal(s1).max():
        return None
    m, info = lapack.dsygst(s2, low, itype=2, lower=1)  # L^T S2 L (its lower triangle)
    if info != 0:
        return None
    w = eigh(m, lower=True, eigvals_only=True, overwrite_a=True, check_finite=False, driver="ev")
    return float(np.sqrt(_drop_noise(w)).sum())


def _tr_sqrt_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """``tr((S1 S2)^{1/2})`` from the eigenvalues of ``S1^{1/2} S2 S1^{1/2}`` (any PSD ``S1``)."""
    # S1^{1/2} S2 S1^{1/2} = V (Y^T S2 Y) V^T with Y = V diag(sqrt w): same eigenvalues, one matmul fewer, and
    # the null directions of S1 (dropped columns) never enter
    w, v = np.linalg.eigh(s1)
    w = _drop_noise(w)
    y = v[:, w > 0] * np.sqrt(w[w > 0])
    m = y.T @ s2 @ y
    return float(np.sqrt(_drop_noise(np.linalg.eigvalsh(0.5 * (m + m.T)))).sum()) if m.size else 0.0


def trace_sqrt_product(sigma1, sigma2) -> float:
    """``tr((S1 S2)^{1/2})`` of two symmetric PSD matrices (see the module docstring): via the Cholesky factor of
    whichever is numerically positive definite, else via the eigen-decomposition of ``S1``."""
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    for a, b in ((s1, s2), (s2, s1)):  # tr((S1 S2)^{1/2}) = tr((S2 S1)^{1/2})
        t = _tr_sqrt_cholesky(a, b)
        if t is not None:
            return t
    return _tr_sqrt_eigh(s1, s2)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``, via symmetric eigenvalue problems (see the
    module docstring); clamped at 0."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    diff = mu1 - mu2
    d = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return float(max(d, 0.0))


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def network_device(network: torch.nn.Module) -> torch.device:
    for t in list(network.parameters())[:1] + list(network.buffers())[:1]:
        return t.device
    return torch.device("cpu")


def feature_stats(data, network: torch.nn.Module, batch_size: int = 50, device=None) -> FeatureStats:
    """Streaming statistics of ``network`` features of ``data``: a tensor, or an iterable of tensor batches."""
    stats = None
    dev = device or network_device(network)
    for b in batches(data, batch_size):
        f = network(b.to(dev))
        stats = FeatureStats.of(f) if stats is None else stats.update(f)
    if stats is None:
        raise ValueError("no data")
    return stats


def fid(preds, target, *, network: torch.nn.Module | None = None, batch_size: int = 50) -> float:
    """FID between generated images ``preds`` and reference images ``target`` (each (N,3,H,W) in [0,1], or an
    iterable of such batches). ``network`` defaults to the real Inception from the weights directory."""
    if network is None:
        from loom.eval.networks import inception

        network = inception.load()
    return frechet_distance_from_stats(feature_stats(preds, network, batch_size),
                                       feature_stats(target, network, batch_size))  # fmt: skip
