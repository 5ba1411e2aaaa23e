"""Flow matching for the 4D shape DiT (ShapeGen4D section 3.2): noise shared by the frames of a sequence, training
inputs, and the Euler sampler with a time shift. The network (`loom.models.shape4d_dit.Shape4DDiT`) stays
a plain ``f(x_t, t, image_tokens)``; the conventions are `loom.models.flow`'s (``x_sigma = (1 - sigma) x0 +
sigma noise``, velocity ``noise - x0``, timestep ``1000 sigma``).

Design choices:

- Shared noise (3.2, "Sharing noise across frames"): one Gaussian draw of shape (Q, C) per sequence, repeated
  over its T frames, in training AND in sampling, so every frame starts from the same point of the base model's
  noise space and the frames agree on pose and scale. ``shared=False`` draws every frame independently (the
  "w/o shared noise" ablation, Table 3). All frames of a sequence share one sigma (`training_inputs` draws one
  per sequence), which is also what makes the shared noise meaningful.
- Randomness comes from explicit generators, one per sequence (`loom.models.flow.sample_generator`): the noise
  is drawn on the CPU, so it is the same numbers on any device and any rank.
- Time shift (3.2 and Table 3, "Denoise time shift"): the paper shifts the sampling schedule towards noise because
  a sequence of T x Q shared-noise latents is easier to denoise at a given sigma than one shape, and finds that
  shifting at training time matters little. It gives no value. The default here is Esser et al. (SD3, section
  5.3.2)'s resolution rule: shift ``sqrt(m / n)`` for m tokens against the n the base was trained on, i.e.
  ``sqrt(T)`` for T frames of the base's Q latents (4.0 for 16 frames). ``shift=1`` is "w/o time shift".
- Guidance: optional classifier-free guidance against zero image tokens (``guidance_scale`` > 1); the
  unconditional input a given base checkpoint was trained with may differ: pass it as ``uncond_image_tokens``.

Shapes::

    x0, noise     (B, T, Q, C)      clean / noise latents of B sequences of T frames
    image_tokens  (B, T, L, D_img)  per-frame DINOv2 features
    timestep      (B,)              1000 * sigma, one per sequence
"""

from __future__ import annotations

import math

import torch

from loom.models.flow import FlowMatching, euler_sample

Generators = torch.Generator | list[torch.Generator] | None


def _draw(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """Standard normal (B, *rest) float32 on the CPU: sample i from ``generator[i]`` when a list is given."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator])
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def noise_4d(shape: tuple[int, int, int, int], generator: Generators = None, shared: bool = True,
             dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """(B, T, Q, C) standard normal noise: one (Q, C) draw per sequence repeated over T (``shared``), or T
    independent draws. ``generator``: one for the batch, one per sequence (a list), or None (global RNG)."""
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, T, Q, C), got {tuple(shape)}")
    b, t, q, c = shape
    if shared:
        noise = _draw((b, 1, q, c), generator).expand(b, t, q, c).contiguous()
    else:
        noise = _draw((b, t, q, c), generator)
    return noise.to(device=device, dtype=dtype)


def shared_noise(shape: tuple[int, int, int, int], generator: Generators = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """(B, T, Q, C) noise identical in every frame of a sequence (`noise_4d` with ``shared=True``)."""
    return noise_4d(shape, generator, shared=True, dtype=dtype, device=device)


def default_shift(frames: int) -> float:
    """Sampling time shift for ``frames`` frames: ``sqrt(frames)`` (see the module docstring)."""
    if frames < 1:
        raise ValueError(f"frames={frames} must be >= 1")
    return math.sqrt(frames)


def training_inputs(x0: torch.Tensor, generators: list[torch.Generator], flow: FlowMatching | None = None,
                    shared: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_sigma, timestep (B,), velocity target, sigma (B,)) for clean latents ``x0`` (B, T, Q, C), sequence i
    drawing its noise and its one sigma from ``generators[i]``. ``flow`` defaults to ``FlowMatching(shift=1)``
    (uniform sigmas: 3.2 finds a training shift of little use). Loss: ``flow.loss(model(x_sigma, timestep,
    image_tokens), target)``."""
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (B, T, Q, C), got {tuple(x0.shape)}")
    if len(generators) != x0.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {x0.shape[0]}")
    flow = flow or FlowMatching(shift=1.0)
    noise = noise_4d(tuple(x0.shape), generators, shared=shared)
    return flow.draw(x0, generators, noise=noise)


@torch.no_grad()
def sample_4d(model, image_tokens: torch.Tensor, steps: int = 50, shift: float | None = None,
              generator: Generators = None, shared: bool = True, num_latents: int | None = None,
              guidance_scale: float = 1.0, uncond_image_tokens: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Generate (B, T, Q, C) latents for per-frame image features (B, T, L, D_img) by Euler integration from
    sigma = 1 to 0 over FlowMatchEuler's sigmas (`loom.models.flow.sampling_sigmas`), ``shift``-ed (default
    `default_shift` (T); 1 = no shift).

    The noise is `noise_4d` (shared across frames unless ``shared=False``) from ``generator``, or ``noise`` when
    given. Q is ``num_latents`` or the model's ``config.num_latents``. With ``guidance_scale`` > 1, classifier-free
    guidance against ``uncond_image_tokens`` (zeros by default). Decode each frame with the shape VAE."""
    if image_tokens.ndim != 4:
        raise ValueError(f"image_tokens must be (B, T, L, D_img), got {tuple(image_tokens.shape)}")
    b, t = image_tokens.shape[:2]
    cfg = model.config
    q = num_latents or cfg.num_latents
    shift = default_shift(t) if shift is None else shift
    device = next(model.parameters()).device
    image_tokens = image_tokens.to(device)
    if noise is None:
        noise = noise_4d((b, t, q, cfg.latent_channels), generator, shared=shared, device=device)
    elif tuple(noise.shape) != (b, t, q, cfg.latent_channels):
        raise ValueError(f"noise must be {(b, t, q, cfg.latent_channels)}, got {tuple(noise.shape)}")
    if guidance_scale != 1.0:
        uncond = torch.zeros_like(image_tokens) if uncond_image_tokens is None else uncond_image_tokens.to(device)
        if uncond.shape != image_tokens.shape:
            raise ValueError(f"uncond_image_tokens {tuple(uncond.shape)} must match image_tokens "
                             f"{tuple(image_tokens.shape)}")

    def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 1.0:
            return model(x, timestep, image_tokens)
        both = model(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([image_tokens, uncond]))
        cond, free = both.chunk(2)
        return free + guidance_scale * (cond - free)

    # Step1X-3D samples its base with diffusers' FlowMatchEulerDiscreteScheduler: the same sigmas (at shift 1)
    return euler_sample(velocity, noise.to(device), steps=steps, shift=shift, schedule="flow_match_euler")

