"""Loom's RAFT (`loom.models.raft`) against torchvision 0.29.1's ``raft_large`` and ``raft_small``:
tests/fixtures/raft_upstream holds what torchvision computed on two frames with weights made by :func:`golden_state`
(``make_golden.py`` there says how); plus the weights file's safety and the frame handling of :func:`raft_flow`.
Random weights say nothing about accuracy: the flows are compared with torchvision's, not with the true motion."""

import os
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loom.models.raft import RAFT, RAFT_LARGE, RAFT_SMALL, _pad_amounts, load_raft, raft_flow, raft_flow_batch

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "raft_upstream")


def golden_state(template: dict) -> dict:
    """Weights for every key of ``template`` (a RAFT state dict) from numpy's default_rng seeded by the key's CRC-32,
    so torchvision's and Loom's networks get the same values: convolutions N(0, 1/fan_in) (activations keep their
    scale), biases and BatchNorm shifts N(0, 0.05^2), BatchNorm scales 1 + N(0, 0.1^2), running mean N(0, 0.1^2),
    running variance U(0.75, 1.25); ``num_batches_tracked`` as in the template."""
    state = {}
    for name, p in template.items():
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        shape = tuple(p.shape)
        if name.endswith("num_batches_tracked"):
            state[name] = p.clone()
            continue
        if name.endswith("running_var"):
            v = rng.uniform(0.75, 1.25, shape)
        elif name.endswith("running_mean"):
            v = 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            v = 0.05 * rng.standard_normal(shape)  # convolutions' and BatchNorms' alike
        elif len(shape) == 1:  # a BatchNorm scale
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            v = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        state[name] = torch.from_numpy(np.asarray(v, dtype=np.float32))
    return state


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(os.path.join(FIX, "golden.npz")))


@pytest.fixture(scope="module")
def large():
    net = RAFT(RAFT_LARGE)
    net.load_state_dict(golden_state(net.state_dict()))
    return net.eval()


def test_state_dict_keys_are_torchvisions(golden):
    for cfg, kind in ((RAFT_LARGE, "large"), (RAFT_SMALL, "small")):
        sd = RAFT(cfg).state_dict()
        assert list(sd) == list(golden[f"{kind}_keys"])
        assert [list(v.shape) for v in sd.values()] == [[int(s) for s in x.split(",") if s]
                                                        for x in golden[f"{kind}_shapes"]]


def test_every_flow_update_matches_torchvision_raft_large(golden, large):
    a, b = (torch.from_numpy(golden[k]).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1 for k in ("frame_a", "frame_b"))
    top, bottom, left, right = (int(x) for x in golden["pad"])
    assert (_pad_amounts(a.shape[2]), _pad_amounts(a.shape[3])) == ((top, bottom), (left, right))
    a, b = (F.pad(x, (left, right, top, bottom), mode="replicate") for x in (a, b))
    with torch.no_grad():
        flows = torch.stack([f[0] for f in large(a, b, num_flow_updates=3)]).numpy()
    want = golden["large_flows"]
    assert flows.shape == want.shape == (3, 2, 128, 128)
    assert np.abs(want).max() > 1.0 and np.abs(want[2] - want[0]).max() > 0.1  # the updates move the flow
    np.testing.assert_allclose(flows, want, rtol=1e-4, atol=1e-4)


def test_raft_flow_matches_torchvision_end_to_end(golden, tmp_path):
    """Normalisation, padding, cropping and the (H,W,2) layout, through the released file layouts: raft_large from a
    .pth, raft_small from a .safetensors in a folder."""
    from safetensors.torch import save_file

    a, b = golden["frame_a"], golden["frame_b"]
    h, w = a.shape[:2]
    top, _, left, _ = (int(x) for x in golden["pad"])
    torch.save(golden_state(RAFT(RAFT_LARGE).state_dict()), str(tmp_path / "raft_large_C_T_SKHT_V2-ff5fadd5.pth"))
    got = raft_flow(a, b, load_raft(str(tmp_path / "raft_large_C_T_SKHT_V2-ff5fadd5.pth")), iters=3)
    want = golden["large_flows"][-1][:, top:top + h, left:left + w].transpose(1, 2, 0)
    assert got.shape == (h, w, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    os.makedirs(tmp_path / "small")
    save_file(golden_state(RAFT(RAFT_SMALL).state_dict()), str(tmp_path / "small" / "raft_small.safetensors"))
    net = load_raft(str(tmp_path / "small"))
    assert net.cfg is RAFT_SMALL and net.mask_predictor is None
    got = raft_flow(a, b, net, iters=3)
    want = golden["small_flow"][:, top:top + h, left:left + w].transpose(1, 2, 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_load_refuses_wrong_keys_and_non_tensor_files(tmp_path):
    state = golden_state(RAFT(RAFT_LARGE).state_dict())
    del state["update_block.flow_head.conv2.bias"]
    torch.save(state, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match=r"raft_large weights: 1 missing \['update_block.flow_head.conv2.bias'\]"):
        load_raft(str(tmp_path / "missing.pth"))
    state = golden_state(RAFT(RAFT_LARGE).state_dict())
    state["update_block.extra.weight"] = torch.zeros(2)
    torch.save(state, str(tmp_path / "extra.pt"))
    with pytest.raises(ValueError, match=r"1 unexpected \['update_block.extra.weight'\]"):
        load_raft(str(tmp_path / "extra.pt"))
    torch.save({"module.fnet.conv1.weight": torch.zeros(1)}, str(tmp_path / "princeton.pth"))
    with pytest.raises(ValueError, match="princeton-vl/RAFT's own checkpoint layout"):
        load_raft(str(tmp_path / "princeton.pth"))

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"feature_encoder.conv.weight": Boom()}, str(tmp_path / "evil.pth"))
    with pytest.raises(ValueError, match="not a tensors-only state dict"):
        load_raft(str(tmp_path / "evil.pth"))
    assert not os.path.exists(tmp_path / "pwned")
    torch.save({"feature_encoder.conv.weight": 3}, str(tmp_path / "number.pth"))
    with pytest.raises(ValueError, match=r"not tensors: \['feature_encoder.conv.weight'\]"):
        load_raft(str(tmp_path / "number.pth"))
    with pytest.raises(ValueError, match="exactly one"):
        load_raft(str(tmp_path))  # a folder of several files
    with pytest.raises(FileNotFoundError, match="raft_large_C_T_SKHT_V2"):
        load_raft(str(tmp_path / "nowhere"))


def test_raft_flow_any_frame_size_and_batches(large):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 61, 93, 3), dtype=np.uint8)  # below the 128 minimum and not multiples of 8
    b = np.roll(a, (1, 2), axis=(1, 2))
    flows = raft_flow_batch(a, b, large, iters=2)
    assert flows.shape == (2, 61, 93, 2) and flows.dtype == np.float32 and np.isfinite(flows).all()
    one = raft_flow(a[1], b[1], large, iters=2)
    np.testing.assert_allclose(one, flows[1], rtol=1e-4, atol=1e-4)  # a pair's flow does not depend on its batch
    assert np.abs(one - flows[0]).max() > 1e-3
    wide = raft_flow(rng.integers(0, 256, (130, 150, 3), dtype=np.uint8),
                     rng.integers(0, 256, (130, 150, 3), dtype=np.uint8), large, iters=1)
    assert wide.shape == (130, 150, 2) and np.isfinite(wide).all()
    with pytest.raises(ValueError, match="uint8"):
        raft_flow(a[0].astype(np.float32), b[0].astype(np.float32), large)
    with pytest.raises(ValueError, match="multiples of 8"):
        large(torch.zeros(1, 3, 128, 130), torch.zeros(1, 3, 128, 130))
