"""The spatiotemporal shape DiT of ShapeGen4D (section 3.2): a Step1X-3D-style rectified-flow DiT over VecSet shape
latents, conditioned on per-frame DINOv2 image features, extended to sequences by spatiotemporal layers.

The network is ``f(x_t, t, image_tokens) -> velocity``; the flow-matching objective, the shared noise and the
sampler live beside it in `loom.models.shape4d_flow`, not here.

Design choices:

- Base (3.2, "pretrained rectified-flow diffusion transformer"): Step1X-3D's released geometry DiT
  (``Step1X-3D-Geometry-1300m/transformer``, ``FluxDenoiser`` wrapping ``FluxTransformer1DModel`` in
  ``step1x3d_geometry/models/transformers/flux_transformer_1d.py`` of stepfun-ai/Step1X-3D, commit 20b5de2), in its
  own module names, so the released folder loads strictly (`from_pretrained`; its keys are ours with the wrapper's
  ``dit_model.`` prefix). ``proj_in`` maps latents (Q, C) to the width, ``proj_cross_attention`` maps the DINOv2
  tokens (L, D_img) to the width (no RMSNorm projector: the release has ``visual_condition_dim == condition_dim``);
  ``num_dual_blocks`` dual-stream blocks (MMDiT: the image tokens keep their own stream and weights, attention is
  joint over ``[image, shape]``) then ``num_single_blocks`` single-stream blocks over that concatenation;
  ``AdaLayerNormContinuous`` + ``proj_out`` back to C, on the shape tokens only. The blocks are diffusers' own
  ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``: upstream's copies (its ``models/attention.py`` and
  ``FluxAttnProcessor2_0``) have the same parameter names and the same math (AdaLN-Zero modulation, per-head
  RMSNorm q/k norms with eps 1e-6, joint attention with the image tokens first, tanh-GELU MLPs), which the golden
  test checks. The timestep, unlike Flux's, is embedded as upstream does: ``time_embed`` = sinusoids of width
  ``timestep_channels`` (= the width, 1280) in ``[sin, cos]`` order (``flip_sin_to_cos=False``, shift 0), then
  ``time_proj`` = Linear(width, 4 width) -> exact GELU -> Linear(4 width, width); it conditions every block
  through AdaLN. There is no pooled vector and no guidance embedding. The timestep is ``1000 * sigma``
  (`loom.models.flow`; upstream trains on the scheduler's integer timesteps and samples with
  FlowMatchEulerDiscreteScheduler's float ones, the target being ``noise - x0``). No positional encoding
  (upstream passes ``image_rotary_emb=None``): a VecSet is a set.
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
- Sizes (`Shape4DDiTConfig.paper`, the default): the release's width 1280 (20 heads x 64), 12 dual + 24 single
  blocks (so 36 spatiotemporal layers), 64 latent channels, DINOv2-L image tokens (1,370 x 1,024 at 518 px), and
  the paper's 1,024 latents per frame (the release samples 2,048). That base is the released one, 1,316,287,808
  parameters (tested against upstream's key list); the 36 spatiotemporal layers add 0.89 B. ``num_latents`` is
  only the sampler's default; the network takes any Q.
- Image features (`ImageFeatures`, `load_image_features`): DINOv2-with-registers-large at 518 px, as the
  release (``configs/train-geometry-diffusion/step1x-3d-geometry-1300m.yaml``:
  ``facebook/dinov2-with-registers-large``, ``image_size: 518``), transformers' ``Dinov2WithRegistersModel``
  from a LOCAL folder, frozen;
  ``last_hidden_state`` (final LayerNorm applied) with the register tokens dropped (upstream's
  ``Dinov2Encoder.encode_image``): CLS + 37 x 37 patch tokens = 1,370 x 1,024. A plain ``Dinov2Model`` folder is
  accepted too (it has no registers). Computed under ``no_grad`` (not ``inference_mode``, whose tensors autograd
  refuses). Preprocessing is upstream's training path: the RGBA frame composited over white (its data module's
  ``background_color``), then its ``transform_dino``: resize the shorter side to 518 (bicubic, antialiased), centre
  crop 518 x 518, ImageNet normalisation (no clamping, as torchvision's float path). Upstream's data module also
  re-frames each image around its alpha bounding box (foreground ratio 0.9, then 512 px); Loom leaves framing to the
  renders (a per-frame re-framing would make the object's scale jitter across a sequence). The unconditional
  tokens are zeros (upstream's ``zero_uncond_embeds``), as `loom.models.shape4d_flow` uses them.
- Loading: `Shape4DDiT.from_pretrained(dir, spatiotemporal=True)` takes a released Step1X-3D folder (the
  ``transformer/`` folder, or the release folder above it) or a folder `save_pretrained` wrote, and turns a base
  (no spatiotemporal layers) into the 4D model with fresh, zero-initialised layers; every other mismatch between
  weights and config is refused.

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
# A released Step1X-3D DiT folder (``<release>/transformer/``): config.json (FluxDenoiser.Config) + these weights,
# whose keys are ours under the FluxDenoiser wrapper's attribute name.
RELEASED_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
RELEASED_PREFIX = "dit_model."
# FluxDenoiser.Config (with BaseModule's ``weights``): every field with upstream's default, which is what a
# config.json that leaves it out means.
_STEP1X3D_DEFAULTS = dict(
    weights=None, pretrained_model_name_or_path=None, input_channels=32, width=768, layers=12, num_single_layers=12,
    num_heads=16, condition_dim=1024, multi_condition_type="in_context", use_visual_condition=False,
    visual_condition_dim=1024, n_views=1, use_caption_condition=False, caption_condition_dim=1024,
    use_label_condition=False, label_condition_dim=1024, identity_init=False)
# upstream fields that would change the network into one Loom does not build: the value the release uses, and why
_STEP1X3D_REQUIRED = dict(
    multi_condition_type=("in_context", "conditions concatenated as tokens"),
    use_visual_condition=(True, "conditioned on the image"),
    use_caption_condition=(False, "no caption tokens (Loom conditions on DINOv2 image tokens only)"),
    use_label_condition=(False, "no label tokens (the Step1X-3D-Geometry-Label-1300m model is not supported)"))


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
    timestep_channels: int | None = None  # sinusoidal timestep features; None: the width (Step1X-3D's)
    spatiotemporal: bool = True  # False: the per-frame base model alone
    temporal: str = "full"  # "full": all tokens of all frames; "1d": each token index along time only
    st_image_tokens: bool = True  # image tokens take part in the spatiotemporal attention
    rope_theta: float = 10000.0  # base of the frame-index RoPE
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS

    def __post_init__(self):
        for name in ("latent_channels", "num_latents", "image_dim", "num_attention_heads", "attention_head_dim",
                     "timestep_channels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"Shape4DDiTConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("num_dual_blocks", "num_single_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"Shape4DDiTConfig.{name}={getattr(self, name)} must be >= 0")
        if self.attention_head_dim % 2:
            raise ValueError(f"Shape4DDiTConfig.attention_head_dim={self.attention_head_dim} must be even (RoPE "
                             "rotates pairs of channels)")
        if self.timestep_channels is not None and self.timestep_channels % 2:
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

    @property
    def time_channels(self) -> int:
        return self.timestep_channels or self.width

    @classmethod
    def paper(cls, **overrides) -> Shape4DDiTConfig:
        """16 frames x 1,024 latents, width 1280, 12 dual + 24 single blocks, DINOv2-L tokens (benchmarks only:
        2.20 B parameters: the released 1.32 B base and 0.89 B in the 36 spatiotemporal layers)."""
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

    @classmethod
    def from_step1x3d(cls, d: dict, source: str = "config", **overrides) -> Shape4DDiTConfig:
        """The base config of a Step1X-3D ``FluxDenoiser`` config.json (``<release>/transformer/config.json``; missing
        fields take upstream's defaults), without spatiotemporal layers; ``overrides`` set Loom's own fields.
        Options that change the network into one Loom does not build are refused."""
        unknown = sorted(set(d) - set(_STEP1X3D_DEFAULTS))
        if unknown:
            raise ValueError(f"{source}: unknown Step1X-3D DiT config fields {unknown}: is it a FluxDenoiser "
                             "config.json (Step1X-3D-Geometry-1300m/transformer/config.json)?")
        full = {**_STEP1X3D_DEFAULTS, **d}
        for name, (want, what) in _STEP1X3D_REQUIRED.items():
            if full[name] != want:
                raise ValueError(f"{source}: {name}={full[name]!r} is not supported; Loom builds the released "
                                 f"network, {name}={want!r} ({what})")
        if full["visual_condition_dim"] != full["condition_dim"]:
            raise ValueError(f"{source}: visual_condition_dim={full['visual_condition_dim']} != condition_dim="
                             f"{full['condition_dim']} (an RMSNorm + Linear condition projector) is not supported: "
                             "the release feeds DINOv2 tokens straight to proj_cross_attention")
        if full["width"] % full["num_heads"]:
            raise ValueError(f"{source}: width={full['width']} is not divisible by num_heads={full['num_heads']}")
        base = dict(latent_channels=full["input_channels"], image_dim=full["condition_dim"],
                    num_attention_heads=full["num_heads"], attention_head_dim=full["width"] // full["num_heads"],
                    num_dual_blocks=full["layers"], num_single_blocks=full["num_single_layers"],
                    timestep_channels=None, spatiotemporal=False)
        return cls.from_dict({**base, **overrides}, source=source)


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
        # Upstream's names (FluxTransformer1DModel) and layout: ``time_embed`` holds the (weightless) sinusoids and
        # ``time_proj`` the MLP, the other way round from diffusers' Flux; the MLP's hidden width is 4x and its
        # activation the exact GELU.
        self.time_embed = Timesteps(config.time_channels, flip_sin_to_cos=False, downscale_freq_shift=0)
        self.time_proj = TimestepEmbedding(config.time_channels, 4 * dim, act_fn="gelu", out_dim=dim)
        self.proj_in = nn.Linear(config.latent_channels, dim)
        self.proj_cross_attention = nn.Linear(config.image_dim, dim)
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
        return self.proj_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_in.weight.device

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
        temb = self.time_proj(self.time_embed(timestep.to(self.device)).to(dtype))  # (B, D)
        temb_frames = temb.repeat_interleave(t, 0)  # (B*T, D): the base sees each frame as its own shape
        hidden = self.proj_in(x.reshape(b * t, q, c).to(dtype))  # (B*T, Q, D)
        context = self.proj_cross_attention(img.reshape(b * t, img.shape[2], img.shape[3]).to(dtype))  # (B*T, L, D)
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
        """Load, from a local directory, a released Step1X-3D DiT (its ``transformer/`` folder: ``config.json`` +
        ``diffusion_pytorch_model.safetensors``, or the release folder above it, ``Step1X-3D-Geometry-1300m``) or
        what `save_pretrained` wrote, with config ``overrides``. Loading a base (the release, or a folder saved with
        ``spatiotemporal=False``) with ``spatiotemporal=True`` adds fresh zero-initialised spatiotemporal layers
        (the start of 4D training); ``spatiotemporal=False`` on a 4D checkpoint drops them. Any other mismatch
        between weights and config (a key missing, unexpected or of another shape) is an error."""
        path = os.fspath(path)
        released = _released_folder(path)
        if released is None:
            raw, state = read_folder(path, cls.__name__, "shape DiT")
            saved = Shape4DDiTConfig.from_dict(raw, source=os.path.join(path, CONFIG_NAME))
        else:
            from safetensors.torch import load_file

            source = os.path.join(released, CONFIG_NAME)
            with open(source) as f:
                saved = Shape4DDiTConfig.from_step1x3d(json.load(f), source=source)
            raw_state = load_file(os.path.join(released, RELEASED_WEIGHTS_NAME))
            foreign = sorted(k for k in raw_state if not k.startswith(RELEASED_PREFIX))
            if foreign:
                raise ValueError(f"{released!r}: weights outside the FluxDenoiser's {RELEASED_PREFIX!r} "
                                 f"({len(foreign)}, e.g. {foreign[:4]}): a condition projector or another model?")
            state = {k[len(RELEASED_PREFIX):]: v for k, v in raw_state.items()}
            path = released
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


def _released_folder(path: str) -> str | None:
    """The released-layout DiT folder at ``path`` or ``path/transformer`` (config.json +
    diffusion_pytorch_model.safetensors), or None (a Loom folder, or nothing: `read_folder` says what is wrong)."""
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        return None
    for folder in (path, os.path.join(path, "transformer")):
        if all(os.path.isfile(os.path.join(folder, n)) for n in (CONFIG_NAME, RELEASED_WEIGHTS_NAME)):
            return folder
    return None


# ---------------------------------------------------------------------------------------------------- image features


class ImageFeatures(nn.Module):
    """A frozen DINOv2 (with registers, or plain) giving ``last_hidden_state`` without the register tokens (CLS +
    patch tokens) per frame, preprocessed as Step1X-3D does. Build with `load_image_features` (local folder) or
    `tiny` (random, for tests)."""

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
        self.registers = int(getattr(cfg, "num_register_tokens", 0) or 0)  # dropped from the output
        self.tokens = (self.image_size // patch) ** 2 + 1
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def preprocessing(self) -> str:
        """What `encode` does to a frame and which tokens it keeps, for caches to record beside the features."""
        grey = round(self.background * 255)
        return (f"Step1X-3D transform_dino: alpha over ({grey}, {grey}, {grey}), bicubic antialiased shortest edge "
                f"{self.image_size}, centre crop, ImageNet mean/std, no clamp; last_hidden_state CLS + patch tokens"
                f"{f' ({self.registers} register tokens dropped)' if self.registers else ''}")

    def preprocess(self, frames) -> torch.Tensor:
        """(N, H, W, 3 or 4) uint8 (straight alpha) -> (N, 3, S, S) normalised pixels."""
        a = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if a.ndim != 4 or a.shape[-1] not in (3, 4) or a.dtype != np.uint8:
            raise ValueError(f"frames must be (N, H, W, 3 or 4) uint8, got {a.shape} {a.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3|4, H, W)
        if x.shape[1] == 4:
            alpha = x[:, 3:]
            x = x[:, :3] * alpha + self.background * (1.0 - alpha)
        # Step1X-3D's transform_dino: torchvision Resize(S, bicubic, antialias) (shorter side to S, the longer
        # one truncated to int(S * long / short)), CenterCrop(S) (offsets rounded), Normalize; float pixels are
        # not clamped after the bicubic resize, as torchvision does not clamp them.
        s = self.image_size
        h, w = x.shape[-2:]
        size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        if size != (h, w):
            x = nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
        x = x[..., top: top + s, left: left + s]
        return (x - self.mean) / self.std

    @torch.no_grad()  # not inference_mode: the features feed a DiT that is trained under autograd
    def encode(self, frames) -> torch.Tensor:
        """(..., H, W, 3 or 4) uint8 frames (e.g. a shard's video (T, H, W, 4)) -> (..., L, D) float32."""
        a = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if a.ndim < 4:
            raise ValueError(f"frames must be (..., H, W, C) with at least one leading dimension, got {a.shape}")
        lead = a.shape[:-3]
        px = self.preprocess(a.reshape(-1, *a.shape[-3:])).to(device=self.device, dtype=self.dtype)
        out = self.model(pixel_values=px).last_hidden_state.float()  # (N, 1 + R + P, D)
        if self.registers:  # Step1X-3D's Dinov2Encoder.encode_image: CLS, then the patch tokens
            out = torch.cat([out[:, :1], out[:, 1 + self.registers:]], dim=1)  # (N, 1 + P, D)
        return out.reshape(*lead, *out.shape[1:])

    @classmethod
    def tiny(cls, seed: int = 0, hidden_size: int = 24, image_size: int = 28, num_register_tokens: int = 0,
             **config) -> ImageFeatures:
        """A random 1-layer DINOv2 (5 tokens of width 24 at 28 px by default); with ``num_register_tokens`` > 0 the
        with-registers variant (the release's kind), whose registers are dropped from the output."""
        import transformers

        cfg = {**dict(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=2 * hidden_size, image_size=image_size, patch_size=14), **config}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if num_register_tokens:
                return cls(transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
                    num_register_tokens=num_register_tokens, **cfg)))
            return cls(transformers.Dinov2Model(transformers.Dinov2Config(**cfg)))


def load_image_features(path: str, dtype: str = "float32", device: str = "cpu", image_size: int | None = None,
                        background: float = 1.0) -> ImageFeatures:
    """A frozen DINOv2 from a LOCAL transformers folder (config.json + weights): Step1X-3D's
    ``facebook/dinov2-with-registers-large`` (``Dinov2WithRegistersModel``; its 4 registers are dropped) copied to
    disk, or a plain ``Dinov2Model``; ``image_size`` defaults to the config's (518 for both: 1,370 tokens)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"DINOv2 directory {path!r} does not exist: point it at a local transformers "
                                "Dinov2WithRegistersModel or Dinov2Model folder (config.json + model.safetensors), "
                                "e.g. facebook/dinov2-with-registers-large; nothing is downloaded")
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
