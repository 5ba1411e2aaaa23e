"""The frozen CLIP vision wrapper against a direct run the way diffusers' WanImageToVideoPipeline.encode_image does it
(image processor, then ``hidden_states[-2]``), on a tiny random CLIPVisionModel; and the released Wan layout
(``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``) against golden outputs of VideoX-Fun's own CLIPModel at a
tiny size (tests/fixtures/wan_encoders, made by its make_fixtures.py)."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from loom.models import image_encoder as ie  # noqa: E402
from tests.models.contract import FrozenEncoderContract  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "wan_encoders")
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
             "image_size": 32, "patch_size": 8, "projection_dim": 16}


def save_tiny_clip(path, processor: bool = True, with_projection: bool = False, seed: int = 0) -> str:
    """A tiny random CLIP vision tower (32 px, 8 px patches: 17 tokens of 32 features), with a CLIP image processor
    config for its size unless ``processor`` is False."""
    cfg = transformers.CLIPVisionConfig(**TINY_CLIP)
    torch.manual_seed(seed)
    cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
    cls(cfg).save_pretrained(str(path))
    if processor:
        ie._pil_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            str(path))
    return str(path)


def wan_reference(path, images):
    """diffusers 0.42.1 WanImageToVideoPipeline.encode_image, minus the pipeline."""
    proc = ie._pil_processor_class().from_pretrained(path)
    model = transformers.CLIPVisionModel.from_pretrained(path).eval()
    px = proc(images=list(images), return_tensors="pt")
    with torch.no_grad():
        return model(**px, output_hidden_states=True).hidden_states[-2]


def images(b=2, h=48, w=40, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (b, h, w, 3), dtype=np.uint8)


def test_encode_is_penultimate_layer_like_wan(tmp_path):
    d = save_tiny_clip(tmp_path / "clip")
    enc = ie.load_image_encoder(d)
    assert (enc.dim, enc.tokens, enc.image_size) == (32, 17, 32)
    assert not any(p.requires_grad for p in enc.parameters())
    assert "preprocessor_config.json" in enc.preprocessing
    x = images()
    z = enc.encode(x)
    assert z.shape == (2, 17, 32) and z.dtype == torch.float32
    torch.testing.assert_close(z, wan_reference(d, x), rtol=1e-5, atol=1e-5)
    # The penultimate layer, not the last one: a hook on the layers gives the same tensor one layer earlier.
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for name, layer in enc.model.named_modules() if re.fullmatch(r".*encoder\.layers\.\d+", name)]
    assert len(hooks) == TINY_CLIP["num_hidden_layers"]
    enc.encode(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(z, outs[-2].float(), rtol=0, atol=0)
    assert (z - outs[-1]).abs().max() > 1e-3


def test_torch_preprocessing_without_processor_config(tmp_path):
    with_cfg = ie.load_image_encoder(save_tiny_clip(tmp_path / "a"))
    plain = ie.load_image_encoder(save_tiny_clip(tmp_path / "b", processor=False))
    assert plain.processor is None and plain.preprocessing.startswith("torch")
    # Already the model's size: no resampling, so both paths give the same pixels.
    x = images(h=32, w=32)
    torch.testing.assert_close(plain.preprocess(x), with_cfg.preprocess(x), rtol=0, atol=1e-6)
    # Larger and not square: shortest-edge resize and centre crop agree with PIL up to resampling differences.
    x = images(b=1, h=96, w=72, seed=1)
    x = np.repeat(np.repeat(x[:, ::8, ::8], 8, 1), 8, 2)  # blocky, so resampling filters barely matter
    a, b = plain.preprocess(x), with_cfg.preprocess(x)
    assert a.shape == b.shape == (1, 3, 32, 32)
    assert (a - b).abs().mean() < 0.01 and (a - b).abs().max() < 0.15  # one uint8 level is 0.015


def test_checkpoint_layout_projection_and_errors(tmp_path):
    root = tmp_path / "wan"
    save_tiny_clip(root / "image_encoder", processor=False, with_projection=True)
    ie._pil_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(root / "image_processor"))
    assert ie.resolve_image_dirs(str(root)) == (str(root / "image_encoder"), str(root / "image_processor"))
    enc = ie.load_image_encoder(str(root))
    assert type(enc.model).__name__ == "CLIPVisionModelWithProjection" and enc.processor is not None
    assert enc.encode(images()).shape == (2, 17, 32)
    with pytest.raises(FileNotFoundError, match="no-such-clip"):
        ie.load_image_encoder(str(tmp_path / "no-such-clip"))
    with pytest.raises(FileNotFoundError, match="no-proc"):
        ie.resolve_image_dirs(str(root), str(tmp_path / "no-proc"))
    other = tmp_path / "other"
    ie._pil_processor_class()(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        str(other))
    with pytest.raises(ValueError, match="224x224"):
        ie.load_image_encoder(str(root), image_processor=str(other))
    with pytest.raises(ValueError, match="uint8"):
        enc.encode(images().astype(np.float32))


def golden():
    from safetensors.torch import load_file

    return load_file(os.path.join(FIXTURES, "golden.safetensors"))


def released_state_dict() -> dict:
    return torch.load(os.path.join(FIXTURES, ie.RELEASED_FILE), weights_only=True)


def wan_clip_vision_shapes(dim, mlp, layers, patch, size, out) -> dict:
    """The visual keys and shapes of Wan's open-clip ViT (wan/modules/clip.py VisionTransformer, pool 'token',
    pre_norm), as meta tensors."""
    shapes = {"visual.patch_embedding.weight": (dim, 3, patch, patch), "visual.cls_embedding": (1, 1, dim),
              "visual.pos_embedding": (1, (size // patch) ** 2 + 1, dim), "visual.head": (dim, out)}
    for n in ("pre_norm", "post_norm"):
        shapes |= {f"visual.{n}.weight": (dim,), f"visual.{n}.bias": (dim,)}
    for i in range(layers):
        b = f"visual.transformer.{i}."
        for n, w in (("norm1", (dim,)), ("norm2", (dim,)), ("attn.to_qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                     ("mlp.0", (mlp, dim)), ("mlp.2", (dim, mlp))):
            shapes |= {b + n + ".weight": w, b + n + ".bias": (w[0],)}
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


@pytest.mark.parametrize("form", ["root", "pth"])
def test_released_pth_matches_upstream_videox_fun(form):
    """The tiny released-layout file through Loom's reader gives what VideoX-Fun's CLIPModel gave (PIL -> to_tensor ->
    [-1, 1] -> bicubic squash to the model's size -> CLIP mean/std -> the first N-1 blocks): so its use_31_block is
    transformers' hidden_states[-2]."""
    gold = golden()
    pth = os.path.join(FIXTURES, ie.RELEASED_FILE)
    enc_path, proc = ie.resolve_image_dirs(FIXTURES if form == "root" else pth)
    assert os.path.samefile(enc_path, pth) and proc is None
    enc = ie.load_image_encoder(FIXTURES if form == "root" else pth)
    assert (enc.dim, enc.tokens, enc.image_size, enc.resize) == (80, 17, 16, "squash")
    assert "VideoX-Fun" in enc.preprocessing and not any(p.requires_grad for p in enc.parameters())
    images = gold["images"].numpy()  # (2, 24, 40, 3): not square, so squash and crop differ
    z = enc.encode(images)
    assert z.shape == (2, 17, 80) and z.dtype == torch.float32
    torch.testing.assert_close(z, gold["image"], rtol=1e-5, atol=1e-5)
    # What would fail: the last layer instead of the penultimate one, or diffusers' crop instead of the squash.
    with torch.no_grad():
        px = enc.preprocess(images)
        last = enc.model(pixel_values=px, output_hidden_states=True).hidden_states[-1]
    assert (last - gold["image"]).abs().max() > 0.1
    crop = ie.ImageEncoder(enc.model).preprocess(images)
    assert (crop - px).abs().max() > 0.1


def test_released_pth_weights_and_bf16():
    """The visual tower lands unchanged where the mapping says (to_qkv split in q, k, v; head transposed into the
    projection); the text tower is in the file and skipped; bfloat16 loads and stays close to upstream."""
    sd = released_state_dict()
    assert any(k.startswith("textual.") for k in sd) and "log_scale" in sd
    m = ie.load_image_encoder(FIXTURES).model
    vm, att = m.vision_model, m.vision_model.encoder.layers[1].self_attn
    qkv, qkv_b = sd["visual.transformer.1.attn.to_qkv.weight"], sd["visual.transformer.1.attn.to_qkv.bias"]
    pairs = [(sd["visual.cls_embedding"][0, 0], vm.embeddings.class_embedding),
             (sd["visual.pos_embedding"][0], vm.embeddings.position_embedding.weight),
             (sd["visual.pre_norm.bias"], vm.pre_layrnorm.bias),
             (sd["visual.post_norm.weight"], vm.post_layernorm.weight),
             (qkv[:80], att.q_proj.weight), (qkv[80:160], att.k_proj.weight), (qkv[160:], att.v_proj.weight),
             (qkv_b[80:160], att.k_proj.bias), (sd["visual.transformer.1.attn.proj.weight"], att.out_proj.weight),
             (sd["visual.transformer.1.norm2.weight"], vm.encoder.layers[1].layer_norm2.weight),
             (sd["visual.transformer.1.mlp.2.bias"], vm.encoder.layers[1].mlp.fc2.bias),
             (sd["visual.head"].t(), m.visual_projection.weight)]
    for i, (want, got) in enumerate(pairs):
        assert torch.equal(got, want), i
    assert (m.config.hidden_act, m.config.num_attention_heads, m.config.layer_norm_eps) == ("gelu", 1, 1e-5)
    bf = ie.load_image_encoder(FIXTURES, dtype="bfloat16")
    assert bf.dtype == torch.bfloat16
    gold = golden()
    z = bf.encode(gold["images"].numpy())
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, gold["image"], rtol=0.05, atol=0.1)


def test_vit_h_config_from_the_released_shapes():
    """ViT-H/14's shapes (meta tensors: no memory) give Wan's CLIP: width 1280, 16 heads, 32 layers, mlp 5120, patch
    14, 224 px, 257 tokens; and the shape builder agrees with the fixture file's visual keys."""
    tiny = {k: tuple(v.shape) for k, v in released_state_dict().items() if k.startswith("visual.")}
    assert {k: tuple(v.shape) for k, v in wan_clip_vision_shapes(80, 32, 2, 4, 16, 16).items()} == tiny
    cfg, hf = ie.clip_vision_from_wan(wan_clip_vision_shapes(1280, 5120, 32, 14, 224, 1024))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size, cfg.patch_size,
            cfg.image_size, cfg.projection_dim) == (1280, 16, 32, 5120, 14, 224, 1024)
    assert hf["vision_model.embeddings.position_embedding.weight"].shape == (257, 1280)


def test_released_pth_refuses_what_is_not_wan_clip(tmp_path):
    sd = released_state_dict()
    with pytest.raises(ValueError, match=r"lacks 1 weight.*visual\.transformer\.1"):
        ie.clip_vision_from_wan({k: v for k, v in sd.items() if k != "visual.transformer.1.norm2.bias"})
    with pytest.raises(ValueError, match="visual.patch_embedding.bias"):  # open-clip with pre_norm has no bias
        ie.clip_vision_from_wan(sd | {"visual.patch_embedding.bias": torch.zeros(80)})
    with pytest.raises(ValueError, match=r"disagree.*visual\.transformer\.0\.mlp\.2\.weight"):
        ie.clip_vision_from_wan(sd | {"visual.transformer.0.mlp.2.weight": torch.zeros(80, 40)})
    with pytest.raises(ValueError, match="80 features per head"):
        ie.clip_vision_from_wan(wan_clip_vision_shapes(96, 32, 2, 4, 16, 16))
    with pytest.raises(ValueError, match="numbered"):
        ie.clip_vision_from_wan({k.replace("transformer.1.", "transformer.2."): v for k, v in sd.items()})
    # The umT5 file passed as the CLIP: named as not a CLIP in Wan's layout.
    with pytest.raises(ValueError, match="no 'visual.patch_embedding.weight'"):
        ie.load_image_encoder(os.path.join(FIXTURES, "models_t5_umt5-xxl-enc-bf16.pth"))
    # The .pth route preprocesses in code: a processor folder is refused, not ignored.
    with pytest.raises(ValueError, match="leave image_processor unset"):
        ie.resolve_image_dirs(FIXTURES, str(tmp_path))
    (tmp_path / "clip.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .pth"):
        ie.load_image_encoder(str(tmp_path / "clip.bin"))
    # A released root without the CLIP file (a T2V release) still has the DiT's config.json: say what is missing.
    root = tmp_path / "t2v"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(FileNotFoundError, match=ie.RELEASED_FILE.replace(".", r"\.")):
        ie.load_image_encoder(str(root))
    shutil.copy(os.path.join(FIXTURES, ie.RELEASED_FILE), root)
    assert ie.load_image_encoder(str(root)).tokens == 17


class TestImageEncoderContract(FrozenEncoderContract):
    """Shapes, determinism, save/load and frozen weights (tests/models/contract.py) of the CLIP vision wrapper."""

    output_shape = (2, 17, 32)
    leaves_global_rng = False  # the tiny CLIP is built under torch.manual_seed

    def make_model(self, seed=0):
        path = self.tmp_path / f"clip-{seed}-{len(list(self.tmp_path.iterdir()))}"
        return ie.load_image_encoder(save_tiny_clip(path, seed=seed))

    def make_inputs(self, seed=0):
        return {"images": images(seed=seed)}

    def forward(self, model, inputs):
        return model.encode(inputs["images"])

    def save(self, model, path):
        model.model.save_pretrained(str(path))
        model.processor.save_pretrained(str(path))

    def load(self, model, path):
        return ie.load_image_encoder(str(path))
