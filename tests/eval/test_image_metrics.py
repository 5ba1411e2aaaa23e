"""PSNR and SSIM against torchmetrics and scikit-image on the same fixtures."""

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr
from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

from loom.eval.metrics import psnr, ssim

# scikit-image comes with the eval extra; without it the torchmetrics parity still runs
try:
    from skimage.metrics import peak_signal_noise_ratio as sk_psnr
    from skimage.metrics import structural_similarity as sk_ssim
except ImportError:  # pragma: no cover - depends on the installed extras
    sk_psnr = sk_ssim = None


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 40, 48, generator=g, dtype=torch.float64)
    # smooth structure plus noise, so SSIM is neither ~0 nor ~1
    target = torch.nn.functional.avg_pool2d(target, 5, 1, 2)
    preds = (target + 0.05 * torch.randn(target.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return preds, target


def test_psnr_matches_torchmetrics_and_skimage(pair):
    p, t = pair
    ours = psnr(p, t)
    # torchmetrics keeps data_range as a float32 tensor: agreement to float32 precision
    assert ours == pytest.approx(float(tm_psnr(p, t, data_range=1.0, dim=(1, 2, 3))), rel=1e-6)
    if sk_psnr is not None:
        sk = np.mean([sk_psnr(t[i].numpy(), p[i].numpy(), data_range=1.0) for i in range(len(p))])
        assert ours == pytest.approx(sk, rel=1e-12)
    per = psnr(p, t, reduction="none")
    assert per.shape == (4,) and float(per.mean()) == pytest.approx(ours)


def test_ssim_matches_torchmetrics_and_skimage(pair):
    p, t = pair
    ours = ssim(p, t)
    # torchmetrics 1.9 averages its map over the whole reflect-padded image; cropped to the window-inside region
    # (Wang et al.'s "valid" SSIM, as scikit-image) it is the same map as ours.
    _, tm_map = tm_ssim(p, t, data_range=1.0, gaussian_kernel=True, sigma=1.5, kernel_size=11, return_full_image=True)
    tm = float(tm_map[..., 5:-5, 5:-5].mean())
    assert 0.2 < ours < 0.95
    if sk_ssim is not None:
        sk = np.mean([
            sk_ssim(t[i].numpy(), p[i].numpy(), data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5,
                    use_sample_covariance=False)
            for i in range(len(p))
        ])  # fmt: skip
        assert ours == pytest.approx(sk, abs=1e-10)
    assert ours == pytest.approx(tm, abs=1e-6)


def test_video_metrics_are_per_frame_means(pair):
    p, t = pair
    pv, tv = p.reshape(2, 2, 3, 40, 48), t.reshape(2, 2, 3, 40, 48)
    assert psnr(pv, tv) == pytest.approx(psnr(p, t))
    assert ssim(pv, tv) == pytest.approx(ssim(p, t))
    assert ssim(t, t) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [lambda x: x * 255, lambda x: x * 2 - 1, lambda x: x[:, :2]])
def test_bad_inputs_are_refused(pair, bad):
    p, t = pair
    with pytest.raises(ValueError):
        psnr(bad(p), bad(t))


def _psnr64(p, t):
    """Per-image PSNR computed in float64 from the same values: the exact reference for the float32 paths."""
    d = (p.double() - t.double()).reshape(p.shape[0], -1)
    return 10 * torch.log10(1.0 / d.square().mean(1))


@pytest.mark.parametrize("shape", [(3, 3, 300, 310), (40, 3, 16, 20), (2, 3, 8, 8)])  # per-image and blocked paths
@pytest.mark.parametrize("noise", [0.05, 1e-4])
def test_psnr_float32_is_summed_accurately(shape, noise):
    g = torch.Generator().manual_seed(1)
    t = torch.rand(shape, generator=g)
    p = (t + noise * torch.randn(shape, generator=g)).clamp(0, 1)
    per = psnr(p, t, reduction="none")
    assert per.dtype == torch.float64 and per.shape == (shape[0],)
    torch.testing.assert_close(per, _psnr64(p, t), rtol=1e-7, atol=0)
    # the other paths (another dtype, a non-contiguous layout) give the same values
    torch.testing.assert_close(psnr(p.double(), t, reduction="none"), _psnr64(p, t), rtol=1e-12, atol=0)
    pc, tc = (x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2) for x in (p, t))
    torch.testing.assert_close(psnr(pc, tc, reduction="none"), _psnr64(p, t), rtol=1e-7, atol=0)


def test_psnr_identical_pair_is_inf_and_one_differing_image_is_finite(pair):
    t = pair[1].float()
    assert psnr(t, t) == float("inf")
    q = t.clone()
    q[1, 0, 0, 0] = 0.5 if float(t[1, 0, 0, 0]) != 0.5 else 0.25
    per = psnr(q, t, reduction="none")
    assert torch.isinf(per[[0, 2, 3]]).all() and torch.isfinite(per[1])
    d = float(q[1, 0, 0, 0]) - float(t[1, 0, 0, 0])
    assert float(per[1]) == pytest.approx(10 * np.log10(t[1].numel() / d**2), rel=1e-8)  # d^2 in float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_psnr_range_check_names_the_input_and_the_values(pair, dtype):
    p, t = (x.to(dtype) for x in pair)
    msg = r"preds: values must lie in \[0,1\], got \[\d+, \d+\] \(scale \[0,255\] by 1/255\)"
    with pytest.raises(ValueError, match=msg):
        psnr((p * 255).round(), t)
    bad = t.clone()
    bad[3, 2, 39, 47] = -0.5  # one value, in the last image
    with pytest.raises(ValueError, match=r"target: values must lie in \[0,1\], got \[-0.5, "):
        psnr(p, bad)
    nan = p.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="preds: values must lie"):
        psnr(nan, t)


def test_psnr_accepts_negative_zero_and_inputs_that_need_grad(pair):
    p, t = (x.float() for x in pair)
    z = p.clone()
    z[z == 0] = -0.0
    z[0, 0, 0, 0] = -0.0  # in [0,1], though its bits fail the fast test
    ref = _psnr64(z, t)
    torch.testing.assert_close(psnr(z, t, reduction="none"), ref, rtol=1e-7, atol=0)
    torch.testing.assert_close(psnr(p.requires_grad_(), t, reduction="none").detach(), _psnr64(p, t), rtol=1e-7,
                               atol=0)  # fmt: skip


def test_psnr_refuses_empty_input():
    with pytest.raises(ValueError, match="preds is empty"):
        psnr(torch.zeros(0, 3, 8, 8), torch.zeros(0, 3, 8, 8))
