"""Contract tests of the TAPESTRY video DiT on tiny random configs (diffusers test_models_transformer_wan.py style)."""

import re

import pytest
import torch
from torch import nn

from loom.models.ttv_dit import TEXT_TOKENS, TTVDiT, tiny_transformer_config
from tests.models.contract import BlocksContract, FrozenPartsContract

B, T, H, W = 1, 3, 8, 8


def _inputs(image: bool = True, seed: int = 0, text_tokens: int = TEXT_TOKENS, ref: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        x_t=torch.randn(B, 16, T, H, W, generator=g),
        timestep=torch.tensor([700.0]),
        geometry=torch.randn(B, 64, T, H, W, generator=g),
        reference=TTVDiT.reference_latent(torch.randn(B, 16, 1, H, W, generator=g), T),
        text=torch.randn(B, text_tokens, 32, generator=g),
        image=torch.randn(B, 7, 32, generator=g) if image else None,
    )
    if ref:  # V1.1's reference-frame latent (TTVDiT.tiny has ref_conv unless ref_conv=False)
        inputs["ref_latent"] = torch.randn(B, 16, 1, H, W, generator=g)
    return inputs


def _randomize(params, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(scale * torch.randn(p.shape, generator=g))


def _randomize_lora_and_fusion(model: TTVDiT, seed: int = 3) -> None:
    """Stand-in for training: nonzero LoRA B (and new A) and a fusion whose body contributes."""
    _randomize([p for n, p in model.named_parameters() if ".lora_" in n or n.startswith("fusion.")], seed)


def _lora_layer_names(transformer: nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, module in transformer.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("image", [True, False])
@pytest.mark.parametrize("ref_conv", [True, False])
def test_forward_shape_and_dtype(image, ref_conv):
    model = TTVDiT.tiny(image=image, ref_conv=ref_conv)
    assert (model.latent_channels, model.text_dim, model.patch_size) == (16, 32, (1, 2, 2))
    assert model.image_dim == (32 if image else None)
    assert model.has_ref_conv == ref_conv and model.ref_channels == (16 if ref_conv else None)
    out = model(**_inputs(image=image, ref=ref_conv))
    assert out.shape == (B, 16, T, H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_image_tokens_reach_the_output():
    model = TTVDiT.tiny()
    inputs = _inputs()
    other = dict(inputs, image=inputs["image"] + 1.0)
    assert not torch.allclose(model(**inputs), model(**other))


def test_the_reference_frame_reaches_the_output_and_none_means_zeros():
    model = TTVDiT.tiny()
    inputs = _inputs()
    with torch.no_grad():
        out = model(**inputs)
        assert not torch.allclose(out, model(**dict(inputs, ref_latent=inputs["ref_latent"] + 1.0)), atol=1e-4)
        zeros = model(**dict(inputs, ref_latent=torch.zeros_like(inputs["ref_latent"])))
        torch.testing.assert_close(model(**dict(inputs, ref_latent=None)), zeros, atol=0, rtol=0)
        # The reference tokens take latent frame 0 and shift the video's RoPE positions: not the model without them.
        plain = TTVDiT.tiny(ref_conv=False)
        assert not torch.allclose(plain(**_inputs(ref=False)), zeros, atol=1e-4)


def test_ref_conv_is_frozen_and_not_adapted():
    model = TTVDiT.tiny()
    model.add_lora(rank=4)
    assert not any(p.requires_grad for p in model.transformer.ref_conv.parameters())
    assert not any("ref_conv" in n for n in _lora_layer_names(model.transformer))
    model(**_inputs()).square().mean().backward()
    assert model.transformer.ref_conv.weight.grad is None


def test_bf16_model_returns_the_input_dtype():
    model = TTVDiT.tiny().to(torch.bfloat16)
    out = model(**_inputs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_reference_latent_is_first_frame_then_zeros():
    first = torch.randn(2, 16, 1, 4, 6)
    ref = TTVDiT.reference_latent(first, 5)
    assert ref.shape == (2, 16, 5, 4, 6)
    assert torch.equal(ref[:, :, :1], first)
    assert not ref[:, :, 1:].any()
    with pytest.raises(ValueError, match=r"\(B, C, 1, H, W\)"):
        TTVDiT.reference_latent(torch.randn(2, 16, 2, 4, 6), 5)


def test_from_pretrained_refuses_a_missing_dir(tmp_path):
    missing = str(tmp_path / "no_such_checkpoint")
    with pytest.raises(FileNotFoundError, match=re.escape(missing) + ".*Nothing is downloaded"):
        TTVDiT.from_pretrained(missing)


def test_from_pretrained_refuses_a_non_fun_control_transformer(tmp_path):
    from diffusers import WanTransformer3DModel

    t2v = WanTransformer3DModel(**tiny_transformer_config(in_channels=16, image_dim=None))
    t2v.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*in_channels=16.*3 \\* out_channels = 48"):
        TTVDiT.from_pretrained(str(tmp_path))


def test_backward_gives_finite_grads_to_every_trainable_param():
    model = TTVDiT.tiny()
    _randomize(model.fusion.conv_out.parameters(), seed=2)  # so the fusion body is on the gradient path
    model(**_inputs()).square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert model.fusion.conv_in.weight.grad.abs().sum() > 0


def test_enable_gradient_checkpointing_checkpoints_the_declared_blocks_only():
    from loom.models.checkpointing import is_checkpointed

    model = TTVDiT.tiny()
    model.enable_gradient_checkpointing()
    checkpointed = [n for n, m in model.named_modules() if is_checkpointed(m)]
    assert checkpointed == ["transformer.blocks.0", "transformer.blocks.1"]
    assert not model.transformer.gradient_checkpointing  # diffusers' own flag off: blocks are not checkpointed twice
    model.disable_gradient_checkpointing()
    assert not any(is_checkpointed(m) for m in model.modules())


def test_lora_changes_nothing_at_step_0():
    model = TTVDiT.tiny()
    inputs = _inputs()
    before = model(**inputs)
    model.add_lora(rank=8, alpha=16)
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(not p.any() for p in lora_b)
    torch.testing.assert_close(model(**inputs), before, atol=1e-6, rtol=0)


def test_lora_targets_every_linear_in_the_blocks_and_nothing_else():
    expected = {name for name, m in TTVDiT.tiny().transformer.named_modules() if isinstance(m, nn.Linear)}
    in_blocks = {name for name in expected if name.startswith("blocks.")}
    assert {n for n in expected - in_blocks}  # the test would be empty without Linear layers outside the blocks
    assert any(n.endswith("add_k_proj") for n in in_blocks) and any(".ffn." in n for n in in_blocks)
    model = TTVDiT.tiny()
    model.add_lora(rank=4)
    assert _lora_layer_names(model.transformer) == in_blocks


def test_lora_freezes_the_base_and_sgd_leaves_it_bit_identical():
    model = TTVDiT.tiny()
    model.add_lora(rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n or n.startswith("fusion.")}
    assert any(n.startswith("fusion.") for n in trainable) and any(".lora_A." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(model.lora_plus_param_groups(lr=0.1), lr=0.1)
    model(**_inputs()).square().mean().backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert param.grad is None, name
            assert torch.equal(param, frozen[name]), name
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if ".lora_B." in n)


def test_lora_plus_param_groups():
    model = TTVDiT.tiny()
    with pytest.raises(ValueError, match="add_lora"):
        model.lora_plus_param_groups(lr=1e-4)
    model.add_lora(rank=4)
    groups = model.lora_plus_param_groups(lr=1e-4, ratio=4.0, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["lora_A", "lora_B+fusion"]
    assert groups[0]["lr"] == 1e-4 and groups[1]["lr"] == pytest.approx(4e-4)
    assert all(g["weight_decay"] == 0.01 for g in groups)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    fast = {names[id(p)] for p in groups[1]["params"]}
    assert {n for n, _ in model.fusion.named_parameters(prefix="fusion")} <= fast
    assert all(".lora_B." in n or n.startswith("fusion.") for n in fast)


@pytest.mark.parametrize("ref_conv", [False, True])
def test_lora_file_loads_in_plain_diffusers(tmp_path, ref_conv):
    """Plain diffusers' WanTransformer3DModel for the model without ref_conv; the same LoRA calls on
    WanFunTransformer3DModel (diffusers' class plus ref_conv, which plain diffusers cannot run) for V1.1."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders import WanLoraLoaderMixin
    from safetensors.torch import load_file

    from loom.models.wan_fun import WanFunTransformer3DModel

    if ref_conv:
        WanTransformer3DModel = WanFunTransformer3DModel  # noqa: N806
    model = TTVDiT.tiny(seed=7, ref_conv=ref_conv)
    model.save_pretrained(str(tmp_path / "base"))
    model.add_lora(rank=4, alpha=8)  # alpha != rank: the file must carry the scaling
    _randomize_lora_and_fusion(model)
    model.save_lora(str(tmp_path / "lora"))
    keys = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")).keys()
    assert all(k.startswith("transformer.blocks.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert (tmp_path / "lora" / "fusion" / "model.safetensors").is_file()

    inputs = _inputs(ref=ref_conv)
    hidden = torch.cat([inputs["x_t"], model.fusion(inputs["geometry"]), inputs["reference"]], dim=1)
    kwargs = dict(timestep=inputs["timestep"], encoder_hidden_states=inputs["text"],
                  encoder_hidden_states_image=inputs["image"], return_dict=False)
    if ref_conv:
        kwargs["ref_latent"] = inputs["ref_latent"][:, :, 0]
    with torch.no_grad():
        expected = model.transformer(hidden, **kwargs)[0]
        # The model's own loader, as a user of plain diffusers calls it. Without weight_name diffusers looks for
        # pytorch_lora_weights.bin, so the safetensors name is given.
        plain = WanTransformer3DModel.from_pretrained(str(tmp_path / "base"))
        assert not torch.allclose(plain(hidden, **kwargs)[0], expected, atol=1e-3)  # the LoRA does something
        plain.load_lora_adapter(str(tmp_path / "lora"), prefix="transformer",
                                weight_name="pytorch_lora_weights.safetensors")
        torch.testing.assert_close(plain(hidden, **kwargs)[0], expected, atol=1e-6, rtol=1e-5)
        # What WanPipeline.load_lora_weights(dir) does: find the file, read the metadata, load into the transformer.
        plain = WanTransformer3DModel.from_pretrained(str(tmp_path / "base"))
        state, metadata = WanLoraLoaderMixin.lora_state_dict(str(tmp_path / "lora"), return_lora_metadata=True)
        assert metadata["transformer.lora_alpha"] == 8
        WanLoraLoaderMixin.load_lora_into_transformer(state, transformer=plain, metadata=metadata)
        torch.testing.assert_close(plain(hidden, **kwargs)[0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("add_lora_first", [False, True])
def test_load_lora_round_trip(tmp_path, add_lora_first):
    model = TTVDiT.tiny(seed=7)
    model.add_lora(rank=4, alpha=8)
    _randomize_lora_and_fusion(model)
    model.save_lora(str(tmp_path))
    restored = TTVDiT.tiny(seed=7)
    if add_lora_first:
        restored.add_lora(rank=4, alpha=8)
    restored.load_lora(str(tmp_path))
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(restored(**inputs), model(**inputs), atol=1e-6, rtol=1e-5)
    assert {n for n, p in restored.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    state, restored_state = model.trainable_state_dict(), restored.trainable_state_dict()
    assert state.keys() == restored_state.keys()
    assert all(torch.equal(state[k], restored_state[k]) for k in state)


def test_load_lora_refuses_another_rank(tmp_path):
    model = TTVDiT.tiny()
    model.add_lora(rank=4)
    model.save_lora(str(tmp_path))
    other = TTVDiT.tiny()
    other.add_lora(rank=8)
    with pytest.raises(ValueError, match="rank 4"):
        other.load_lora(str(tmp_path))


def test_save_pretrained_refuses_a_lora_model(tmp_path):
    model = TTVDiT.tiny()
    model.add_lora(rank=4)
    with pytest.raises(ValueError, match="save_lora"):
        model.save_pretrained(str(tmp_path))


def test_bad_inputs_are_refused():
    model, text_only = TTVDiT.tiny(), TTVDiT.tiny(image=False)
    with pytest.raises(ValueError, match="pad the umT5 embeddings to 512"):
        model(**_inputs(text_tokens=20))
    with pytest.raises(ValueError, match="has an image branch"):
        model(**dict(_inputs(), image=None))
    with pytest.raises(ValueError, match="no image branch"):
        text_only(**_inputs())
    assert text_only(**_inputs(image=False, text_tokens=20)).shape == (B, 16, T, H, W)  # any length without image
    with pytest.raises(ValueError, match="geometry must be"):
        model(**dict(_inputs(), geometry=torch.zeros(B, 48, T, H, W)))
    with pytest.raises(ValueError, match="timestep must be"):
        model(**dict(_inputs(), timestep=torch.tensor(700.0)))
    with pytest.raises(ValueError, match=r"ref_latent must be \(1, 16, 1, 8, 8\)"):
        model(**dict(_inputs(), ref_latent=torch.zeros(B, 16, 2, H, W)))
    with pytest.raises(ValueError, match="no ref_conv"):
        TTVDiT.tiny(ref_conv=False)(**_inputs())


class TestTTVDiTContract(FrozenPartsContract, BlocksContract):
    """Shapes, determinism, save/load, backward, frozen base and checkpointed blocks (tests/models/contract.py), on
    the model as training uses it: LoRA on the frozen transformer, the fusion trained in full."""

    output_shape = (B, 16, T, H, W)
    round_trip_atol = 1e-6

    def make_model(self, seed=0):
        return TTVDiT.tiny(seed=seed)

    def make_inputs(self, seed=0):
        return _inputs(seed=seed)

    def save(self, model, path):
        _randomize(model.fusion.parameters(), seed=5)  # so the saved fusion is not the zero-output initial one
        model.save_pretrained(str(path))

    def load(self, model, path):
        return TTVDiT.from_pretrained(str(path), str(path / "fusion"))

    def prepare_training(self, model):
        model.add_lora(rank=4)
        _randomize_lora_and_fusion(model)
        return model
