"""The frozen video VAE of the Video DiT (TAPESTRY 3.1, 4.1; Wan2.1-Fun-Control): a thin wrapper over diffusers'
``AutoencoderKLWan`` that turns videos into the normalised latents the DiT is trained on.

Design choices:

- The network is diffusers' own ``AutoencoderKLWan``. `load_video_vae` reads the Wan2.1 VAE as released
  (``Wan2.1_VAE.pth``, the file or the Wan2.1-Fun release folder holding it: original Wan keys, renamed by diffusers'
  own converter and loaded strictly, see `loom.models.wan_fun.load_wan_vae_checkpoint`) or a diffusers folder
  (``<checkpoint>/vae``, tiny random test VAEs), so all load the same way. Nothing is downloaded.
- Frozen: ``eval()``, ``requires_grad_(False)``, encoding under ``torch.inference_mode``.
- Deterministic latents: the posterior mode (its mean), not a sample, so a cache is a pure function of
  (video, weights). The DiT's flow-matching noise supplies the randomness.
- Normalisation is Wan's: ``z = (mu - latents_mean) / latents_std`` per channel, with the mean and std from the
  VAE config (diffusers ``WanPipeline`` undoes exactly this before decoding: ``mu = z * std + mean``).
- Frame count: the encoder is causal in time; it encodes the first frame alone, then chunks of
  ``temporal_factor`` (4) frames, so it takes T = 1 + 4k frames and gives T' = 1 + k latent frames. diffusers
  silently drops frames past the last whole chunk; `encode` refuses them instead (choose trim/pad before).
- Spatial: H and W must be multiples of ``spatial_factor`` (8 for Wan2.1: 3 downsampling stages).

Shapes::

    video   (B, 3, T, H, W) in [-1, 1], T = 1 + 4k          ->  latents (B, z_dim, 1 + k, H / 8, W / 8)
    mask    (T, H, W) in [0, 1]                              ->  (1 + k, H / 8, W / 8) coverage fraction

No Ray, Lightning or torch.distributed here: this is a single-device module.
"""

from __future__ import annotations

import os

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VideoVAE(nn.Module):
    """A frozen ``AutoencoderKLWan`` with Wan's latent normalisation. Build with `load_video_vae`."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.z_dim = int(cfg.z_dim)
        # Downsampling factors from the architecture itself (the config's scale_factor_* are only hints).
        patch = int(cfg.patch_size or 1)
        self.spatial_factor = 2 ** (len(cfg.dim_mult) - 1) * patch
        self.temporal_factor = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std, dtype=torch.float32), persistent=False)
        if self.latents_mean.numel() != self.z_dim or self.latents_std.numel() != self.z_dim:
            raise ValueError(f"VAE config has {self.latents_mean.numel()} latents_mean and "
                             f"{self.latents_std.numel()} latents_std values for z_dim={self.z_dim}")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def valid_frames(self, t: int) -> bool:
        return t >= 1 and (t - 1) % self.temporal_factor == 0

    def latent_shape(self, t: int, h: int, w: int) -> tuple[int, int, int, int]:
        """(z_dim, T', H', W') of the latents of a (3, T, H, W) video."""
        return (self.z_dim, 1 + (t - 1) // self.temporal_factor, h // self.spatial_factor, w // self.spatial_factor)

    def check_video(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(x.shape)}")
        _, _, t, h, w = x.shape
        if not self.valid_frames(t):
            raise ValueError(f"video has T={t} frames; the causal VAE takes 1 + {self.temporal_factor}k frames "
                             f"(e.g. {1 + self.temporal_factor * max((t - 1) // self.temporal_factor, 0)}): "
                             "trim or pad first")
        if h % self.spatial_factor or w % self.spatial_factor:
            raise ValueError(f"video is {w}x{h}; width and height must be multiples of {self.spatial_factor}")

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, z_dim, T', H', W') float32 posterior means, Wan-normalised if
        ``normalize``."""
        self.check_video(x)
        mu = self.vae.encode(x.to(device=self.device, dtype=self.dtype)).latent_dist.mode()  # (B, z, T', H', W')
        mu = mu.float()
        if normalize:
            shape = (1, self.z_dim, 1, 1, 1)
            mu = (mu - self.latents_mean.view(shape)) / self.latents_std.view(shape)
        return mu

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """(B, z_dim, T', H', W') latents (Wan-normalised if ``normalized``) -> (B, 3, 1 + r(T'-1), H s, W s) video in
        [-1, 1] (clamped: the decoder can overshoot)."""
        z = z.float()
        if normalized:
            shape = (1, self.z_dim, 1, 1, 1)
            z = z * self.latents_std.view(shape) + self.latents_mean.view(shape)
        x = self.vae.decode(z.to(device=self.device, dtype=self.dtype)).sample
        return x.float().clamp(-1, 1)

    def pool_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(T, H, W) in [0, 1] -> (T', H', W') coverage fraction, grouped like the encoder's causal chunks:
        latent frame 0 <- frame 0, latent frame i <- frames 1 + r(i-1) .. r*i (r = temporal factor), and each
        latent pixel <- its s x s block of pixels (s = spatial factor)."""
        t, h, w = mask.shape
        if not self.valid_frames(t):
            raise ValueError(f"mask has T={t} frames; expected 1 + {self.temporal_factor}k")
        m = mask.float()
        first = m[:1]
        rest = m[1:].reshape(-1, self.temporal_factor, h, w).mean(1) if t > 1 else m[:0]
        m = torch.cat([first, rest])  # (T', H, W)
        s = self.spatial_factor
        return nn.functional.avg_pool2d(m[:, None], s)[:, 0]  # (T', H', W')


def tiny_vae_config(z_dim: int = 16) -> dict:
    """A tiny ``AutoencoderKLWan`` config (random weights) with Wan2.1's factors (8x spatial, 4x temporal) and
    z_dim, for tests and the demo: same code path as the real VAE, a few thousand parameters."""
    return {"base_dim": 8, "z_dim": z_dim, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True],
            "latents_mean": [0.0] * z_dim, "latents_std": [1.0] * z_dim}


def build_tiny_vae(seed: int = 0, z_dim: int = 16) -> VideoVAE:
    """A randomly initialised tiny VAE, the same for a given seed."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return VideoVAE(AutoencoderKLWan(**tiny_vae_config(z_dim)))


def load_video_vae(path: str, dtype: str = "float32", device: str = "cpu") -> VideoVAE:
    """Load the Wan video VAE at the local ``path``: the Wan2.1 VAE as released (``Wan2.1_VAE.pth``, or the
    Wan2.1-Fun release folder holding it) or a diffusers ``AutoencoderKLWan`` folder (config.json + weights; for a
    diffusers pipeline checkpoint pass its ``vae`` subfolder)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video VAE {path!r} does not exist: point 'vae' at the local Wan2.1-Fun release "
                                "folder (it holds Wan2.1_VAE.pth), at Wan2.1_VAE.pth itself, or at a diffusers "
                                "AutoencoderKLWan folder (config.json + diffusion_pytorch_model.safetensors)")
    from loom.models.wan_fun import find_wan_vae_checkpoint, load_wan_vae_checkpoint

    # The .pth first: the release folder also has a config.json, the transformer's.
    if find_wan_vae_checkpoint(path) is not None:
        return VideoVAE(load_wan_vae_checkpoint(path, DTYPES[dtype])).to(device)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"video VAE {path!r} holds neither Wan2.1_VAE.pth nor a config.json: pass the "
                                "Wan2.1-Fun release folder, the .pth file, or a diffusers AutoencoderKLWan folder (for "
                                "a full diffusers Wan checkpoint, its 'vae' subfolder)")
    from diffusers import AutoencoderKLWan  # imported here: only jobs that encode need diffusers

    vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=DTYPES[dtype], low_cpu_mem_usage=False)
    return VideoVAE(vae).to(device)
