"""Structural similarity (Wang et al. 2004), the Gaussian-window form.

Definition: per channel, local means, variances and covariance from an 11x11 Gaussian window of sigma 1.5
(normalised; population statistics, no N/(N-1) correction), constants ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``
with ``L = data_range = 1``; the SSIM map
``((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` is averaged over the
positions where the window lies inside the image (a 5-pixel border is dropped) and over the 3 channels; the result
is the mean over images (and frames). This is Wang et al.'s "valid" SSIM and scikit-image's
``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``.
torchmetrics 1.9's ``structural_similarity_index_measure`` computes the same map but averages it over the whole
reflect-padded image (no border crop), so its value differs on small images (0.713 against 0.646 on a 40x48 test
fixture); its map cropped by 5 pixels equals ours (tested). Computed in the inputs' dtype (float32 as torchmetrics;
float64 inputs give scikit-image's value to 1e-10) with a separable "valid" filter. Images must be at least 11x11.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.eval.metrics._common import as_images, reduce, same_shape

_WIN, _SIGMA = 11, 1.5


def _gaussian(dtype, device) -> torch.Tensor:
    x = torch.arange(_WIN, dtype=torch.float64) - (_WIN - 1) / 2
    g = torch.exp(-(x**2) / (2 * _SIGMA**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim(preds, target, *, data_range: float = 1.0, reduction: str = "mean", batch_size: int | None = None):
    """SSIM of ``preds`` against ``target``: images (N,3,H,W) or videos (N,T,3,H,W) in [0,1]."""
    p, t = as_images(preds, "preds"), as_images(target, "target")
    same_shape(p, t)
    if min(p.shape[-2:]) < _WIN:
        raise ValueError(f"SSIM needs images of at least {_WIN}x{_WIN}, got {tuple(p.shape[-2:])}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    # small batches (~2^18 values) keep the 15 filtered maps in cache: 8x faster than one batch of 32 at 256x256
    batch_size = batch_size or max(1, (1 << 18) // p[0].numel())
    out = []
    for i in range(0, p.shape[0], batch_size):
        x, y = p[i : i + batch_size], t[i : i + batch_size]
        n, c, h, w = x.shape
        g = _gaussian(x.dtype, x.device)
        # 5 maps x C channels through one separable "valid" depthwise filter, (N, 5C, H, W): a depthwise conv is
        # ~15x faster on CPU than the same filter over a (5NC, 1, H, W) batch
        stack = torch.cat([x, y, x * x, y * y, x * y], 1)
        k = 5 * c
        f = F.conv2d(stack, g.view(1, 1, 1, _WIN).expand(k, 1, 1, _WIN).contiguous(), groups=k)
        f = F.conv2d(f, g.view(1, 1, _WIN, 1).expand(k, 1, _WIN, 1).contiguous(), groups=k)
        f = f.reshape(n, 5, c, h - _WIN + 1, w - _WIN + 1).transpose(0, 1)
        mx, my, sxx, syy, sxy = f[0], f[1], f[2] - f[0] ** 2, f[3] - f[1] ** 2, f[4] - f[0] * f[1]
        smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        out.append(smap.double().mean((1, 2, 3)))
    return reduce(torch.cat(out), reduction)
