"""Flow matching: closed forms of the path, the shift and the Euler sampler; reproducible per-sample draws."""

import pytest
import torch

from loom.models.flow import FlowMatching, euler_sample, sample_generator, sampling_sigmas, shift_sigmas


def test_shift_is_identity_at_1_keeps_endpoints_and_moves_towards_noise():
    s = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_sigmas(s, 1.0), s)
    sh = shift_sigmas(s, 5.0)
    assert sh[0] == 0 and sh[-1] == 1
    assert torch.all(sh[1:-1] > s[1:-1]) and torch.all(sh.diff() > 0)
    assert shift_sigmas(torch.tensor([0.5]), 5.0).item() == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(s, 0.0)


def test_noisy_target_and_loss_are_the_rectified_flow_path():
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    sigma = torch.tensor([0.0, 1.0])
    xt = FlowMatching.noisy(x0, noise, sigma)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    # d x_sigma / d sigma is the target velocity
    eps = 1e-3
    s = torch.tensor([0.3, 0.3])
    fd = (FlowMatching.noisy(x0, noise, s + eps) - FlowMatching.noisy(x0, noise, s)) / eps
    assert torch.allclose(fd, FlowMatching.target(x0, noise), atol=1e-3)


def test_euler_with_the_exact_velocity_lands_on_the_data_for_any_step_count():
    x0, noise = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 4, 3, 5, 5)
    for steps in (1, 4, 7):
        out = euler_sample(lambda x, t: noise - x0, noise, steps=steps, shift=5.0)
        assert torch.allclose(out, x0, atol=1e-5)
    sig = sampling_sigmas(4, 5.0)
    assert sig.shape == (5,) and sig[0] == 1 and sig[-1] == 0
    for steps in (1, 3):
        out = euler_sample(lambda x, t: noise - x0, noise, steps=steps, shift=4.0, schedule="flow_match_euler")
        assert torch.allclose(out, x0, atol=1e-5)


def test_the_flow_match_euler_schedule_is_diffusers_schedulers_at_shift_1():
    """Step1X-3D samples with diffusers' FlowMatchEulerDiscreteScheduler (1,000 training steps, shift 1): the same
    sigmas and timesteps, step for step; a shift is applied once, as training's."""
    diffusers = pytest.importorskip("diffusers")
    for steps in (1, 4, 50):
        sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        sched.set_timesteps(steps)
        ours = sampling_sigmas(steps, 1.0, "flow_match_euler")
        torch.testing.assert_close(ours, sched.sigmas.float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(ours[:-1] * 1000, sched.timesteps.float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(sampling_sigmas(4, 3.0, "flow_match_euler"),
                               shift_sigmas(sampling_sigmas(4, 1.0, "flow_match_euler"), 3.0))
    with pytest.raises(ValueError, match="schedule"):
        sampling_sigmas(4, 1.0, "cosine")


def test_draws_are_a_function_of_seed_step_and_key():
    fm = FlowMatching(shift=3.0)
    x0 = torch.zeros(2, 4, 2, 3, 3)
    a = fm.draw(x0, [sample_generator(0, 5, "k1"), sample_generator(0, 5, "k2")])
    b = fm.draw(x0[:1], [sample_generator(0, 5, "k1")])
    assert torch.equal(a[0][:1], b[0]) and torch.equal(a[1][:1], b[1])  # same sample, other batch: same draw
    c = fm.draw(x0[:1], [sample_generator(0, 6, "k1")])
    assert not torch.equal(b[0], c[0])
    assert a[1].min() >= 0 and a[1].max() <= 1000
    with pytest.raises(ValueError, match="generators"):
        fm.draw(x0, [sample_generator(0, 0, "k")])


def test_logit_normal_density_and_unknown_density():
    s = FlowMatching(shift=1.0, density="logit_normal").sample_sigmas(4000, torch.Generator().manual_seed(0))
    assert 0.45 < s.median().item() < 0.55 and s.std().item() < 0.25  # concentrated in the middle, unlike U(0,1)
    with pytest.raises(ValueError, match="density"):
        FlowMatching(density="beta").sample_sigmas(2, torch.Generator())
