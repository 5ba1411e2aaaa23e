"""Flow matching for Loom's diffusion models: the training objective and the few-step sampler, kept apart from the
networks (which are plain ``f(x_t, t, cond)``), as diffusers keeps schedulers apart from models.

Conventions (Wan2.1 / rectified flow, TAPESTRY 3.1 and 4.1; ShapeGen4D 3.2):

- ``x_sigma = (1 - sigma) * x0 + sigma * noise`` with ``sigma`` in [0, 1]: 0 is data, 1 is pure noise.
- The network predicts the velocity ``v = noise - x0`` (d x_sigma / d sigma); the loss is its mean squared error.
- The network's timestep is ``1000 * sigma`` (Wan's ``num_train_timesteps``).
- Time shift: ``shift(s) = k s / (1 + (k - 1) s)`` moves sigmas towards the noisy end, where large latents need more
  of the budget. Wan samples 480p video with k = 5 and trains with the same shifted schedule (diffusers'
  ``FlowMatchEulerDiscreteScheduler(shift=5)``, DiffSynth-Studio's Wan training), so both default to 5.
- Training sigmas: ``u ~ U(0, 1)`` (or logit-normal, SD3's density) then shifted.
- Sampling: Euler steps over ``shift(linspace(1, 0, steps + 1))``. TAPESTRY reports 4 steps.
- Randomness comes from explicit ``torch.Generator`` objects, one per sample, seeded from (seed, step, sample key):
  a resumed run draws exactly what the uninterrupted run drew, and a sample gets the same noise whichever rank
  reads it, so N ranks with batch b compute the losses of 1 rank with batch N*b.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000.0


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan/SD3 time shift ``k s / (1 + (k - 1) s)``; k = 1 is the identity, k > 1 spends more time near noise."""
    if shift <= 0:
        raise ValueError(f"shift={shift}: must be > 0")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_generator(seed: int, step: int, key: str) -> torch.Generator:
    """A CPU generator for one sample at one training step, seeded from (seed, step, sample key)."""
    import hashlib

    h = hashlib.sha256(f"{seed}\0{step}\0{key}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))
    return g


@dataclass(frozen=True)
class FlowMatching:
    """The training objective. ``sample`` draws sigmas, ``noisy`` builds the input, ``loss`` compares the
    prediction with the velocity target."""

    shift: float = 5.0
    density: str = "uniform"  # or "logit_normal" (SD3: mean 0, std 1 before the shift)

    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.density == "uniform":
            u = torch.rand(n, generator=generator)
        elif self.density == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator))
        else:
            raise ValueError(f"density={self.density!r}: use 'uniform' or 'logit_normal'")
        return shift_sigmas(u, self.shift)

    @staticmethod
    def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return (1 - s) * x0 + s * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def draw(self, x0: torch.Tensor, generators: list[torch.Generator],
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_sigma, timestep, target, sigma) for a batch of clean latents ``x0`` (B, ...), sample i drawing from
        ``generators[i]``. The noise is drawn on the CPU (the same numbers on any device) unless given, e.g. one
        noise shared by all frames (ShapeGen4D)."""
        if len(generators) != x0.shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {x0.shape[0]}")
        sigma = torch.cat([self.sample_sigmas(1, g) for g in generators])
        if noise is None:
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=torch.float32) for g in generators])
        noise = noise.to(device=x0.device, dtype=x0.dtype)
        sigma = sigma.to(x0.device)
        return self.noisy(x0, noise, sigma), sigma * NUM_TRAIN_TIMESTEPS, self.target(x0, noise), sigma

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(pred.float(), target.float())


def sampling_sigmas(steps: int, shift: float = 5.0, schedule: str = "uniform") -> torch.Tensor:
    """The ``steps + 1`` sigmas of the Euler sampler, from 1 (noise) to 0 (data), shifted by ``shift``.
    ``uniform``: ``steps`` equal steps of the unit interval. ``flow_match_euler``: diffusers'
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(steps)`` of a 1,000-step scheduler at shift 1 (what Step1X-3D's
    pipeline runs): ``steps`` sigmas from 1 to 1/1000, then 0; a shift is then applied once (the scheduler's own
    ``shift`` applies it to its training sigmas and again to these, which is not what ``shift`` means here)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    if schedule == "uniform":
        base = torch.linspace(1.0, 0.0, steps + 1)
    elif schedule == "flow_match_euler":
        base = torch.cat([torch.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps), torch.zeros(1)])
    else:
        raise ValueError(f"schedule={schedule!r}: use 'uniform' or 'flow_match_euler'")
    return shift_sigmas(base, shift)


@torch.no_grad()
def euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                 steps: int = 4, shift: float = 5.0, schedule: str = "uniform") -> torch.Tensor:
    """Integrate dx/dsigma = v from sigma = 1 to 0 over `sampling_sigmas`. ``velocity(x, timestep)`` gets
    timesteps ``(B,)`` in [0, 1000] (with any conditioning bound in)."""
    sigmas = sampling_sigmas(steps, shift, schedule).to(noise.device)
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        t = torch.full((x.shape[0],), float(s) * NUM_TRAIN_TIMESTEPS, device=x.device)
        x = x + (s_next - s).to(x.dtype) * velocity(x, t).to(x.dtype)
    return x
