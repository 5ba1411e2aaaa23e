"""Wan2.1-Fun-V1.1-Control read as released (loom.models.wan_fun): parity with golden outputs that VideoX-Fun's own
WanTransformer3DModel and Wan VAE produced from a tiny checkpoint in the release layout (tests/fixtures/wan_fun,
README there), and the strictness of the reading."""

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom.models.ttv_dit import TTVDiT, tiny_transformer_config
from loom.models.video_vae import load_video_vae
from loom.models.wan_fun import (WanFunTransformer3DModel, load_wan_fun_transformer, load_wan_vae_checkpoint,
                                 transformer_layout)

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "wan_fun"
RELEASE = FIXTURES / "release"
WEIGHTS = "diffusion_pytorch_model.safetensors"
ATOL = 1e-4  # fp32; measured max |diff| ~8e-6 on outputs of magnitude ~3.6 (RoPE and timestep sines: fp64 upstream)


@pytest.fixture(scope="module")
def golden():
    return load_file(str(FIXTURES / "golden.safetensors"))


def _dit_inputs(golden):
    text = torch.zeros(2, 512, golden["dit.text"].shape[2])  # VideoX-Fun pads the prompt to text_len with zeros
    text[:, : golden["dit.text"].shape[1]] = golden["dit.text"]
    return dict(hidden_states=torch.cat([golden["dit.x"], golden["dit.y"]], dim=1), timestep=golden["dit.timestep"],
                encoder_hidden_states=text, encoder_hidden_states_image=golden["dit.image"], return_dict=False)


def _copy_release(tmp_path) -> pathlib.Path:
    dst = tmp_path / "release"
    shutil.copytree(RELEASE, dst)
    return dst


def test_the_fixture_is_in_the_release_layout():
    config = json.loads((RELEASE / "config.json").read_text())
    assert {"dim", "num_heads", "in_dim", "out_dim", "add_ref_conv"} <= config.keys() and config["in_dim"] == 48
    keys = load_file(str(RELEASE / WEIGHTS)).keys()
    assert {"ref_conv.weight", "blocks.0.self_attn.q.weight", "blocks.1.cross_attn.k_img.weight", "head.head.weight",
            "img_emb.proj.1.weight", "blocks.0.norm3.weight"} <= keys
    assert not any("attn1" in k or "condition_embedder" in k for k in keys)
    assert transformer_layout(str(RELEASE)) == "release"


def test_transformer_matches_videox_fun_with_and_without_a_reference(golden):
    model = load_wan_fun_transformer(str(RELEASE))
    assert type(model) is WanFunTransformer3DModel and model.config.ref_channels == 16
    assert (model.config.in_channels, model.config.num_attention_heads, model.config.attention_head_dim) == (48, 2, 12)
    assert not any(p.is_meta for p in model.parameters())
    inputs = _dit_inputs(golden)
    with torch.no_grad():
        out_ref = model(**inputs, ref_latent=golden["dit.ref"])[0]
        out_none = model(**inputs)[0]  # no reference: zeros, as VideoX-Fun's pipeline feeds
    torch.testing.assert_close(out_ref, golden["dit.out_ref"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_none, golden["dit.out_zero_ref"], atol=ATOL, rtol=0)
    assert (golden["dit.out_ref"] - golden["dit.out_zero_ref"]).abs().max() > 100 * ATOL  # the reference matters


def test_ttv_dit_loads_the_release_folder_directly(golden):
    dit = TTVDiT.from_pretrained(str(RELEASE))
    assert dit.has_ref_conv and dit.ref_channels == 16 and dit.image_dim == 32
    c, b = 16, 2
    x_t, control, start = golden["dit.x"], golden["dit.y"][:, :c], golden["dit.y"][:, c:]
    geometry = torch.randn(b, 4 * c, *x_t.shape[2:])
    with torch.no_grad():
        fused = dit.fusion(geometry)
        out = dit(x_t, golden["dit.timestep"], geometry, start, _dit_inputs(golden)["encoder_hidden_states"],
                  golden["dit.image"], ref_latent=golden["dit.ref"][:, :, None])
        hidden = torch.cat([x_t, fused, start], dim=1)
        expected = dit.transformer(hidden, golden["dit.timestep"], _dit_inputs(golden)["encoder_hidden_states"],
                                   golden["dit.image"], ref_latent=golden["dit.ref"], return_dict=False)[0]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert control.shape == fused.shape


def test_vae_matches_videox_fun_from_the_folder_and_the_pth(golden):
    for path in (RELEASE, RELEASE / "Wan2.1_VAE.pth"):
        vae = load_video_vae(str(path))
        assert (vae.z_dim, vae.spatial_factor, vae.temporal_factor) == (16, 8, 4)
        torch.testing.assert_close(vae.encode(golden["vae.video"]), golden["vae.latents"], atol=1e-5, rtol=0)
        torch.testing.assert_close(vae.decode(golden["vae.latents"]), golden["vae.decoded"], atol=1e-4, rtol=0)


def test_a_missing_or_unexpected_tensor_is_refused(tmp_path):
    release = _copy_release(tmp_path)
    state = load_file(str(release / WEIGHTS))
    save_file({k: v for k, v in state.items() if k != "blocks.1.ffn.2.bias"}, str(release / WEIGHTS))
    with pytest.raises(ValueError, match=r"1 missing keys \['blocks.1.ffn.net.2.bias'\]"):
        load_wan_fun_transformer(str(release))
    save_file({**state, "control_adapter.conv.weight": torch.zeros(2)}, str(release / WEIGHTS))
    with pytest.raises(ValueError, match=r"unexpected keys \['control_adapter.conv.weight'\].*camera control"):
        load_wan_fun_transformer(str(release))


def test_config_json_and_weights_must_agree(tmp_path):
    release = _copy_release(tmp_path)
    config = json.loads((release / "config.json").read_text())
    for key, value, message in (("num_layers", 3, "num_layers=3 but the weights have num_layers=2"),
                                ("add_ref_conv", False, "add_ref_conv=False but the weights have ref_conv"),
                                ("num_heads", 5, "num_heads=5 must be a positive divisor of dim=24"),
                                ("model_type", "t2v", "model_type='t2v' but the weights have the CLIP image branch"),
                                ("window_size", [4, 4], "supports only window_size=\\[-1, -1\\]")):
        (release / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=message):
            load_wan_fun_transformer(str(release))
    # Without add_ref_conv / in_dim_ref_conv / text_dim in config.json, the weights decide.
    lean = {k: v for k, v in config.items() if k not in ("add_ref_conv", "in_dim_ref_conv", "text_dim")}
    (release / "config.json").write_text(json.dumps(lean))
    assert load_wan_fun_transformer(str(release)).config.ref_channels == 16


def test_the_fun_control_check_runs_before_the_weights_are_read(monkeypatch):
    import loom.models.wan_fun as wan_fun

    def build(**config):
        raise AssertionError("the model was built (and its weights read) before the check")

    monkeypatch.setattr(wan_fun, "WanFunTransformer3DModel", build)
    seen = []

    def refuse(config, source):
        seen.append((config["in_channels"], config["ref_channels"], source))
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        load_wan_fun_transformer(str(RELEASE), check=refuse)
    assert seen == [(48, 16, str(RELEASE))]


def test_bf16_keeps_diffusers_fp32_modules(golden):
    model = load_wan_fun_transformer(str(RELEASE), torch.bfloat16)
    assert model.scale_shift_table.dtype == torch.float32  # _keep_in_fp32_modules, as from_pretrained keeps them
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert model.blocks[0].attn1.to_q.weight.dtype == model.ref_conv.weight.dtype == torch.bfloat16
    inputs = {k: v.bfloat16() if isinstance(v, torch.Tensor) and k != "timestep" else v
              for k, v in _dit_inputs(golden).items()}
    with torch.no_grad():
        out = model(**inputs, ref_latent=golden["dit.ref"].bfloat16())[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), golden["dit.out_ref"], atol=0.15, rtol=0.05)


def test_diffusers_layout_round_trip(tmp_path, golden):
    model = load_wan_fun_transformer(str(RELEASE))
    model.save_pretrained(str(tmp_path / "diffusers"))
    assert transformer_layout(str(tmp_path / "diffusers")) == "diffusers"
    loaded = load_wan_fun_transformer(str(tmp_path / "diffusers"))
    assert loaded.config.ref_channels == 16
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_dit_inputs(golden), ref_latent=golden["dit.ref"])[0],
                                   golden["dit.out_ref"], atol=ATOL, rtol=0)


def test_without_ref_conv_it_is_diffusers_wan_transformer():
    from diffusers import WanTransformer3DModel

    config = tiny_transformer_config()
    torch.manual_seed(0)
    plain = WanTransformer3DModel(**config)
    ours = WanFunTransformer3DModel(**config)
    ours.load_state_dict(plain.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(1, 48, 2, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                  encoder_hidden_states_image=torch.randn(1, 5, 32, generator=g), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(**kwargs)[0], plain(**kwargs)[0], atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="no ref_conv"):
            ours(**kwargs, ref_latent=torch.zeros(1, 16, 4, 4))


def test_diffusers_gradient_checkpointing_flag_gives_the_same_output(golden):
    model = load_wan_fun_transformer(str(RELEASE))
    inputs = _dit_inputs(golden)
    plain = model(**inputs, ref_latent=golden["dit.ref"])[0]
    model.enable_gradient_checkpointing()
    torch.testing.assert_close(model(**inputs, ref_latent=golden["dit.ref"])[0], plain, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"timestep must be \(B,\)"):
        model(**dict(inputs, timestep=torch.ones(2, 48)))
    with pytest.raises(ValueError, match=r"ref_latent must be \(2, 16, 4, 4\)"):
        model(**inputs, ref_latent=golden["dit.ref"][:, :, None])


def test_vae_of_another_shape_is_refused(tmp_path):
    state = torch.load(str(RELEASE / "Wan2.1_VAE.pth"), weights_only=True)
    del state["decoder.upsamples.4.shortcut.weight"]
    torch.save(state, str(tmp_path / "cut.pth"))
    with pytest.raises(ValueError, match=r"missing keys.*Only the Wan2.1 VAE structure"):
        load_wan_vae_checkpoint(str(tmp_path / "cut.pth"))
    z8 = {k: v for k, v in state.items()}
    z8["conv2.weight"] = torch.zeros(8, 8, 1, 1, 1)
    torch.save(z8, str(tmp_path / "z8.pth"))
    with pytest.raises(ValueError, match="z_dim=8"):
        load_wan_vae_checkpoint(str(tmp_path / "z8.pth"))
    with pytest.raises(FileNotFoundError, match="neither Wan2.1_VAE.pth nor a config.json"):
        load_video_vae(str(tmp_path))


@pytest.mark.parametrize("size", ["1.3B", "14B"])
def test_release_config_of_the_published_sizes(size):
    """The diffusers config derived from the release's config.json and weight shapes (only the header is needed)."""
    from loom.models.wan_fun import release_transformer_config

    dim, heads, layers, ffn = {"1.3B": (1536, 12, 30, 8960), "14B": (5120, 40, 40, 13824)}[size]
    wan = {"_class_name": "WanTransformer3DModel", "model_type": "i2v", "dim": dim, "ffn_dim": ffn, "freq_dim": 256,
           "in_dim": 48, "num_heads": heads, "num_layers": layers, "out_dim": 16, "text_len": 512, "eps": 1e-6,
           "add_ref_conv": True, "in_dim_ref_conv": 16}
    shapes = {"patch_embedding.weight": (dim, 48, 1, 2, 2), "head.head.weight": (64, dim),
              "time_embedding.0.weight": (dim, 256), "text_embedding.0.weight": (dim, 4096),
              "img_emb.proj.0.weight": (1280,), "ref_conv.weight": (dim, 16, 2, 2),
              **{f"blocks.{i}.ffn.0.weight": (ffn, dim) for i in range(layers)}}
    config = release_transformer_config(wan, shapes, size)
    assert config == dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128, in_channels=48,
                          out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn, num_layers=layers,
                          cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280,
                          added_kv_proj_dim=dim, rope_max_seq_len=1024, ref_channels=16)
