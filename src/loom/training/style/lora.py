"""The LoRAs of distribution alignment on the FLUX DiT and the HED ControlNet: which Linears (x-flux's LoRA
processors in diffusers' names, `loom.models.flux_xlabs`), adding them with peft, and saving them as diffusers
reads them (`loom.inference.style.load_style_run`)."""

from __future__ import annotations

import json
import os

from loom.models.sag import CONTROLNET_LORA, TRANSFORMER_LORA

ADAPTER = "default"

# x-flux's LoRA processors in diffusers' names (loom.models.flux_xlabs): (fused q/k/v Linears, projection)
_DOUBLE = ((("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0"),
           (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.to_add_out"))
_SINGLE = ((("attn.to_q", "attn.to_k", "attn.to_v"), "proj_out"),)


def lora_groups(double: tuple[int, ...], single: tuple[int, ...]) -> list[tuple[tuple[str, ...], str]]:
    """[(q/k/v Linears sharing x-flux's fused down matrix, the projection)] of the named blocks, by module name."""
    out = []
    for i in double:
        out += [(tuple(f"transformer_blocks.{i}.{n}" for n in qkv), f"transformer_blocks.{i}.{p}")
                for qkv, p in _DOUBLE]
    for i in single:
        out += [(tuple(f"single_transformer_blocks.{i}.{n}" for n in qkv), f"single_transformer_blocks.{i}.{p}")
                for qkv, p in _SINGLE]
    return out


def add_lora(net, groups: list[tuple[tuple[str, ...], str]], lora, what: str) -> int:
    """A trainable peft LoRA (adapter ``default``) on ``net``'s layers of ``groups``: x-flux's initialisation (down
    ~ N(0, 1/rank), up = 0) and, with ``lora.tie_qkv``, one down matrix for each q/k/v triple. Returns the number of
    LoRA parameters."""
    from peft import LoraConfig

    names = [n for qkv, p in groups for n in (*qkv, p)]
    modules = dict(net.named_modules())
    absent = [n for n in names if n not in modules]
    if absent:
        raise ValueError(f"lora: {what} ({type(net).__name__}, {len(net.transformer_blocks)} double / "
                         f"{len(getattr(net, 'single_transformer_blocks', []))} single blocks) has no {absent[:3]}: "
                         "choose block indices it has")
    net.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.scale_alpha, init_lora_weights="gaussian",
                               target_modules=names), adapter_name=ADAPTER)
    if lora.tie_qkv:
        modules = dict(net.named_modules())  # peft replaced the targets by its LoRA layers
        for qkv, _ in groups:
            first = modules[qkv[0]].lora_A[ADAPTER]
            for n in qkv[1:]:
                modules[n].lora_A[ADAPTER] = first
    count = 0
    for name, prm in net.named_parameters():
        is_lora = ".lora_" in name
        prm.requires_grad_(is_lora)
        if is_lora:
            prm.data = prm.data.float()  # trained in float32 whatever the base's dtype (autocast mixes them)
            count += prm.numel()
    return count


def add_style_lora(parts, lora) -> dict[str, int]:
    """The style LoRAs of ``lora`` (`StyleLoraSettings`) on the DiT and the ControlNet of ``parts``."""
    out = {"transformer": add_lora(parts.transformer, lora_groups(lora.double_blocks, lora.single_blocks), lora,
                                   "the DiT")}
    if lora.controlnet_double_blocks:
        if parts.controlnet is None:
            raise ValueError("lora.controlnet_double_blocks is set but model.controlnet is empty: give the HED "
                             "ControlNet, or set lora.controlnet_double_blocks=[]")
        out["controlnet"] = add_lora(parts.controlnet, lora_groups(lora.controlnet_double_blocks, ()), lora,
                                     "the ControlNet")
    return out


def _state(net) -> tuple[dict, dict]:
    """(the adapter's peft state dict, copied: tied tensors become separate ones, as safetensors wants; its peft
    config as diffusers writes it into the file's metadata)."""
    from peft.utils import get_peft_model_state_dict

    sd = {k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(net, adapter_name=ADAPTER)
          .items()}
    meta = net.peft_config[ADAPTER].to_dict()
    return sd, {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}


def save_style_lora(parts, folder: str) -> list[str]:
    """``folder``/pytorch_lora_weights.safetensors (the DiT's, diffusers' FLUX LoRA format) and, with a ControlNet
    LoRA, ``folder``/controlnet_lora.safetensors (peft keys, no prefix); written whole, then renamed."""
    import safetensors.torch
    from diffusers import FluxPipeline

    os.makedirs(folder, exist_ok=True)
    sd, meta = _state(parts.transformer)
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=sd, transformer_lora_adapter_metadata=meta,
                                   weight_name=TRANSFORMER_LORA)
    written = [os.path.join(folder, TRANSFORMER_LORA)]
    if parts.controlnet is not None and ADAPTER in getattr(parts.controlnet, "peft_config", {}):
        sd, meta = _state(parts.controlnet)
        path = os.path.join(folder, CONTROLNET_LORA)
        safetensors.torch.save_file(sd, path + ".part", metadata={"format": "pt", "lora_adapter_metadata":
                                                                   json.dumps(meta, indent=2, sort_keys=True)})
        os.replace(path + ".part", path)
        written.append(path)
    return written


def build_parts(m, seed: int):
    from loom.models.sag import build_local

    return build_local(m, seed)
