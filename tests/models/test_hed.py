"""Loom's HED (`loom.models.hed`) against controlnet_aux 0.0.10's network and detector: tests/fixtures/hed_upstream
holds what ``HEDdetector`` computed on fixed, formula-made weights (``make_golden.py`` there says how); plus the weights
file's safety and the edges of depth that VideoFrom3D needs (prep videos with edges.method=hed)."""

import os

import numpy as np
import pytest
import torch

from loom.models.hed import HEDNet, hed_edges, load_hed

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hed_upstream")


def fixed_state() -> dict:
    """ControlNetHED-shaped weights from a formula (no RNG: the same on every torch): small, varied, and a norm
    near ImageNet's mean in 0..255 units."""
    state = {}
    for i, (name, p) in enumerate(HEDNet().state_dict().items()):
        n = p.numel()
        if name == "norm":
            v = torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
        elif name.endswith("bias"):
            v = 0.01 * torch.cos(torch.arange(n, dtype=torch.float64) * 0.7 + i).view(p.shape)
        else:
            fan_in = n // p.shape[0]
            v = torch.sin(torch.arange(n, dtype=torch.float64) * 0.37 + i).view(p.shape) / fan_in ** 0.5
        state[name] = v.float()
    return state


def depth_step(h=48, w=80) -> np.ndarray:
    """A depth map (uint8) with a vertical step and a gentle ramp: one strong structural edge."""
    d = np.tile(np.linspace(60, 90, w), (h, 1))
    d[:, w // 2:] += 120
    return d.astype(np.uint8)


def test_hed_matches_controlnet_aux_and_loads_the_released_layout(tmp_path):
    path = str(tmp_path / "ControlNetHED.pth")
    torch.save(fixed_state(), path)
    net = load_hed(str(tmp_path))
    got = hed_edges(net, depth_step())
    want = np.load(os.path.join(FIX, "golden.npz"))["edges"]
    assert got.shape == want.shape == (64, 64)  # detection size: each side rounded to a multiple of 64
    assert np.abs(got.astype(int) - want).max() <= 1


def test_weights_are_read_as_tensors_only(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = str(tmp_path / "evil.pth")
    torch.save({"norm": Boom()}, path)
    with pytest.raises(Exception):
        load_hed(path)
    assert not os.path.exists(tmp_path / "pwned")
    torch.save({"norm": torch.zeros(1, 3, 1, 1)}, str(tmp_path / "partial.pth"))
    with pytest.raises(ValueError, match="not ControlNetHED"):
        load_hed(str(tmp_path / "partial.pth"))
    with pytest.raises(FileNotFoundError, match="ControlNetHED.pth"):
        load_hed(str(tmp_path / "nowhere"))


def test_prep_videos_edges_with_hed(tmp_path):
    from loom.corpora import videos as V
    from loom.platform import config as c

    torch.save(fixed_state(), str(tmp_path / "ControlNetHED.pth"))
    depth = np.stack([depth_step() / 255.0] * 2).astype(np.float32)
    edges, method = V.edges_of_depth(depth, c.to_dict(V.DepthEdgeSettings(method="hed",
                                                                          hed_weights=str(tmp_path))))
    assert method == "hed-of-depth" and edges.shape == depth.shape and edges.dtype == np.uint8
