"""HED edges (Xie and Tu, 2015) as ControlNet's annotator computes them, for VideoFrom3D's edges of depth maps
(section 3.4: "apply the HED edge detector to the estimated depth maps").

Why Loom's own network: the maintained implementation, controlnet_aux's ``HEDdetector`` with lllyasviel's
``ControlNetHED.pth`` (the Apache-2.0 model), is five VGG-style convolution blocks, but the controlnet_aux package
imports every one of its detectors when any is imported, several needing torchvision and timm, which Loom's
environments and the GPU images do not carry. This module is that network with the same state-dict keys (``norm``,
``block<N>.convs.<K>``, ``block<N>.projection``), so ``ControlNetHED.pth`` loads as released, and the same
detection (:func:`hed_edges`); it is checked against controlnet_aux 0.0.10's own network and detector on fixed
weights (tests/fixtures/hed_upstream). The weights file is read with ``torch.load(weights_only=True)``: tensors
only, nothing in the file runs.

Detection, as ``HEDdetector.__call__`` with ``detect_resolution = image_resolution = min(H, W)``: the image (RGB,
uint8; a grey map is repeated to three channels) resized so its short side is that resolution and both sides are
multiples of 64 (Lanczos when enlarging, area when shrinking), fed as float 0..255 minus the learned ``norm``; the
five side outputs bilinearly resized to that size, averaged, passed through a sigmoid, x 255 -> uint8.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class _Block(nn.Module):
    """``layers`` 3x3 convolutions with ReLU (after an optional 2x2 max-pool), and a 1x1 side projection."""

    def __init__(self, cin: int, cout: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, pool: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        h = nn.functional.max_pool2d(x, 2, 2) if pool else x
        for conv in self.convs:
            h = nn.functional.relu(conv(h))
        return h, self.projection(h)


class HEDNet(nn.Module):
    """ControlNetHED's network: (B,3,H,W) float 0..255 -> five side outputs (B,1,H/2^k,W/2^k), k = 0..4."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        widths = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))
        for i, (cin, cout, layers) in enumerate(widths, 1):
            setattr(self, f"block{i}", _Block(cin, cout, layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, sides = x - self.norm, []
        for i in range(1, 6):
            h, side = getattr(self, f"block{i}")(h, pool=i > 1)
            sides.append(side)
        return sides


def load_hed(path: str) -> HEDNet:
    """``ControlNetHED.pth`` (or a folder holding it) -> the network in eval mode; every key must match."""
    import os

    file = os.path.join(path, "ControlNetHED.pth") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"HED weights {path!r}: no such file; download ControlNetHED.pth "
                                "(lllyasviel/Annotators) and point at it")
    state = torch.load(file, map_location="cpu", weights_only=True)
    net = HEDNet()
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{file} is not ControlNetHED's weights: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}")
    return net.float().eval()


def _fit(image: np.ndarray, resolution: int) -> np.ndarray:
    """controlnet_aux's ``resize_image``: short side -> resolution, both sides rounded to multiples of 64."""
    import cv2

    h, w = image.shape[:2]
    k = resolution / min(h, w)
    hh, ww = int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64
    return cv2.resize(image, (ww, hh), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def hed_edges(net: HEDNet, image: np.ndarray) -> np.ndarray:
    """(H,W) or (H,W,3) uint8 -> HED edge map uint8 at the detection size (module docstring: both sides multiples
    of 64 near the image's own; resize it back to the image's size where needed)."""
    import cv2

    if image.dtype != np.uint8:
        raise ValueError(f"HED takes uint8 images, got {image.dtype}")
    rgb = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image
    x = _fit(rgb, min(rgb.shape[:2]))
    h, w = x.shape[:2]
    device = next(net.parameters()).device
    with torch.no_grad():
        sides = net(torch.from_numpy(np.ascontiguousarray(x)).float().permute(2, 0, 1)[None].to(device))
    maps = [cv2.resize(s[0, 0].cpu().numpy().astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
            for s in sides]
    edge = 1 / (1 + np.exp(-np.mean(np.stack(maps, 2), axis=2).astype(np.float64)))
    return (edge * 255.0).clip(0, 255).astype(np.uint8)
