"""The clips schema (`loom.datasets.clips`): round trip through the on-disk encoding, refusals, the shard reader and
check, the contact sheet."""

import numpy as np
import pytest

from loom.datasets import clips
from loom.platform import shards

T, H, W, C = 5, 32, 48, 4


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "rgb": rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8),
        "flow_fwd": rng.normal(0, 3, (T - 1, H, W, 2)).astype(np.float32),
        "flow_last_to_first": rng.normal(0, 3, (H, W, 2)).astype(np.float32),
        "noise": rng.standard_normal((2, C, H // 8, W // 8)).astype(np.float32),  # 5 frames -> 1 + 1 latent
        "depth": rng.random((T, H, W)).astype(np.float32),
        "edges": (rng.random((T, H, W)) > 0.9).astype(np.uint8) * 255,
    }


def test_round_trip_keeps_every_array_within_its_storage_precision():
    a = _arrays()
    files = clips.encode_sample(a, {"uid": "u", "caption": "a room"})
    assert set(files) == set(clips.EXTS)
    s = clips.decode_sample(files)
    np.testing.assert_array_equal(s["rgb"], a["rgb"])  # FFV1: lossless
    np.testing.assert_array_equal(s["edges"], a["edges"])
    for k in ("noise", "depth"):  # float16 on disk
        assert s[k].dtype == np.float32
        np.testing.assert_allclose(s[k], a[k], rtol=2**-10, atol=2**-14)
    for k in ("flow_fwd", "flow_last_to_first"):  # int16 in 1/32 px on disk
        assert s[k].dtype == np.float32
        assert np.abs(s[k] - a[k]).max() <= 1 / 64 + 1e-6
    assert s["meta"] == {"uid": "u", "caption": "a room", "kind": "clips"}
    only = clips.decode_sample(files, keys=("depth",))
    assert set(only) == {"depth", "meta"}


@pytest.mark.parametrize("key,bad,needle", [
    ("noise", np.zeros((5, C, H // 8, W // 8), np.float32), "noise"),  # not at the latent frame rate
    ("flow_fwd", np.zeros((T, H, W, 2), np.float32), "flow_fwd"),
    ("edges", np.zeros((T, H, W), np.float32), "uint8"),
    ("depth", np.full((T, H, W), 2.0, np.float32), r"\[0, 1\]"),
    ("flow_last_to_first", np.full((H, W, 2), np.nan, np.float32), "NaN"),
])
def test_malformed_samples_are_refused(key, bad, needle):
    a = _arrays()
    a[key] = bad
    with pytest.raises(ValueError, match=needle):
        clips.encode_sample(a, {})
    a = _arrays()
    del a["depth"]
    with pytest.raises(ValueError, match="missing array 'depth'"):
        clips.check_arrays(a)


def test_reader_and_check_over_a_shard(tmp_path):
    url = str(tmp_path / "clips-000000.tar")
    good = clips.encode_sample(_arrays(0), {"uid": "a", "caption": "a street"})
    uncaptioned = clips.encode_sample(_arrays(1), {"uid": "b", "caption": ""})
    shards.write_tar(url, [("a_c0", good), ("b_c0", uncaptioned)])
    got = list(clips.iter_samples(url, keys=("noise",)))
    assert [s["__key__"] for s in got] == ["a_c0", "b_c0"] and got[0]["noise"].shape == (2, C, H // 8, W // 8)
    assert clips.check(url) == ["b_c0: meta has no caption"]
    assert clips.check(url, limit=1) == []
    incomplete = {k: v for k, v in good.items() if k != "edges.npz"}
    shards.write_tar(str(tmp_path / "x.tar"), [("c_c0", incomplete)])
    with pytest.raises(ValueError, match="edges.npz"):
        next(clips.iter_samples(str(tmp_path / "x.tar")))


def test_contact_sheet_columns():
    from loom.datasets.inspect import contact_sheet_clips

    s = clips.decode_sample(clips.encode_sample(_arrays(), {"caption": "x"}))
    sheet = contact_sheet_clips(s, max_frames=3)
    assert sheet.shape == (3 * H, 5 * W, 3) and sheet.dtype == np.uint8
    # Column 2 is the depth, grey: its three channels are equal and follow the depth of row 0.
    depth_col = sheet[:H, W:2 * W].astype(int)
    assert (depth_col[..., 0] == depth_col[..., 2]).all()
    assert np.corrcoef(depth_col[..., 0].ravel(), s["depth"][0].ravel())[0, 1] > 0.99


def test_flow_quantisation_range_and_older_float16_files():
    big = np.array([[-2000.0, -1023.0, 0.01, 1023.0, 5000.0]], np.float32)
    q = clips.dequantise_flow(clips.quantise_flow(big))
    np.testing.assert_allclose(q, [[-1023.97, -1023.0, 0.0, 1023.0, 1023.97]], atol=0.01)  # clipped, not wrapped
    f16 = np.array([1.5, -3.25], np.float16)
    assert clips.dequantise_flow(f16).dtype == np.float32 and clips.dequantise_flow(f16).tolist() == [1.5, -3.25]
