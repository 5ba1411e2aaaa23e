"""RAFT optical flow (Teed and Deng, ECCV 2020), for VideoFrom3D's real-video clips (the paper estimates their flow
with RAFT).

Why Loom's own network: the maintained implementation with released weights is torchvision's
``torchvision.models.optical_flow.raft_large`` (and ``raft_small``), but torchvision cannot be imported in Loom's
environments (CPU torch installed from a local file; PyPI's torchvision then fails with "operator torchvision::nms
does not exist"), and the GPU images do not carry it. This module is that network with the same state-dict keys
(``feature_encoder.*``, ``context_encoder.*``, ``update_block.{motion_encoder,recurrent_block,flow_head}.*``,
``mask_predictor.*``), so torchvision's files (``raft_large_C_T_SKHT_V2-ff5fadd5.pth``, ``raft_large_C_T_V2-*.pth``,
``raft_small_C_T_V2-*.pth``) load as released, and the same computation: it is checked against torchvision 0.29.1 on
fixed random weights, every flow update (tests/fixtures/raft_upstream). Weights files are read with
``torch.load(weights_only=True)`` or safetensors: tensors only, nothing in the file runs.

The network (paper section 3; torchvision's defaults):

- feature encoder (instance norm) on both frames and context encoder (batch norm, running statistics) on the first:
  a 7x7 stride-2 convolution and three stages of two residual blocks (strides 1, 2, 2) -> 1/8 resolution;
  256 channels (large). The context is split into the GRU's initial hidden state (tanh, 128) and context (ReLU, 128).
- all-pairs correlation (section 3.2): dot products of every feature pair / sqrt(C), average-pooled over the second
  frame's axes into a 4-level pyramid; looked up around the current correspondence in a (2r+1)^2 window, r = 4.
- update operator (3.3): motion encoder (correlation + flow), a separable ConvGRU (1x5 then 5x1), a flow head giving
  the residual flow; ``num_flow_updates`` iterations (12 by default).
- convex upsampling (3.3): each full-resolution flow vector a softmax-weighted mix of its 3x3 coarse neighbours
  (x 8); raft_small upsamples bilinearly instead.

:func:`raft_flow` (and :func:`raft_flow_batch`) take uint8 RGB frames of any size: they are mapped to [-1, 1] as
torchvision's ``OpticalFlow`` transform does, padded by edge replication, centred (the original code's ``InputPadder``),
to multiples of 8 and to at least 128 per side (the coarsest pyramid level needs two cells; torchvision refuses less),
and the flow is cropped back. ``flow[y, x] = (dx, dy)``: the pixel ``a[y, x]`` is seen at ``b[y + dy, x + dx]``, the
convention of OpenCV and of ``loom.geometry.video_signals.optical_flow``. The correlation volume holds (HW/64)^2
floats per pair (~0.8 GB for a 720x1280 pair): batch accordingly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MIN_SIDE = 128  # 8 (encoder stride) x 2 cells x 2^(4 - 1) (pyramid levels): the smallest padded side


@dataclass(frozen=True, kw_only=True)
class RaftConfig:
    """The shape of a RAFT network; :data:`RAFT_LARGE` and :data:`RAFT_SMALL` are torchvision's two."""

    block: str = "residual"  # "residual" (two 3x3) or "bottleneck" (1x1, 3x3, 1x1 at a quarter of the width)
    feature_layers: tuple[int, ...] = (64, 64, 96, 128, 256)  # stem, three stages, output
    context_layers: tuple[int, ...] = (64, 64, 96, 128, 256)
    context_norm: str | None = "batch"  # the feature encoder always uses instance norm
    corr_levels: int = 4
    corr_radius: int = 4
    motion_corr_layers: tuple[int, ...] = (256, 192)
    motion_flow_layers: tuple[int, ...] = (128, 64)
    motion_out: int = 128  # including the 2 flow channels appended
    hidden: int = 128  # GRU hidden state; the context encoder's output minus this is the context
    gru_kernels: tuple[tuple[int, int], ...] = ((1, 5), (5, 1))
    flow_head_hidden: int = 256
    convex_upsampling: bool = True

    def __post_init__(self):
        if self.block not in ("residual", "bottleneck"):
            raise ValueError(f"RaftConfig.block: {self.block!r} is not 'residual' or 'bottleneck'")
        if self.context_layers[-1] <= self.hidden:
            raise ValueError(f"RaftConfig.context_layers[-1] ({self.context_layers[-1]}) must exceed hidden "
                             f"({self.hidden}): the context encoder's output is split into hidden state and context")


RAFT_LARGE = RaftConfig()
RAFT_SMALL = RaftConfig(block="bottleneck", feature_layers=(32, 32, 64, 96, 128), context_layers=(32, 32, 64, 96, 160),
                        context_norm=None, corr_radius=3, motion_corr_layers=(96,), motion_flow_layers=(64, 32),
                        motion_out=82, hidden=96, gru_kernels=((3, 3),), flow_head_hidden=128,
                        convex_upsampling=False)


def _conv(cin: int, cout: int, k: int, *, stride: int = 1, norm: str | None = None, relu: bool = True) -> nn.Sequential:
    """Convolution (+ norm) (+ ReLU) as one Sequential: torchvision's ``Conv2dNormActivation`` key layout (``.0`` the
    convolution, ``.1`` the norm when there is one); biases everywhere, as torchvision keeps them before norms."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2)]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(cout))
    elif norm == "instance":
        layers.append(nn.InstanceNorm2d(cout))  # no parameters, no running statistics: per-image statistics
    elif norm is not None:
        raise ValueError(f"unknown norm {norm!r}")
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str | None, stride: int):
        super().__init__()
        self.convnormrelu1 = _conv(cin, cout, 3, stride=stride, norm=norm)
        self.convnormrelu2 = _conv(cout, cout, 3, norm=norm)
        self.downsample = nn.Identity() if stride == 1 else _conv(cin, cout, 1, stride=stride, norm=norm, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.downsample(x) + self.convnormrelu2(self.convnormrelu1(x)))


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str | None, stride: int):
        super().__init__()
        self.convnormrelu1 = _conv(cin, cout // 4, 1, norm=norm)
        self.convnormrelu2 = _conv(cout // 4, cout // 4, 3, stride=stride, norm=norm)
        self.convnormrelu3 = _conv(cout // 4, cout, 1, norm=norm)
        self.downsample = nn.Identity() if stride == 1 else _conv(cin, cout, 1, stride=stride, norm=norm, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.downsample(x) + self.convnormrelu3(self.convnormrelu2(self.convnormrelu1(x))))


class _Encoder(nn.Module):
    """(B,3,H,W) in [-1,1] -> (B,layers[4],H/8,W/8): 7x7 stride-2 stem, stages of two blocks (strides 1, 2, 2)."""

    def __init__(self, layers: tuple[int, ...], block: str, norm: str | None):
        super().__init__()
        blk = _Residual if block == "residual" else _Bottleneck
        self.convnormrelu = _conv(3, layers[0], 7, stride=2, norm=norm)
        for i, stride in enumerate((1, 2, 2), 1):
            setattr(self, f"layer{i}", nn.Sequential(blk(layers[i - 1], layers[i], norm, stride),
                                                     blk(layers[i], layers[i], norm, 1)))
        self.conv = nn.Conv2d(layers[3], layers[4], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convnormrelu(x)
        return self.conv(self.layer3(self.layer2(self.layer1(x))))


class _MotionEncoder(nn.Module):
    """(flow (B,2,h,w), correlation (B,L*(2r+1)^2,h,w)) -> (B,motion_out,h,w), the last two channels the flow."""

    def __init__(self, cfg: RaftConfig):
        super().__init__()
        corr_in = cfg.corr_levels * (2 * cfg.corr_radius + 1) ** 2
        c, f = cfg.motion_corr_layers, cfg.motion_flow_layers
        self.convcorr1 = _conv(corr_in, c[0], 1)
        self.convcorr2 = _conv(c[0], c[1], 3) if len(c) == 2 else nn.Identity()
        self.convflow1 = _conv(2, f[0], 7)
        self.convflow2 = _conv(f[0], f[1], 3)
        self.conv = _conv(c[-1] + f[1], cfg.motion_out - 2, 3)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        c = self.convcorr2(self.convcorr1(corr))
        f = self.convflow2(self.convflow1(flow))
        return torch.cat([self.conv(torch.cat([c, f], 1)), flow], 1)


class _ConvGRU(nn.Module):
    def __init__(self, hidden: int, inputs: int, kernel: tuple[int, int]):
        super().__init__()
        pad = (kernel[0] // 2, kernel[1] // 2)
        self.convz = nn.Conv2d(hidden + inputs, hidden, kernel, padding=pad)
        self.convr = nn.Conv2d(hidden + inputs, hidden, kernel, padding=pad)
        self.convq = nn.Conv2d(hidden + inputs, hidden, kernel, padding=pad)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hx = torch.cat([h, x], 1)
        z, r = torch.sigmoid(self.convz(hx)), torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], 1)))
        return (1 - z) * h + z * q


class _RecurrentBlock(nn.Module):
    def __init__(self, hidden: int, inputs: int, kernels: tuple[tuple[int, int], ...]):
        super().__init__()
        for i, k in enumerate(kernels, 1):
            setattr(self, f"convgru{i}", _ConvGRU(hidden, inputs, k))
        self.n = len(kernels)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.n + 1):
            h = getattr(self, f"convgru{i}")(h, x)
        return h


class _FlowHead(nn.Module):
    def __init__(self, cin: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(h)))


class _UpdateBlock(nn.Module):
    def __init__(self, cfg: RaftConfig):
        super().__init__()
        context = cfg.context_layers[-1] - cfg.hidden
        self.motion_encoder = _MotionEncoder(cfg)
        self.recurrent_block = _RecurrentBlock(cfg.hidden, cfg.motion_out + context, cfg.gru_kernels)
        self.flow_head = _FlowHead(cfg.hidden, cfg.flow_head_hidden)

    def forward(self, h, context, corr, flow) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.recurrent_block(h, torch.cat([context, self.motion_encoder(flow, corr)], 1))
        return h, self.flow_head(h)


class _MaskPredictor(nn.Module):
    """Hidden state -> (B, 9*8*8, h, w) logits of the convex upsampling weights."""

    def __init__(self, hidden: int):
        super().__init__()
        self.convrelu = _conv(hidden, 256, 3)
        self.conv = nn.Conv2d(256, 8 * 8 * 9, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return 0.25 * self.conv(self.convrelu(h))  # the original's gradient down-weighting, kept: it scales the logits


def _coords_grid(b: int, h: int, w: int, device) -> torch.Tensor:
    """(B,2,h,w) pixel coordinates, channel 0 = x, 1 = y."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([xs, ys]).float()[None].expand(b, 2, h, w)


def _corr_pyramid(f1: torch.Tensor, f2: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """(B,C,h,w) x2 -> ``levels`` volumes (B*h*w, 1, h/2^l, w/2^l): for each first-frame cell, its dot product with
    every second-frame cell / sqrt(C), the second frame's axes average-pooled l times."""
    b, c, h, w = f1.shape
    corr = torch.matmul(f1.flatten(2).transpose(1, 2), f2.flatten(2)) / torch.sqrt(torch.tensor(float(c)))
    pyramid = [corr.reshape(b * h * w, 1, h, w)]
    for _ in range(levels - 1):
        pyramid.append(F.avg_pool2d(pyramid[-1], 2, stride=2))
    return pyramid


def _corr_lookup(pyramid: list[torch.Tensor], coords: torch.Tensor, radius: int) -> torch.Tensor:
    """Bilinear samples of each level in a (2r+1)^2 window around ``coords`` (B,2,h,w), at coords / 2^l ->
    (B, levels*(2r+1)^2, h, w). Channel order (what the released weights expect): level, then the x offset, then the
    y offset; outside the volume reads zero."""
    b, _, h, w = coords.shape
    side = 2 * radius + 1
    d = torch.linspace(-radius, radius, side, device=coords.device)
    dx, dy = torch.meshgrid(d, d, indexing="ij")  # window row index = x offset, column index = y offset
    window = torch.stack([dx, dy], -1)[None]  # (1, side, side, 2) as (x, y)
    centre = coords.permute(0, 2, 3, 1).reshape(b * h * w, 1, 1, 2)
    out = []
    for level, vol in enumerate(pyramid):
        hl, wl = vol.shape[-2:]
        p = centre / 2 ** level + window  # absolute (x, y) at this level
        # grid_sample's align_corners=True frame: -1 and 1 are the centres of the first and last cells
        grid = torch.cat([2 * p[..., :1] / (wl - 1) - 1, 2 * p[..., 1:] / (hl - 1) - 1], -1)
        out.append(F.grid_sample(vol, grid, mode="bilinear", align_corners=True).view(b, h, w, side * side))
    return torch.cat(out, -1).permute(0, 3, 1, 2).contiguous()


def _upsample(flow: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B,2,h,w) flow at 1/8 -> (B,2,8h,8w) in full-resolution pixels; ``mask`` (B,576,h,w): convex weights of the
    3x3 neighbours for each of the 8x8 sub-pixels (softmax over the 9), else bilinear."""
    b, _, h, w = flow.shape
    if mask is None:
        return 8 * F.interpolate(flow, size=(8 * h, 8 * w), mode="bilinear", align_corners=True)
    weights = torch.softmax(mask.view(b, 1, 9, 8, 8, h, w), dim=2)
    neighbours = F.unfold(8 * flow, 3, padding=1).view(b, 2, 9, 1, 1, h, w)
    up = (weights * neighbours).sum(2)  # (B, 2, 8(sub-row), 8(sub-col), h, w)
    return up.permute(0, 1, 4, 2, 5, 3).reshape(b, 2, 8 * h, 8 * w)


class RAFT(nn.Module):
    """RAFT: two (B,3,H,W) images in [-1,1], H and W multiples of 8 and >= 128 -> the list of the
    ``num_flow_updates`` flow estimates (B,2,H,W) (x, y), from frame 1 to frame 2, the last the best."""

    def __init__(self, cfg: RaftConfig = RAFT_LARGE):
        super().__init__()
        self.cfg = cfg
        self.feature_encoder = _Encoder(cfg.feature_layers, cfg.block, "instance")
        self.context_encoder = _Encoder(cfg.context_layers, cfg.block, cfg.context_norm)
        self.update_block = _UpdateBlock(cfg)
        self.mask_predictor = _MaskPredictor(cfg.hidden) if cfg.convex_upsampling else None

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, num_flow_updates: int = 12) -> list[torch.Tensor]:
        b, _, h, w = image1.shape
        if image2.shape != image1.shape:
            raise ValueError(f"RAFT: the two images differ in shape: {tuple(image1.shape)} vs {tuple(image2.shape)}")
        if h % 8 or w % 8 or min(h, w) < MIN_SIDE:
            raise ValueError(f"RAFT: image size {h}x{w} must be multiples of 8 and at least {MIN_SIDE} per side "
                             "(raft_flow pads frames for you)")
        f1, f2 = self.feature_encoder(torch.cat([image1, image2])).chunk(2)  # (B, C, H/8, W/8) each
        pyramid = _corr_pyramid(f1, f2, self.cfg.corr_levels)
        hidden, context = self.context_encoder(image1).split([self.cfg.hidden, self.cfg.context_layers[-1]
                                                              - self.cfg.hidden], 1)
        hidden, context = torch.tanh(hidden), F.relu(context)
        coords0 = _coords_grid(b, h // 8, w // 8, image1.device)
        coords1 = coords0.clone()
        flows = []
        for _ in range(num_flow_updates):
            coords1 = coords1.detach()  # the paper stops gradients through the lookup coordinates
            corr = _corr_lookup(pyramid, coords1, self.cfg.corr_radius)
            hidden, delta = self.update_block(hidden, context, corr, coords1 - coords0)
            coords1 = coords1 + delta
            mask = self.mask_predictor(hidden) if self.mask_predictor is not None else None
            flows.append(_upsample(coords1 - coords0, mask))
        return flows


def _weights_file(path: str) -> str:
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pt", ".safetensors")))
        if len(found) != 1:
            raise ValueError(f"RAFT weights folder {path!r} holds {len(found)} weights files {found[:6]}: it must hold "
                             "exactly one (.pth, .pt or .safetensors), or pass the file itself")
        return os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"RAFT weights {path!r}: no such file or folder; download torchvision's "
                                "raft_large_C_T_SKHT_V2-ff5fadd5.pth (download.pytorch.org/models) and point at it")
    return path


def _read_state(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError for anything but tensors and plain containers
        raise ValueError(f"{file}: not a tensors-only state dict (read with weights_only=True, nothing in it was run): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    for wrapper in ("state_dict", "model"):  # training checkpoints that hold the state dict under one key
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a dict of tensors (a RAFT state dict), got {type(state).__name__}")
    others = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise ValueError(f"{file}: expected a dict of tensors (a RAFT state dict); not tensors: {others[:4]}")
    return state


def load_raft(path: str) -> RAFT:
    """torchvision's raft_large or raft_small weights (a .pth/.pt, a .safetensors, or a folder holding exactly one)
    -> the network in eval mode (float32, CPU); which of the two is read from the keys; every key must match."""
    file = _weights_file(path)
    state = _read_state(file)
    if any(k.startswith(("module.fnet.", "fnet.")) for k in state):
        raise ValueError(f"{file} is princeton-vl/RAFT's own checkpoint layout (fnet/cnet/update_block), not "
                         "torchvision's: use torchvision's raft_large_C_T_SKHT_V2-ff5fadd5.pth")
    cfg = RAFT_LARGE if "mask_predictor.conv.weight" in state else RAFT_SMALL
    net = RAFT(cfg)
    expected = net.state_dict()
    # torch fills a BatchNorm's num_batches_tracked when a file lacks it (unused in eval), so it is not required here
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})" for k in expected
             if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        name = "raft_large" if cfg is RAFT_LARGE else "raft_small"
        raise ValueError(f"{file} is not torchvision's {name} weights: {len(missing)} missing {missing[:6]}, "
                         f"{len(unexpected)} unexpected {unexpected[:6]}, {len(wrong)} of the wrong shape {wrong[:3]}")
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    return net.eval()


def _pad_amounts(size: int) -> tuple[int, int]:
    total = max(MIN_SIDE, -(-size // 8) * 8) - size
    return total // 2, total - total // 2


def raft_flow_batch(a: np.ndarray, b: np.ndarray, model: RAFT, iters: int = 12,
                    device: str | torch.device | None = None) -> np.ndarray:
    """Frame pairs (N,H,W,3) uint8 RGB x2 -> flows (N,H,W,2) float32, ``flow[n, y, x] = (dx, dy)`` from ``a[n]`` to
    ``b[n]`` (module docstring). ``device``: where to run (the model is moved there, in place); default the model's."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"raft_flow_batch takes two (N,H,W,3) arrays of the same shape, got {a.shape} and {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"raft_flow takes uint8 RGB frames, got {a.dtype} and {b.dtype}")
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    h, w = a.shape[1:3]
    (top, bottom), (left, right) = _pad_amounts(h), _pad_amounts(w)

    def prepare(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(dev).permute(0, 3, 1, 2).float()
        t = t / 255.0 * 2.0 - 1.0  # torchvision's OpticalFlow transform: [0, 1] normalised with mean = std = 0.5
        return F.pad(t, (left, right, top, bottom), mode="replicate")

    with torch.no_grad():
        flow = model(prepare(a), prepare(b), num_flow_updates=iters)[-1]
    flow = flow[:, :, top:top + h, left:left + w].permute(0, 2, 3, 1)
    return np.ascontiguousarray(flow.cpu().numpy(), dtype=np.float32)


def raft_flow(a: np.ndarray, b: np.ndarray, model: RAFT, iters: int = 12,
              device: str | torch.device | None = None) -> np.ndarray:
    """(H,W,3) uint8 RGB frames ``a``, ``b`` -> flow (H,W,2) float32 from ``a`` to ``b``: ``a[y, x]`` is seen at
    ``b[y + dy, x + dx]`` (as ``loom.geometry.video_signals.optical_flow``)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"raft_flow takes two (H,W,3) frames of the same shape, got {a.shape} and {b.shape}")
    return raft_flow_batch(a[None], b[None], model, iters, device)[0]
