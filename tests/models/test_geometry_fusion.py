import re

import pytest
import torch

from loom.models.geometry_fusion import GeometryFusion
from tests.models.contract import TrainableContract


def _latents(b=2, c=64, t=3, h=8, w=6, seed=0):
    return torch.randn(b, c, t, h, w, generator=torch.Generator().manual_seed(seed))


def _perturb(module: torch.nn.Module, seed: int = 1) -> None:
    """Give every parameter random values, so the zero-initialised output conv no longer hides the body."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def test_starts_as_a_copy_of_the_normal_latent():
    torch.manual_seed(0)
    fusion = GeometryFusion(in_channels=64, out_channels=16, hidden=32, blocks=2)
    x = _latents()
    torch.testing.assert_close(fusion(x), x[:, :16], atol=1e-6, rtol=0)


def test_zero_output_conv_still_learns():
    # The body's gradient must not be blocked at step 0: its last conv and the skip get gradients, and one step
    # makes the output depend on the other conditions (position, known video, mask).
    torch.manual_seed(0)
    fusion = GeometryFusion(in_channels=64, out_channels=16, hidden=32, blocks=2)
    x = _latents()
    fusion(x).square().mean().backward()
    assert fusion.conv_out.weight.grad.abs().sum() > 0
    assert fusion.skip.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in fusion.parameters():
            p -= 0.1 * p.grad
    x2 = x.clone()
    x2[:, 16:] = _latents(seed=5)[:, 16:]  # same normal latent, other position/known/mask latents
    assert not torch.allclose(fusion(x), fusion(x2))


def test_frames_are_fused_independently():
    fusion = GeometryFusion(in_channels=64, out_channels=16, hidden=32, blocks=1)
    _perturb(fusion)
    x = _latents()
    x2 = x.clone()
    x2[:, :, 1] += 1.0
    y, y2 = fusion(x), fusion(x2)
    torch.testing.assert_close(y[:, :, 0], y2[:, :, 0], atol=0, rtol=0)
    torch.testing.assert_close(y[:, :, 2], y2[:, :, 2], atol=0, rtol=0)
    assert not torch.allclose(y[:, :, 1], y2[:, :, 1])


def test_save_load_round_trip(tmp_path):
    fusion = GeometryFusion(in_channels=64, out_channels=16, hidden=32, blocks=3)
    _perturb(fusion)
    fusion.save_pretrained(str(tmp_path / "fusion"))
    assert sorted(p.name for p in (tmp_path / "fusion").iterdir()) == ["config.json", "model.safetensors"]
    loaded = GeometryFusion.from_pretrained(str(tmp_path / "fusion"))
    assert loaded.config == {"in_channels": 64, "out_channels": 16, "hidden": 32, "blocks": 3}
    x = _latents()
    torch.testing.assert_close(loaded(x), fusion(x), atol=0, rtol=0)


def test_bad_inputs_are_refused(tmp_path):
    fusion = GeometryFusion(in_channels=64, out_channels=16, hidden=32, blocks=1)
    with pytest.raises(ValueError, match=r"\(B, 64, T, H, W\)"):
        fusion(_latents(c=48))
    with pytest.raises(ValueError, match="in_channels=8 < out_channels=16"):
        GeometryFusion(in_channels=8, out_channels=16)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        GeometryFusion.from_pretrained(missing)


class TestGeometryFusionContract(TrainableContract):
    """Shapes, determinism, save/load and backward (tests/models/contract.py), on a fusion whose zero-initialised
    output conv has been moved (else every seed would give the same output: a copy of the normal latent)."""

    output_shape = (2, 16, 3, 8, 6)

    def make_model(self, seed=0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fusion = GeometryFusion(in_channels=64, out_channels=16, hidden=32, blocks=2)
        _perturb(fusion, seed=seed + 1)
        return fusion

    def make_inputs(self, seed=0):
        return {"x": _latents(seed=seed)}
