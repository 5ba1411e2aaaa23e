"""The VecSet shape VAE of ShapeGen4D (section 3.1): 3DShape2VecSet (Zhang et al. 2023) as Step1X-3D and
Hunyuan3D-2 use it. Surface points with normals are cross-attended by a set of query points; self-attention
layers turn the result into a set of latents; the decoder maps latents and any 3D position to a truncated signed
distance. A mesh comes back by marching cubes.

Design choices:

- Encoder (3.1, "Preliminary: Encoder"): the surface points (B, S, 6) (xyz + unit normal) are embedded as
  ``Linear([fourier(xyz), normal])``; the query points (B, Q, 3) as ``Linear(fourier(xyz))``, positions only,
  because the aligned queries of the 4D shards (`loom.datasets.shape4d`, key ``queries``) lie on the ORIGINAL
  animated mesh and carry no normals. One cross-attention block (queries attend to the surface) gives one token
  per query; ``encoder_layers`` self-attention blocks follow. Query i therefore owns latent i: with the aligned
  queries of a 4D sequence, latent i describes the same physical point in every frame (the paper's "aligned
  latents"). For static shapes, `fps_queries` picks the queries by farthest point sampling of the surface, as
  3DShape2VecSet does.
- Bottleneck: a diagonal Gaussian (B, Q, C) per latent token; `encode(..., sample=False)` returns the mean (the
  deterministic latents a latent cache wants), ``sample=True`` a reparameterised sample. The KL term is
  3DShape2VecSet's: the mean over tokens and channels of ``0.5 (mu^2 + var - 1 - log var)``, one value per shape.
  The number of latents Q is not part of the model: any Q works (ShapeGen4D: 1,024 per frame).
- Decoder (3.1, "Preliminary: Decoder"): ``Linear(C -> width)``, ``decoder_layers`` self-attention blocks, then
  one cross-attention block in which the Fourier-embedded query positions (B, M, 3) attend to the decoded tokens,
  a LayerNorm and ``Linear(width -> 1)``. The self-attention part runs once per shape (`decode_features`); the
  cross-attention part (`query_sdf`) runs on chunks of positions, so a 256^3 grid never has to fit at once.
- Output: a truncated signed distance, NEGATIVE INSIDE, in the units of the shards (the unit box), as
  ``loom.geometry.mesh.sdf_samples`` writes it (key ``sdf``: clipped to [-tau, tau], tau = 0.05 by default,
  ``PointSettings.sdf_truncation``). The network predicts ``sdf / tau`` and `decode` multiplies by tau, so the
  regression target is O(1) whatever tau is. The prediction is not clipped: it can leave [-tau, tau] slightly,
  which does not move the zero level set. The model's ``tau`` must equal the shards' truncation.
- Fourier features: 3DShape2VecSet/Hunyuan3D-2's ``[x, sin(2^k x), cos(2^k x)]``, k = 0 .. num_freqs - 1
  (no factor pi: Hunyuan3D-2's ``include_pi: false``). They are computed in float32 whatever the weights' dtype
  (a bf16 coordinate has an 8-bit mantissa; times 2^7 its phase would be noise); latents, posterior and SDF come
  back as float32.
- Attention blocks are pre-norm (LayerNorm) with RMS-normalised queries and keys (``qk_norm``, as Hunyuan3D-2's
  ShapeVAE), torch SDPA, GELU MLPs of ``mlp_ratio`` x width.
- Sizes (`ShapeVAEConfig.paper`, the default): Hunyuan3D-2's published ShapeVAE (width 1024, 16 heads, 8 encoder
  and 16 decoder self-attention layers, 64 latent channels, 8 frequencies). Step1X-3D's own VAE widths are not
  published in the paper this project follows; Hunyuan3D-2's are the same 3DShape2VecSet family, and its 64
  latent channels match the 64-channel latents the Step1X-3D-style DiT (`shape4d_dit`) takes (328 M
  parameters). Sharp-edge point
  sampling (3.1: "salient points sampled along sharp edges") is a data choice and not modelled here.
- Marching cubes: `mesh_from_sdf` evaluates any SDF on a regular grid in chunks and runs point-cloud-utils'
  ``marching_cubes_sparse_voxel_grid`` on the cells that straddle the level (pcu is in the render extra, which
  already builds the shards; scikit-image is not a dependency). Faces come out counter-clockwise seen from
  outside (outward normals) for a field that is negative inside. `ShapeVAE.extract_mesh` is that function on the
  decoder.

Shapes::

    surface  (B, S, 6)  float  points on the (watertight) surface + unit outward normals; S = 32,768 in the shards
    queries  (B, Q, 3)  float  query points (aligned 4D queries, or `fps_queries`); Q = 1,024 in the shards
    latents  (B, Q, C)  float  C = latent_channels (64)
    points   (B, M, 3)  float  any positions   ->  sdf (B, M), negative inside, ~[-tau, tau]

A 4D sample (T frames) is encoded as a batch of T shapes: ``surface[t]`` with ``queries[t]``.

No Ray, Lightning, DeepSpeed or torch.distributed here: this is a single-device module. Sharding intent is
declared in ``_no_split_modules`` and applied by ``loom.training.launch.apply_sharding_intent``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loom.models.folder import CONFIG_NAME, WEIGHTS_NAME, read_folder, save_folder  # noqa: F401
# The 4D shards fit every frame in [-0.5, 0.5]^3 and supervise the field 5% beyond it
# (loom.geometry.mesh: volume samples in 1.05 * half_extent), so that is where the decoder is meaningful.
DEFAULT_BOUNDS = (-0.525, 0.525)
# fpsample's kd-tree bucket height used by the 4D pipeline too (loom.geometry.mesh._FPS_TREE_HEIGHT).
_FPS_TREE_HEIGHT = 5


# ---------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class ShapeVAEConfig:
    """Sizes of the VecSet VAE. ``ShapeVAEConfig()`` is the paper-sized default (see the module docstring)."""

    latent_channels: int = 64  # C of the (B, Q, C) latents the DiT models
    width: int = 1024  # token width inside the encoder and decoder
    heads: int = 16
    encoder_layers: int = 8  # self-attention blocks after the surface -> queries cross-attention
    decoder_layers: int = 16  # self-attention blocks before the point -> tokens cross-attention
    num_freqs: int = 8  # Fourier frequencies 2^0 .. 2^(num_freqs - 1) per coordinate
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    tau: float = 0.05  # SDF truncation of the supervision (shards: PointSettings.sdf_truncation)

    def __post_init__(self):
        for name in ("latent_channels", "width", "heads", "num_freqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"ShapeVAEConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("encoder_layers", "decoder_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"ShapeVAEConfig.{name}={getattr(self, name)} must be >= 0")
        if self.width % self.heads:
            raise ValueError(f"ShapeVAEConfig.width={self.width} must be divisible by heads={self.heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"ShapeVAEConfig.mlp_ratio={self.mlp_ratio} must be > 0")
        if not self.tau > 0:
            raise ValueError(f"ShapeVAEConfig.tau={self.tau} must be > 0 (the shards' sdf_truncation)")

    @classmethod
    def paper(cls, **overrides) -> ShapeVAEConfig:
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> ShapeVAEConfig:
        """A few-thousand-parameter model for tests."""
        return cls(**{**dict(latent_channels=8, width=32, heads=2, encoder_layers=1, decoder_layers=1,
                             num_freqs=6, mlp_ratio=2.0), **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ShapeVAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown ShapeVAEConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------- layers


class FourierEmbedder(nn.Module):
    """(..., 3) -> (..., 3 (1 + 2 F)): ``[x, sin(2^k x), cos(2^k x)]`` for k < F, per coordinate."""

    def __init__(self, num_freqs: int):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs, dtype=torch.float32), persistent=False)
        self.out_dim = 3 * (1 + 2 * num_freqs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = (x[..., None] * self.freqs.to(x.dtype)).flatten(-2)  # (..., 3F)
        return torch.cat([x, angles.sin(), angles.cos()], dim=-1)


class Attention(nn.Module):
    """Multi-head attention from ``x`` (B, N, W) to ``context`` (B, K, W) (self-attention when None)."""

    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        head_dim = width // heads
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        # Normalised q/k keep the logits bounded in bf16 (Hunyuan3D-2's ShapeVAE: qk_norm: true).
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.to_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self.to_q(x).unflatten(-1, (self.heads, -1))  # (B, N, H, d)
        k, v = self.to_kv(context).unflatten(-1, (2, self.heads, -1)).unbind(2)  # (B, K, H, d) each
        q, k = self.norm_q(q), self.norm_k(k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B,H,N,d)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, W)


class Block(nn.Module):
    """Pre-norm transformer block: (cross- or self-) attention, then a GELU MLP, each a residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.norm_context = nn.LayerNorm(width) if cross else None
        self.attn = Attention(width, heads, qk_norm)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if (context is None) != (self.norm_context is None):
            raise ValueError("a cross-attention block needs a context and a self-attention block takes none")
        ctx = None if context is None else self.norm_context(context)
        x = x + self.attn(self.norm1(x), ctx)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------------- posterior


@dataclass
class DiagonalGaussian:
    """The encoder's posterior over the latents, per token and channel."""

    mean: torch.Tensor  # (B, Q, C)
    logvar: torch.Tensor  # (B, Q, C), clamped to [-30, 20] as in 3DShape2VecSet / LDM

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
    sdf: torch.Tensor  # (B, M) predicted truncated SDF at the given points
    kl: torch.Tensor  # (B,)
    latents: torch.Tensor  # (B, Q, C) the latents that were decoded
    posterior: DiagonalGaussian


# ---------------------------------------------------------------------------------------------------- model


class ShapeVAE(nn.Module):
    """VecSet VAE: ``encode(surface, queries)`` -> latents, ``decode(latents, points)`` -> truncated SDF."""

    _no_split_modules = ["Block"]  # the attention blocks (cross and self): each gathered whole under ZeRO-3

    def __init__(self, config: ShapeVAEConfig | None = None):
        super().__init__()
        self.config = config = config or ShapeVAEConfig()
        w, h, r, qk = config.width, config.heads, config.mlp_ratio, config.qk_norm
        self.fourier = FourierEmbedder(config.num_freqs)
        pe = self.fourier.out_dim
        # encoder
        self.surface_proj = nn.Linear(pe + 3, w)  # fourier(xyz) + normal
        self.query_proj = nn.Linear(pe, w)  # fourier(xyz): aligned queries carry no normals
        self.encoder_cross = Block(w, h, r, qk, cross=True)
        self.encoder_layers = nn.ModuleList(Block(w, h, r, qk) for _ in range(config.encoder_layers))
        self.encoder_norm = nn.LayerNorm(w)
        self.to_moments = nn.Linear(w, 2 * config.latent_channels)
        # decoder
        self.from_latents = nn.Linear(config.latent_channels, w)
        self.decoder_layers = nn.ModuleList(Block(w, h, r, qk) for _ in range(config.decoder_layers))
        self.point_proj = nn.Linear(pe, w)
        self.decoder_cross = Block(w, h, r, qk, cross=True)
        self.decoder_norm = nn.LayerNorm(w)
        self.to_sdf = nn.Linear(w, 1)  # predicts sdf / tau

    @property
    def dtype(self) -> torch.dtype:
        return self.to_sdf.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.to_sdf.weight.device

    # ------------------------------------------------------------------ encoder

    def encode(self, surface: torch.Tensor, queries: torch.Tensor, sample: bool = True,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(B, S, 6) surface points + normals, (B, Q, 3) query points -> (latents (B, Q, C), posterior).
        ``sample=False`` returns the posterior mean. Latents and posterior are float32 whatever the weights."""
        if surface.ndim != 3 or surface.shape[-1] != 6:
            raise ValueError(f"surface must be (B, S, 6) points + normals, got {tuple(surface.shape)}")
        if queries.ndim != 3 or queries.shape[-1] != 3 or queries.shape[0] != surface.shape[0]:
            raise ValueError(f"queries must be ({surface.shape[0]}, Q, 3) like surface's batch, "
                             f"got {tuple(queries.shape)}")
        # Fourier features in float32 whatever the weights: bf16 positions (8-bit mantissa) times 2^7 would
        # scramble the high frequencies.
        surface = surface.to(self.device, torch.float32)
        features = torch.cat([self.fourier(surface[..., :3]), surface[..., 3:]], -1).to(self.dtype)
        data = self.surface_proj(features)  # (B, S, W)
        x = self.query_proj(self.fourier(queries.to(self.device, torch.float32)).to(self.dtype))  # (B, Q, W)
        x = self.encoder_cross(x, data)
        for block in self.encoder_layers:
            x = block(x)
        mean, logvar = self.to_moments(self.encoder_norm(x)).float().chunk(2, dim=-1)  # (B, Q, C) float32 each
        posterior = DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))
        return (posterior.sample(generator) if sample else posterior.mean), posterior

    # ------------------------------------------------------------------ decoder

    def decode_features(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, Q, C) latents -> (B, Q, W) shape tokens the SDF queries attend to (run once per shape)."""
        c = self.config.latent_channels
        if latents.ndim != 3 or latents.shape[-1] != c:
            raise ValueError(f"latents must be (B, Q, {c}), got {tuple(latents.shape)}")
        x = self.from_latents(latents.to(self.device, self.dtype))
        for block in self.decoder_layers:
            x = block(x)
        return x

    def query_sdf(self, features: torch.Tensor, points: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(B, Q, W) decoded tokens, (B, M, 3) positions -> (B, M) float32 truncated SDF, negative inside;
        ``chunk`` positions at a time (all at once when None)."""
        if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] != features.shape[0]:
            raise ValueError(f"points must be ({features.shape[0]}, M, 3), got {tuple(points.shape)}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk={chunk} must be >= 1 or None")
        points = points.to(features.device, torch.float32)  # float32 Fourier features, as in `encode`
        step = points.shape[1] if chunk is None else chunk
        out = []
        for start in range(0, points.shape[1], max(step, 1)):
            x = self.point_proj(self.fourier(points[:, start: start + step]).to(self.dtype))  # (B, m, W)
            x = self.decoder_cross(x, features)
            out.append(self.to_sdf(self.decoder_norm(x)).squeeze(-1).float())  # (B, m)
        sdf = torch.cat(out, dim=1) if out else points.new_zeros(points.shape[:2])
        return sdf * self.config.tau

    def decode(self, latents: torch.Tensor, points: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(B, Q, C) latents, (B, M, 3) positions -> (B, M) truncated SDF, negative inside."""
        return self.query_sdf(self.decode_features(latents), points, chunk)

    def forward(self, surface: torch.Tensor, queries: torch.Tensor, points: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> VAEOutput:
        """Training pass: encode, (sample,) decode at ``points`` (B, M, 3) -> `VAEOutput` (sdf (B, M), kl (B,))."""
        latents, posterior = self.encode(surface, queries, sample=sample, generator=generator)
        return VAEOutput(self.decode(latents, points), posterior.kl(), latents, posterior)

    @torch.no_grad()
    def extract_mesh(self, latents: torch.Tensor, resolution: int = 256,
                     bounds: tuple[float, float] = DEFAULT_BOUNDS, level: float = 0.0,
                     chunk: int = 2**18) -> tuple[np.ndarray, np.ndarray]:
        """One shape's latents (Q, C) or (1, Q, C) -> (vertices (V, 3) float32, faces (F, 3) int64) by marching
        cubes on a ``resolution``^3 grid over ``[bounds[0], bounds[1]]^3`` (see `mesh_from_sdf`)."""
        if latents.ndim == 2:
            latents = latents[None]
        if latents.ndim != 3 or latents.shape[0] != 1:
            raise ValueError(f"extract_mesh takes one shape's latents (Q, C) or (1, Q, C), got "
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
        """``path/config.json`` and ``path/model.safetensors``; load with `from_pretrained`."""
        save_folder(self, self.config.to_dict(), path)

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> ShapeVAE:
        """Load what `save_pretrained` wrote, from a local directory."""
        raw, state = read_folder(path, cls.__name__, "shape VAE")
        model = cls(ShapeVAEConfig.from_dict(raw, source=os.path.join(path, CONFIG_NAME)))
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches raise even when strict=False
            raise ValueError(f"{path!r}: weights do not match its config: {e}") from e
        if missing or unexpected:
            raise ValueError(f"{path!r}: weights do not match its config: missing {sorted(missing)[:4]} "
                             f"({len(missing)}), unexpected {sorted(unexpected)[:4]} ({len(unexpected)})")
        return model.to(device=device, dtype=torch_dtype)


def vae_loss(pred: torch.Tensor, target: torch.Tensor, kl: torch.Tensor, kl_weight: float = 1e-3,
             tau: float = 0.05) -> dict[str, torch.Tensor]:
    """The VAE objective: mean squared error of the SDF in units of the truncation (``(pred - target) / tau``,
    so the weight of the KL term does not depend on tau) plus ``kl_weight`` x the mean KL (3DShape2VecSet's
    weight, 1e-3). Returns ``{"loss", "sdf", "kl"}`` (scalars; "sdf" is the MSE in tau units)."""
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

