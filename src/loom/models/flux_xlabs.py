"""XLabs' Flux checkpoints ("x-flux") in diffusers: the HED ControlNet and the LoRAs of VideoFrom3D's Sparse
Anchor-view Generation (SAG, section 3.2), mapped key by key onto ``FluxControlNetModel`` / ``FluxTransformer2DModel``.

The authors run XLabs' own Flux code (vendored in their ``src/flux``) with ``flux-hed-controlnet-v3.safetensors``
and LoRAs trained by x-flux's attention processors, rank 16, on every double block and on single blocks 1-4 of the
DiT and on both double blocks of the ControlNet (their ``configs/distribution_alignment.yaml``: ``double_blocks:
null`` means all; the ControlNet has no single blocks). Loom runs diffusers' networks instead; this module is the
mapping, checked against the upstream code at tiny size (tests/fixtures/xflux_upstream: outputs equal to ~1e-5).

x-flux ControlNet (``ControlNetFlux``) -> ``FluxControlNetModel(patch_size=2, num_single_layers=0,
conditioning_embedding_channels=16)``::

    img_in, txt_in                          -> x_embedder, context_embedder
    time_in / vector_in / guidance_in       -> time_text_embed.{timestep,text,guidance}_embedder (in/out_layer ->
                                               linear_1/linear_2)
    double_blocks.N                         -> transformer_blocks.N (qkv split into to_q/to_k/to_v and
                                               add_q_proj/add_k_proj/add_v_proj; *_mod.lin -> norm1(_context).linear;
                                               RMSNorm .scale -> .weight; proj -> to_out.0 / to_add_out; mlp -> ff)
    controlnet_blocks.N                     -> controlnet_blocks.N
    pos_embed_input                         -> controlnet_x_embedder
    input_hint_block.{0,2,4,...,12,14}      -> input_hint_block.{conv_in, blocks.0..5, conv_out}

The hint encoder is the same network in both (3 -> 16 channels, three stride-2 convolutions with SiLU between, so
the control image is encoded at 1/8 of its size, i.e. the latent grid, then packed 2x2 like the latents: hence
``patch_size=2``). The control image goes in as RGB in [-1, 1] at the output resolution (:func:`control_image`).

Design choices and the differences that matter at inference:

- **Residual reuse.** x-flux's DiT adds ControlNet residual ``index % 2`` after double block ``index`` (hard-coded
  2; nothing after single blocks); diffusers does that with ``controlnet_blocks_repeat=True`` (``% len``), which the
  diffusers pipelines pick when the ControlNet has an ``input_hint_block``. Same for depth 2 (every XLabs v3
  ControlNet, and the depth the authors build); a deeper one would use only residuals 0 and 1 under x-flux.
- **Control weight** = diffusers' ``conditioning_scale`` (both multiply the residuals).
- **LoRA.** x-flux's processors add ``up(down(x))`` to a fused projection; diffusers/peft put ``lora_B @ lora_A``
  on each unfused ``Linear``. A fused qkv LoRA maps exactly: its ``down`` is shared by to_q, to_k and to_v (each gets
  a copy as ``lora_A``) and its ``up`` rows split in three (``lora_B``). The single block's qkv LoRA covers only the
  3*hidden qkv rows of ``linear1`` (``proj_mlp`` gets none, as in x-flux); its ``proj_lora`` acts on
  cat(attention, MLP activation) exactly like ``linear2`` = ``proj_out``. Double blocks: ``qkv_lora1/proj_lora1``
  (image stream) -> to_q/k/v and to_out.0, ``qkv_lora2/proj_lora2`` (text stream) -> add_q/k/v_proj and
  to_add_out; x-flux gates the proj LoRA with the block's gate as diffusers gates to_out. Nothing of these
  processors is lost. Not mapped (refused, naming the key): x-flux's IP-adapter processors, and anything else.
  x-flux files carry no alpha; x-flux's ``network_alpha`` is ``None`` in the authors' training, i.e. scale 1, which
  is what peft gets (``lora_alpha`` = rank).
- **LoRA weight is squared in x-flux.** The authors' ``update_model_with_lora`` multiplies *both* the down and the
  up matrices by ``--lora_weight`` before loading them, so the update scales by its square (their default 1.0 hides
  it). :func:`convert_xlabs_lora` takes the same ``lora_weight`` and does the same, so a number copied from the
  authors' command means what it meant there.
- **Strict.** Converters refuse keys they do not know; loaders load with every key matched, and read safetensors
  only (a pickle is never unpickled).

:func:`convert_flux_transformer` maps the BFL/x-flux layout of the DiT itself (also ``final_layer``: its
adaLN (shift, scale) is diffusers' (scale, shift)), for tests and single files; diffusers' own converter hard-codes
FLUX.1's width.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np
    import torch
    from diffusers import FluxControlNetModel

FLUX_AXES = (16, 56, 56)  # FLUX.1's rope axes (head dim 128); not recorded in a state dict
LORA_TARGETS = ("transformer", "controlnet")

_EMBED = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out", "norm.query_norm": "attn.norm_q",
           "norm.key_norm": "attn.norm_k"}
_SINGLE_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
# x-flux's nn.Sequential (convolution, SiLU, ...) -> diffusers' ControlNetConditioningEmbedding
_HINT = {0: "conv_in", 2: "blocks.0", 4: "blocks.1", 6: "blocks.2", 8: "blocks.3", 10: "blocks.4", 12: "blocks.5",
         14: "conv_out"}
_LORA = {  # x-flux processor module -> diffusers Linear(s) (a tuple: the fused LoRA's up rows split over them)
    "double": {"qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"), "proj_lora1": ("attn.to_out.0",),
               "qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
               "proj_lora2": ("attn.to_add_out",)},
    "single": {"qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"), "proj_lora": ("proj_out",)},
}


def _leaf(leaf: str) -> str:
    return "weight" if leaf == "scale" else leaf  # x-flux's RMSNorm parameter is called scale


def _block_key(key: str, value: "torch.Tensor", hidden: int) -> dict | None:
    """One x-flux double/single-block parameter -> its diffusers parameter(s); None when unknown."""
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)\.(weight|bias|scale)", key)
    if m is None:
        return None
    kind, i, sub, leaf = m.groups()
    if kind == "double":
        prefix = f"transformer_blocks.{i}"
        if sub in _DOUBLE:
            return {f"{prefix}.{_DOUBLE[sub]}.{_leaf(leaf)}": value}
        if sub in _DOUBLE_QKV and leaf != "scale":  # rows: q, k, v
            return dict(zip((f"{prefix}.{n}.{leaf}" for n in _DOUBLE_QKV[sub]), value.chunk(3, 0)))
        return None
    prefix = f"single_transformer_blocks.{i}"
    if sub in _SINGLE:
        return {f"{prefix}.{_SINGLE[sub]}.{_leaf(leaf)}": value}
    if sub == "linear1" and leaf != "scale":  # rows: q, k, v (hidden each), then the MLP input
        parts = value.split([hidden, hidden, hidden, value.shape[0] - 3 * hidden], 0)
        return dict(zip((f"{prefix}.{n}.{leaf}" for n in _SINGLE_LINEAR1), parts))
    return None


def _refuse(unknown: list[str], what: str) -> None:
    if not unknown:
        return
    lora = [k for k in unknown if ".processor." in k]
    hint = (f" ({len(lora)} are x-flux LoRA/IP-adapter processor weights: load a LoRA with convert_xlabs_lora)"
            if lora else "")
    raise ValueError(f"not an x-flux {what} state dict: {len(unknown)} unknown keys, e.g. {sorted(unknown)[:5]}"
                     f"{hint}")


def _convert(state_dict: Mapping[str, "torch.Tensor"], what: str) -> dict:
    import torch

    hidden = _get(state_dict, "img_in.weight", what).shape[0]
    controlnet = what == "ControlNet"
    out, unknown = {}, []
    for key, value in state_dict.items():
        name, _, leaf = key.rpartition(".")
        hint = re.fullmatch(r"input_hint_block\.(\d+)", name)
        mapped = None
        if name in _EMBED:
            mapped = {f"{_EMBED[name]}.{leaf}": value}
        elif key.startswith("double_blocks.") or (key.startswith("single_blocks.") and not controlnet):
            mapped = _block_key(key, value, hidden)
        elif controlnet and re.fullmatch(r"controlnet_blocks\.\d+", name):
            mapped = {key: value}
        elif controlnet and name == "pos_embed_input":
            mapped = {f"controlnet_x_embedder.{leaf}": value}
        elif controlnet and hint and int(hint.group(1)) in _HINT:
            mapped = {f"input_hint_block.{_HINT[int(hint.group(1))]}.{leaf}": value}
        elif not controlnet and name == "final_layer.linear":
            mapped = {f"proj_out.{leaf}": value}
        elif not controlnet and name == "final_layer.adaLN_modulation.1":
            shift, scale = value.chunk(2, 0)  # x-flux's LastLayer reads (shift, scale); diffusers' (scale, shift)
            mapped = {f"norm_out.linear.{leaf}": torch.cat([scale, shift], 0)}
        if mapped is None:
            unknown.append(key)
        else:
            out.update(mapped)
    _refuse(unknown, what)
    return out


def convert_xlabs_controlnet(state_dict: Mapping[str, "torch.Tensor"]) -> dict:
    """x-flux ``ControlNetFlux`` state dict (e.g. ``flux-hed-controlnet-v3.safetensors``) -> ``FluxControlNetModel``
    state dict for :func:`xlabs_controlnet_config`'s model (module docstring: the mapping). Unknown keys are refused;
    missing ones show when the result is loaded strictly (:func:`load_xlabs_controlnet`)."""
    return _convert(state_dict, "ControlNet")


def convert_flux_transformer(state_dict: Mapping[str, "torch.Tensor"]) -> dict:
    """BFL/x-flux ``Flux`` DiT state dict (``flux1-dev.safetensors`` layout) -> ``FluxTransformer2DModel`` state
    dict, at any width (diffusers' single-file converter assumes FLUX.1's 3072)."""
    state = {k.removeprefix("model.diffusion_model."): v for k, v in state_dict.items()}
    return _convert(state, "DiT")


def _get(sd: Mapping, key: str, what: str):
    if key not in sd:
        raise ValueError(f"not an x-flux {what} state dict: no {key!r}")
    return sd[key]


def _common_config(sd: Mapping, what: str, axes_dims_rope: Sequence[int]) -> dict:
    hidden, in_channels = _get(sd, "img_in.weight", what).shape
    head_dim = _get(sd, "double_blocks.0.img_attn.norm.query_norm.scale", what).shape[0]
    mlp = _get(sd, "double_blocks.0.img_mlp.0.weight", what).shape[0]
    if mlp != 4 * hidden:
        raise ValueError(f"x-flux {what}: MLP width {mlp} is not 4 x hidden {hidden}; diffusers' Flux blocks fix "
                         "mlp_ratio 4")
    if "double_blocks.0.img_attn.qkv.bias" not in sd:
        raise ValueError(f"x-flux {what}: qkv without bias (qkv_bias=False); diffusers' Flux attention has biases")
    if sum(axes_dims_rope) != head_dim:
        raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} sums to {sum(axes_dims_rope)}, not the head dim "
                         f"{head_dim} of this {what}; pass the rope axes it was trained with (FLUX.1: {FLUX_AXES})")
    depth = len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")})
    return dict(in_channels=int(in_channels), num_layers=depth, attention_head_dim=int(head_dim),
                num_attention_heads=int(hidden // head_dim),
                joint_attention_dim=int(_get(sd, "txt_in.weight", what).shape[1]),
                pooled_projection_dim=int(_get(sd, "vector_in.in_layer.weight", what).shape[1]),
                guidance_embeds="guidance_in.in_layer.weight" in sd, axes_dims_rope=tuple(axes_dims_rope))


def xlabs_controlnet_config(state_dict: Mapping[str, "torch.Tensor"], axes_dims_rope: Sequence[int] = FLUX_AXES
                            ) -> dict:
    """``FluxControlNetModel(**config)`` for an x-flux ControlNet state dict (x-flux layout): depth = number of
    double blocks, hidden size from ``img_in``, head dim from the RMSNorm scale, heads = hidden / head dim, the hint
    encoder's output channels; ``patch_size=2`` (the encoded hint is packed 2x2) and no single blocks."""
    config = _common_config(state_dict, "ControlNet", axes_dims_rope)
    hint_in = _get(state_dict, "input_hint_block.0.weight", "ControlNet").shape
    hint_out = _get(state_dict, "input_hint_block.14.weight", "ControlNet").shape
    if hint_in[:2] != (16, 3) or hint_out[1] != 16:
        raise ValueError(f"x-flux ControlNet: input_hint_block maps {hint_in[1]} -> {hint_in[0]} ... -> {hint_out[0]} "
                         "channels; diffusers' hint encoder is 3 -> 16 x 4 -> C")
    if config["in_channels"] != 4 * hint_out[0]:
        raise ValueError(f"x-flux ControlNet: the hint encoder gives {hint_out[0]} channels, packed 2x2 that is "
                         f"{4 * hint_out[0]}, but pos_embed_input/img_in take {config['in_channels']}")
    return dict(config, patch_size=2, num_single_layers=0, conditioning_embedding_channels=int(hint_out[0]))


def flux_transformer_config(state_dict: Mapping[str, "torch.Tensor"], axes_dims_rope: Sequence[int] = FLUX_AXES
                            ) -> dict:
    """``FluxTransformer2DModel(**config)`` for a BFL/x-flux DiT state dict (x-flux layout)."""
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in state_dict.items()}
    config = _common_config(sd, "DiT", axes_dims_rope)
    config["num_single_layers"] = len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")})
    out_channels = _get(sd, "final_layer.linear.weight", "DiT").shape[0]
    if out_channels != config["in_channels"]:
        config["out_channels"] = int(out_channels)
    return config


def read_safetensors(path: str) -> dict:
    """A ``.safetensors`` file -> {key: tensor} on CPU; anything else (a torch pickle, a folder, a missing file) is
    refused with what to do, and nothing in it runs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r}: no such file; point at the .safetensors checkpoint")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise ValueError(f"{path} is a pickle (torch.save), not safetensors; it is not opened. Convert it where you "
                         "trust it: safetensors.torch.save_file(torch.load(p, weights_only=True), 'x.safetensors')")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a safetensors file ({err}); x-flux checkpoints ship as .safetensors") from err


def load_xlabs_controlnet(path: str, *, axes_dims_rope: Sequence[int] = FLUX_AXES,
                          dtype: "torch.dtype | None" = None) -> "FluxControlNetModel":
    """An x-flux ControlNet file (``flux-hed-controlnet-v3.safetensors``) -> diffusers ``FluxControlNetModel`` in
    eval mode, every parameter from the file (built on the meta device, so nothing is initialised twice); ``dtype``
    casts (default: the file's). Use it with ``controlnet_blocks_repeat=True`` in the DiT's forward."""
    import torch
    from diffusers import FluxControlNetModel

    state = read_safetensors(path)
    try:
        config = xlabs_controlnet_config(state, axes_dims_rope)
        converted = convert_xlabs_controlnet(state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    with torch.device("meta"):
        model = FluxControlNetModel(**config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise ValueError(f"{path} does not fill FluxControlNetModel({config}): missing {len(missing)} "
                         f"{missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}; is it an x-flux ControlNet?")
    model.load_state_dict(converted, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def convert_xlabs_lora(state_dict: Mapping[str, "torch.Tensor"],
                       target: Literal["transformer", "controlnet"] = "transformer",
                       lora_weight: float = 1.0) -> dict:
    """x-flux LoRA processor weights (``double_blocks.N.processor.qkv_lora1.down.weight``, ...; an optional
    ``diffusion_model.`` prefix) -> peft/diffusers keys ``{target}.transformer_blocks.N.attn.to_q.lora_A.weight``,
    for ``model.load_lora_adapter(sd, prefix=target)`` on a ``FluxTransformer2DModel`` (target "transformer") or a
    ``FluxControlNetModel`` ("controlnet": no single blocks there). ``lora_weight`` is x-flux's, applied as x-flux's
    loader applies it: down and up each multiplied, so the update scales by its square."""
    if target not in LORA_TARGETS:
        raise ValueError(f"target={target!r}: one of {LORA_TARGETS}")
    pattern = re.compile(r"(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(\w+)\.(down|up)\.weight")
    pairs: dict[tuple, dict] = {}
    unknown = []
    for key, value in state_dict.items():
        m = pattern.fullmatch(key)
        if m is None or m.group(3) not in _LORA[m.group(1)]:
            unknown.append(key)
            continue
        kind, i, proc, side = m.groups()
        pairs.setdefault((kind, int(i), proc), {})[side] = (key, value)
    if unknown:
        raise ValueError(f"not x-flux LoRA processor weights: {len(unknown)} keys cannot be mapped, e.g. "
                         f"{sorted(unknown)[:5]} (x-flux's LoRA processors are qkv_lora1/2, proj_lora1/2 on double "
                         "blocks and qkv_lora, proj_lora on single blocks)")
    out = {}
    for (kind, i, proc), sides in sorted(pairs.items()):
        if set(sides) != {"down", "up"}:
            have = next(iter(sides.values()))[0]
            raise ValueError(f"x-flux LoRA: {have} has no {'up' if 'down' in sides else 'down'} partner")
        if kind == "single" and target == "controlnet":
            raise ValueError(f"x-flux LoRA: {sides['down'][0]} is on a single block, and an x-flux ControlNet has "
                             "none; is this the DiT's LoRA (target='transformer')?")
        down, up = sides["down"][1] * lora_weight, sides["up"][1] * lora_weight
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(f"x-flux LoRA {sides['down'][0]}: down {tuple(down.shape)} and up {tuple(up.shape)} "
                             "are not a rank-r pair")
        names = _LORA[kind][proc]
        if up.shape[0] % len(names):
            raise ValueError(f"x-flux LoRA {sides['up'][0]}: {up.shape[0]} rows do not split over {names}")
        block = f"{target}.{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{i}"
        for name, rows in zip(names, up.chunk(len(names), 0)):
            out[f"{block}.{name}.lora_A.weight"] = down.clone()
            out[f"{block}.{name}.lora_B.weight"] = rows.contiguous()
    return out


def load_xlabs_lora(model, lora: "str | Mapping[str, torch.Tensor]", *,
                    target: Literal["transformer", "controlnet"] = "transformer", adapter_name: str = "xlabs",
                    lora_weight: float = 1.0) -> str:
    """Put an x-flux LoRA (a .safetensors path or its state dict) on a diffusers Flux DiT or ControlNet as the peft
    adapter ``adapter_name`` (active; ``model.fuse_lora()`` merges it). Every converted key must find its layer."""
    state = read_safetensors(lora) if isinstance(lora, str) else lora
    where = lora if isinstance(lora, str) else "the LoRA state dict"
    try:
        converted = convert_xlabs_lora(state, target, lora_weight)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    modules = dict(model.named_modules())
    absent = sorted({k.removeprefix(f"{target}.").rsplit(".lora_", 1)[0] for k in converted} - set(modules))
    if absent:
        raise ValueError(f"{where}: {len(absent)} LoRA layers are not in this {type(model).__name__}, e.g. "
                         f"{absent[:4]} (wrong target, or a LoRA for a deeper model)")
    model.load_lora_adapter(converted, prefix=target, adapter_name=adapter_name)
    return adapter_name


def control_image(image: "np.ndarray") -> "torch.Tensor":
    """The control image as x-flux feeds it (the authors' ``call``: ``image / 127.5 - 1``, CHW): (H,W,3) or (H,W)
    uint8 -> (1,3,H,W) float32 in [-1, 1]. H and W must be multiples of 16 (the VAE's 8 x the 2x2 packing)."""
    import numpy as np
    import torch

    if image.dtype != np.uint8:
        raise ValueError(f"control image: uint8 expected, got {image.dtype}")
    rgb = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] % 16 or rgb.shape[1] % 16:
        raise ValueError(f"control image: (H,W,3) with H, W multiples of 16 expected, got {image.shape}")
    return torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None].contiguous()
