"""Feature-network weights found where users already have them: the LPIPS ImageNet backbones in the torch hub cache,
CLIP in the Hugging Face cache; ``loom weights`` says where each was found, and the loaders load from there."""

import dataclasses
import os

import pytest
import torch

from loom.cli import main
from loom.eval import weights as W
from loom.eval.networks import clip, lpips
from tests.platform.hf_cache import cache_folder, cache_repo

CLIP_REPO = "openai/clip-vit-large-patch14"


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty weights directory, torch hub cache and Hugging Face cache, all under tmp_path."""
    for env in ("HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv(W.WEIGHTS_ENV, str(tmp_path / "weights"))
    return {"weights": tmp_path / "weights", "hub": tmp_path / "torch" / "hub" / "checkpoints",
            "hf": tmp_path / "hf"}


def _row(rows, path):
    return next(r for r in rows if r.path == path)


def _alexnet_file(path, seed):
    """A torchvision-layout AlexNet file (``features.*`` and a classifier) with random weights."""
    net = lpips.tiny_random("alex", seed)
    sd = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    sd["classifier.1.weight"] = torch.zeros(2, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return net


def _pin_to(monkeypatch, network, index, path):
    """The registry entry pinned to ``path``'s sha256 prefix, as it is to the real file's."""
    net = W.REGISTRY[network]
    files = list(net.files)
    files[index] = dataclasses.replace(files[index], sha256=W.sha256_file(path)[:8])
    monkeypatch.setitem(W.REGISTRY, network, dataclasses.replace(net, files=tuple(files)))


def test_lpips_backbone_from_the_torch_hub_cache_is_found_and_loaded(caches, monkeypatch):
    hub_file = caches["hub"] / "alexnet-owt-7be5be79.pth"
    assert W.torch_hub_checkpoints() == caches["hub"]  # $TORCH_HOME/hub/checkpoints, read now
    net = _alexnet_file(hub_file, seed=1)
    # a file by that name that is not torchvision's AlexNet: found, and refused
    row = _row(W.check(), "lpips/alexnet-owt-7be5be79.pth")
    assert (row.status, row.found_in, row.location) == ("checksum mismatch", "torch hub cache", str(hub_file))
    with pytest.raises(ValueError, match="sha256"):
        W.resolve("lpips-alex")

    _pin_to(monkeypatch, "lpips-alex", 0, hub_file)
    row = _row(W.check(), "lpips/alexnet-owt-7be5be79.pth")
    assert (row.status, row.found_in, row.checksum) == ("present", "torch hub cache", "sha256 prefix ok")
    heads = _row(W.check(), "lpips/alex.pth")
    assert heads.status == "present" and heads.found_in == "installed torchmetrics"
    loaded = lpips.load("alex")  # the loader reads what check() names
    for a, b in zip(loaded.features.parameters(), net.features.parameters(), strict=True):
        assert torch.equal(a, b)

    # the weights directory comes first
    local = caches["weights"] / "lpips" / "alexnet-owt-7be5be79.pth"
    other = _alexnet_file(local, seed=2)
    _pin_to(monkeypatch, "lpips-alex", 0, local)
    assert W.resolve("lpips-alex")[0] == local and _row(W.check(), local.relative_to(caches["weights"]).as_posix()
                                                        ).found_in == "weights dir"
    assert torch.equal(lpips.load("alex").features[0].weight, other.features[0].weight)


def test_clip_from_the_hugging_face_cache_is_found_and_loaded(caches, tmp_path):
    row = _row(W.check(), "clip/clip-vit-large-patch14")
    assert row.status == "missing" and f"hf download {CLIP_REPO}" in row.fix and str(caches["hf"]) in row.fix
    with pytest.raises(FileNotFoundError, match=f"hf download {CLIP_REPO}"):
        clip.load()
    # a snapshot without the weights (`hf download --include '*.json'`) is not CLIP
    cache_repo(caches["hf"], CLIP_REPO, {"config.json": b"{}", "tokenizer.json": b"{}"})
    assert _row(W.check(), "clip/clip-vit-large-patch14").status == "missing"

    folder = clip.save_tiny_random(tmp_path / "clip-src", seed=3)
    snap = cache_folder(caches["hf"], CLIP_REPO, folder, revision="main")
    row = _row(W.check(), "clip/clip-vit-large-patch14")
    assert (row.status, row.found_in, row.location) == ("present", "HF cache", str(snap))
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    got = clip.load().image_embeds(images)
    want = clip.load_folder(folder).image_embeds(images)
    assert torch.allclose(got, want, atol=1e-6)


def test_loom_weights_says_where_each_file_was_found_and_how_to_get_the_rest(caches, monkeypatch, capsys, tmp_path):
    hub_file = caches["hub"] / "alexnet-owt-7be5be79.pth"
    _alexnet_file(hub_file, seed=1)
    _pin_to(monkeypatch, "lpips-alex", 0, hub_file)
    cache_folder(caches["hf"], CLIP_REPO, clip.save_tiny_random(tmp_path / "clip-src"))
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    assert f"torch hub cache:   {caches['hub']} ($TORCH_HOME)" in out
    assert f"HF hub cache:      {caches['hf']} ($HF_HUB_CACHE)" in out

    def line(f):
        return next(ln for ln in out.splitlines() if ln.split()[1:2] == [f])

    assert "torch hub cache" in line("lpips/alexnet-owt-7be5be79.pth") and str(hub_file) in line(
        "lpips/alexnet-owt-7be5be79.pth")
    assert " HF cache " in line("clip/clip-vit-large-patch14")
    assert "installed torchmetrics" in line("lpips/alex.pth")
    assert " missing " in line("lpips/vgg16-397923af.pth")
    fix = next(ln for ln in out.splitlines() if ln.strip().startswith("lpips/vgg16-397923af.pth (missing)"))
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in fix and str(caches["hub"]) in fix
    assert os.path.join(str(caches["weights"]), "lpips", "vgg16-397923af.pth") in fix
