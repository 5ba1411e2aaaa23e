"""Wan2.1-Fun-V1.1-Control as VideoX-Fun releases it, read directly: the transformer with V1.1's reference path
(`WanFunTransformer3DModel`), the release folder's transformer (`load_wan_fun_transformer`) and its
``Wan2.1_VAE.pth`` (`load_wan_vae_checkpoint`). No conversion step and no second copy on disk.

The release (``alibaba-pai/Wan2.1-Fun-V1.1-1.3B-Control``, ``...-14B-Control``) is one folder::

    config.json                            original Wan names: dim, num_heads, in_dim=48, out_dim, ffn_dim, ...
    diffusion_pytorch_model.safetensors    original Wan keys (blocks.N.self_attn.q, head.head, img_emb.proj.1, ...)
    Wan2.1_VAE.pth                         a pickled state dict with the original Wan VAE keys
    models_t5_umt5-xxl-enc-bf16.pth, models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
    google/umt5-xxl/, xlm-roberta-large/   tokenizers

Design choices:

- The network is diffusers' ``WanTransformer3DModel`` (its blocks, RoPE, condition embedder, output head), plus
  V1.1's ``ref_conv``; original Wan keys are renamed by diffusers' own converter
  (``convert_wan_transformer_to_diffusers``, the function ``from_single_file`` uses), and the VAE's by
  ``convert_wan_vae_to_diffusers``. ``from_single_file`` itself is not used: it would fetch a config from the Hub and
  guess a 16-channel text-to-video model from the keys. The diffusers config is derived here from the release's
  ``config.json`` and checked against the shapes in the safetensors header (read before any weight is), so a
  release of another size (14B: dim 5120, 40 heads, 40 layers) loads the same way and a mismatch is named.
- Loading is strict: every tensor of the file is used and every parameter of the model, ``ref_conv`` included, is
  filled, or loading stops and names the keys. The model is built without allocating its weights
  (``accelerate.init_empty_weights``) and the file's tensors are assigned to it, so the 14B release (28 GB in
  bf16) needs its size in memory once, not twice. The modules diffusers keeps in float32 (``_keep_in_fp32_modules``)
  are kept in float32 as ``from_pretrained`` does.
- The reference path (VideoX-Fun ``videox_fun/models/wan_transformer3d.py``, ``WanTransformer3DModel.forward``,
  ``full_ref``): ``ref_conv`` (Conv2d ref_channels -> dim, kernel = stride = the spatial patch) turns ONE
  reference-frame latent (B, 16, H, W) into h*w tokens, which are put before the video tokens as latent frame 0:
  RoPE runs over F + 1 frames, the reference at temporal position 0 and video frame i at position i + 1. The
  reference tokens pass through every block (self-attention with the video tokens, cross-attention, FFN) and are
  dropped after the output projection. A model with ``ref_conv`` always carries the reference tokens: with no
  reference they are ``ref_conv`` of a zero latent, which is what VideoX-Fun's pipeline feeds
  (``pipeline_wan_fun_control.py``: ``ref_image_latentes = torch.zeros_like(latents)[:, :, 0]``) and what its
  training feeds when the reference is dropped. ``ref_channels=None`` builds a model without the path, equal to
  diffusers' ``WanTransformer3DModel``.
- Only Wan2.1's per-sample timestep (B,) is supported (Wan2.2's per-token timesteps are refused).
- The VAE: ``Wan2.1_VAE.pth`` is read with ``torch.load(weights_only=True)`` (tensors only, never arbitrary
  unpickling). Its base width and latent channels come from the weights; every other hyper-parameter is the
  Wan2.1 VAE's (diffusers' ``AutoencoderKLWan`` defaults, which the key converter assumes), so a VAE of another
  structure fails the strict load with a message that says so. Its latent mean/std are Wan2.1's (16 channels).

Shapes (transformer)::

    hidden_states   (B, in_channels, F, H, W)   noisy + control + start-image latents (48 = 3 x 16)
    timestep        (B,)                        t = 1000 * sigma
    encoder_hidden_states        (B, 512, text_dim)
    encoder_hidden_states_image  (B, 257, image_dim) or None
    ref_latent      (B, ref_channels, H, W) or None (zeros)
    -> (B, out_channels, F, H, W)

Single-device code: no torch.distributed, DeepSpeed, Lightning or Ray here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

try:  # diffusers is imported at module level: this file is only imported by code that builds the video DiT
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(f"loom.models.wan_fun needs diffusers (pip install 'loom[eval]' or 'loom[train]'): {e}") from e
try:  # the decorator diffusers' own Wan forward uses for attention_kwargs={"scale": s} (LoRA scale)
    from diffusers.utils import apply_lora_scale
except ImportError:  # diffusers releases before it: the same, by hand
    import functools

    def apply_lora_scale(kwargs_name):
        from diffusers.utils import scale_lora_layers, unscale_lora_layers

        def decorator(forward):
            @functools.wraps(forward)
            def wrapper(self, *args, **kwargs):
                extra = dict(kwargs.get(kwargs_name) or {})
                scale = extra.pop("scale", 1.0)
                kwargs[kwargs_name] = extra
                scale_lora_layers(self, scale)
                try:
                    return forward(self, *args, **kwargs)
                finally:
                    unscale_lora_layers(self, scale)
            return wrapper
        return decorator


RELEASE_WEIGHTS = "diffusion_pytorch_model.safetensors"
RELEASE_INDEX = RELEASE_WEIGHTS + ".index.json"
RELEASE_VAE = "Wan2.1_VAE.pth"
TEXT_LEN = 512  # diffusers' Wan attention splits [image, text] assuming 512 text tokens
ROPE_MAX_SEQ_LEN = 1024  # Wan's RoPE table length (rope_params(1024, ...))
# Keys a Wan transformer config.json names its width by: original Wan (the release) vs diffusers.
_WAN_CONFIG_KEYS = {"dim", "num_heads", "in_dim"}
_DIFFUSERS_CONFIG_KEYS = {"num_attention_heads", "attention_head_dim", "in_channels"}


class WanFunTransformer3DModel(WanTransformer3DModel):
    """diffusers' ``WanTransformer3DModel`` with Wan2.1-Fun-V1.1's reference path (``ref_conv``, see the module
    docstring); ``ref_channels=None`` is the plain model."""

    _skip_layerwise_casting_patterns = [*WanTransformer3DModel._skip_layerwise_casting_patterns, "ref_conv"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        ref_channels: int | None = None,
    ) -> None:
        # The parent's arguments are repeated because diffusers' ConfigMixin reads a model's config keys from its
        # own __init__ signature.
        super().__init__(patch_size=patch_size, num_attention_heads=num_attention_heads,
                         attention_head_dim=attention_head_dim, in_channels=in_channels, out_channels=out_channels,
                         text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=num_layers,
                         cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps, image_dim=image_dim,
                         added_kv_proj_dim=added_kv_proj_dim, rope_max_seq_len=rope_max_seq_len,
                         pos_embed_seq_len=pos_embed_seq_len)
        self.ref_conv = None
        if ref_channels is not None:
            inner_dim = num_attention_heads * attention_head_dim
            self.ref_conv = nn.Conv2d(ref_channels, inner_dim, kernel_size=patch_size[1:], stride=patch_size[1:])

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        ref_latent: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
    ):
        """diffusers' Wan forward with the reference tokens first (shapes in the module docstring); ``ref_latent``
        only for a model with ``ref_conv`` (None: zeros)."""
        b, _, f, h, w = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        pf, ph, pw = f // p_t, h // p_h, w // p_w
        if timestep.ndim != 1:
            raise ValueError(f"timestep must be (B,) (Wan2.1: one t per sample), got {tuple(timestep.shape)}")

        x = self.patch_embedding(hidden_states)  # (B, D, F', H', W')
        n_ref = 0
        if self.ref_conv is not None:
            if ref_latent is None:  # no reference: a zero latent, as VideoX-Fun's pipeline feeds
                ref_latent = hidden_states.new_zeros(b, self.config.ref_channels, h, w)
            if ref_latent.shape != (b, self.config.ref_channels, h, w):
                raise ValueError(f"ref_latent must be {(b, self.config.ref_channels, h, w)} (one latent frame), got "
                                 f"{tuple(ref_latent.shape)}")
            ref = self.ref_conv(ref_latent.to(x.dtype))  # (B, D, H', W')
            x = torch.cat([ref.unsqueeze(2), x], dim=2)  # (B, D, 1 + F', H', W'): the reference is frame 0
            n_ref = ph * pw
        elif ref_latent is not None:
            raise ValueError("this transformer has no ref_conv (ref_channels=None): pass ref_latent=None")
        # RoPE reads only the shape of its input: the grid, reference frame included, before patching.
        rotary_emb = self.rope(torch.empty((b, 0, x.shape[2] * p_t, h, w), device="meta"))
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, L, D), L = (n_ref_frames + F') H' W'

        temb, timestep_proj, context, context_image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))  # (B, 6, D)
        if context_image is not None:
            context = torch.cat([context_image, context], dim=1)  # (B, L_img + 512, D)

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, context, timestep_proj, rotary_emb)
            else:
                x = block(x, context, timestep_proj, rotary_emb)

        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)[:, n_ref:]  # (B, F' H' W', p_t p_h p_w C): reference tokens dropped
        x = x.reshape(b, pf, ph, pw, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


# ---------------------------------------------------------------------------------------------- the release


def transformer_layout(path: str) -> str:
    """``"release"`` (original Wan config names: VideoX-Fun's release folder) or ``"diffusers"`` for a transformer
    folder; refuses anything else, naming what it found."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"transformer directory {path!r} has no config.json: pass the Wan2.1-Fun release "
                                "folder itself (config.json + diffusion_pytorch_model.safetensors at its top level) or "
                                "a diffusers WanTransformer3DModel folder (for a diffusers pipeline, its 'transformer' "
                                "subfolder)")
    with open(config_path) as f:
        config = json.load(f)
    if _DIFFUSERS_CONFIG_KEYS <= config.keys():
        return "diffusers"
    if _WAN_CONFIG_KEYS <= config.keys():
        return "release"
    raise ValueError(f"{config_path}: neither a diffusers WanTransformer3DModel config (needs "
                     f"{sorted(_DIFFUSERS_CONFIG_KEYS)}) nor an original Wan config (needs "
                     f"{sorted(_WAN_CONFIG_KEYS)}); it has {sorted(config)}")


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, RELEASE_INDEX)
    if os.path.isfile(index):  # sharded: diffusion_pytorch_model-0000i-of-0000n.safetensors
        with open(index) as f:
            return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(path, RELEASE_WEIGHTS)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{path!r} has neither {RELEASE_WEIGHTS} nor {RELEASE_INDEX}: is it the complete "
                            "Wan2.1-Fun release folder? (the .safetensors file may still be downloading)")


def _header_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def release_transformer_config(wan: dict, shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """A `WanFunTransformer3DModel` config from a release's original-Wan ``config.json`` (``wan``), each size checked
    against the tensor shapes of its weights."""

    def need(key):
        if key not in shapes:
            raise ValueError(f"{source}: the weights have no {key!r}; is this a Wan2.1 transformer in the original "
                             f"Wan key layout? (it has e.g. {sorted(shapes)[:6]})")
        return shapes[key]

    def agree(name, from_weights, default=None):
        value = wan.get(name, default)
        if value is not None and value != from_weights:
            raise ValueError(f"{source}: config.json says {name}={value} but the weights have {name}={from_weights}")
        return from_weights

    dim, in_dim, *patch = need("patch_embedding.weight")
    patch = agree("patch_size", list(patch), None)
    agree("dim", dim)
    agree("in_dim", in_dim)
    num_heads = wan.get("num_heads")
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"{source}: config.json num_heads={num_heads!r} must be a positive divisor of dim={dim}")
    num_layers = agree("num_layers", len({k.split(".")[1] for k in shapes if k.startswith("blocks.")}))
    out_dim = agree("out_dim", need("head.head.weight")[0] // (patch[0] * patch[1] * patch[2]))
    ffn_dim = agree("ffn_dim", need("blocks.0.ffn.0.weight")[0])
    freq_dim = agree("freq_dim", need("time_embedding.0.weight")[1])
    text_dim = agree("text_dim", need("text_embedding.0.weight")[1])
    has_image = "img_emb.proj.0.weight" in shapes
    model_type = wan.get("model_type", "i2v" if has_image else "t2v")
    if (model_type == "i2v") != has_image:
        raise ValueError(f"{source}: config.json model_type={model_type!r} but the weights "
                         f"{'have' if has_image else 'lack'} the CLIP image branch (img_emb.*)")
    has_ref = "ref_conv.weight" in shapes
    if wan.get("add_ref_conv", has_ref) != has_ref:
        raise ValueError(f"{source}: config.json add_ref_conv={wan['add_ref_conv']} but the weights "
                         f"{'have' if has_ref else 'lack'} ref_conv.weight")
    ref_channels = agree("in_dim_ref_conv", need("ref_conv.weight")[1]) if has_ref else None
    for name, wanted in (("text_len", TEXT_LEN), ("window_size", [-1, -1]), ("qk_norm", True),
                         ("cross_attn_norm", True), ("add_control_adapter", False)):
        value = wan.get(name, wanted)
        if (list(value) if isinstance(value, (list, tuple)) else value) != wanted:
            raise ValueError(f"{source}: config.json {name}={value!r}; Loom's Wan transformer (diffusers') supports "
                             f"only {name}={wanted!r}")
    return dict(
        patch_size=tuple(patch),
        num_attention_heads=num_heads,
        attention_head_dim=dim // num_heads,
        in_channels=in_dim,
        out_channels=out_dim,
        text_dim=text_dim,
        freq_dim=freq_dim,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=float(wan.get("eps", 1e-6)),
        image_dim=need("img_emb.proj.0.weight")[0] if has_image else None,
        added_kv_proj_dim=dim if has_image else None,  # k_img/v_img read the projected (dim-wide) image tokens
        rope_max_seq_len=ROPE_MAX_SEQ_LEN,
        ref_channels=ref_channels,
    )


def _empty_weights():
    """Build a model without allocating (or randomly initialising) its parameters; buffers (RoPE tables) stay real."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # slower, twice the memory, same result
        return nullcontext()
    return init_empty_weights()


def _assign_strict(model: nn.Module, state: dict[str, torch.Tensor], torch_dtype: torch.dtype, source: str) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source} does not match {type(model).__name__} {getattr(model, 'config', '')}: "
                         f"{len(missing)} missing keys {missing[:6]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:6]}. Loom reads Wan2.1(-Fun) checkpoints only (text/image-to-video, "
                         "Fun-Control with or without V1.1's ref_conv); other variants (camera control, VACE, Wan2.2) "
                         "are refused")
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{source}: tensor shapes differ from the model's (name, file, model): {wrong[:6]}")
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    for key in list(state):
        dtype = torch.float32 if any(m in key.split(".") for m in keep_fp32) else torch_dtype
        if state[key].is_floating_point():
            state[key] = state[key].to(dtype)  # one tensor at a time: the original is freed as we go
    model.load_state_dict(state, strict=True, assign=True)


def load_wan_fun_transformer(path: str, torch_dtype: torch.dtype = torch.float32,
                             check: Callable[[dict, str], None] | None = None) -> WanFunTransformer3DModel:
    """The transformer of a Wan2.1(-Fun) release folder (original Wan names) or of a diffusers folder (a plain
    ``WanTransformer3DModel`` or a saved `WanFunTransformer3DModel`), in ``torch_dtype``, in eval mode. Local paths
    only. ``check(diffusers_config, path)`` runs before any weight is read (and may refuse the model)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors import safe_open

    path = os.fspath(path)
    layout = transformer_layout(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if layout == "diffusers":
        if check is not None:
            check(config, path)
        return WanFunTransformer3DModel.from_pretrained(path, torch_dtype=torch_dtype, local_files_only=True)
    files = _weight_files(path)
    config = release_transformer_config(config, _header_shapes(files), path)
    if check is not None:
        check(config, path)
    with _empty_weights():
        model = WanFunTransformer3DModel(**config)
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    state = convert_wan_transformer_to_diffusers(state)  # renames in place: no tensor is copied
    _assign_strict(model, state, torch_dtype, path)
    return model.eval()


def find_wan_vae_checkpoint(path: str) -> str | None:
    """The ``Wan2.1_VAE.pth`` that ``path`` names (the file itself, or a release folder holding it), else None."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith((".pth", ".pt")):
        return path
    candidate = os.path.join(path, RELEASE_VAE)
    return candidate if os.path.isfile(candidate) else None


def load_wan_vae_checkpoint(path: str, torch_dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    """diffusers' ``AutoencoderKLWan`` with the weights of an original Wan2.1 VAE file (``Wan2.1_VAE.pth``: the
    file, or a folder holding it), in ``torch_dtype``, in eval mode."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    file = find_wan_vae_checkpoint(path)
    if file is None:
        raise FileNotFoundError(f"{path!r} is neither a Wan VAE .pth file nor a folder holding {RELEASE_VAE}")
    # weights_only: tensors and plain containers only; mmap: the file is paged in, not copied (zip-format files
    # only: a legacy-format file is read whole).
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "encoder.conv1.weight" not in state or "conv2.weight" not in state:
        raise ValueError(f"{file}: not an original Wan VAE state dict (no encoder.conv1.weight / conv2.weight)")
    base_dim, z_dim = state["encoder.conv1.weight"].shape[0], state["conv2.weight"].shape[0]
    if z_dim != 16:
        raise ValueError(f"{file}: a VAE with z_dim={z_dim}; Loom reads the Wan2.1 VAE (z_dim=16, whose latent "
                         "mean/std it normalises with). For another VAE, save it as a diffusers AutoencoderKLWan "
                         "folder with its own latents_mean/latents_std")
    with _empty_weights():  # every other hyper-parameter is Wan2.1's: diffusers' defaults
        vae = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim)
    state = convert_wan_vae_to_diffusers(state)
    try:
        _assign_strict(vae, state, torch_dtype, file)
    except ValueError as e:
        raise ValueError(f"{e}. Only the Wan2.1 VAE structure (dim_mult [1, 2, 4, 4], 2 residual blocks, temporal "
                         "downsampling [False, True, True]) is read from .pth files") from None
    return vae.eval()
