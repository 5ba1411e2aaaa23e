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
"""

from __future__ import annotations

import numpy as np
import torch

from loom.eval.metrics._common import batches
from loom.eval.metrics.fid import network_device


def _kernel_sums(a: torch.Tensor, b: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = (a @ b.T).div_(d).add_(1).pow_(3)  # in the features' dtype: the matmul is the cost
    return k.sum(dtype=torch.float64), k.diagonal().sum(dtype=torch.float64)


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # kernel values in the features' dtype (float32 from the networks, as torchmetrics), their sums in float64
    m, d = x.shape
    sxx, dxx = _kernel_sums(x, x, d)
    syy, dyy = _kernel_sums(y, y, d)
    sxy, _ = _kernel_sums(x, y, d)
    return (sxx - dxx + syy - dyy) / (m * (m - 1)) - 2 * sxy / (m * m)


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
    vals = []
    for _ in range(subsets):
        ir = torch.randperm(len(r), generator=g)[:subset_size]
        i_f = torch.randperm(len(f), generator=g)[:subset_size]
        vals.append(_mmd2_unbiased(r[ir], f[i_f]))
    v = torch.stack(vals)
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
