"""The shape VAE of ShapeGen4D (section 3.1): Step1X-3D's released VAE (``Step1X-3D-Geometry-1300m/vae``), a
Michelangelo/Dora-style perceiver VAE with a sharp-edge branch, in Step1X-3D's own key layout, so that the released
folder loads with no missing or unexpected key (`ShapeVAE.from_pretrained`). Surface points with normals are
cross-attended by query points; self-attention layers turn the result into a set of latents; the decoder maps the
latents and any 3D position to a truncated signed distance. A mesh comes back by marching cubes.

Everything below was read from Step1X-3D at commit 20b5de2b (``step1x3d_geometry/models/autoencoders/``
``michelangelo_autoencoder.py``, ``transformers/attention.py``, ``transformers/perceiver_1d.py``; sizes from
``configs/train-geometry-diffusion/step1x-3d-geometry-1300m.yaml``, the config that loads the released VAE strictly)
and is checked against it by golden outputs at tiny size (``tests/fixtures/step1x3d_vae/``).

Design choices:

- Point embedding: ``Linear([fourier(xyz), normal])`` (upstream ``point_feats=3``, ``embed_point_feats=false``).
  Fourier features are ``[x, sin(f_k x), cos(f_k x)]`` with ``f_k = 2^k`` (times pi when ``include_pi``; false in the
  release), k < ``num_freqs`` (8), laid out per coordinate as upstream's. They are computed in float32 whatever the
  weights' dtype (a bf16 coordinate has an 8-bit mantissa; times 2^7 its phase would be noise).
- Encoder, queries: upstream picks its query tokens by farthest point sampling of the input points
  (``use_downsample``; torch_cluster ``fps``, random start) and embeds them with the SAME projection as the points they
  come from: ``num_latents / 2`` = 1,024 from the uniform surface points (``encoder.input_proj``) and 1,024 from the
  sharp-edge points (``encoder.input_proj_sharp``), concatenated in that order (2,048 latents). Here the caller passes
  the query points: ``queries`` (the surface half) and, optionally, ``sharp_queries`` (the sharp half); latent i
  belongs to query i. `fps_queries` picks them for a static shape, as upstream does (deterministic start instead of a
  random one).
- Encoder, two cross-attentions (``with_sharp_data``): EVERY query token attends to the uniform surface points with
  ``encoder.cross_attn`` and to the sharp-edge points with ``encoder.cross_attn_sharp`` (separate weights), and the
  two results are summed (each block is residual, so the query enters twice, as upstream). Then
  ``encoder_layers`` (8) self-attention blocks (``encoder.self_attn``) and a LayerNorm (``encoder.ln_post``,
  ``use_ln_post``); ``pre_kl`` gives the posterior. Without the sharp branch (``sharp_edges=False``, upstream
  ``with_sharp_data=false``) only ``cross_attn`` runs.
- Aligned queries (ShapeGen4D 3.2): a 4D sequence is encoded frame by frame with its 1,024 aligned query points as
  ``queries`` and NO ``sharp_queries``: all latents come from the aligned queries, so latent i is the same physical
  point in every frame. They are embedded with the surface projection (they are points of the surface, not of its
  sharp edges), and they still attend to the frame's sharp-edge points through ``cross_attn_sharp``, exactly as
  upstream's surface half of the queries does. Sharp queries are not aligned across frames (they are an FPS of each
  frame's own edge points), so they are left out; the 4D latents are the 1,024 aligned ones (the paper's count).
- Query normals: a query may come as (B, Q, 6) (xyz + normal) or (B, Q, 3). Positions alone take the normal of the
  nearest point of the set they query from (``surface`` or ``sharp_surface``): a query that IS one of those points
  (FPS) gets that point's own normal, which is upstream's embedding exactly; an aligned query lying on the surface
  gets its nearest sample's normal, an approximation (wrong where a sheet is thinner than the sampling spacing), so
  shards should carry the queries' own normals (the face normal of ``query_faces`` in that frame) as (B, Q, 6).
- Bottleneck: ``pre_kl`` -> (mean, logvar) per latent token (logvar clamped to [-30, 20]); ``encode(sample=False)``
  returns the mean. Latents are multiplied by ``z_scale_factor`` (1.0 in the release) after sampling and divided by
  it before ``post_kl``, as upstream. The KL term is the mean over tokens and channels of
  ``0.5 (mu^2 + var - 1 - log var)``, one value per shape (upstream ``posterior.kl()``).
- Decoder: ``post_kl`` (C -> width), ``decoder_layers`` (16) self-attention blocks (``transformer``) run once per
  shape (`decode_features`); then, for any positions in chunks (`query_sdf`), ``decoder.query_proj(fourier(xyz))``
  cross-attends the tokens (``decoder.cross_attn_decoder``), ``decoder.ln_post``, ``decoder.output_proj`` -> 1.
- Output convention. The network's output (`query_tsdf`, upstream's ``query``) is Step1X-3D's: a truncated SDF
  divided by its truncation tau, POSITIVE INSIDE (Dora's data, which Step1X-3D trains on, uses pysdf, positive
  inside; upstream's DMC extractor negates the output to get an SDF), in [-1, 1] away from the surface; positions
  in Step1X-3D's frame, the shape normalised to [-1, 1]^3 (meshes are extracted in [-1.05, 1.05]^3). `query_sdf` and
  `decode` return Loom's convention, ``sdf = -tau * output``: a truncated distance, NEGATIVE INSIDE, in the units of
  the positions, as ``loom.geometry.mesh.sdf_samples`` writes it. `vae_loss` on that equals upstream's MSE on the
  normalised TSDF. The release does not record tau; 0.01 is Step1X-3D's ``tsdf_threshold`` default (Dora uses 0.015):
  a meshing of the zero level does not depend on it, an SDF value does.
- Attention: pre-norm residual blocks (LayerNorm eps 1e-5), fused projections laid out per head as upstream
  (``c_qkv``: per head [q | k | v]; ``c_kv``: per head [k | v]), no q/k/v biases in the release (``qkv_bias``),
  optional per-head q/k LayerNorms (``qk_norm``, eps 1e-6; off in the release), torch SDPA (upstream's
  ``use_flash`` path; its einsum path computes the same), exact-GELU MLPs of 4 x width. Fresh weights follow
  upstream's init (attention and MLP linears ~ N(0, 0.25 / sqrt(width)), zero biases).
- Sizes (`ShapeVAEConfig.paper`, the default): the release, width 768, 12 heads, 8 encoder and 16 decoder layers,
  64 latent channels, 2,048 latents, sharp branch on: 191.6 M parameters.
- Marching cubes: `mesh_from_sdf` evaluates any SDF on a regular grid in chunks and runs point-cloud-utils'
  ``marching_cubes_sparse_voxel_grid`` on the cells that straddle the level (pcu is in the render extra, which
  already builds the shards; scikit-image is not a dependency). Faces come out counter-clockwise seen from
  outside (outward normals) for a field that is negative inside. `ShapeVAE.extract_mesh` is that function on the
  decoder.

Shapes::

    surface        (B, S, 6)      float  uniform surface points + unit outward normals (S = 32,768 upstream)
    sharp_surface  (B, S', 6)     float  sharp-edge points + normals (Dora's sharp-edge sampling); sharp model only
    queries        (B, Q, 3 or 6) float  query points on the surface (aligned 4D queries, or `fps_queries`)
    sharp_queries  (B, Q', 3 or 6)       query points among the sharp-edge points (static shapes: Q = Q' = 1,024)
    latents        (B, Q + Q', C) float  C = latent_channels (64)
    points         (B, M, 3)      float  any positions  ->  sdf (B, M), negative inside, ~[-tau, tau]

A 4D sample (T frames) is encoded as a batch of T shapes: ``surface[t]`` with ``queries[t]``.

No Ray, Lightning, DeepSpeed or torch.distributed here: this is a single-device module. Sharding intent is
declared in ``_no_split_modules`` and applied by ``loom.training.launch.apply_sharding_intent``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loom.models.folder import CONFIG_NAME, WEIGHTS_NAME, read_folder, save_folder  # noqa: F401

# Step1X-3D extracts meshes in [-1.05, 1.05]^3 (its pipeline's and VAE system's ``bounds=1.05``): the shapes are
# normalised to [-1, 1]^3 and the field is supervised a little beyond.
DEFAULT_BOUNDS = (-1.05, 1.05)
# fpsample's kd-tree bucket height used by the 4D pipeline too (loom.geometry.mesh._FPS_TREE_HEIGHT).
_FPS_TREE_HEIGHT = 5
# The weights file of a released Step1X-3D VAE folder (``<release>/vae/``), next to its config.json.
RELEASED_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Upstream's init of the attention and MLP linears: N(0, INIT_SCALE / sqrt(width)).
_INIT_SCALE = 0.25
# Nearest-neighbour look-ups hold at most this many distances at once.
_NN_CHUNK = 2**24

# MichelangeloAutoencoder.Config: every field with upstream's default (what a config.json that leaves it out means).
_STEP1X3D_DEFAULTS = dict(
    weights=None, pretrained_model_name_or_path="", subfolder="", n_samples=4096, use_downsample=False,
    downsample_ratio=0.0625, num_latents=256, point_feats=0, embed_point_feats=False, out_dim=1, embed_dim=64,
    embed_type="fourier", num_freqs=8, include_pi=True, width=768, heads=12, num_encoder_layers=8,
    num_decoder_layers=16, init_scale=0.25, qkv_bias=True, qk_norm=False, use_ln_post=False, use_flash=False,
    use_checkpoint=True, use_multi_reso=False, resolutions=None, sampling_prob=None, with_sharp_data=True,
    volume_decoder_type="hierarchical", surface_extractor_type="mc", z_scale_factor=1.0)
# upstream field -> ShapeVAEConfig field
_STEP1X3D_FIELDS = dict(embed_dim="latent_channels", width="width", heads="heads",
                        num_encoder_layers="encoder_layers", num_decoder_layers="decoder_layers",
                        num_freqs="num_freqs", include_pi="include_pi", qkv_bias="qkv_bias", qk_norm="qk_norm",
                        use_ln_post="ln_post", with_sharp_data="sharp_edges", num_latents="num_latents",
                        z_scale_factor="z_scale_factor")
# upstream fields that change the network in ways Loom does not build: the value the release uses, and why
_STEP1X3D_REQUIRED = dict(
    use_downsample=(True, "queries picked from the input points (false means learned queries, encoder.query)"),
    point_feats=(3, "points carry their normals"),
    embed_point_feats=(False, "normals enter unembedded"),
    embed_type=("fourier", "Fourier point embedding"),
    out_dim=(1, "one TSDF value per position"),
    use_multi_reso=(False, "no random resolution drop in the encoder"))


# ---------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class ShapeVAEConfig:
    """Sizes and options of the VAE. ``ShapeVAEConfig()`` is the released Step1X-3D VAE (see the module docstring);
    `from_step1x3d` reads a released config.json."""

    latent_channels: int = 64  # C of the (B, L, C) latents the DiT models (upstream embed_dim)
    width: int = 768  # token width inside the encoder and decoder
    heads: int = 12
    encoder_layers: int = 8  # self-attention blocks after the cross-attention(s) (num_encoder_layers)
    decoder_layers: int = 16  # self-attention blocks before the position -> tokens cross-attention
    num_freqs: int = 8  # Fourier frequencies 2^0 .. 2^(num_freqs - 1) per coordinate
    include_pi: bool = False  # frequencies times pi
    qkv_bias: bool = False  # biases of the q/k/v projections
    qk_norm: bool = False  # per-head LayerNorms of q and k
    ln_post: bool = True  # LayerNorm at the end of the encoder (use_ln_post)
    sharp_edges: bool = True  # the sharp-edge branch (with_sharp_data): a second point set and cross-attention
    num_latents: int = 2048  # latents the release was trained with (half surface, half sharp queries); any count works
    z_scale_factor: float = 1.0  # latents = posterior sample x this
    tau: float = 0.01  # TSDF truncation, in the units of the positions: the network predicts sdf / tau

    def __post_init__(self):
        for name in ("latent_channels", "width", "heads", "num_latents"):
            if getattr(self, name) < 1:
                raise ValueError(f"ShapeVAEConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("encoder_layers", "decoder_layers", "num_freqs"):
            if getattr(self, name) < 0:
                raise ValueError(f"ShapeVAEConfig.{name}={getattr(self, name)} must be >= 0")
        if self.width % self.heads:
            raise ValueError(f"ShapeVAEConfig.width={self.width} must be divisible by heads={self.heads}")
        if self.sharp_edges and self.num_latents % 2:
            raise ValueError(f"ShapeVAEConfig.num_latents={self.num_latents} must be even with sharp_edges: half the "
                             "latents come from the surface, half from the sharp-edge points")
        if not self.z_scale_factor > 0:
            raise ValueError(f"ShapeVAEConfig.z_scale_factor={self.z_scale_factor} must be > 0")
        if not self.tau > 0:
            raise ValueError(f"ShapeVAEConfig.tau={self.tau} must be > 0 (the TSDF truncation of the supervision)")

    @classmethod
    def paper(cls, **overrides) -> ShapeVAEConfig:
        """The released Step1X-3D-Geometry-1300m VAE, ShapeGen4D's frozen VAE."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> ShapeVAEConfig:
        """A ~50k-parameter model for tests. Without the sharp branch by default, so it encodes shards that have no
        sharp-edge points; ``tiny(sharp_edges=True)`` has it. tau = 0.05, the smoke corpora's wide band."""
        return cls(**{**dict(latent_channels=8, width=32, heads=2, encoder_layers=1, decoder_layers=1, num_freqs=6,
                             num_latents=16, sharp_edges=False, tau=0.05), **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ShapeVAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown ShapeVAEConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_step1x3d(cls, d: dict, source: str = "config", **overrides) -> ShapeVAEConfig:
        """The config of a Step1X-3D ``MichelangeloAutoencoder`` config.json (its Config fields; missing ones take
        upstream's defaults). Options that change the network into one Loom does not build are refused; the
        training- and inference-only ones (n_samples, init_scale, use_flash, extractors, ...) are ignored.
        ``overrides`` set Loom's own fields (``tau``)."""
        unknown = sorted(set(d) - set(_STEP1X3D_DEFAULTS))
        if unknown:
            raise ValueError(f"{source}: unknown Step1X-3D VAE config fields {unknown}: is it a "
                             "MichelangeloAutoencoder config.json (Step1X-3D-Geometry-*/vae/config.json)?")
        full = {**_STEP1X3D_DEFAULTS, **d}
        for name, (want, what) in _STEP1X3D_REQUIRED.items():
            have = bool(full[name]) if isinstance(want, bool) else full[name]  # use_multi_reso may be null
            if have != want:
                raise ValueError(f"{source}: {name}={full[name]!r} is not supported; Loom builds the released "
                                 f"network, {name}={want!r} ({what})")
        if full["embed_dim"] <= 0:
            raise ValueError(f"{source}: embed_dim={full['embed_dim']} (no KL bottleneck) is not supported: Loom's "
                             "latents are the pre_kl / post_kl ones")
        return cls(**{ours: full[theirs] for theirs, ours in _STEP1X3D_FIELDS.items()}, **overrides)


# ---------------------------------------------------------------------------------------------------- layers


class FourierEmbedder(nn.Module):
    """(..., 3) -> (..., 3 (1 + 2 F)): ``[x, sin(f_k x), cos(f_k x)]``, ``f_k = 2^k`` (x pi with ``include_pi``),
    k < F, the sines ordered coordinate-major as upstream's."""

    def __init__(self, num_freqs: int, include_pi: bool):
        super().__init__()
        freqs = 2.0 ** torch.arange(num_freqs, dtype=torch.float32)
        self.register_buffer("freqs", freqs * torch.pi if include_pi else freqs, persistent=False)
        self.out_dim = 3 * (1 + 2 * num_freqs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = (x[..., None] * self.freqs.to(x.dtype)).flatten(-2)  # (..., 3F): x0 f0, x0 f1, ..., x1 f0, ...
        return torch.cat([x, angles.sin(), angles.cos()], dim=-1)


class HeadNorms(nn.Module):
    """Per-head LayerNorms of q and k (``qk_norm``), or identities. Named ``attention`` inside an attention layer,
    where upstream keeps them (inside its attention kernel module), so the keys read ``attn.attention.q_norm.*``."""

    def __init__(self, head_dim: int, qk_norm: bool):
        super().__init__()
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norms: HeadNorms) -> torch.Tensor:
    """(B, N, H, d) queries, (B, K, H, d) keys and values -> (B, N, H d)."""
    q, k = norms.q_norm(q), norms.k_norm(k)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, N, d)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """(B, N, W) -> (B, N, W). ``c_qkv`` is laid out per head as [q | k | v] (upstream's view then split)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.c_proj = nn.Linear(width, width)
        self.attention = HeadNorms(width // heads, qk_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_qkv(x).unflatten(-1, (self.heads, 3, -1)).unbind(-2)  # (B, N, H, d) each
        return self.c_proj(_attend(q, k, v, self.attention))


class CrossAttention(nn.Module):
    """(B, N, W) queries, (B, K, W) data -> (B, N, W). ``c_kv`` is laid out per head as [k | v]."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.c_q = nn.Linear(width, width, bias=qkv_bias)
        self.c_kv = nn.Linear(width, 2 * width, bias=qkv_bias)
        self.c_proj = nn.Linear(width, width)
        self.attention = HeadNorms(width // heads, qk_norm)

    def forward(self, x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        q = self.c_q(x).unflatten(-1, (self.heads, -1))  # (B, N, H, d)
        k, v = self.c_kv(data).unflatten(-1, (self.heads, 2, -1)).unbind(-2)  # (B, K, H, d) each
        return self.c_proj(_attend(q, k, v, self.attention))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class SelfAttentionBlock(nn.Module):
    """Pre-norm residual self-attention + MLP (upstream ResidualAttentionBlock)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.attn = SelfAttention(width, heads, qkv_bias, qk_norm)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CrossAttentionBlock(nn.Module):
    """Pre-norm residual cross-attention (queries ``ln_1``, data ``ln_2``) + MLP (upstream
    ResidualCrossAttentionBlock)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.attn = CrossAttention(width, heads, qkv_bias, qk_norm)
        self.ln_1 = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_3 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), self.ln_2(data))
        return x + self.mlp(self.ln_3(x))


class Transformer(nn.Module):
    """A stack of self-attention blocks (upstream Perceiver: ``resblocks``)."""

    def __init__(self, width: int, heads: int, layers: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(SelfAttentionBlock(width, heads, qkv_bias, qk_norm) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class PointEncoder(nn.Module):
    """Embedded query tokens (B, L, W) + embedded point sets -> (B, L, W) encoder tokens (upstream
    PerceiverCrossAttentionEncoder; the point and query embeddings are `ShapeVAE.encode`'s)."""

    def __init__(self, c: ShapeVAEConfig, point_dim: int):
        super().__init__()
        a = (c.width, c.heads, c.qkv_bias, c.qk_norm)
        self.input_proj = nn.Linear(point_dim, c.width)  # fourier(xyz) + normal of surface points and their queries
        self.cross_attn = CrossAttentionBlock(*a)
        if c.sharp_edges:
            self.input_proj_sharp = nn.Linear(point_dim, c.width)  # the same for sharp-edge points
            self.cross_attn_sharp = CrossAttentionBlock(*a)
        self.self_attn = Transformer(c.width, c.heads, c.encoder_layers, c.qkv_bias, c.qk_norm)
        self.ln_post = nn.LayerNorm(c.width) if c.ln_post else None

    def forward(self, x: torch.Tensor, data: torch.Tensor, sharp_data: torch.Tensor | None) -> torch.Tensor:
        if sharp_data is None:
            x = self.cross_attn(x, data)
        else:  # every query attends to both sets; the two residual blocks' outputs are summed
            x = self.cross_attn(x, data) + self.cross_attn_sharp(x, sharp_data)
        x = self.self_attn(x)
        return x if self.ln_post is None else self.ln_post(x)


class SDFDecoder(nn.Module):
    """Fourier-embedded positions (B, M, F) attend to the decoded tokens (B, L, W) -> (B, M, 1) (upstream
    PerceiverCrossAttentionDecoder)."""

    def __init__(self, c: ShapeVAEConfig, fourier_dim: int):
        super().__init__()
        self.query_proj = nn.Linear(fourier_dim, c.width)
        self.cross_attn_decoder = CrossAttentionBlock(c.width, c.heads, c.qkv_bias, c.qk_norm)
        self.ln_post = nn.LayerNorm(c.width)
        self.output_proj = nn.Linear(c.width, 1)

    def forward(self, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.cross_attn_decoder(self.query_proj(positions), tokens)
        return self.output_proj(self.ln_post(x))


# ---------------------------------------------------------------------------------------------------- posterior


@dataclass
class DiagonalGaussian:
    """The encoder's posterior over the latents, per token and channel."""

    mean: torch.Tensor  # (B, L, C)
    logvar: torch.Tensor  # (B, L, C), clamped to [-30, 20] as upstream

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            eps = torch.randn_like(self.mean)
        else:  # drawn where the generator lives, so a CPU generator gives the same numbers on any device
            eps = torch.randn(self.mean.shape, generator=generator, device=generator.device, dtype=self.mean.dtype)
            eps = eps.to(self.mean.device)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), averaged over tokens and channels: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).float().mean(dim=(1, 2))


class VAEOutput(NamedTuple):
    sdf: torch.Tensor  # (B, M) predicted truncated SDF at the given points, negative inside
    kl: torch.Tensor  # (B,)
    latents: torch.Tensor  # (B, L, C) the latents that were decoded
    posterior: DiagonalGaussian


# ---------------------------------------------------------------------------------------------------- model


class ShapeVAE(nn.Module):
    """Step1X-3D's shape VAE: ``encode(surface, queries, sharp_surface=...)`` -> latents, ``decode(latents, points)``
    -> truncated SDF (negative inside). State-dict keys are upstream's (``encoder.*``, ``pre_kl``, ``post_kl``,
    ``transformer.*``, ``decoder.*``)."""

    _no_split_modules = ["SelfAttentionBlock", "CrossAttentionBlock"]  # each gathered whole under ZeRO-3

    def __init__(self, config: ShapeVAEConfig | None = None):
        super().__init__()
        self.config = c = config or ShapeVAEConfig()
        self.fourier = FourierEmbedder(c.num_freqs, c.include_pi)  # one embedder, shared as upstream's
        pe = self.fourier.out_dim
        self.encoder = PointEncoder(c, pe + 3)
        self.pre_kl = nn.Linear(c.width, 2 * c.latent_channels)
        self.post_kl = nn.Linear(c.latent_channels, c.width)
        self.transformer = Transformer(c.width, c.heads, c.decoder_layers, c.qkv_bias, c.qk_norm)
        self.decoder = SDFDecoder(c, pe)
        std = _INIT_SCALE / math.sqrt(c.width)
        for m in self.modules():
            if isinstance(m, (SelfAttention, CrossAttention, MLP)):
                for lin in m.children():
                    if isinstance(lin, nn.Linear):
                        nn.init.normal_(lin.weight, std=std)
                        if lin.bias is not None:
                            nn.init.zeros_(lin.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.pre_kl.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.pre_kl.weight.device

    # ------------------------------------------------------------------ encoder

    def _embed(self, points: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """(B, N, 6) float32 points + normals -> (B, N, W) tokens; Fourier features in float32 (module docstring)."""
        features = torch.cat([self.fourier(points[..., :3]), points[..., 3:]], dim=-1)
        return proj(features.to(self.dtype))

    def encode(self, surface: torch.Tensor, queries: torch.Tensor, sample: bool = True,
               generator: torch.Generator | None = None, *, sharp_surface: torch.Tensor | None = None,
               sharp_queries: torch.Tensor | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(B, S, 6) surface points + normals, (B, Q, 3 or 6) query points [, (B, S', 6) sharp-edge points + normals,
        (B, Q', 3 or 6) sharp query points] -> (latents (B, Q + Q', C), posterior). ``sample=False`` returns the
        posterior mean (times ``z_scale_factor``). Latents and posterior are float32 whatever the weights."""
        c = self.config
        b = surface.shape[0]
        _check_points("surface", surface, b, (6,))
        _check_points("queries", queries, b, (3, 6))
        if c.sharp_edges:
            if sharp_surface is None:
                raise ValueError("this shape VAE has Step1X-3D's sharp-edge branch (sharp_edges=True): pass "
                                 "sharp_surface=(B, S', 6), the sharp-edge points + normals of each shape")
            _check_points("sharp_surface", sharp_surface, b, (6,))
            if sharp_queries is not None:
                _check_points("sharp_queries", sharp_queries, b, (3, 6))
        elif sharp_surface is not None or sharp_queries is not None:
            raise ValueError("this shape VAE has no sharp-edge branch (sharp_edges=False): it takes no sharp_surface "
                             "or sharp_queries")
        f32 = dict(device=self.device, dtype=torch.float32)
        surface = surface.to(**f32)
        data = self._embed(surface, self.encoder.input_proj)  # (B, S, W)
        x = self._embed(_with_normals(queries.to(**f32), surface), self.encoder.input_proj)  # (B, Q, W)
        sharp_data = None
        if c.sharp_edges:
            sharp_surface = sharp_surface.to(**f32)
            sharp_data = self._embed(sharp_surface, self.encoder.input_proj_sharp)  # (B, S', W)
            if sharp_queries is not None:
                xs = self._embed(_with_normals(sharp_queries.to(**f32), sharp_surface), self.encoder.input_proj_sharp)
                x = torch.cat([x, xs], dim=1)  # (B, Q + Q', W): surface queries first, as upstream
        x = self.encoder(x, data, sharp_data)
        mean, logvar = self.pre_kl(x).float().chunk(2, dim=-1)  # (B, L, C) float32 each
        posterior = DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))
        latents = posterior.sample(generator) if sample else posterior.mean
        return latents * c.z_scale_factor, posterior

    # ------------------------------------------------------------------ decoder

    def decode_features(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, L, C) latents -> (B, L, W) shape tokens the positions attend to (run once per shape)."""
        c = self.config
        if latents.ndim != 3 or latents.shape[-1] != c.latent_channels:
            raise ValueError(f"latents must be (B, L, {c.latent_channels}), got {tuple(latents.shape)}")
        x = latents.to(self.device, torch.float32) / c.z_scale_factor
        return self.transformer(self.post_kl(x.to(self.dtype)))

    def query_tsdf(self, features: torch.Tensor, points: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(B, L, W) decoded tokens, (B, M, 3) positions -> (B, M) float32 network output in Step1X-3D's convention
        (upstream ``query``): TSDF / tau, POSITIVE INSIDE; ``chunk`` positions at a time (all at once when None)."""
        if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] != features.shape[0]:
            raise ValueError(f"points must be ({features.shape[0]}, M, 3), got {tuple(points.shape)}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk={chunk} must be >= 1 or None")
        points = points.to(features.device, torch.float32)  # float32 Fourier features, as in `encode`
        step = max(points.shape[1] if chunk is None else chunk, 1)
        out = [self.decoder(self.fourier(points[:, i: i + step]).to(self.dtype), features)[..., 0].float()
               for i in range(0, points.shape[1], step)]  # (B, m) each
        return torch.cat(out, dim=1) if out else points.new_zeros(points.shape[:2])

    def query_sdf(self, features: torch.Tensor, points: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(B, L, W) decoded tokens, (B, M, 3) positions -> (B, M) float32 truncated SDF in Loom's convention,
        NEGATIVE INSIDE, in the units of the positions: ``-tau x`` `query_tsdf`."""
        return -self.config.tau * self.query_tsdf(features, points, chunk)

    def decode(self, latents: torch.Tensor, points: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(B, L, C) latents, (B, M, 3) positions -> (B, M) truncated SDF, negative inside."""
        return self.query_sdf(self.decode_features(latents), points, chunk)

    def forward(self, surface: torch.Tensor, queries: torch.Tensor, points: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None, *, sharp_surface: torch.Tensor | None = None,
                sharp_queries: torch.Tensor | None = None) -> VAEOutput:
        """Training pass: encode, (sample,) decode at ``points`` (B, M, 3) -> `VAEOutput` (sdf (B, M), kl (B,))."""
        latents, posterior = self.encode(surface, queries, sample=sample, generator=generator,
                                         sharp_surface=sharp_surface, sharp_queries=sharp_queries)
        return VAEOutput(self.decode(latents, points), posterior.kl(), latents, posterior)

    @torch.no_grad()
    def extract_mesh(self, latents: torch.Tensor, resolution: int = 256,
                     bounds: tuple[float, float] = DEFAULT_BOUNDS, level: float = 0.0,
                     chunk: int = 2**18) -> tuple[np.ndarray, np.ndarray]:
        """One shape's latents (L, C) or (1, L, C) -> (vertices (V, 3) float32, faces (F, 3) int64) by marching
        cubes on a ``resolution``^3 grid over ``[bounds[0], bounds[1]]^3`` (see `mesh_from_sdf`)."""
        if latents.ndim == 2:
            latents = latents[None]
        if latents.ndim != 3 or latents.shape[0] != 1:
            raise ValueError(f"extract_mesh takes one shape's latents (L, C) or (1, L, C), got "
                             f"{tuple(latents.shape)}: call it once per shape (per frame of a sequence)")
        features = self.decode_features(latents.to(self.device))

        def field(points: torch.Tensor) -> torch.Tensor:  # (N, 3) -> (N,)
            return self.query_sdf(features, points.to(self.device)[None])[0]

        return mesh_from_sdf(field, resolution, bounds, level, chunk)

    # ------------------------------------------------------------------ building, saving, loading

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> ShapeVAE:
        """A tiny random model, the same for the same seed; the global RNG is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(ShapeVAEConfig.tiny(**overrides))

    def save_pretrained(self, path: str) -> None:
        """``path/config.json`` (Loom's config) and ``path/model.safetensors`` (upstream's keys); load with
        `from_pretrained`."""
        save_folder(self, self.config.to_dict(), path)

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> ShapeVAE:
        """Load, from a local directory, what `save_pretrained` wrote, or a released Step1X-3D VAE: its ``vae/``
        folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or the release folder above it
        (``Step1X-3D-Geometry-1300m``). Every key must match: none missing, none unexpected."""
        path = os.fspath(path)
        released = _released_folder(path)
        if released is None:
            raw, state = read_folder(path, cls.__name__, "shape VAE")
            config = ShapeVAEConfig.from_dict(raw, source=os.path.join(path, CONFIG_NAME))
        else:
            from safetensors.torch import load_file

            source = os.path.join(released, CONFIG_NAME)
            with open(source) as f:
                config = ShapeVAEConfig.from_step1x3d(json.load(f), source=source)
            state = load_file(os.path.join(released, RELEASED_WEIGHTS_NAME))
            path = released
        model = cls(config)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches raise even when strict=False
            raise ValueError(f"{path!r}: weights do not match its config: {e}") from e
        if missing or unexpected:
            raise ValueError(f"{path!r}: weights do not match its config: missing {sorted(missing)[:4]} "
                             f"({len(missing)}), unexpected {sorted(unexpected)[:4]} ({len(unexpected)})")
        return model.to(device=device, dtype=torch_dtype)


def _released_folder(path: str) -> str | None:
    """The released-layout VAE folder at ``path`` or ``path/vae`` (config.json + diffusion_pytorch_model.safetensors),
    or None (a Loom folder, or nothing: `read_folder` says what is wrong)."""
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        return None
    for folder in (path, os.path.join(path, "vae")):
        if all(os.path.isfile(os.path.join(folder, n)) for n in (CONFIG_NAME, RELEASED_WEIGHTS_NAME)):
            return folder
    return None


def _check_points(name: str, x: torch.Tensor, batch: int, channels: tuple[int, ...]) -> None:
    if x.ndim != 3 or x.shape[0] != batch or x.shape[-1] not in channels:
        what = " or ".join(str(n) for n in channels)
        raise ValueError(f"{name} must be ({batch}, N, {what}) (xyz{' [+ normal]' if 3 in channels else ' + normal'}"
                         f", the batch of surface), got {tuple(x.shape)}")


def _with_normals(queries: torch.Tensor, cloud: torch.Tensor) -> torch.Tensor:
    """(B, Q, 3 or 6) queries, (B, S, 6) points + normals -> (B, Q, 6): queries without normals take the normal of
    their nearest point of ``cloud`` (their own when they are points of it)."""
    if queries.shape[-1] == 6:
        return queries
    b, q, _ = queries.shape
    step = max(1, _NN_CHUNK // max(1, b * cloud.shape[1]))
    nearest = torch.cat([torch.cdist(queries[:, i: i + step], cloud[..., :3]).argmin(-1)
                         for i in range(0, q, step)], dim=1) if q else queries.new_zeros(b, 0, dtype=torch.long)
    normals = torch.gather(cloud[..., 3:], 1, nearest[..., None].expand(-1, -1, 3))  # (B, Q, 3)
    return torch.cat([queries, normals], dim=-1)


def vae_loss(pred: torch.Tensor, target: torch.Tensor, kl: torch.Tensor, kl_weight: float = 1e-3,
             tau: float = 0.05) -> dict[str, torch.Tensor]:
    """The VAE objective: mean squared error of the SDF in units of the truncation (``(pred - target) / tau``; with
    ``pred`` = `ShapeVAE.decode` and ``target`` clipped to [-tau, tau] this is upstream's MSE of the network output
    against the TSDF / tau; ``tau`` must be the model's) plus ``kl_weight`` x the mean KL (Step1X-3D's
    ``lambda_kl`` = 1e-3). Returns
    ``{"loss", "sdf", "kl"}`` (scalars; "sdf" is the MSE in tau units)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    sdf = ((pred.float() - target.float()) / tau).pow(2).mean()
    kl = kl.float().mean()
    return {"loss": sdf + kl_weight * kl, "sdf": sdf, "kl": kl}


# ---------------------------------------------------------------------------------------------------- queries


def fps_queries(points: torch.Tensor, q: int, backend: str = "auto", start: int = 0) -> torch.Tensor:
    """Farthest point samples of a point cloud, the query points of a static shape (3DShape2VecSet:
    Q = FPS(P)). ``points`` (S, 3+) or (B, S, 3+) (extra channels such as normals are ignored) -> the chosen
    positions (q, 3) or (B, q, 3), in FPS order (every prefix is spread out).

    ``backend``: "fpsample" (its QuickFPS kd-tree variant, exact FPS; its first pick is ``start`` in the tree's
    internal order, a fixed function of the input), "torch" (an exact O(q S) loop starting at ``points[start]``,
    on the points' device), or "auto" (fpsample when installed, else torch)."""
    if points.ndim not in (2, 3) or points.shape[-1] < 3:
        raise ValueError(f"points must be (S, 3+) or (B, S, 3+), got {tuple(points.shape)}")
    batched = points.ndim == 3
    xyz = (points if batched else points[None])[..., :3]  # (B, S, 3)
    s = xyz.shape[1]
    if not 1 <= q <= s:
        raise ValueError(f"q={q} queries must be between 1 and the {s} points")
    if not 0 <= start < s:
        raise ValueError(f"start={start} must index one of the {s} points")
    if backend == "auto":
        try:
            import fpsample  # noqa: F401
            backend = "fpsample"
        except ImportError:
            backend = "torch"
    if backend == "fpsample":
        import fpsample

        idx = []
        for cloud in xyz.detach().float().cpu().numpy():
            if s < 2**_FPS_TREE_HEIGHT:  # too few points for the bucket tree
                chosen = fpsample.fps_sampling(cloud, q, start_idx=start)
            else:
                chosen = fpsample.bucket_fps_kdline_sampling(cloud, q, h=_FPS_TREE_HEIGHT, start_idx=start)
            idx.append(torch.as_tensor(np.asarray(chosen, dtype=np.int64)))
        index = torch.stack(idx).to(xyz.device)  # (B, q)
    elif backend == "torch":
        index = _fps_torch(xyz, q, start)
    else:
        raise ValueError(f"backend={backend!r}: use 'auto', 'fpsample' or 'torch'")
    out = torch.gather(xyz, 1, index[..., None].expand(-1, -1, 3))  # (B, q, 3)
    return out if batched else out[0]


def _fps_torch(xyz: torch.Tensor, q: int, start: int) -> torch.Tensor:
    """(B, S, 3) -> (B, q) indices of exact farthest point sampling from index ``start``."""
    b, s, _ = xyz.shape
    pts = xyz.detach().float()
    index = torch.empty(b, q, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, s), float("inf"), device=xyz.device)
    current = torch.full((b,), start, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(q):
        index[:, i] = current
        d = (pts - pts[rows, current][:, None]).pow(2).sum(-1)  # (B, S)
        dist = torch.minimum(dist, d)
        current = dist.argmax(dim=1)
    return index


# ---------------------------------------------------------------------------------------------------- meshing


def grid_points(resolution: int, bounds: tuple[float, float] = DEFAULT_BOUNDS) -> torch.Tensor:
    """The 1D coordinates (resolution,) of the grid `mesh_from_sdf` evaluates: both bounds included."""
    lo, hi = float(bounds[0]), float(bounds[1])
    if not hi > lo:
        raise ValueError(f"bounds={bounds} must be (low, high) with high > low")
    if resolution < 2:
        raise ValueError(f"resolution={resolution} must be >= 2")
    return torch.linspace(lo, hi, resolution, dtype=torch.float64)


@torch.no_grad()
def mesh_from_sdf(sdf: Callable[[torch.Tensor], torch.Tensor], resolution: int = 256,
                  bounds: tuple[float, float] = DEFAULT_BOUNDS, level: float = 0.0,
                  chunk: int = 2**18) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of the level set ``sdf = level`` of a field that is negative inside.

    ``sdf`` maps (N, 3) float32 positions to (N,) values; it is called on ``chunk`` grid points at a time, over
    the ``resolution``^3 grid of `grid_points` (x, y, z in 'ij' order). Returns (vertices (V, 3) float32 in the
    same coordinates, faces (F, 3) int64, counter-clockwise seen from outside); both empty when the field does
    not cross ``level`` inside the grid."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    axis = grid_points(resolution, bounds).float()
    r = resolution
    values = np.empty(r**3, dtype=np.float64)
    flat = torch.arange(r**3)
    for start in range(0, r**3, chunk):
        i = flat[start: start + chunk]
        pts = torch.stack([axis[i // (r * r)], axis[(i // r) % r], axis[i % r]], dim=-1)  # (n, 3)
        out = sdf(pts)
        if out.shape != (len(i),):
            raise ValueError(f"sdf returned shape {tuple(out.shape)} for {len(i)} points; expected ({len(i)},)")
        values[start: start + len(i)] = out.detach().float().cpu().numpy()
    if not np.isfinite(values).all():
        raise ValueError("the SDF is not finite on the grid: cannot extract a mesh")
    return marching_cubes(values.reshape(r, r, r), bounds, level)


def marching_cubes(grid: np.ndarray, bounds: tuple[float, float] = DEFAULT_BOUNDS,
                   level: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(R, R, R) samples of a field that is negative inside, at `grid_points` (x, y, z in 'ij' order) ->
    (vertices (V, 3) float32, faces (F, 3) int64) with outward normals; empty arrays when nothing crosses
    ``level``."""
    try:
        import point_cloud_utils as pcu
    except ImportError as e:
        raise ImportError("marching cubes needs point-cloud-utils: pip install point-cloud-utils (it comes with "
                          "loom's 'render' extra)") from e
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 3 or len(set(g.shape)) != 1:
        raise ValueError(f"grid must be (R, R, R), got {g.shape}")
    r = g.shape[0]
    axis = grid_points(r, bounds).numpy()
    empty = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    # Only the cells whose corners straddle the level go to pcu: a dense 256^3 hex mesh would need ~1 GB.
    corners = [(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1)]  # pcu order
    cell = [g[i: r - 1 + i, j: r - 1 + j, k: r - 1 + k] for i, j, k in corners]  # 8 x
    lo, hi = np.minimum.reduce(cell), np.maximum.reduce(cell)
    origin = np.argwhere((lo <= level) & (hi >= level))  # (n, 3) cell origins
    if len(origin) == 0:
        return empty
    ids = np.stack([np.ravel_multi_index((origin + o).T, g.shape) for o in corners], axis=1)  # (n, 8)
    used, cubes = np.unique(ids, return_inverse=True)
    ijk = np.stack(np.unravel_index(used, g.shape), axis=1)  # (u, 3)
    v, f = pcu.marching_cubes_sparse_voxel_grid(g.reshape(-1)[used], axis[ijk], cubes.reshape(-1, 8).astype(np.int32),
                                                float(level))
    v, f = np.asarray(v), np.asarray(f)
    if len(f) == 0:
        return empty
    # pcu orients faces with outward normals for fields that grow outward (checked on a sphere in the tests).
    return v.astype(np.float32), f.astype(np.int64)


def sphere_sdf(radius: float, center: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Callable:
    """An analytic sphere SDF (negative inside): a reference field for tests and for checking meshing."""
    c = torch.tensor(center, dtype=torch.float32)

    def sdf(points: torch.Tensor) -> torch.Tensor:
        return (points - c.to(points)).norm(dim=-1) - radius

    return sdf

