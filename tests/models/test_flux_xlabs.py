"""x-flux -> diffusers (`loom.models.flux_xlabs`) against the authors' x-flux code: tests/fixtures/xflux_upstream holds
what VideoFrom3D's vendored x-flux DiT, HED-style ControlNet and LoRA processors computed at tiny size
(``make_golden.py`` there says how); the weights are rebuilt here from ``manifest.json`` by the same per-key
generator, converted, and run through diffusers' ``FluxTransformer2DModel`` + ``FluxControlNetModel`` (+ peft)."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from loom.models import flux_xlabs as fx

diffusers = pytest.importorskip("diffusers")
FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "xflux_upstream")
ATOL = 1e-4


def _golden_module():
    spec = importlib.util.spec_from_file_location("xflux_make_golden", os.path.join(FIX, "make_golden.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MG = _golden_module()
with open(os.path.join(FIX, "manifest.json")) as _f:
    MANIFEST = json.load(_f)
INP, GOLD = np.load(os.path.join(FIX, "inputs.npz")), np.load(os.path.join(FIX, "golden.npz"))


def xflux(name: str) -> dict:
    """The x-flux-layout state dict ``name`` (dit, controlnet, lora_dit, lora_controlnet) the golden ran on."""
    return {k: torch.from_numpy(v) for k, v in MG.xflux_state(MANIFEST[name], name).items()}


def models():
    dit_sd = xflux("dit")
    dit = diffusers.FluxTransformer2DModel(**fx.flux_transformer_config(dit_sd, MG.AXES))
    dit.load_state_dict(fx.convert_flux_transformer(dit_sd), strict=True)
    cn_sd = xflux("controlnet")
    controlnet = diffusers.FluxControlNetModel(**fx.xlabs_controlnet_config(cn_sd, MG.AXES))
    controlnet.load_state_dict(fx.convert_xlabs_controlnet(cn_sd), strict=True)
    return dit.eval(), controlnet.eval()


def common() -> dict:
    t = lambda k: torch.from_numpy(INP[k])  # noqa: E731
    return dict(encoder_hidden_states=t("txt"), pooled_projections=t("y"), timestep=t("t"), img_ids=t("img_ids"),
                txt_ids=t("txt_ids"), guidance=t("guidance"))


def run(dit, controlnet, control: bool, repeat: bool = True):
    x, kw = torch.from_numpy(INP["img"]), common()
    with torch.no_grad():
        if not control:
            return None, dit(x, **kw).sample.numpy()
        cond = fx.control_image(INP["hint"]).expand(x.shape[0], -1, -1, -1)
        res = controlnet(x, cond, conditioning_scale=MG.CONTROL_WEIGHT, **kw).controlnet_block_samples
        out = dit(x, controlnet_block_samples=res, controlnet_blocks_repeat=repeat, **kw).sample
    return torch.stack(res).numpy() / MG.CONTROL_WEIGHT, out.numpy()


def test_config_is_inferred_from_the_xflux_state_dicts():
    cfg = fx.xlabs_controlnet_config(xflux("controlnet"), MG.AXES)
    assert cfg == dict(in_channels=64, num_layers=2, attention_head_dim=32, num_attention_heads=2,
                       joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=MG.AXES,
                       patch_size=2, num_single_layers=0, conditioning_embedding_channels=16)
    dit_cfg = fx.flux_transformer_config(xflux("dit"), MG.AXES)
    assert (dit_cfg["num_layers"], dit_cfg["num_single_layers"]) == (4, 3)
    with pytest.raises(ValueError, match="sums to 128, not the head dim 32"):
        fx.xlabs_controlnet_config(xflux("controlnet"))  # FLUX.1's axes on a head dim of 32
    grey = fx.control_image(INP["hint"][..., 0])  # a grey map is repeated to RGB, in [-1, 1]
    assert grey.shape == (1, 3, 64, 64) and grey.min() == -1 and grey.max() == 1 and torch.equal(grey[0, 0], grey[0, 2])
    with pytest.raises(ValueError, match="multiples of 16"):
        fx.control_image(INP["hint"][:60])


def test_dit_and_controlnet_match_xflux():
    dit, controlnet = models()
    _, base = run(dit, controlnet, control=False)
    np.testing.assert_allclose(base, GOLD["base"], rtol=0, atol=ATOL)
    res, out = run(dit, controlnet, control=True)
    np.testing.assert_allclose(res, GOLD["res"], rtol=0, atol=ATOL)  # the hint encoder, packing and blocks
    np.testing.assert_allclose(out, GOLD["control"], rtol=0, atol=ATOL)
    assert np.abs(GOLD["control"] - GOLD["base"]).max() > 1  # the control is felt
    # x-flux reuses residual index % 2 after each of the 4 double blocks; diffusers' default spreads them (0,0,1,1)
    _, spread = run(dit, controlnet, control=True, repeat=False)
    assert np.abs(spread - GOLD["control"]).max() > 1e-2


def test_loras_on_dit_and_controlnet_match_xflux_then_fuse():
    dit, controlnet = models()
    fx.load_xlabs_lora(dit, xflux("lora_dit"), target="transformer", lora_weight=MG.LORA_WEIGHT)
    fx.load_xlabs_lora(controlnet, xflux("lora_controlnet"), target="controlnet", lora_weight=MG.LORA_WEIGHT)
    _, lora = run(dit, controlnet, control=False)
    np.testing.assert_allclose(lora, GOLD["lora"], rtol=0, atol=ATOL)
    res, out = run(dit, controlnet, control=True)
    np.testing.assert_allclose(res, GOLD["res_lora"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(out, GOLD["control_lora"], rtol=0, atol=ATOL)
    assert np.abs(GOLD["control_lora"] - GOLD["control"]).max() > 0.5  # the LoRAs are felt
    dit.fuse_lora()
    controlnet.fuse_lora()
    dit.unload_lora()
    controlnet.unload_lora()
    _, fused = run(dit, controlnet, control=True)
    np.testing.assert_allclose(fused, GOLD["control_lora"], rtol=0, atol=ATOL)


def test_lora_weight_is_squared_as_in_xflux_and_dit_lora_matches_diffusers_converter():
    dit, _ = models()
    # x-flux's loader scales down and up by lora_weight: a linear scale (adapter weight 0.9) is not what it ran
    fx.load_xlabs_lora(dit, xflux("lora_dit"), target="transformer")
    dit.set_adapters(["xlabs"], weights=[MG.LORA_WEIGHT])
    _, linear = run(dit, None, control=False)
    assert np.abs(linear - GOLD["lora"]).max() > 1e-2
    dit.set_adapters(["xlabs"], weights=[MG.LORA_WEIGHT ** 2])
    _, squared = run(dit, None, control=False)
    np.testing.assert_allclose(squared, GOLD["lora"], rtol=0, atol=ATOL)
    # the DiT mapping agrees with diffusers' own x-flux LoRA conversion (which has no ControlNet target)
    ours = fx.convert_xlabs_lora(xflux("lora_dit"))
    theirs = diffusers.FluxPipeline.lora_state_dict(xflux("lora_dit"))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_strict_keys(tmp_path):
    from safetensors.torch import save_file

    cn = xflux("controlnet")
    with pytest.raises(ValueError, match="unknown keys.*final_layer"):
        fx.convert_xlabs_controlnet({**cn, "final_layer.linear.weight": torch.zeros(64, 64)})
    with pytest.raises(ValueError, match="LoRA/IP-adapter processor"):
        fx.convert_xlabs_controlnet({**cn, **xflux("lora_controlnet")})
    partial = {k: v for k, v in cn.items() if not k.startswith("pos_embed_input")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"partial.safetensors does not fill.*missing 2.*controlnet_x_embedder"):
        fx.load_xlabs_controlnet(str(tmp_path / "partial.safetensors"), axes_dims_rope=MG.AXES)
    save_file(cn, str(tmp_path / "cn.safetensors"))
    model = fx.load_xlabs_controlnet(str(tmp_path / "cn.safetensors"), axes_dims_rope=MG.AXES)
    assert not any(p.is_meta for p in model.parameters()) and not model.training
    lora = xflux("lora_dit")
    with pytest.raises(ValueError, match="single block, and an x-flux ControlNet has none"):
        fx.convert_xlabs_lora(lora, target="controlnet")
    with pytest.raises(ValueError, match="cannot be mapped.*ip_adapter"):
        fx.convert_xlabs_lora({**lora, "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight":
                               torch.zeros(64, 64)})
    del lora["double_blocks.3.processor.qkv_lora2.up.weight"]
    with pytest.raises(ValueError, match="qkv_lora2.down.weight has no up partner"):
        fx.convert_xlabs_lora(lora)
    with pytest.raises(ValueError, match="not in this FluxControlNetModel"):  # a DiT LoRA on 2-block ControlNet
        fx.load_xlabs_lora(model, {k: v for k, v in xflux("lora_dit").items() if "double_blocks.3" in k},
                           target="controlnet")


def test_a_pickle_is_refused_unopened(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    for name in ("evil.safetensors", "evil.pt"):
        torch.save({"img_in.weight": Boom()}, str(tmp_path / name))
        with pytest.raises(ValueError, match="is a pickle"):
            fx.load_xlabs_controlnet(str(tmp_path / name))
        dit = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=8,
                                               num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                                               axes_dims_rope=(2, 2, 4))
        with pytest.raises(ValueError, match="is a pickle"):
            fx.load_xlabs_lora(dit, str(tmp_path / name))
    assert not os.path.exists(tmp_path / "pwned")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a safetensors file"):
        fx.load_xlabs_controlnet(str(tmp_path / "junk.safetensors"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        fx.load_xlabs_controlnet(str(tmp_path / "nowhere.safetensors"))
