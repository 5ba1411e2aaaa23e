"""Warped noise: every frame i.i.d. N(0,1), the pattern follows the flow; resize_flow scales vectors."""

import math

import pytest
import torch
import torch.nn.functional as F

from loom.geometry.noise import resize_flow, warp_noise

torch.set_num_threads(1)

C, HH, WW = 4, 64, 64
N = C * HH * WW
SIGMA = 4.0 / math.sqrt(N)  # 4 standard errors of a mean or a correlation over N samples


def _noise0(seed=0):
    return torch.randn((C, HH, WW), generator=torch.Generator().manual_seed(seed))


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _constant(frames, dx, dy):
    f = torch.zeros((frames, HH, WW, 2))
    f[..., 0], f[..., 1] = dx, dy
    return f


def _smooth_random(frames, amplitude, seed=2):
    """Low-frequency random flows: a 4x4 grid of random vectors, bilinearly upsampled."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((frames, 2, 4, 4), generator=g) * amplitude
    return F.interpolate(coarse, size=(HH, WW), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def _zoom(frames, scale):
    """Each step scales the image about its centre by ``scale`` (> 1: zoom in, the pattern stretches)."""
    ys, xs = torch.meshgrid(torch.arange(HH) + 0.5, torch.arange(WW) + 0.5, indexing="ij")
    f = torch.stack([(scale - 1) * (xs - WW / 2), (scale - 1) * (ys - HH / 2)], -1)
    return f.expand(frames, HH, WW, 2).clone()


def _corr(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _assert_white(frame):
    """(C,h,w): mean 0, variance 1, no correlation between horizontal or vertical neighbours (within chance)."""
    assert abs(float(frame.mean())) < SIGMA
    assert abs(float(frame.var()) - 1.0) < 4 * math.sqrt(2.0 / N)
    assert abs(_corr(frame[:, :, 1:], frame[:, :, :-1])) < SIGMA
    assert abs(_corr(frame[:, 1:, :], frame[:, :-1, :])) < SIGMA


@pytest.mark.parametrize(
    "flows",
    [_smooth_random(6, 3.0), _constant(6, 1.7, -0.6), _zoom(6, 1.15), _zoom(6, 1 / 1.15), _smooth_random(3, 8.0)],
    ids=["smooth", "translation", "zoom_in", "zoom_out", "large_smooth"],
)
def test_every_frame_is_white_standard_normal(flows):
    out = warp_noise(_noise0(), flows, generator=_gen())
    assert out.shape == (flows.shape[0] + 1, C, HH, WW)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    for frame in out[1:]:
        _assert_white(frame)


def test_naive_bilinear_warping_would_fail_the_whiteness_check():
    """The statistical check is sharp enough to reject the obvious wrong method (resampling the noise)."""
    n0 = _noise0()
    ys, xs = torch.meshgrid(torch.arange(HH) + 0.5, torch.arange(WW) + 0.5, indexing="ij")
    grid = torch.stack([2 * (xs - 0.5) / WW - 1, 2 * (ys - 0.5) / HH - 1], -1)[None]  # half-pixel shift
    naive = F.grid_sample(n0[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
    with pytest.raises(AssertionError):
        _assert_white(naive)


def test_integer_translation_moves_the_pattern_exactly():
    n0 = _noise0()
    out = warp_noise(n0, _constant(2, 3.0, 0.0), generator=_gen())
    torch.testing.assert_close(out[1][:, :, 3:], n0[:, :, :-3], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2][:, :, 6:], n0[:, :, :-6], atol=1e-5, rtol=0)
    # The revealed columns are fresh noise, not a copy of anything.
    assert abs(_corr(out[1][:, :, :3], n0[:, :, :3])) < 0.1
    out = warp_noise(n0, _constant(1, -2.0, 5.0), generator=_gen())
    torch.testing.assert_close(out[1][:, 5:, :-2], n0[:, :-5, 2:], atol=1e-5, rtol=0)


def test_fractional_translation_still_follows_the_flow():
    n0 = _noise0()
    out = warp_noise(n0, _constant(1, 3.25, 0.0), generator=_gen())
    # Of the 4x4 sub-pixels landing in a target pixel, 12 come from the source 3 pixels to the left and 4 from 4
    # pixels to the left; each sub-pixel has covariance 1/k = 1/4 with its source, so r = 12/16 and 4/16.
    assert 0.72 < _corr(out[1][:, :, 4:], n0[:, :, 1:-3]) < 0.78
    assert 0.22 < _corr(out[1][:, :, 4:], n0[:, :, :-4]) < 0.28


def test_smooth_flow_keeps_the_pattern_along_the_flow():
    n0 = _noise0()
    flow = _smooth_random(1, 3.0)
    out = warp_noise(n0, flow, generator=_gen())
    # Nearest-pixel lookup of frame 1 at each pixel's destination correlates strongly with frame 0.
    ys, xs = torch.meshgrid(torch.arange(HH) + 0.5, torch.arange(WW) + 0.5, indexing="ij")
    tx = torch.floor(xs + flow[0, ..., 0]).long()
    ty = torch.floor(ys + flow[0, ..., 1]).long()
    inside = (tx >= 0) & (tx < WW) & (ty >= 0) & (ty < HH)
    looked_up = out[1][:, ty[inside], tx[inside]]
    assert _corr(looked_up, n0[:, inside]) > 0.5
    assert abs(_corr(out[1], n0)) < 0.1  # without following the flow there is little left


def test_identity_flow_keeps_frame_zero():
    n0 = _noise0()
    out = warp_noise(n0, torch.zeros((4, HH, WW, 2)), generator=_gen())
    for frame in out:
        torch.testing.assert_close(frame, n0, atol=1e-5, rtol=0)


def test_seeded_generator_is_deterministic():
    flows = _smooth_random(4, 3.0)
    a = warp_noise(_noise0(), flows, generator=_gen(7))
    b = warp_noise(_noise0(), flows, generator=_gen(7))
    c = warp_noise(_noise0(), flows, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a[1:], c[1:])
    assert torch.equal(a[0], c[0])


def test_no_flows_returns_frame_zero_and_bad_shapes_are_refused():
    n0 = _noise0()
    out = warp_noise(n0, torch.zeros((0, HH, WW, 2)))
    assert out.shape == (1, C, HH, WW) and torch.equal(out[0], n0)
    with pytest.raises(ValueError, match="flows"):
        warp_noise(n0, torch.zeros((2, HH, WW + 1, 2)))
    with pytest.raises(ValueError, match="noise0"):
        warp_noise(n0[0], torch.zeros((2, HH, WW, 2)))
    with pytest.raises(ValueError, match="upsample"):
        warp_noise(n0, torch.zeros((2, HH, WW, 2)), upsample=0)


def test_resize_flow_scales_vectors_per_axis():
    f = torch.zeros((2, 64, 128, 2))
    f[..., 0], f[..., 1] = 16.0, -8.0
    out = resize_flow(f, (16, 16))  # x shrinks by 8, y by 4
    assert out.shape == (2, 16, 16, 2)
    torch.testing.assert_close(out[..., 0], torch.full((2, 16, 16), 2.0))
    torch.testing.assert_close(out[..., 1], torch.full((2, 16, 16), -2.0))


def test_resize_flow_averages_each_cell_and_can_ignore_invalid_vectors():
    g = torch.Generator().manual_seed(0)
    f = torch.randn((1, 8, 8, 2), generator=g)
    out = resize_flow(f, (2, 2))
    expect = f.reshape(1, 2, 4, 2, 4, 2).mean(dim=(2, 4)) * 0.25
    torch.testing.assert_close(out, expect)
    valid = torch.ones((1, 8, 8), dtype=torch.bool)
    valid[0, :4, :4] = False  # the top-left cell: all invalid -> 0
    valid[0, 4:, 4:6] = False  # the bottom-right cell: only columns 6..7 count
    f2 = f.clone()
    f2[~valid] = 0.0  # what the flow module writes at occluded pixels
    out = resize_flow(f2, (2, 2), valid=valid)
    torch.testing.assert_close(out[0, 0, 0], torch.zeros(2))
    torch.testing.assert_close(out[0, 1, 1], f[0, 4:, 6:].reshape(-1, 2).mean(0) * 0.25)
    torch.testing.assert_close(out[0, 0, 1], expect[0, 0, 1])


def test_resize_flow_refuses_upsampling():
    with pytest.raises(ValueError, match="downsamples"):
        resize_flow(torch.zeros((1, 8, 8, 2)), (16, 16))


# ------------------------------------------------------------------------------------------------------ latent rate


def _latent(flows, seed=0):
    from loom.geometry.noise import compress_time

    full = warp_noise(_noise0(seed), flows, generator=_gen(seed + 1))
    return full, compress_time(full, 4)


@pytest.mark.parametrize("flows", [_smooth_random(12, 1.0), _constant(12, 0.3, 0.1), _zoom(12, 1.03)],
                         ids=["smooth_slow", "slow_translation", "slow_zoom"])
def test_latent_frame_rate_noise_is_white_standard_normal(flows):
    """13 frames -> 4 latent frames (CogVideoX: frame 0, then one per 4), each i.i.d. N(0, 1): mean, variance, no
    neighbour correlation, and a Kolmogorov-Smirnov test against N(0, 1)."""
    from scipy import stats

    full, lat = _latent(flows)
    assert lat.shape == (4, C, HH, WW)
    torch.testing.assert_close(lat, full[[0, 4, 8, 12]], atol=0, rtol=0)  # latent j is frame 4j
    for frame in lat:
        _assert_white(frame)
        assert stats.kstest(frame.flatten().double().numpy(), "norm").pvalue > 1e-3


def test_latent_frames_follow_the_flow_composed_over_their_group():
    """1 px right and 0.5 px down per frame: latent frame 1 (frame 4) is latent frame 0 moved by (4, 2)."""
    _, lat = _latent(_constant(12, 1.0, 0.5))
    assert _corr(lat[1][:, 2:, 4:], lat[0][:, :-2, :-4]) > 0.3
    assert abs(_corr(lat[1], lat[0])) < 0.1  # without following the flow there is little left


def test_scaled_sum_of_a_group_would_not_be_standard_normal():
    """Why compress_time selects instead of summing: under a slow camera the 4 frames of a group are nearly the same
    noise, so (sum of 4) / 2 has a variance of several units (4 for equal frames)."""
    full, _ = _latent(_constant(12, 0.3, 0.1))
    summed = full[1:5].sum(0) / 2
    assert float(summed.var()) > 2.0  # about 3 here; 1 would be N(0, 1)
    with pytest.raises(AssertionError):
        _assert_white(summed)


def test_compress_time_refuses_lengths_the_vae_cannot_take():
    from loom.geometry.noise import compress_time

    with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
        compress_time(torch.zeros((46, C, 4, 4)), 4)  # VideoFrom3D's 46 frames must be padded to 49 first
    assert compress_time(torch.zeros((49, C, 4, 4)), 4).shape == (13, C, 4, 4)
    assert compress_time(torch.zeros((1, C, 4, 4)), 4).shape == (1, C, 4, 4)
    with pytest.raises(ValueError, match="noise"):
        compress_time(torch.zeros((5, 4, 4)), 4)
