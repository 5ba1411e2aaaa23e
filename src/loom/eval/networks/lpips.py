"""The LPIPS network (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric").

LPIPS v0.1: an ImageNet backbone (AlexNet or VGG16, torchvision's layout and files), five feature taps (after the
ReLUs that ``lpips``' ``pretrained_networks.py`` slices at), each unit-normalised over channels, squared
difference, a learned non-negative 1x1 "lin" head, spatial mean, sum over taps.

Weights (registry entries ``lpips-alex`` / ``lpips-vgg`` of :mod:`loom.eval.weights`): the backbone is
torchvision's ImageNet file (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``), read from the weights
directory or, when it is not there, from the torch hub cache where torchvision keeps it (``$TORCH_HOME/hub/
checkpoints``; torchvision itself is not used: it does not work here, and it would download); the lin heads are the
``lpips`` v0.1 files that torchmetrics ships (``lpips_models/{alex,vgg}.pth``), found in the weights directory or
in the installed torchmetrics. :func:`loom.eval.weights.resolve` picks the place; ``loom weights`` names it.

Input: two image batches (N,3,H,W) in [0,1]; they are mapped to [-1,1] (``2x - 1``) and then through LPIPS'
scaling layer (shift [-.030,-.088,-.188], scale [.458,.448,.450]), exactly as ``lpips.LPIPS(normalize=True)``.
Channel normalisation is ``f / (||f|| + 1e-10)`` as in the ``lpips`` package (torchmetrics uses
``f / sqrt(||f||^2 + 1e-8)``; the two agree to ~1e-7 relative on real features).
"""

from __future__ import annotations

import os

import torch
from torch import nn

# (conv out channels, kernel, stride, padding) per conv, "M" for a 3x3/2 (alex) or 2x2/2 (vgg) max pool.
_ALEX = [(64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), "M"]
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Slice ends in torchvision's ``features`` indices: the taps are the outputs of features[:end].
_TAPS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}
_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
_BACKBONE_FILE = {"alex": "lpips-alex", "vgg": "lpips-vgg"}


def _features(net: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    if net == "alex":
        for c in _ALEX:
            if c == "M":
                layers.append(nn.MaxPool2d(3, 2))
            else:
                cout, k, s, p = c
                layers += [nn.Conv2d(cin, cout, k, s, p), nn.ReLU()]
                cin = cout
    elif net == "vgg":
        for c in _VGG16:
            if c == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, c, 3, 1, 1), nn.ReLU()]
                cin = c
    else:
        raise ValueError(f"LPIPS backbone must be 'alex' or 'vgg', got {net!r}")
    return nn.Sequential(*layers)  # same indices as torchvision's ``model.features``


class LPIPSNetwork(nn.Module):
    """(x0, x1) images (N,3,H,W) in [0,1] -> LPIPS distance per image (N,)."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        self.net_type = net
        self.features = _features(net)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS[net])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for end in _TAPS[self.net_type]:
            for layer in self.features[start:end]:
                # each ReLU follows a convolution whose fresh output nothing else holds: rectify it in place
                x = torch.relu_(x) if isinstance(layer, nn.ReLU) else layer(x)
            out.append(x)
            start = end
        return out

    @torch.no_grad()
    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[1] != 3:
            raise ValueError(f"expected two image batches (N,3,H,W) of one shape, got {tuple(x0.shape)}, "
                             f"{tuple(x1.shape)}")  # fmt: skip
        n = x0.shape[0]
        # one backbone pass for both, (2N,3,H,W) float32, channels-last on the CPU: oneDNN's own layout there, so
        # no layout conversions around each layer (max pooling ~8x, the AlexNet backbone 1.15-1.3x faster than NCHW)
        fmt = torch.channels_last if x0.device.type == "cpu" else torch.contiguous_format
        x = torch.empty((2 * n, *x0.shape[1:]), dtype=torch.float32, device=x0.device, memory_format=fmt)
        # [0,1] -> [-1,1] -> scaling layer, ((2x - 1) - shift) / scale, as one multiply-add in the copy into x
        gain, offset = 2.0 / self.scale, (1.0 + self.shift) / self.scale
        torch.addcmul(-offset, x0, gain, out=x[:n])
        torch.addcmul(-offset, x1, gain, out=x[n:])
        total = torch.zeros(n, device=x.device)
        for lin, f in zip(self.lins, self.taps(x), strict=True):  # f (2N,C,h,w)
            inv = (torch.linalg.vector_norm(f, dim=1, keepdim=True) + 1e-10).reciprocal_()  # (2N,1,h,w)
            d = (f[:n] * inv[:n]).addcmul_(f[n:], inv[n:], value=-1.0).square_()  # (N,C,h,w), unit length over C
            # the 1x1 head: a product with the (N,h,w,C) view (a matrix-vector product in channels-last)
            total += (d.permute(0, 2, 3, 1) @ lin.weight.view(-1)).mean((1, 2))
        return total  # (N,)

    def load_weights(self, backbone: str | os.PathLike, heads: str | os.PathLike) -> None:
        """torchvision's ImageNet file (``features.*`` used) and an ``lpips`` v0.1 heads file (``lin{k}.model.1``)."""
        sd = torch.load(backbone, map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        self.features.load_state_dict(feats, strict=True)
        hd = torch.load(heads, map_location="cpu", weights_only=True)
        for i, lin in enumerate(self.lins):
            lin.weight.data.copy_(hd[f"lin{i}.model.1.weight"])


def load(net: str = "alex", root: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """The real LPIPS (ImageNet backbone + v0.1 heads) from where :func:`loom.eval.weights.resolve` finds them
    (weights directory, installed torchmetrics, torch hub cache), checked."""
    from loom.eval.weights import resolve

    backbone, heads = resolve(_BACKBONE_FILE[net], root)
    m = LPIPSNetwork(net)
    m.load_weights(backbone, heads)
    return m.to(device)


def tiny_random(net: str = "alex", seed: int = 0) -> LPIPSNetwork:
    """The same architecture with a random backbone (He init) and random non-negative heads (the test stand-in;
    AlexNet is small enough to be the stand-in itself)."""
    g = torch.Generator().manual_seed(seed)
    m = LPIPSNetwork(net)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("lins"):
                p.copy_(torch.rand(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
    return m
