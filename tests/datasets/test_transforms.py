"""Frame subsampling and crop/resize: every per-frame array follows, K stays exact (projections agree with the
resampled pixels), colour is filtered, geometry is not mixed across pixels."""

import numpy as np
import pytest
import torch

from loom.datasets import transforms as T
from loom.geometry.camera import intrinsics, look_at, project, unproject_depth

torch.set_num_threads(1)


def scene_sample(t=4, h=24, w=32, seed=0):
    rng = np.random.default_rng(seed)
    K = np.tile(intrinsics(np.deg2rad(50), w, h).astype(np.float32), (t, 1, 1))
    K[:, 0, 2] += 1.3  # an off-centre principal point, so offsets and scales cannot cancel by symmetry
    c2w = np.stack([look_at((3.0 * np.cos(a), 3.0 * np.sin(a), 1.0)) for a in np.linspace(0, 1, t)]).astype(np.float32)
    depth = rng.uniform(2.0, 4.0, (t, h, w)).astype(np.float32)
    pos = np.stack([unproject_depth(depth[i].astype(np.float64), K[i].astype(np.float64), c2w[i].astype(np.float64))
                    for i in range(t)]).astype(np.float32)
    return {
        "rgb": rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8), "depth": depth, "position": pos,
        "mask": rng.random((t, h, w)) > 0.5, "object_id": rng.integers(0, 5, (t, h, w)).astype(np.uint16),
        "flow_fwd": rng.normal(size=(t - 1, h, w, 2)).astype(np.float32),
        "occlusion_fwd": rng.random((t - 1, h, w)) > 0.5, "flow_last_to_first": np.ones((h, w, 2), np.float32),
        "noise": rng.normal(size=(t, 2, h // 4, w // 4)).astype(np.float32),
        "K": K, "c2w": c2w, "meta": {"frame_times": list(range(t))},
    }


@pytest.mark.parametrize("box,size", [((4, 2, 28, 22), (10, 12)), ((3, 5, 11, 13), (16, 16)),
                                      ((0, 0, 32, 24), (12, 16)), ((5, 1, 30, 20), (19, 25))])
def test_crop_resize_keeps_projection_consistent(box, size):
    s = scene_sample()
    s.pop("noise")
    out = T.crop_resize(s, box, size)
    x0, y0, x1, y1 = box
    sx, sy = size[1] / (x1 - x0), size[0] / (y1 - y0)
    pts = np.random.default_rng(1).normal(scale=0.4, size=(50, 3))
    for t in range(4):
        uv, _ = project(pts, s["K"][t].astype(np.float64), s["c2w"][t].astype(np.float64))
        uv2, _ = project(pts, out["K"][t].astype(np.float64), s["c2w"][t].astype(np.float64))
        np.testing.assert_allclose(uv2, (uv - [x0, y0]) * [sx, sy], atol=1e-3)
        # each output pixel holds the position of a source pixel centre: it projects into (or, enlarging,
        # within half a source pixel of) the output pixel it landed in
        H, W = size
        uvp, _ = project(out["position"][t].reshape(-1, 3).astype(np.float64), out["K"][t].astype(np.float64),
                         s["c2w"][t].astype(np.float64))
        centres = np.stack(np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5), -1).reshape(-1, 2)
        err = np.abs(uvp - centres)
        assert (err[:, 0] <= 0.5 * max(sx, 1) + 1e-3).all() and (err[:, 1] <= 0.5 * max(sy, 1) + 1e-3).all()
    assert out["rgb"].shape == (4, *size, 3) and out["rgb"].dtype == np.uint8
    assert out["mask"].dtype == bool and out["object_id"].dtype == np.uint16 and out["flow_fwd"].shape == (3, *size, 2)
    # geometry is never mixed: every output depth/id value is one of the source's
    assert np.isin(out["depth"], s["depth"]).all() and np.isin(out["object_id"], s["object_id"]).all()
    np.testing.assert_allclose(out["flow_last_to_first"][0, 0], [sx, sy], rtol=1e-6)
    assert s["K"].dtype == out["K"].dtype == np.float32 and "rgb" in s and s["rgb"].shape == (4, 24, 32, 3)


def test_colour_is_area_averaged_and_alpha_does_not_bleed():
    s = scene_sample()
    out = T.crop_resize({"rgb": s["rgb"]}, (0, 0, 32, 24), (12, 16))
    ref = s["rgb"].astype(np.float64).reshape(4, 12, 2, 16, 2, 3).mean((2, 4))
    assert np.abs(out["rgb"].astype(np.float64) - ref).max() <= 0.5 + 1e-6
    video = np.zeros((1, 2, 2, 4), np.uint8)
    video[0, 0, 0] = [200, 100, 50, 255]
    video[0, 1, 1] = [0, 255, 0, 0]  # a fully transparent pixel with colour garbage
    v = T.crop_resize({"video": video}, (0, 0, 2, 2), (1, 1))["video"]
    assert v[0, 0, 0].tolist() == [200, 100, 50, 64]


def test_noise_is_cropped_on_its_grid_or_refused():
    s = scene_sample()
    out = T.crop_resize(s, (4, 8, 28, 20))  # aligned to the 4 px latent cells, no resize
    np.testing.assert_array_equal(out["noise"], s["noise"][:, :, 2:5, 1:7])
    with pytest.raises(ValueError, match="noise"):
        T.crop_resize(s, (4, 8, 28, 20), (6, 12))
    with pytest.raises(ValueError, match="noise"):
        T.crop_resize(s, (3, 8, 28, 20))


def test_bad_boxes_are_refused():
    s = scene_sample()
    for box in [(0, 0, 33, 24), (5, 5, 5, 10), (-1, 0, 4, 4)]:
        with pytest.raises(ValueError, match="crop box"):
            T.crop_resize(s, box)


def test_subsample_frames_moves_every_per_frame_array_together():
    s = scene_sample(t=6)
    rng = np.random.default_rng(3)
    out = T.subsample_frames(s, 3, "random", rng, drop_flow=True)
    idx = out["frame_indices"]
    assert len(idx) == 3 and np.all(np.diff(idx) > 0)
    for k in ("rgb", "depth", "K", "c2w", "noise", "mask"):
        np.testing.assert_array_equal(out[k], s[k][idx])
    assert out["meta"]["frame_times"] == idx.tolist() and "flow_fwd" not in out
    with pytest.raises(ValueError, match="flow"):
        T.subsample_frames(s, 3, "uniform")
    w = T.subsample_frames(s, 3, "window", np.random.default_rng(0), drop_flow=True)
    i0 = w["frame_indices"][0]
    assert w["frame_indices"].tolist() == [i0, i0 + 1, i0 + 2]
    np.testing.assert_array_equal(w["flow_fwd"], s["flow_fwd"][i0:i0 + 2])
    assert "flow_last_to_first" not in w
    assert T.frame_indices(6, 3).tolist() == [0, 2, 5] and T.frame_indices(9, 3, "window", stride=4).tolist() == [0, 4, 8]
    with pytest.raises(ValueError, match="n=7"):
        T.subsample_frames(s, 7)


def test_4d_sample_keeps_per_query_arrays():
    t, q = 4, 4  # Q == T on purpose: per-query arrays must not be taken for frames
    s = {"surface": np.zeros((t, 10, 6), np.float32), "queries": np.arange(t * q * 3, dtype=np.float32).reshape(t, q, 3),
         "query_faces": np.arange(q), "query_bary": np.ones((q, 3), np.float32),
         "K": np.zeros((t, 3, 3), np.float32), "c2w": np.zeros((t, 4, 4), np.float32),
         "video": np.zeros((t, 8, 8, 4), np.uint8)}
    out = T.SubsampleFrames(2)(s, None)
    assert out["queries"].shape == (2, q, 3) and out["query_faces"].shape == (q,) and out["query_bary"].shape == (q, 3)
    np.testing.assert_array_equal(out["queries"], s["queries"][[0, 3]])


def test_random_crop_is_a_function_of_the_generator():
    s = scene_sample()
    s.pop("noise")
    tf = T.CropResize((8, 8), scale=(0.4, 1.0))
    a = tf(s, np.random.default_rng(9))
    b = tf(s, np.random.default_rng(9))
    c = tf(s, np.random.default_rng(10))
    assert np.array_equal(a["K"], b["K"]) and np.array_equal(a["rgb"], b["rgb"]) and not np.array_equal(a["K"], c["K"])
    assert T.CropResize((12, 16))(s)["rgb"].shape == (4, 12, 16, 3)
