"""Contract tests of the ShapeGen4D spatiotemporal DiT (section 3.2) on tiny configs, its DINOv2 features, and the
4D flow-matching helpers (shared noise, training inputs, sampler)."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from loom.models.flow import FlowMatching, sample_generator
from loom.models.shape4d_dit import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ST_PREFIX,
    ImageFeatures,
    SDPAProcessor,
    Shape4DDiT,
    Shape4DDiTConfig,
    SpatioTemporalLayer,
    load_image_features,
)
from loom.models.shape4d_flow import default_shift, noise_4d, sample_4d, shared_noise, training_inputs
from tests.models.contract import BlocksContract, FrozenPartsContract

B, T, Q, C, L, D_IMG = 2, 3, 6, 8, 5, 24
FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "step1x3d_dit")
TINY_RELEASE = os.path.join(FIXTURES, "tiny", "transformer")


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(B, T, Q, C, generator=g), timestep=torch.tensor([300.0, 800.0]),
                image_tokens=torch.randn(B, T, L, D_IMG, generator=g))


def _base_per_frame(base: Shape4DDiT, x: dict) -> torch.Tensor:
    """The base model applied to every frame as an independent shape."""
    out = base(x["latents"].reshape(B * T, Q, C), x["timestep"].repeat_interleave(T),
               x["image_tokens"].reshape(B * T, L, D_IMG))
    return out.reshape(B, T, Q, C)


def _perturb_st_outputs(model: Shape4DDiT, seed: int = 5, scale: float = 0.1) -> None:
    """Stand-in for training: nonzero output projections of the spatiotemporal layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.spatiotemporal_layers:
            layer.proj_out.weight.copy_(scale * torch.randn(layer.proj_out.weight.shape, generator=g))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A saved tiny base model (no spatiotemporal layers)."""
    path = tmp_path_factory.mktemp("base")
    Shape4DDiT.tiny(seed=0, spatiotemporal=False).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------- contract


def test_forward_shapes_4d_and_single_frame():
    model = Shape4DDiT.tiny()
    assert len(model.spatiotemporal_layers) == 4  # one after each of the 2 dual + 2 single blocks
    x = _inputs()
    out = model(**x)
    assert out.shape == (B, T, Q, C) and out.dtype == torch.float32 and torch.isfinite(out).all()
    one = model(x["latents"][:, 0], x["timestep"], x["image_tokens"][:, 0])  # (B, Q, C): a one-frame sequence
    assert one.shape == (B, Q, C)
    torch.testing.assert_close(one, model(x["latents"][:, :1], x["timestep"], x["image_tokens"][:, :1])[:, 0])


def test_bf16_model_returns_the_input_dtype():
    out = Shape4DDiT.tiny().to(torch.bfloat16)(**_inputs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_conditioning_reaches_the_output():
    model = Shape4DDiT.tiny()
    x = _inputs()
    out = model(**x)
    assert not torch.allclose(out, model(**dict(x, image_tokens=x["image_tokens"] + 1.0)))
    assert not torch.allclose(out, model(**dict(x, timestep=torch.tensor([500.0, 100.0]))))


def test_input_validation():
    model = Shape4DDiT.tiny()
    x = _inputs()
    with pytest.raises(ValueError, match="timestep must be"):
        model(x["latents"], torch.full((B, T), 300.0), x["image_tokens"])
    with pytest.raises(ValueError, match="image_tokens must be"):
        model(x["latents"], x["timestep"], x["image_tokens"][:, :2])
    with pytest.raises(ValueError, match="latents must be"):
        model(x["latents"][..., :4], x["timestep"], x["image_tokens"])


def test_config_validation_and_paper_sizes():
    with pytest.raises(ValueError, match="temporal='2d'"):
        Shape4DDiTConfig(temporal="2d")
    with pytest.raises(ValueError, match="attention_backend='cuda'"):
        Shape4DDiTConfig(attention_backend="cuda")
    with pytest.raises(ValueError, match="attention_head_dim=15 must be even"):
        Shape4DDiTConfig(attention_head_dim=15)
    paper = Shape4DDiTConfig.paper()
    assert (paper.width, paper.num_dual_blocks, paper.num_single_blocks, paper.num_latents, paper.image_dim) == (
        1280, 12, 24, 1024, 1024)
    assert paper.spatiotemporal and paper.temporal == "full" and paper.st_image_tokens


def test_backward_gives_finite_grads():
    model = Shape4DDiT.tiny()
    _perturb_st_outputs(model)  # so gradients reach inside the spatiotemporal layers too
    model(**_inputs()).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_gradient_checkpointing_of_the_whole_model_gives_the_same_gradients():
    """Every parameter trainable (the base too, unlike the contract's frozen-base set-up)."""
    a, b = Shape4DDiT.tiny(), Shape4DDiT.tiny()
    _perturb_st_outputs(a)
    _perturb_st_outputs(b)
    b.enable_gradient_checkpointing()
    assert b.gradient_checkpointing and not a.gradient_checkpointing
    x = _inputs()
    a(**x).pow(2).mean().backward()
    b(**x).pow(2).mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)
    b.disable_gradient_checkpointing()
    assert not b.gradient_checkpointing


def test_save_load_round_trip(tmp_path):
    model = Shape4DDiT.tiny(seed=2, temporal="1d")
    _perturb_st_outputs(model)
    model.save_pretrained(tmp_path / "dit")
    assert json.loads((tmp_path / "dit" / "config.json").read_text())["temporal"] == "1d"
    loaded = Shape4DDiT.from_pretrained(tmp_path / "dit")
    assert loaded.config == model.config
    x = _inputs()
    assert torch.equal(loaded(**x), model(**x))


def test_from_pretrained_errors(tmp_path, base_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Shape4DDiT.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Shape4DDiT.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="do not match"):
        Shape4DDiT.from_pretrained(base_dir, num_single_blocks=3)
    with pytest.raises(ValueError, match="do not match"):
        Shape4DDiT.from_pretrained(base_dir, attention_head_dim=8)
    with pytest.raises(ValueError, match="unknown Shape4DDiTConfig fields"):
        Shape4DDiT.from_pretrained(base_dir, depth=3)


# ---------------------------------------------------------------------------------------------------- Step1X-3D


def _golden() -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(FIXTURES, "tiny", "golden.safetensors"))


def test_velocity_matches_upstream_step1x3d():
    """Golden parity with Step1X-3D's own FluxDenoiser (tests/fixtures/step1x3d_dit/make_fixtures.py): its tiny
    released-layout folder loads strictly through Loom's loader and gives upstream's velocity, fp32."""
    g = _golden()
    model = Shape4DDiT.from_pretrained(TINY_RELEASE)
    assert not model.config.spatiotemporal and model.config.timestep_channels is None  # a base, upstream's embed
    out = model(g["latents"], g["timestep"], g["image_tokens"])
    torch.testing.assert_close(out, g["velocity"], atol=1e-5, rtol=1e-5)
    # the release root (the folder above transformer/) loads too, and a 4D model on it is still the base per frame
    root = os.path.dirname(TINY_RELEASE)
    ext = Shape4DDiT.from_pretrained(root, spatiotemporal=True)
    assert len(ext.spatiotemporal_layers) == 4
    x = g["latents"][:, None].expand(-1, 2, -1, -1)  # (B, 2, Q, C): two frames
    img = g["image_tokens"][:, None].expand(-1, 2, -1, -1)
    torch.testing.assert_close(ext(x, g["timestep"], img), g["velocity"][:, None].expand(-1, 2, -1, -1),
                               atol=1e-5, rtol=1e-5)


def test_released_folder_is_loaded_strictly(tmp_path):
    """A key missing from, or added to, the released weights is refused, as is an option Loom does not build."""
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(TINY_RELEASE, "diffusion_pytorch_model.safetensors"))
    config = json.loads(open(os.path.join(TINY_RELEASE, "config.json")).read())
    for name, bad_state, bad_config, match in [
        ("missing", {k: v for k, v in state.items() if "norm_added_q" not in k}, config, "missing"),
        ("unexpected", {**state, "dit_model.pos_embed.weight": torch.zeros(1)}, config, "unexpected"),
        ("projector", {**state, "proj_visual_condtion.1.weight": torch.zeros(1)}, config, "outside"),
        ("label", state, {**config, "use_label_condition": True}, "use_label_condition"),
        ("dims", state, {**config, "visual_condition_dim": 48}, "condition projector"),
        ("field", state, {**config, "depth": 3}, "unknown Step1X-3D DiT config fields"),
    ]:
        folder = tmp_path / name / "transformer"
        folder.mkdir(parents=True)
        save_file(bad_state, folder / "diffusion_pytorch_model.safetensors")
        (folder / "config.json").write_text(json.dumps(bad_config))
        with pytest.raises(ValueError, match=match):
            Shape4DDiT.from_pretrained(tmp_path / name)


def test_saved_release_round_trips_through_loom_folders(tmp_path):
    g = _golden()
    model = Shape4DDiT.from_pretrained(TINY_RELEASE)
    model.save_pretrained(tmp_path / "base")
    loaded = Shape4DDiT.from_pretrained(tmp_path / "base")
    assert loaded.config == model.config
    assert torch.equal(loaded(g["latents"], g["timestep"], g["image_tokens"]),
                       model(g["latents"], g["timestep"], g["image_tokens"]))


def test_paper_config_has_exactly_the_released_keys():
    """The paper's base, built on the meta device, has every key of the released Step1X-3D-Geometry-1300m DiT
    (upstream's FluxDenoiser at full size, keys and shapes in released_keys.json) and no other."""
    released = json.load(open(os.path.join(FIXTURES, "released_keys.json")))
    want = {k[len("dit_model."):]: v for k, v in released["keys"].items()}
    assert len(want) == len(released["keys"])  # every released key is under the wrapper's dit_model.
    with torch.device("meta"):
        model = Shape4DDiT(Shape4DDiTConfig.paper(spatiotemporal=False))
    have = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(want) - set(have)) == [] and sorted(set(have) - set(want)) == []
    assert have == want
    assert sum(p.numel() for p in model.parameters()) == released["parameters"] == 1_316_287_808
    # the released config.json fields map onto the paper's config
    cfg = Shape4DDiTConfig.from_step1x3d({**released["denoiser_model"], "condition_dim": 1024})
    assert cfg == Shape4DDiTConfig.paper(spatiotemporal=False)


# ---------------------------------------------------------------------------------------------------- the extension


def test_zero_init_extension_equals_base_per_frame(base_dir):
    """At initialisation the 4D model (base + zero-initialised spatiotemporal layers) is the base applied to every
    frame; once the layers' output projections move, it is not."""
    base = Shape4DDiT.from_pretrained(base_dir)
    x = _inputs()
    ref = _base_per_frame(base, x)
    for temporal in ("full", "1d"):
        for st_image_tokens in (True, False):
            ext = Shape4DDiT.from_pretrained(base_dir, spatiotemporal=True, temporal=temporal,
                                             st_image_tokens=st_image_tokens)
            assert len(ext.spatiotemporal_layers) == 4
            torch.testing.assert_close(ext(**x), ref, atol=1e-5, rtol=1e-5)
            _perturb_st_outputs(ext)
            assert (ext(**x) - ref).abs().max() > 1e-2


def test_spatiotemporal_layer_is_an_exact_identity_at_init():
    layer = SpatioTemporalLayer(32, 2, 16)
    g = torch.Generator().manual_seed(0)
    hidden, context, temb = (torch.randn(6, 4, 32, generator=g), torch.randn(6, 5, 32, generator=g),
                             torch.randn(2, 32, generator=g))
    c, h = layer(hidden, context, temb, frames=3)
    assert torch.equal(h, hidden) and torch.equal(c, context)


def test_dropping_spatiotemporal_layers_gives_the_base(tmp_path, base_dir):
    ext = Shape4DDiT.from_pretrained(base_dir, spatiotemporal=True)
    _perturb_st_outputs(ext)
    ext.save_pretrained(tmp_path / "ext")
    base = Shape4DDiT.from_pretrained(tmp_path / "ext", spatiotemporal=False)
    x = _inputs()
    torch.testing.assert_close(base(**x), _base_per_frame(Shape4DDiT.from_pretrained(base_dir), x))


def test_frozen_base_stays_frozen_and_the_layers_train(base_dir):
    model = Shape4DDiT.from_pretrained(base_dir, spatiotemporal=True)
    model.freeze_base()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(ST_PREFIX) for n in trainable)
    assert trainable == {ST_PREFIX + k for k, _ in model.spatiotemporal_layers.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = _inputs()
    target = torch.randn(B, T, Q, C, generator=torch.Generator().manual_seed(9))
    for _ in range(2):  # the zero output projection moves in step 1; the rest of the layer sees gradients in step 2
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(**x), target).backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith(ST_PREFIX):
            continue
        assert torch.equal(after[k], v), k  # bit-identical
    changed = {k for k in before if k.startswith(ST_PREFIX) and not torch.equal(after[k], before[k])}
    assert any(".proj_out." in k for k in changed)
    assert any(".attn.to_q." in k for k in changed) and any(".proj_mlp." in k for k in changed)
    with pytest.raises(ValueError, match="no spatiotemporal layers"):
        Shape4DDiT.tiny(spatiotemporal=False).freeze_base()


def test_a_tiny_4d_run_lowers_the_loss(base_dir):
    """Only the spatiotemporal layers train, on the shared-noise flow objective, and the loss falls."""
    model = Shape4DDiT.from_pretrained(base_dir, spatiotemporal=True)
    model.freeze_base()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, T, Q, C, generator=g).cumsum(1) * 0.3  # frames that drift: a "motion"
    image = torch.randn(B, T, L, D_IMG, generator=g)
    flow = FlowMatching(shift=1.0)

    def loss_at(step: int) -> torch.Tensor:
        gens = [sample_generator(0, step, f"seq{i}") for i in range(B)]
        x_t, timestep, target, _ = training_inputs(x0, gens, flow)
        return flow.loss(model(x_t, timestep, image), target)

    with torch.no_grad():
        start = sum(loss_at(1000 + k).item() for k in range(4))
    for step in range(60):
        opt.zero_grad()
        loss_at(step % 4).backward()
        opt.step()
    with torch.no_grad():
        end = sum(loss_at(1000 + k).item() for k in range(4))
    assert end < 0.8 * start


# ---------------------------------------------------------------------------------------------------- variants


def _layer_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden, context = torch.randn(2 * T, Q, 32, generator=g), torch.randn(2 * T, L, 32, generator=g)
    return hidden, context, torch.randn(2, 32, generator=g)


def _trained_layer(temporal: str, image_tokens: bool = True) -> SpatioTemporalLayer:
    torch.manual_seed(0)
    layer = SpatioTemporalLayer(32, 2, 16, temporal=temporal, image_tokens=image_tokens)
    torch.nn.init.normal_(layer.proj_out.weight, std=0.2)
    return layer


@pytest.mark.parametrize("temporal", ["full", "1d"])
def test_which_tokens_a_spatiotemporal_layer_mixes(temporal):
    """Perturb shape token 0 of frame 0 of sequence 0. "1d" attention changes token 0 in the other frames and no
    other token index; "full" attention reaches other token indices in other frames too. No variant mixes
    sequences."""
    layer = _trained_layer(temporal)
    hidden, context, temb = _layer_inputs()
    _, h = layer(hidden, context, temb, frames=T)
    bumped = hidden.clone()
    bumped[0, 0] += torch.randn(32, generator=torch.Generator().manual_seed(1))  # not a constant: LayerNorm
    _, h2 = layer(bumped, context, temb, frames=T)
    diff = (h2 - h).abs().amax(-1).reshape(2, T, Q)  # (sequence, frame, token)
    assert (diff[0, 1:, 0] > 1e-4).all()  # same token index, other frames
    assert (diff[1] == 0).all()  # the other sequence
    if temporal == "1d":
        assert (diff[0, :, 1:] == 0).all()
    else:
        assert (diff[0, 1:, 1:] > 1e-6).any()


def test_st_layer_without_image_tokens():
    """st_image_tokens=False: image tokens pass through unchanged and do not influence the shape tokens."""
    layer = _trained_layer("full", image_tokens=False)
    hidden, context, temb = _layer_inputs()
    c, h = layer(hidden, context, temb, frames=T)
    assert torch.equal(c, context)
    other = context + torch.randn(context.shape, generator=torch.Generator().manual_seed(1))
    _, h2 = layer(hidden, other, temb, frames=T)
    assert torch.equal(h2, h)
    with_images = _trained_layer("full", image_tokens=True)
    c3, h3 = with_images(hidden, context, temb, frames=T)
    _, h4 = with_images(hidden, other, temb, frames=T)
    assert not torch.equal(c3, context) and not torch.allclose(h3, h4)


def test_frame_rope_depends_only_on_the_frame_offset():
    """q . k after the frame-index rotary is the same when every frame index is shifted by the same amount, and
    changes when the offset between two tokens changes."""
    layer = SpatioTemporalLayer(32, 2, 16)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 5, 2, 16, generator=g), torch.randn(1, 5, 2, 16, generator=g)  # (B, S, H, d)
    frames = torch.tensor([0, 1, 2, 3, 7])

    def scores(ids):
        rot = layer.frame_rotary(ids)
        qr, kr = apply_rotary_emb(q, rot, sequence_dim=1), apply_rotary_emb(k, rot, sequence_dim=1)
        return torch.einsum("bshd,bthd->bhst", qr, kr)

    torch.testing.assert_close(scores(frames + 9), scores(frames), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(frames * 2), scores(frames), atol=1e-3)


# ---------------------------------------------------------------------------------------------------- attention


def test_attention_backend_switch():
    model = Shape4DDiT.tiny(attention_backend="math")
    processors = [m.processor for m in model.modules() if hasattr(m, "set_processor")]
    assert len(processors) == 2 + 2 + 4 and all(isinstance(p, SDPAProcessor) and p.backend == "math"
                                                for p in processors)
    x = _inputs()
    out = model(**x)
    model.set_attention_backend("auto")
    assert model.config.attention_backend == "auto"
    assert all(p.backend == "auto" for p in [m.processor for m in model.modules() if hasattr(m, "set_processor")])
    torch.testing.assert_close(model(**x), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention backend 'xformers'"):
        model.set_attention_backend("xformers")


def test_attention_backend_is_enforced():
    """A backend the device cannot run fails instead of silently falling back (on CPU there is no
    memory-efficient kernel)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device may have the memory-efficient kernel")
    model = Shape4DDiT.tiny(attention_backend="efficient")
    with pytest.raises(RuntimeError):
        model(**_inputs())


# ---------------------------------------------------------------------------------------------------- image features


def test_image_features_shapes_alpha_and_loading(tmp_path):
    enc = ImageFeatures.tiny()
    assert (enc.tokens, enc.dim, enc.image_size) == (5, 24, 28)
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(T, 40, 56, 4), dtype=np.uint8)  # (T, H, W, 4) like a shard
    feats = enc.encode(video)
    assert feats.shape == (T, 5, 24) and feats.dtype == torch.float32
    assert enc.encode(video[None]).shape == (1, T, 5, 24)
    # straight alpha composited over white: a transparent frame is a white frame
    clear = video.copy()
    clear[..., 3] = 0
    white = np.full((T, 40, 56, 3), 255, np.uint8)
    torch.testing.assert_close(enc.encode(clear), enc.encode(white))
    enc.model.save_pretrained(tmp_path / "dino")
    loaded = load_image_features(tmp_path / "dino")
    torch.testing.assert_close(loaded.encode(video), feats)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_features(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="uint8"):
        enc.encode(video.astype(np.float32))


def test_image_features_drop_the_register_tokens(tmp_path):
    """DINOv2 with registers (the release's encoder): CLS + patch tokens, the registers dropped, as Step1X-3D's
    Dinov2Encoder.encode_image; the folder loads through load_image_features."""
    enc = ImageFeatures.tiny(num_register_tokens=4)
    assert (enc.tokens, enc.registers) == (5, 4)
    assert "4 register tokens dropped" in enc.preprocessing and "dropped" not in ImageFeatures.tiny().preprocessing
    video = np.random.default_rng(2).integers(0, 256, size=(T, 28, 28, 4), dtype=np.uint8)
    feats = enc.encode(video)
    assert feats.shape == (T, 5, 24)
    with torch.no_grad():
        full = enc.model(pixel_values=enc.preprocess(video)).last_hidden_state  # (T, 1 + 4 + 4, D)
    assert full.shape[1] == 9
    torch.testing.assert_close(feats, torch.cat([full[:, :1], full[:, 5:]], 1))
    enc.model.save_pretrained(tmp_path / "dino-reg")
    torch.testing.assert_close(load_image_features(tmp_path / "dino-reg").encode(video), feats)


def test_image_preprocessing_is_step1x3d_transform():
    """Shorter side resized to the image size (bicubic, antialiased, the longer side truncated), centre crop with
    rounded offsets, ImageNet normalisation, no clamping: torchvision's Resize/CenterCrop/Normalize as Step1X-3D
    composes them, written out with torch ops."""
    enc = ImageFeatures.tiny()  # 28 px
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, size=(1, 40, 61, 3), dtype=np.uint8)
    x = torch.from_numpy(frame).permute(0, 3, 1, 2).float() / 255
    resized = torch.nn.functional.interpolate(x, size=(28, int(28 * 61 / 40)), mode="bicubic", align_corners=False,
                                              antialias=True)  # (1, 3, 28, 42)
    left = int(round((42 - 28) / 2.0))
    want = (resized[..., left: left + 28] - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(enc.preprocess(frame), want)
    assert enc.preprocess(frame.transpose(0, 2, 1, 3)).shape == (1, 3, 28, 28)  # portrait: the width is the side
    # a frame already at the size is only normalised
    small = frame[:, :28, :28]
    torch.testing.assert_close(enc.preprocess(small), (torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255
                                                       - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
                               / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))


def test_image_features_condition_the_dit():
    enc = ImageFeatures.tiny()
    video = np.random.default_rng(1).integers(0, 256, size=(B, T, 28, 28, 4), dtype=np.uint8)
    tokens = enc.encode(video)  # (B, T, L, D_img)
    out = Shape4DDiT.tiny()(_inputs()["latents"], torch.tensor([10.0, 990.0]), tokens)
    assert out.shape == (B, T, Q, C)


# ---------------------------------------------------------------------------------------------------- sampling


def test_shared_noise_is_identical_across_frames():
    noise = shared_noise((B, T, Q, C), torch.Generator().manual_seed(0))
    assert noise.shape == (B, T, Q, C)
    for t in range(1, T):
        assert torch.equal(noise[:, t], noise[:, 0])
    assert not torch.equal(noise[0, 0], noise[1, 0])  # sequences differ
    assert torch.equal(noise, shared_noise((B, T, Q, C), torch.Generator().manual_seed(0)))
    independent = noise_4d((B, T, Q, C), torch.Generator().manual_seed(0), shared=False)
    assert not torch.equal(independent[:, 1], independent[:, 0])
    # one generator per sequence: sequence i's noise does not depend on the batch around it
    gens = [sample_generator(0, 3, k) for k in ("a", "b")]
    both = shared_noise((2, T, Q, C), gens)
    alone = shared_noise((1, T, Q, C), [sample_generator(0, 3, "b")])
    assert torch.equal(both[1:], alone)


def test_training_inputs_share_noise_and_sigma():
    x0 = torch.randn(B, T, Q, C, generator=torch.Generator().manual_seed(0))
    x0[:, 1] = x0[:, 0]  # two identical frames get identical noisy inputs
    x_t, timestep, target, sigma = training_inputs(x0, [sample_generator(0, 0, k) for k in ("a", "b")])
    assert timestep.shape == sigma.shape == (B,)
    torch.testing.assert_close(timestep, sigma * 1000)
    assert torch.equal(x_t[:, 1], x_t[:, 0]) and not torch.equal(x_t[:, 2], x_t[:, 0])
    noise = target + x0
    torch.testing.assert_close(noise[:, 2], noise[:, 0])


def test_sample_4d():
    torch.manual_seed(0)
    base = Shape4DDiT.tiny(spatiotemporal=False, num_latents=Q)
    image = torch.randn(B, 1, L, D_IMG).expand(B, T, L, D_IMG)  # the same image in every frame
    out = sample_4d(base, image, steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (B, T, Q, C) and torch.isfinite(out).all()
    # shared noise + a per-frame model + identical frames: identical outputs; independent noise: not
    torch.testing.assert_close(out[:, 1], out[:, 0])
    independent = sample_4d(base, image, steps=3, generator=torch.Generator().manual_seed(0), shared=False)
    assert not torch.allclose(independent[:, 1], independent[:, 0])
    again = sample_4d(base, image, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    unshifted = sample_4d(base, image, steps=3, shift=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(unshifted, out)
    assert default_shift(16) == 4.0
    guided = sample_4d(Shape4DDiT.tiny(), image, steps=2, guidance_scale=3.0, num_latents=4,
                       generator=torch.Generator().manual_seed(0))
    assert guided.shape == (B, T, 4, C) and torch.isfinite(guided).all()
    with pytest.raises(ValueError, match="noise must be"):
        sample_4d(base, image, steps=1, noise=torch.zeros(B, T, Q + 1, C))


class TestShape4DDiTContract(FrozenPartsContract, BlocksContract):
    """Shapes, determinism, save/load, backward, frozen base and checkpointed blocks (tests/models/contract.py), on
    the model as 4D training uses it: the base frozen, the spatiotemporal layers trained (3.2)."""

    output_shape = (B, T, Q, C)

    def make_model(self, seed=0):
        return Shape4DDiT.tiny(seed=seed)

    def make_inputs(self, seed=0):
        return _inputs(seed)

    def save(self, model, path):
        _perturb_st_outputs(model)  # so the saved layers are not the zero-output initial ones
        model.save_pretrained(path)

    def load(self, model, path):
        return Shape4DDiT.from_pretrained(path)

    def prepare_training(self, model):
        model.freeze_base()
        _perturb_st_outputs(model)
        return model
