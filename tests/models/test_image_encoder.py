"""The frozen CLIP vision wrapper against a direct run the way diffusers' WanImageToVideoPipeline.encode_image does it
(image processor, then ``hidden_states[-2]``), on a tiny random CLIPVisionModel."""

import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from loom.models import image_encoder as ie  # noqa: E402
from tests.models.contract import FrozenEncoderContract  # noqa: E402

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
