"""Kernel Inception Distance (Binkowski et al. 2018).

Definition: the unbiased estimator of the squared MMD between the Inception pool3 features of two image sets with
the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3`` (d = feature dimension), computed on ``subsets`` random
subsets of ``subset_size`` features drawn without replacement from each set, and reported as the mean and the
population standard deviation (ddof 0) over subsets. Defaults 100 subsets of 1000; all as torchmetrics and the
original code.

The subsets are drawn with ``torch.randperm`` from a ``torch.Generator`` seeded with ``seed``, real set first, then
generated set, per subset: the same draws torchmetrics' ``KernelInceptionDistance.compute()`` makes after
``torch.manual_seed(seed)``, so with the same features the two agree exactly (tested). Unlike torchmetrics, the
network comes from the local weights directory (no download at run time). KID needs the features themselves, not
only their moments; they are kept as the network returns them (float32: 2048 x 4 bytes per image). The Gram
matrices and kernel values are computed in that dtype, as torchmetrics does, and summed in float64.

Each estimate needs three ``subset_size^2`` kernel blocks. When the subsets overlap a lot (``U_r^2 + U_f^2 +
U_r U_f <= 3 subsets subset_size^2`` for the ``U`` rows drawn at least once, e.g. 10 subsets of 1000 from 1500
features: 4.4x fewer products) and the kernel matrices of all drawn rows fit in 2^26 entries, those matrices are
computed once and each estimate sums its blocks from them (a 0/1 mask product in float64); otherwise the
products are made per subset. Both give the same estimates for the same draws up to float rounding of the
float32 products (tested). Symmetric products ``x x^T`` use BLAS ``syrk`` (NumPy's matmul), half the work.
"""

from __future__ import annotations

import numpy as np
import torch

from loom.eval.metrics._common import batches
from loom.eval.metrics.fid import network_device


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in the features' dtype (CPU). NumPy's matmul recognises ``a @ a.T`` and calls BLAS ``syrk``
    (half the multiplications of a general product); torch's does not."""
    an = a.numpy()
    return torch.from_numpy(an @ (an if b is a else b.numpy()).T)


def _kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _gram(a, b).div_(a.shape[1]).add_(1).pow_(3)  # (x.y / d + 1)^3 in the features' dtype


def _kernel_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = _kernel(a, b)  # the matmul is the cost
    return k.sum(dtype=torch.float64), k.diagonal().sum(dtype=torch.float64)


def _mmd2(sxx, dxx, syy, dyy, sxy, m: int):
    return (sxx - dxx + syy - dyy) / (m * (m - 1)) - 2 * sxy / (m * m)


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # kernel values in the features' dtype (float32 from the networks, as torchmetrics), their sums in float64
    sxx, dxx = _kernel_sums(x, x)
    syy, dyy = _kernel_sums(y, y)
    sxy, _ = _kernel_sums(x, y)
    return _mmd2(sxx, dxx, syy, dyy, sxy, len(x))


def _masks(draws: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows used by any draw (sorted) and one 0/1 float64 row per draw over them, (S, U)."""
    rows = torch.unique(torch.cat(draws))
    masks = torch.zeros(len(draws), len(rows), dtype=torch.float64)
    masks.scatter_(1, torch.searchsorted(rows, torch.stack(draws)), 1.0)
    return rows, masks


def _block_sums(k: torch.Tensor, ma: torch.Tensor, mb: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``sum_{i in A_s, j in B_s} k_ij`` for each draw s (masks ``ma`` (S,U_a), ``mb`` (S,U_b)), in float64."""
    out = torch.zeros(ma.shape[0], k.shape[1], dtype=torch.float64)
    for i in range(0, k.shape[0], block):
        out.addmm_(ma[:, i : i + block], k[i : i + block].double())
    return (out * mb).sum(1)


def _mmd2_from_kernels(x: torch.Tensor, y: torch.Tensor, draws_x: list, draws_y: list) -> torch.Tensor:
    """The same estimates as ``_mmd2_unbiased(x[ix], y[iy])`` for every draw (ix, iy), from the kernel matrices of
    all the rows drawn, each computed once: cheaper when the draws overlap a lot."""
    rx, mx = _masks(draws_x)
    ry, my = _masks(draws_y)
    x, y = x[rx], y[ry]
    kxx = _kernel(x, x)
    sxx, dxx = _block_sums(kxx, mx, mx), mx @ kxx.diagonal().double()
    del kxx
    kyy = _kernel(y, y)
    syy, dyy = _block_sums(kyy, my, my), my @ kyy.diagonal().double()
    del kyy
    sxy = _block_sums(_kernel(x, y), mx, my)
    return _mmd2(sxx, dxx, syy, dyy, sxy, len(draws_x[0]))


# The kernel matrices of all drawn rows are used while they hold at most this many entries (256 MB in float32).
_MAX_KERNEL_ENTRIES = 1 << 26


def _as_float(x) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def kid_from_features(fake, real, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0):
    """(mean, std) of the subset KID estimates for feature sets ``fake`` (N,D) and ``real`` (M,D)."""
    f, r = _as_float(fake), _as_float(real)
    if f.ndim != 2 or r.ndim != 2 or f.shape[1] != r.shape[1]:
        raise ValueError(f"features must be (N,D) and (M,D) of one D, got {tuple(f.shape)} and {tuple(r.shape)}")
    if min(len(f), len(r)) < subset_size:
        raise ValueError(f"subset_size={subset_size} exceeds the number of features ({len(f)} generated, "
                         f"{len(r)} reference); lower subset_size")  # fmt: skip
    if subset_size < 2:
        raise ValueError(f"subset_size must be at least 2, got {subset_size}")
    g = torch.Generator().manual_seed(seed)
    draws_r, draws_f = [], []
    for _ in range(subsets):
        draws_r.append(torch.randperm(len(r), generator=g)[:subset_size])
        draws_f.append(torch.randperm(len(f), generator=g)[:subset_size])
    # each estimate needs three subset_size^2 kernel blocks; the kernel matrices of all drawn rows hold them all
    u_r, u_f = (len(torch.unique(torch.cat(d))) for d in (draws_r, draws_f))
    whole = u_r * u_r + u_f * u_f + u_r * u_f
    if whole <= 3 * subsets * subset_size**2 and max(u_r, u_f) ** 2 <= _MAX_KERNEL_ENTRIES:
        v = _mmd2_from_kernels(r, f, draws_r, draws_f)
    else:
        v = torch.stack([_mmd2_unbiased(r[ir], f[i_f]) for ir, i_f in zip(draws_r, draws_f, strict=True)])
    return float(v.mean()), float(v.std(unbiased=False))


def features(data, network: torch.nn.Module, batch_size: int = 50) -> torch.Tensor:
    dev = network_device(network)
    return torch.cat([network(b.to(dev)).cpu() for b in batches(data, batch_size)])


def kid(preds, target, *, network: torch.nn.Module | None = None, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, batch_size: int = 50) -> tuple[float, float]:  # fmt: skip
    """KID (mean, std) between generated images ``preds`` and reference images ``target``, (N,3,H,W) in [0,1] or
    iterables of batches. ``network`` defaults to the real Inception from the weights directory."""
    if network is None:
        from loom.eval.networks import inception

        network = inception.load()
    return kid_from_features(features(preds, network, batch_size), features(target, network, batch_size),
                             subsets=subsets, subset_size=subset_size, seed=seed)  # fmt: skip
