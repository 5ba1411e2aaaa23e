"""LPIPS distance (Zhang et al. 2018), v0.1 heads.

Definition: for images x, y in [0,1] mapped to [-1,1], ``LPIPS(x, y) = sum_l mean_hw( w_l . (f_l(x) - f_l(y))^2 )``
with ``f_l`` the channel-unit-normalised activations of tap l of the backbone and ``w_l`` the non-negative linear
head (see :mod:`loom.eval.networks.lpips`); the result is the mean over images (and frames of videos). Backbone
``alex`` by default (the ``lpips`` package's recommended forward metric and torchmetrics' default); ``vgg`` via
``net="vgg"`` or a loaded network. Lower is more similar.
"""

from __future__ import annotations

import torch

from loom.eval.metrics._common import as_images, reduce, same_shape
from loom.eval.metrics.fid import network_device


def lpips(preds, target, *, network: torch.nn.Module | None = None, net: str = "alex", batch_size: int = 32,
          reduction: str = "mean"):  # fmt: skip
    """LPIPS of ``preds`` against ``target``: images (N,3,H,W) or videos (N,T,3,H,W) in [0,1]."""
    p, t = as_images(preds, "preds"), as_images(target, "target")
    same_shape(p, t)
    if network is None:
        from loom.eval.networks import lpips as lpips_net

        network = lpips_net.load(net)
    dev = network_device(network)
    vals = [network(p[i : i + batch_size].to(dev), t[i : i + batch_size].to(dev)).double().cpu()
            for i in range(0, p.shape[0], batch_size)]  # fmt: skip
    return reduce(torch.cat(vals), reduction)
