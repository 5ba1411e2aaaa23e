"""Frechet distance, streaming statistics, FID, KID and FVD: parity with scipy / torchmetrics, exact merging."""

import importlib

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from loom.eval.metrics import FeatureStats, fid, fvd, kid
from loom.eval.metrics.fid import _tr_sqrt_cholesky, _tr_sqrt_eigh, frechet_distance_from_stats, trace_sqrt_product
from loom.eval.metrics.fvd import fvd_from_stats, video_stats
from loom.eval.metrics.kid import _mmd2_from_kernels, _mmd2_unbiased, kid_from_features
from loom.eval.networks import i3d, inception


def _scipy_fd(mu1, s1, mu2, s2):
    # pytorch-fid's calculate_frechet_distance
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _gauss(rng, n, d, shift=0.0):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + shift


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    x, y = _gauss(rng, 400, 32), _gauss(rng, 300, 32, shift=0.3)
    sx, sy = FeatureStats.of(x), FeatureStats.of(y)
    np.testing.assert_allclose(sx.cov, np.cov(x, rowvar=False), rtol=1e-12, atol=1e-14)
    ours = frechet_distance_from_stats(sx, sy)
    assert ours == pytest.approx(_scipy_fd(sx.mean, sx.cov, sy.mean, sy.cov), rel=1e-9)
    assert ours > 1.0


def test_frechet_distance_is_right_on_near_singular_covariances():
    # fewer samples than dimensions: rank-deficient covariances, where sqrtm of the non-symmetric product is
    # ill-conditioned. Exact reference: tr((S1 S2)^1/2) = nuclear norm of X1c X2c^T / sqrt((n1-1)(n2-1)).
    rng = np.random.default_rng(1)
    d = 256
    x, y = _gauss(rng, 40, d), _gauss(rng, 50, d, shift=0.01)
    xc, yc = x - x.mean(0), y - y.mean(0)
    tr_sqrt = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt(39 * 49)
    diff = x.mean(0) - y.mean(0)
    exact = diff @ diff + (xc**2).sum() / 39 + (yc**2).sum() / 49 - 2 * tr_sqrt
    sx, sy = FeatureStats.of(x), FeatureStats.of(y)
    assert frechet_distance_from_stats(sx, sy) == pytest.approx(exact, rel=1e-12)
    # identical sets: 0 up to rounding, never negative (scipy's sqrtm gives about -2e-5 here)
    assert 0.0 <= frechet_distance_from_stats(sx, sx) <= 1e-12 * np.trace(sx.cov)


def _spd(rng, d, lo_exp):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s = (q * np.logspace(0, lo_exp, d)) @ q.T
    return 0.5 * (s + s.T)


@pytest.mark.parametrize("d,lo_exp", [(8, -1), (64, -3), (200, -9)])
def test_trace_sqrt_cholesky_and_eigen_paths_agree_with_scipy_on_spd(d, lo_exp):
    rng = np.random.default_rng(d)
    s1, s2 = _spd(rng, d, lo_exp), _spd(rng, d, -2)
    ref = np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    chol12, chol21 = _tr_sqrt_cholesky(s1, s2), _tr_sqrt_cholesky(s2, s1)
    assert chol12 is not None and chol21 is not None  # positive definite: the Cholesky path applies
    for v in (chol12, chol21, _tr_sqrt_eigh(s1, s2), _tr_sqrt_eigh(s2, s1), trace_sqrt_product(s1, s2)):
        assert v == pytest.approx(ref, rel=1e-11)


def test_trace_sqrt_falls_back_when_a_covariance_is_rank_deficient():
    # 40 samples of 96-d: S1 has rank 39, so no Cholesky path from S1; S2 (3000 samples) is positive definite.
    # Exact: tr((S1 S2)^1/2) = nuclear norm of X1c X2c^T / sqrt((n1-1)(n2-1)).
    rng = np.random.default_rng(4)
    x, y = _gauss(rng, 40, 96), _gauss(rng, 3000, 96, shift=0.1)
    xc, yc = x - x.mean(0), y - y.mean(0)
    exact = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt(39 * 2999)
    s1, s2 = FeatureStats.of(x).cov, FeatureStats.of(y).cov
    assert _tr_sqrt_cholesky(s1, s2) is None
    assert _tr_sqrt_cholesky(s2, s1) == pytest.approx(exact, rel=1e-12)  # via S2 = L L^T
    assert _tr_sqrt_eigh(s1, s2) == pytest.approx(exact, rel=1e-12)
    assert trace_sqrt_product(s1, s2) == pytest.approx(exact, rel=1e-12)
    assert trace_sqrt_product(s2, s1) == pytest.approx(exact, rel=1e-12)
    # both rank-deficient: the eigen path, whatever the order
    s3 = FeatureStats.of(_gauss(rng, 50, 96)).cov
    assert _tr_sqrt_cholesky(s3, s1) is None
    assert trace_sqrt_product(s3, s1) == pytest.approx(_tr_sqrt_eigh(s3, s1), rel=0)
    # a constant feature (a zero row and column) is not positive definite either
    z = s2.copy()
    z[0, :] = z[:, 0] = 0.0
    assert _tr_sqrt_cholesky(z, s2) is None
    assert trace_sqrt_product(z, s2) == pytest.approx(_tr_sqrt_eigh(z, s2), rel=1e-12)


def test_frechet_distance_of_identical_full_rank_sets_is_zero_not_negative():
    rng = np.random.default_rng(5)
    s = FeatureStats.of(_gauss(rng, 600, 128))
    assert _tr_sqrt_cholesky(s.cov, s.cov) is not None
    assert 0.0 <= frechet_distance_from_stats(s, s) <= 1e-12 * np.trace(s.cov)


def test_stats_over_chunks_and_processes_equal_one_pass():
    rng = np.random.default_rng(2)
    x = _gauss(rng, 1000, 48, shift=2.0)
    one = FeatureStats.of(x)
    chunked = FeatureStats.empty(48)
    for c in np.array_split(x, 7):
        chunked.update(c)
    procs = [FeatureStats.of(c) for c in np.array_split(x, 8)]
    merged = procs[0].merge(*procs[1:])
    via_state = FeatureStats.from_state_dict(
        {k: sum(p.state_dict()[k] for p in procs) for k in ("n", "total", "outer")})  # an all-reduce SUM
    for s in (chunked, merged, via_state):
        assert s.n == 1000
        np.testing.assert_allclose(s.mean, one.mean, rtol=1e-13)
        np.testing.assert_allclose(s.cov, one.cov, rtol=1e-11, atol=1e-13)
    with pytest.raises(ValueError, match="dimension"):
        one.merge(FeatureStats.empty(3))


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(24, 3, 64, 64, generator=g)
    b = (torch.rand(24, 3, 64, 64, generator=g) * 0.7 + 0.2).clamp(0, 1)
    return a, b


def test_fid_matches_torchmetrics_with_the_same_network(images):
    net = inception.tiny_random(seed=0, dim=16)
    a, b = images
    ours = fid(a, b, network=net, batch_size=10)
    tm = FrechetInceptionDistance(feature=net, normalize=True).double()
    tm.update(b, real=True)
    tm.update(a, real=False)
    assert ours == pytest.approx(float(tm.compute()), rel=1e-6)
    # a stream of batches gives the same value as the tensor
    assert fid(iter(a.split(5)), iter(b.split(7)), network=net) == pytest.approx(ours, rel=1e-10)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        fid(a * 255, b, network=net)


def test_kid_matches_torchmetrics_with_the_same_features():
    rng = np.random.default_rng(3)
    real, fake = torch.tensor(_gauss(rng, 120, 20)), torch.tensor(_gauss(rng, 100, 20, shift=0.2))
    tm = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=20, subset_size=50)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    torch.manual_seed(7)
    tm_mean, tm_std = tm.compute()
    mean, std = kid_from_features(fake, real, subsets=20, subset_size=50, seed=7)
    assert mean == pytest.approx(float(tm_mean), rel=1e-6)
    assert std == pytest.approx(float(tm_std), rel=1e-5)
    assert mean > 0.01
    with pytest.raises(ValueError, match="subset_size"):
        kid_from_features(fake, real, subset_size=1000)


def _draws(n_r, n_f, subsets, size, seed):
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randperm(n_r, generator=g)[:size], torch.randperm(n_f, generator=g)[:size]) for _ in range(subsets)]
    return [r for r, _ in out], [f for _, f in out]


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_kid_from_all_kernels_equals_the_per_subset_estimates(dtype, rel):
    g = torch.Generator().manual_seed(0)
    real = torch.relu(torch.randn(150, 64, generator=g)).to(dtype)
    fake = torch.relu(torch.randn(130, 64, generator=g) + 0.1).to(dtype)
    dr, df = _draws(150, 130, 12, 60, seed=3)
    per_subset = torch.stack([_mmd2_unbiased(real[ir], fake[i_f]) for ir, i_f in zip(dr, df)])
    whole = _mmd2_from_kernels(real, fake, dr, df)
    torch.testing.assert_close(whole, per_subset, rtol=rel, atol=rel * float(per_subset.abs().max()))
    assert float(per_subset.min()) > 0


def test_kid_takes_the_same_value_on_either_path(monkeypatch):
    kid_mod = importlib.import_module("loom.eval.metrics.kid")
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(90, 16, generator=g, dtype=torch.float64), torch.randn(80, 16, generator=g).double()
    calls = []
    monkeypatch.setattr(kid_mod, "_mmd2_from_kernels", lambda *a: calls.append(1) or _mmd2_from_kernels(*a))
    kernels = kid_from_features(fake + 0.3, real, subsets=15, subset_size=40, seed=2)
    assert calls  # 15 overlapping subsets of 40 from 90 and 80 rows: the kernel matrices are computed once
    monkeypatch.setattr(kid_mod, "_MAX_KERNEL_ENTRIES", 0)  # forces one set of products per subset
    per_subset = kid_from_features(fake + 0.3, real, subsets=15, subset_size=40, seed=2)
    assert len(calls) == 1
    assert kernels == pytest.approx(per_subset, rel=1e-12)


def test_kid_with_a_network(images):
    a, b = images
    net = inception.tiny_random(seed=0, dim=16)
    m1, _ = kid(a, b, network=net, subsets=5, subset_size=20)
    m0, _ = kid(a, a.flip(0), network=net, subsets=5, subset_size=20)
    assert m1 > m0


@pytest.fixture(scope="module")
def videos():
    g = torch.Generator().manual_seed(1)
    real = torch.rand(6, 10, 3, 32, 32, generator=g)
    fake = (real + 0.2 * torch.rand(real.shape, generator=g)).clamp(0, 1).flip(1)
    return fake, real


def test_fvd_is_the_same_on_one_or_n_processes(videos):
    net = i3d.tiny_random(seed=0)
    fake, real = videos
    # batch size 1 everywhere: the network sees the same batches, so only the statistics' merging differs (CPU
    # convolutions round differently for other batch sizes, ~1e-7 relative in the features)
    one = fvd(fake, real, network=net, batch_size=1)
    assert one > 0
    # 3 simulated processes, each with its shard of both sets, merged as after an all-gather
    shards = [video_stats(fake[i::3], net, batch_size=1) for i in range(3)]
    shards_r = [video_stats(real[i::3], net, batch_size=1) for i in range(3)]
    merged = fvd_from_stats(shards[0].merge(*shards[1:]), shards_r[0].merge(*shards_r[1:]))
    assert merged == pytest.approx(one, rel=1e-11)


def test_i3d_input_normalisation(videos):
    fake, _ = videos
    x = i3d.I3DFeatures.preprocess(fake)
    assert x.shape == (6, 3, 10, 224, 224)
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.9 and x.max() > 0.9
    # TF1 bilinear: output pixel i samples input i*in/out; a 2x upsample keeps the even pixels exactly
    y = i3d.resize_bilinear_tf1(fake[0, :, :, :, :].reshape(10, 3, 32, 32), (64, 64))
    torch.testing.assert_close(y[..., ::2, ::2], fake[0].reshape(10, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        fvd(fake * 2 - 1, fake, network=i3d.tiny_random())
    with pytest.raises(ValueError, match="at least 9 frames"):
        fvd(fake[:, :8], fake[:, :8], network=i3d.tiny_random())
