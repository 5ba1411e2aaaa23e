"""The spatiotemporal shape DiT of ShapeGen4D (section 3.2): a Step1X-3D-style rectified-flow DiT over VecSet shape
latents, conditioned on per-frame DINOv2 image features, extended to sequences by spatiotemporal layers.

The network is ``f(x_t, t, image_tokens) -> velocity``; the flow-matching objective, the shared noise and the
sampler live beside it in `loom.models.shape4d_flow`, not here.

Design choices:

- Base (3.2, "pretrained rectified-flow diffusion transformer"): Flux's layout (BlackForestLabs 2024) as
  Step1X-3D and Hunyuan3D-2 use it for shapes. ``x_embedder`` maps latents (Q, C) to the width, ``context_embedder``
  maps DINOv2 tokens (L, D_img) to the width; ``num_dual_blocks`` dual-stream blocks (MMDiT: the image tokens keep
  their own stream and weights, attention is joint) then ``num_single_blocks`` single-stream blocks over the
  concatenation ``[image, shape]``; ``AdaLayerNormContinuous`` + ``proj_out`` back to C. The blocks are diffusers'
  own ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``. The timestep conditions every block through
  AdaLN (Flux's sinusoidal ``Timesteps(256)`` + MLP); there is no pooled text vector and no guidance embedding.
  The timestep is ``1000 * sigma`` (`loom.models.flow`). Shape tokens get no positional encoding: a VecSet is
  a set, and where a token sits in it says nothing about where its query point lies.
- Spatiotemporal layers (3.2, "Inserting spatiotemporal attention layers"): one `SpatioTemporalLayer` after
  EACH block (dual and single), a ``FluxSingleTransformerBlock`` itself ("mirror the base model's single-stream
  blocks") whose attention runs over the shape AND image tokens of ALL T frames of a sequence: the per-frame
  tokens (B*T, N, D) are regrouped to (B, T*N, D). Frame index t enters as 1D RoPE on q and k (Flux's rotary,
  ``FluxPosEmbed`` with one axis of ``attention_head_dim``, theta 10,000), so attention sees relative frame
  offsets only. Its output projection ``proj_out`` starts at zero: the layer returns its input exactly and the
  extended model equals the base applied per frame at initialisation (tested). The AdaLN timestep is the
  sequence's (all frames share one sigma).
- Only the spatiotemporal layers train (`freeze_base`); the base is frozen "to avoid forgetting, given the limited
  4D data".
- Ablation variants (3.2 and Table 3), by config: ``temporal="1d"``: each token index attends only to itself in
  the other frames (sequences of length T, one per token index; no same-frame interactions), ``st_image_tokens=
  False``: the spatiotemporal layers see the shape tokens only and leave the image tokens as they are;
  ``spatiotemporal=False``: the base alone, run per frame ("Step1X-3D (+ shared noise)" of Table 1). Independent
  noise and no time shift are sampler options (`loom.models.shape4d_flow`).
- Attention is torch SDPA (diffusers' "native" backend), restricted by ``attention_backend`` with
  ``torch.nn.attention.sdpa_kernel`` inside each attention call, so the choice also holds when gradient
  checkpointing recomputes a block during backward: "auto" lets PyTorch pick among FlashAttention-2,
  memory-efficient and math kernels and never cuDNN. Issue 8 reports that PyTorch's default cuDNN attention
  crashed in the backward pass at the paper's shapes on an H100 ("illegal memory access", 16 x (1,024 + 1,370)
  = 38,304 tokens) although it ran alone and was 1.4-1.7x faster there; "cudnn" exists for benchmarks that
  investigate it and is not used unless asked for. On CPU "auto" and "math" work; "flash" and "efficient" need
  kernels that the device has.
- Sizes (`Shape4DDiTConfig.paper`, the default): width 1280 (20 heads x 64), 12 dual + 24 single blocks (so 36
  spatiotemporal layers), 64 latent channels, 1,024 latents per frame, DINOv2-L image tokens (1,370 x 1,024 at
  518 px). That base has 1.31 B parameters, about the size of the released Step1X-3D-Geometry-1300m; the 36
  spatiotemporal layers add 0.89 B. ``num_latents`` is only the sampler's default; the network takes any Q.
- Image features (`ImageFeatures`, `load_image_features`): transformers' ``Dinov2Model`` from a LOCAL folder,
  frozen; ``last_hidden_state`` (final LayerNorm applied), CLS + patch tokens, as Step1X-3D / Hunyuan3D-2 feed
  their DiTs; computed under ``no_grad`` (not ``inference_mode``, whose tensors autograd refuses). The shards'
  RGBA frames are composited over white (the object's background in those models' preprocessing), centre-cropped
  to a square, resized to the model's ``image_size`` and ImageNet-normalised.
- Loading: `Shape4DDiT.from_pretrained(dir, spatiotemporal=True)` turns a saved base (no spatiotemporal layers)
  into the 4D model with fresh, zero-initialised layers; every other mismatch is refused. Step1X-3D's released
  weights use other parameter names; converting them is a key mapping onto this layout (not done here).

Shapes::

    latents       (B, T, Q, C)  or (B, Q, C) for one frame     noisy latents x_t (C = 64, Q = 1,024, T = 16)
    timestep      (B,)          1000 * sigma, one per sequence (all frames share sigma: shared noise, 3.2)
    image_tokens  (B, T, L, D_img) or (B, L, D_img)            DINOv2 last_hidden_state (L = 1,370, D_img = 1,024)
    -> velocity   like latents

No Ray, Lightning, DeepSpeed or torch.distributed here: this is a single-device module. Sharding intent is
declared in ``_no_split_modules`` (dual and single blocks, spatiotemporal layers) and applied by
``loom.training.launch.apply_sharding_intent``: gradient checkpointing of those blocks, and under ZeRO-3 each block
gathered whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from loom.models.checkpointing import checkpoint_blocks, is_checkpointed, uncheckpoint_blocks
from loom.models.folder import CONFIG_NAME, WEIGHTS_NAME, read_folder, save_folder  # noqa: F401
ST_PREFIX = "spatiotemporal_layers."
ATTENTION_BACKENDS = {
    # cuDNN is left out of "auto" on purpose: see the module docstring (issue 8).
    "auto": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
}
TEMPORAL_MODES = ("full", "1d")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class Shape4DDiTConfig:
    """Sizes and variants of the shape DiT. ``Shape4DDiTConfig()`` is the paper's 4D model."""

    latent_channels: int = 64  # C of the VAE latents
    num_latents: int = 1024  # Q the sampler draws by default (the network takes any Q)
    image_dim: int = 1024  # D_img: DINOv2-L
    num_attention_heads: int = 20
    attention_head_dim: int = 64  # width = heads * head_dim = 1280
    num_dual_blocks: int = 12
    num_single_blocks: int = 24
    timestep_channels: int = 256  # Flux's sinusoidal timestep features
    spatiotemporal: bool = True  # False: the per-frame base model alone
    temporal: str = "full"  # "full": all tokens of all frames; "1d": each token index along time only
    st_image_tokens: bool = True  # image tokens take part in the spatiotemporal attention
    rope_theta: float = 10000.0  # base of the frame-index RoPE
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS

    def __post_init__(self):
        for name in ("latent_channels", "num_latents", "image_dim", "num_attention_heads", "attention_head_dim",
                     "timestep_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"Shape4DDiTConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("num_dual_blocks", "num_single_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"Shape4DDiTConfig.{name}={getattr(self, name)} must be >= 0")
        if self.attention_head_dim % 2:
            raise ValueError(f"Shape4DDiTConfig.attention_head_dim={self.attention_head_dim} must be even (RoPE "
                             "rotates pairs of channels)")
        if self.timestep_channels % 2:
            raise ValueError(f"Shape4DDiTConfig.timestep_channels={self.timestep_channels} must be even")
        if self.temporal not in TEMPORAL_MODES:
            raise ValueError(f"Shape4DDiTConfig.temporal={self.temporal!r}: use one of {TEMPORAL_MODES}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"Shape4DDiTConfig.attention_backend={self.attention_backend!r}: use one of "
                             f"{sorted(ATTENTION_BACKENDS)}")
        if not self.rope_theta > 0:
            raise ValueError(f"Shape4DDiTConfig.rope_theta={self.rope_theta} must be > 0")

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def paper(cls, **overrides) -> Shape4DDiTConfig:
        """16 frames x 1,024 latents, width 1280, 12 dual + 24 single blocks, DINOv2-L tokens (benchmarks only:
        2.19 B parameters, a 1.31 B base and 0.89 B in the 36 spatiotemporal layers)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> Shape4DDiTConfig:
        """A width-32 model with 2 dual + 2 single blocks for tests."""
        return cls(**{**dict(latent_channels=8, num_latents=16, image_dim=24, num_attention_heads=2,
                             attention_head_dim=16, num_dual_blocks=2, num_single_blocks=2, timestep_channels=32),
                      **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> Shape4DDiTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown Shape4DDiTConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------- attention


class SDPAProcessor(FluxAttnProcessor):
    """Flux's attention processor on torch SDPA, restricted to the kernels of one `ATTENTION_BACKENDS` entry."""

    _attention_backend = "native"  # torch SDPA whatever diffusers' global default is

    def __init__(self, backend: str = "auto"):
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r}: use one of {sorted(ATTENTION_BACKENDS)}")
        self.backend = backend

    def __call__(self, *args, **kwargs):
        # Entered on every call, so a checkpointed block recomputed in backward uses the same kernels.
        with sdpa_kernel(ATTENTION_BACKENDS[self.backend]):
            return super().__call__(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------- layers


class SpatioTemporalLayer(FluxSingleTransformerBlock):
    """A single-stream block whose attention spans the frames of a sequence, with frame-index RoPE and a
    zero-initialised output projection (an exact identity at initialisation).

    ``forward(hidden (B*T, Q, D), context (B*T, L, D), temb (B, D), frames=T)`` -> (context, hidden), the same
    shapes, frames of one sequence consecutive in the batch (as ``x.reshape(B * T, ...)`` lays them out)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, temporal: str = "full",
                 image_tokens: bool = True, rope_theta: float = 10000.0):
        super().__init__(dim, num_attention_heads, attention_head_dim)
        if temporal not in TEMPORAL_MODES:
            raise ValueError(f"temporal={temporal!r}: use one of {TEMPORAL_MODES}")
        self.temporal = temporal
        self.image_tokens = image_tokens
        self.rope = FluxPosEmbed(theta=rope_theta, axes_dim=[attention_head_dim])
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def frame_rotary(self, frame_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S,) frame index of each token -> (cos, sin), each (S, head_dim) float32, for diffusers'
        ``apply_rotary_emb`` on (B, S, H, head_dim) queries and keys."""
        return self.rope(frame_ids.reshape(-1, 1).float())

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        bt, q, d = hidden_states.shape
        l = encoder_hidden_states.shape[1]  # noqa: E741
        if bt % frames or temb.shape[0] != bt // frames:
            raise ValueError(f"{bt} frames in the batch, frames={frames} per sequence and temb for "
                             f"{temb.shape[0]} sequences do not agree")
        b = bt // frames
        device = hidden_states.device
        t = torch.arange(frames, device=device)
        if self.temporal == "full":
            h = hidden_states.reshape(b, frames * q, d)  # (B, T*Q, D), frame-major
            c = (encoder_hidden_states.reshape(b, frames * l, d) if self.image_tokens
                 else hidden_states.new_zeros(b, 0, d))  # (B, T*L, D) or nothing
            ids = torch.cat([t.repeat_interleave(c.shape[1] // frames), t.repeat_interleave(q)])  # (T*L + T*Q,)
            c, h = super().forward(h, c, temb, image_rotary_emb=self.frame_rotary(ids))
            context = c.reshape(bt, l, d) if self.image_tokens else encoder_hidden_states
            return context, h.reshape(bt, q, d)
        # "1d": one sequence of length T per token index; nothing is seen from the same frame.
        tokens = torch.cat([encoder_hidden_states, hidden_states], 1) if self.image_tokens else hidden_states
        n = tokens.shape[1]
        x = tokens.reshape(b, frames, n, d).transpose(1, 2).reshape(b * n, frames, d)  # (B*N, T, D)
        _, x = super().forward(x, x.new_zeros(b * n, 0, d), temb.repeat_interleave(n, 0),
                               image_rotary_emb=self.frame_rotary(t))
        x = x.reshape(b, n, frames, d).transpose(1, 2).reshape(bt, n, d)  # (B*T, N, D)
        if self.image_tokens:
            return x[:, :l], x[:, l:]
        return encoder_hidden_states, x


# ---------------------------------------------------------------------------------------------------- model


class Shape4DDiT(nn.Module):
    """Rectified-flow DiT over shape latents: ``forward(latents, timestep, image_tokens)`` -> velocity, per frame
    (base) or per sequence (with spatiotemporal layers). Build with ``Shape4DDiT(config)``, `tiny` or
    `from_pretrained`."""

    _no_split_modules = ["FluxTransformerBlock", "FluxSingleTransformerBlock", "SpatioTemporalLayer"]

    def __init__(self, config: Shape4DDiTConfig | None = None):
        super().__init__()
        self.config = config = config or Shape4DDiTConfig()
        dim, heads, head_dim = config.width, config.num_attention_heads, config.attention_head_dim
        self.time_proj = Timesteps(config.timestep_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(config.timestep_channels, dim)
        self.x_embedder = nn.Linear(config.latent_channels, dim)
        self.context_embedder = nn.Linear(config.image_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, heads, head_dim) for _ in range(config.num_dual_blocks))
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(config.num_single_blocks))
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, config.latent_channels)
        n_st = (config.num_dual_blocks + config.num_single_blocks) if config.spatiotemporal else 0
        self.spatiotemporal_layers = nn.ModuleList(
            SpatioTemporalLayer(dim, heads, head_dim, config.temporal, config.st_image_tokens, config.rope_theta)
            for _ in range(n_st))
        self.set_attention_backend(config.attention_backend)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def set_attention_backend(self, backend: str) -> None:
        """Use the SDPA kernels of ``backend`` (see `ATTENTION_BACKENDS`) in every block from now on."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r}: use one of {sorted(ATTENTION_BACKENDS)}")
        for module in self.modules():
            if hasattr(module, "set_processor") and hasattr(module, "processor"):
                module.set_processor(SDPAProcessor(backend))
        self.config = dataclasses.replace(self.config, attention_backend=backend)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block and spatiotemporal layer (``_no_split_modules``) in backward instead of keeping its
        activations (`loom.models.checkpointing`, the mechanism training applies too)."""
        checkpoint_blocks(self)

    def disable_gradient_checkpointing(self) -> None:
        uncheckpoint_blocks(self)

    @property
    def gradient_checkpointing(self) -> bool:
        return any(is_checkpointed(m) for m in self.modules())

    def freeze_base(self) -> None:
        """Freeze everything but the spatiotemporal layers (3.2: only they are trained)."""
        if not len(self.spatiotemporal_layers):
            raise ValueError("this model has no spatiotemporal layers (spatiotemporal=False): nothing would train")
        self.requires_grad_(False)
        self.spatiotemporal_layers.requires_grad_(True)

    def spatiotemporal_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained part: the spatiotemporal layers' weights under their full names."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(ST_PREFIX)}

    # ------------------------------------------------------------------ forward

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        single_frame = latents.ndim == 3
        x = latents[:, None] if single_frame else latents  # (B, T, Q, C)
        img = image_tokens[:, None] if image_tokens.ndim == 3 else image_tokens  # (B, T, L, D_img)
        self._check_inputs(x, timestep, img, single_frame)
        b, t, q, c = x.shape
        dtype = self.dtype
        temb = self.time_embed(self.time_proj(timestep.to(self.device)).to(dtype))  # (B, D)
        temb_frames = temb.repeat_interleave(t, 0)  # (B*T, D): the base sees each frame as its own shape
        hidden = self.x_embedder(x.reshape(b * t, q, c).to(dtype))  # (B*T, Q, D)
        context = self.context_embedder(img.reshape(b * t, img.shape[2], img.shape[3]).to(dtype))  # (B*T, L, D)
        blocks = list(self.transformer_blocks) + list(self.single_transformer_blocks)
        for i, block in enumerate(blocks):
            context, hidden = block(hidden, context, temb_frames)
            if len(self.spatiotemporal_layers):
                context, hidden = self.spatiotemporal_layers[i](hidden, context, temb, t)
        hidden = self.norm_out(hidden, temb_frames)
        out = self.proj_out(hidden).reshape(b, t, q, c).to(latents.dtype)  # (B, T, Q, C)
        return out[:, 0] if single_frame else out

    def _check_inputs(self, x, timestep, img, single_frame: bool) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.latent_channels:
            raise ValueError(f"latents must be (B, T, Q, {cfg.latent_channels}) or (B, Q, {cfg.latent_channels}), "
                             f"got {tuple(x.shape[1:] if single_frame else x.shape)}")
        b, t = x.shape[:2]
        if img.ndim != 4 or img.shape[:2] != (b, t) or img.shape[-1] != cfg.image_dim:
            want = f"({b}, L, {cfg.image_dim})" if single_frame else f"({b}, {t}, L, {cfg.image_dim})"
            raise ValueError(f"image_tokens must be {want} to match the latents, got "
                             f"{tuple(img.shape[1:] if single_frame else img.shape)}")
        if tuple(timestep.shape) != (b,):
            raise ValueError(f"timestep must be ({b},): one 1000 * sigma per sequence, shared by its frames; got "
                             f"{tuple(timestep.shape)}")

    # ------------------------------------------------------------------ building, saving, loading

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> Shape4DDiT:
        """A tiny random model (`Shape4DDiTConfig.tiny`), the same for the same seed; the global RNG is left
        as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(Shape4DDiTConfig.tiny(**overrides))

    def save_pretrained(self, path: str) -> None:
        """``path/config.json`` and ``path/model.safetensors`` (all weights); load with `from_pretrained`."""
        save_folder(self, self.config.to_dict(), path)

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **overrides) -> Shape4DDiT:
        """Load what `save_pretrained` wrote from a local directory, with config ``overrides``. Loading a base
        (saved with ``spatiotemporal=False``) with ``spatiotemporal=True`` adds fresh zero-initialised
        spatiotemporal layers (the start of 4D training); ``spatiotemporal=False`` on a 4D checkpoint drops them.
        Any other mismatch between weights and config is an error."""
        raw, state = read_folder(path, cls.__name__, "shape DiT")
        saved = Shape4DDiTConfig.from_dict(raw, source=os.path.join(path, CONFIG_NAME))
        config = Shape4DDiTConfig.from_dict({**saved.to_dict(), **overrides}, source="overrides")
        with torch.random.fork_rng(devices=[]):  # fresh layers: only their zero output matters, keep RNG intact
            model = cls(config)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches raise even when strict=False
            raise ValueError(f"{path!r}: weights do not match the config: {e}") from e
        adding = not saved.spatiotemporal and config.spatiotemporal
        dropping = saved.spatiotemporal and not config.spatiotemporal
        bad_missing = [k for k in missing if not (adding and k.startswith(ST_PREFIX))]
        bad_unexpected = [k for k in unexpected if not (dropping and k.startswith(ST_PREFIX))]
        if bad_missing or bad_unexpected:
            raise ValueError(f"{path!r}: weights do not match the config {config}: missing {sorted(bad_missing)[:4]} "
                             f"({len(bad_missing)}), unexpected {sorted(bad_unexpected)[:4]} ({len(bad_unexpected)})")
        return model.to(device=device, dtype=torch_dtype)


# ---------------------------------------------------------------------------------------------------- image features


class ImageFeatures(nn.Module):
    """A frozen DINOv2 giving ``last_hidden_state`` (CLS + patch tokens) per frame. Build with
    `load_image_features` (local folder) or `tiny` (random, for tests)."""

    def __init__(self, model: nn.Module, image_size: int | None = None, background: float = 1.0):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.image_size = int(image_size or cfg.image_size)
        patch = int(cfg.patch_size)
        if self.image_size % patch:
            raise ValueError(f"image_size={self.image_size} must be a multiple of the patch size {patch}")
        if not 0.0 <= background <= 1.0:
            raise ValueError(f"background={background} must be a grey level in [0, 1]")
        self.background = background
        self.dim = int(cfg.hidden_size)
        self.tokens = (self.image_size // patch) ** 2 + 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, frames) -> torch.Tensor:
        """(N, H, W, 3 or 4) uint8 (straight alpha) -> (N, 3, S, S) normalised pixels."""
        a = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if a.ndim != 4 or a.shape[-1] not in (3, 4) or a.dtype != np.uint8:
            raise ValueError(f"frames must be (N, H, W, 3 or 4) uint8, got {a.shape} {a.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3|4, H, W)
        if x.shape[1] == 4:
            alpha = x[:, 3:]
            x = x[:, :3] * alpha + self.background * (1.0 - alpha)
        h, w = x.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[..., top: top + side, left: left + side]
        if side != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                                          align_corners=False, antialias=True).clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    @torch.no_grad()  # not inference_mode: the features feed a DiT that is trained under autograd
    def encode(self, frames) -> torch.Tensor:
        """(..., H, W, 3 or 4) uint8 frames (e.g. a shard's video (T, H, W, 4)) -> (..., L, D) float32."""
        a = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if a.ndim < 4:
            raise ValueError(f"frames must be (..., H, W, C) with at least one leading dimension, got {a.shape}")
        lead = a.shape[:-3]
        px = self.preprocess(a.reshape(-1, *a.shape[-3:])).to(device=self.device, dtype=self.dtype)
        out = self.model(pixel_values=px).last_hidden_state.float()  # (N, L, D)
        return out.reshape(*lead, *out.shape[1:])

    @classmethod
    def tiny(cls, seed: int = 0, hidden_size: int = 24, image_size: int = 28, **config) -> ImageFeatures:
        """A random 1-layer DINOv2 (5 tokens of width 24 at 28 px by default)."""
        from transformers import Dinov2Config, Dinov2Model

        cfg = Dinov2Config(**{**dict(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=2 * hidden_size, image_size=image_size, patch_size=14),
                              **config})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(Dinov2Model(cfg))


def load_image_features(path: str, dtype: str = "float32", device: str = "cpu", image_size: int | None = None,
                        background: float = 1.0) -> ImageFeatures:
    """A frozen DINOv2 (``Dinov2Model`` or the with-registers variant) from a LOCAL transformers folder
    (config.json + weights), e.g. facebook/dinov2-large copied to disk; ``image_size`` defaults to the config's
    (518 for DINOv2-L: 1,370 tokens)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"DINOv2 directory {path!r} does not exist: point it at a local transformers "
                                "Dinov2Model folder (config.json + model.safetensors); nothing is downloaded")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"DINOv2 directory {path!r} has no config.json: is it a transformers model folder?")
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    classes = {"dinov2": transformers.Dinov2Model,
               "dinov2_with_registers": getattr(transformers, "Dinov2WithRegistersModel", None)}
    if classes.get(model_type) is None:
        raise ValueError(f"{path!r} holds a {model_type!r} model, not DINOv2 ('dinov2' or 'dinov2_with_registers')")
    model = classes[model_type].from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    return ImageFeatures(model, image_size=image_size, background=background).to(device)
