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
