"""LPIPS and CLIP score against torchmetrics' implementations, with the same (random) networks."""

import importlib

import pytest
import torch
from torchmetrics.functional.image import lpips as tm_lpips_mod

from loom.eval.metrics import clip_score, lpips
from loom.eval.metrics.clip_score import clip_similarity
from loom.eval.networks import clip as clip_net
from loom.eval.networks import lpips as lpips_net

tm_clip_mod = importlib.import_module("torchmetrics.functional.multimodal.clip_score")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 64, 64, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    return a, b


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_torchmetrics(images, net, monkeypatch, tmp_path):
    ours = lpips_net.tiny_random(net, seed=1)
    # torchmetrics' _LPIPS with our backbone (its torchvision loader patched) and our heads as its weights file
    monkeypatch.setattr(tm_lpips_mod, "_get_tv_model_features", lambda name, pretrained=False: ours.features)
    heads = {f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(ours.lins)}
    torch.save(heads, tmp_path / "heads.pth")
    ref = tm_lpips_mod._LPIPS(pretrained=True, net=net, model_path=str(tmp_path / "heads.pth"))
    a, b = images
    expect = ref(a, b, normalize=True).flatten()
    got = lpips(a, b, network=ours, reduction="none")
    torch.testing.assert_close(got.float(), expect, rtol=1e-5, atol=1e-7)
    assert float(got.min()) > 0
    assert lpips(a, a, network=ours) == pytest.approx(0.0, abs=1e-9)


def test_lpips_network_takes_any_layout_and_float_dtype(images):
    # the network copies both batches into one float32 (channels-last on the CPU) buffer: views, float64 and a
    # batch split give the same distances as the contiguous float32 batch
    net = lpips_net.tiny_random("alex", seed=2)
    a, b = images
    expect = net(a, b)
    torch.testing.assert_close(net(a.double(), b.double()), expect, rtol=1e-6, atol=1e-9)
    at, bt = a.transpose(2, 3).contiguous().transpose(2, 3), b.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(net(at, bt), expect, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.cat([net(a[:1], b[:1]), net(a[1:], b[1:])]), expect, rtol=1e-5, atol=1e-9)
    assert a.equal(images[0]) and b.equal(images[1])  # the inputs are not modified in place


def test_lpips_weights_load_from_torchvision_and_lpips_files(tmp_path):
    from loom.eval.weights import REGISTRY, _installed_location

    heads = _installed_location(REGISTRY["lpips-alex"].files[1])  # the v0.1 heads torchmetrics ships
    assert heads is not None and heads.name == "alex.pth"
    src = lpips_net.tiny_random("alex", seed=3)
    # a torchvision-layout file: features.* plus a classifier that must be ignored
    sd = {f"features.{k}": v for k, v in src.features.state_dict().items()} | {"classifier.1.weight": torch.ones(2)}
    torch.save(sd, tmp_path / "alexnet.pth")
    m = lpips_net.LPIPSNetwork("alex")
    m.load_weights(tmp_path / "alexnet.pth", heads)
    torch.testing.assert_close(m.features[3].weight, src.features[3].weight)
    ref = torch.load(heads, map_location="cpu", weights_only=True)
    torch.testing.assert_close(m.lins[2].weight, ref["lin2.model.1.weight"])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = clip_net.save_tiny_random(tmp_path_factory.mktemp("clip") / "clip", seed=0)
    return path, clip_net.load_folder(path)


def _tm_model(path):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()

    class Projected(torch.nn.Module):  # torchmetrics 1.9 expects tensors (transformers 5 returns ModelOutput)
        def __init__(self):
            super().__init__()
            self.m = model
            self.config = model.config

        def get_image_features(self, *a, **k):
            return clip_net._embeds(self.m.get_image_features(*a, **k))

        def get_text_features(self, *a, **k):
            return clip_net._embeds(self.m.get_text_features(*a, **k))

    return Projected(), CLIPProcessor.from_pretrained(path, local_files_only=True)


def test_clip_score_matches_torchmetrics(tiny_clip):
    path, net = tiny_clip
    g = torch.Generator().manual_seed(0)
    # 224x224 uint8-valued images: the processor's resize and crop are identities and no quantisation differs
    imgs = torch.randint(0, 256, (3, 3, 224, 224), generator=g).float() / 255
    texts = ["a red chair", "a small wooden boat", "two dogs"]
    model, proc = _tm_model(path)
    tm_items, _ = tm_clip_mod._clip_score_update((imgs * 255).round().to(torch.uint8), texts, model, proc)
    ours = clip_similarity(imgs, texts, network=net)
    torch.testing.assert_close(ours.float(), tm_items.float(), rtol=1e-4, atol=1e-4)
    # image-image form: an image against itself scores 100
    assert clip_score(imgs, reference=imgs, network=net) == pytest.approx(100.0, abs=1e-3)
    tm_ii = tm_clip_mod.clip_score((imgs * 255).round().to(torch.uint8), (imgs * 255).round().to(torch.uint8),
                                   model_name_or_path=lambda: (model, proc))  # fmt: skip
    assert float(tm_ii) == pytest.approx(100.0, abs=1e-3)


def test_clip_score_of_videos_is_per_frame(tiny_clip):
    _, net = tiny_clip
    g = torch.Generator().manual_seed(1)
    v = torch.rand(2, 3, 3, 96, 128, generator=g)
    per = clip_similarity(v, ["a cat", "a dog"], network=net)
    assert per.shape == (6,)
    torch.testing.assert_close(per[:3], clip_similarity(v[0], "a cat", network=net), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="exactly one"):
        clip_score(v, "a cat", reference=v, network=net)
