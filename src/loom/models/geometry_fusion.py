"""The geometry fusion module of the Video DiT (TAPESTRY 3.1, "Geometry-Guided Latent Space Injection"; 4.1 calls it
the Geometry Control Mix module): it fuses the VAE latents of the condition videos into one geometry latent that
takes the place of Wan2.1-Fun-Control's control-video latent.

Design choices:

- Input: the four condition latents from the frozen video VAE (`video_vae.py`), each ``z_dim`` = 16 channels,
  concatenated on channels in the order of `CONDITION_ORDER`: normal, position, known video, inpainting mask.
  The order is part of the contract: the initialisation below reads the normal latent from channels 0..15.
- Per frame 2D convolutions (time folded into the batch), as the paper says: "several 2D convolutional layers and
  residual blocks". The DiT's own 3D attention mixes information across time; the VAE latents are already
  temporally compressed, so the fusion only has to mix modalities at each latent pixel and its neighbours.
- Residual blocks are GroupNorm -> SiLU -> conv3x3, twice, plus the identity (the ResNet block of diffusion
  U-Nets and of the Wan VAE).
- Initialisation: ``out = skip(x) + body(x)``. ``skip`` is a 1x1 conv initialised to copy the normal latent
  (identity on the first ``out_channels`` input channels, zero elsewhere) and ``body``'s last conv is zero.
  So at step 0 the fusion outputs exactly the normal-video latent. Why not zero the whole output (ControlNet
  style)? The pretrained Fun-Control patch embedding has weights for these 16 channels that expect the VAE
  latent of a control video (depth, canny, pose, ...); a zero latent reads as "no control", and the DiT would
  ignore the geometry until the fusion has learnt something. A normal map is an RGB image, encoded by the same
  VAE, and as a control it is close to a depth map: the pretrained model starts out following the geometry, and
  the zero-initialised body learns what position, known video and mask add. Both ``skip`` and ``body`` train.
- GroupNorm groups: the largest of 32, 16, ... 1 that divides ``hidden``, so tiny test configs work.
- Saved as ``config.json`` + ``model.safetensors`` in its own folder (`save_pretrained`), independent of the DiT.

Shapes::

    x  (B, in_channels, T, H, W)  ->  (B * T, in_channels, H, W)  -> convs ->  (B, out_channels, T, H, W)

No Ray, Lightning or torch.distributed here: this is a single-device module.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

CONDITION_ORDER = ("normal", "position", "known", "mask")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _num_groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class ResBlock2d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_num_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_num_groups(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return x + h


class GeometryFusion(nn.Module):
    """(B, in_channels, T, H, W) concatenated condition latents -> (B, out_channels, T, H, W) geometry latent.
    Starts as a copy of the normal latent (channels 0..out_channels-1); see the module docstring."""

    def __init__(self, in_channels: int = 64, out_channels: int = 16, hidden: int = 128, blocks: int = 2):
        super().__init__()
        if in_channels < out_channels:
            raise ValueError(f"in_channels={in_channels} < out_channels={out_channels}: the fusion starts as a copy "
                             "of the normal latent, the first out_channels input channels")
        if hidden < 1 or blocks < 0:
            raise ValueError(f"hidden={hidden} must be >= 1 and blocks={blocks} >= 0")
        self.in_channels, self.out_channels, self.hidden, self.num_blocks = in_channels, out_channels, hidden, blocks

        self.skip = nn.Conv2d(in_channels, out_channels, 1)
        self.conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlock2d(hidden) for _ in range(blocks)])
        self.norm_out = nn.GroupNorm(_num_groups(hidden), hidden)
        self.conv_out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        self.reset_output()

    @torch.no_grad()
    def reset_output(self) -> None:
        """Make the module a copy of the normal latent again: identity ``skip`` on it, zero ``conv_out``."""
        self.skip.weight.zero_()
        self.skip.bias.zero_()
        self.skip.weight[:, :, 0, 0].copy_(torch.eye(self.out_channels, self.in_channels))
        self.conv_out.weight.zero_()
        self.conv_out.bias.zero_()

    @property
    def config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "hidden": self.hidden,
                "blocks": self.num_blocks}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"geometry latents must be (B, {self.in_channels}, T, H, W) "
                             f"({' + '.join(CONDITION_ORDER)} on channels), got {tuple(x.shape)}")
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B * T, C_in, H, W)
        y = self.conv_in(x)  # (B * T, hidden, H, W)
        for block in self.blocks:
            y = block(y)
        y = self.conv_out(nn.functional.silu(self.norm_out(y)))  # (B * T, C_out, H, W)
        y = self.skip(x) + y
        return y.reshape(b, t, self.out_channels, h, w).permute(0, 2, 1, 3, 4)  # (B, C_out, T, H, W)

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump({"_class_name": type(self).__name__, **self.config}, f, indent=2)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, os.path.join(path, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: torch.dtype | None = None) -> GeometryFusion:
        """Load a folder written by `save_pretrained` (``config.json`` + ``model.safetensors``)."""
        from safetensors.torch import load_file

        config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
            raise FileNotFoundError(f"geometry fusion directory {path!r} lacks {CONFIG_NAME} or {WEIGHTS_NAME}: pass "
                                    "a folder written by GeometryFusion.save_pretrained (e.g. <checkpoint>/fusion)")
        with open(config_path) as f:
            config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        module = cls(**config)
        module.load_state_dict(load_file(weights_path))  # strict: a partial fusion is refused
        return module.to(torch_dtype) if torch_dtype is not None else module
