"""The training data of ``loom train ttv``: the rank's loader over turntable shards (pixels) or latent shards, and
the partial textures drawn for TAPESTRY 3.2's context-aware inpainting.

Known video and inpainting mask: with probability ``data.known_prob`` a sample gets a "partial texture": the
object's pixels on one side of a random plane through the unit sphere, taken in world coordinates from the position
pass, so the known region is consistent across views as a partially textured mesh would be. Unknown pixels are 0
(mid-grey in [-1, 1]); the mask video is +1 where the model must generate and -1 where the content is given.
Otherwise nothing is known (zeros, mask all +1), which is also what generation from an untextured mesh feeds.
Latent shards cannot re-draw the plane, so with them every sample is "nothing known". The rest of the conditioning
is the model line's (`loom.models.ttv.Conditioner`), shared with generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.training.ttv.config import DataSettings

if TYPE_CHECKING:
    import torch


def partial_known(rgb: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, prob: float,
                  generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """(known video, inpainting-mask video), both (B, 3, T, H, W) in [-1, 1], from rgb (B,T,H,W,3) in [-1, 1],
    world positions (B,T,H,W,3) and the object mask (B,T,H,W) bool; one draw per sample from its generator."""
    import torch

    b = rgb.shape[0]
    draws = [(torch.rand(1, generator=g), torch.randn(3, generator=g), torch.rand(1, generator=g)) for g in generators]
    use = torch.cat([d[0] for d in draws]) < prob
    n = torch.stack([d[1] for d in draws])
    n = n / n.norm(dim=1, keepdim=True).clamp_min(1e-6)
    c = (torch.cat([d[2] for d in draws]) * 2 - 1) * 0.5  # the plane passes within half the radius of the centre
    side = (position * n.view(b, 1, 1, 1, 3)).sum(-1) > c.view(b, 1, 1, 1)
    keep = side & mask & use.view(b, 1, 1, 1)  # (B,T,H,W)
    known = torch.where(keep[..., None], rgb, torch.zeros_like(rgb))
    gen = (~keep).float() * 2 - 1
    return known.permute(0, 4, 1, 2, 3), gen[:, None].expand(-1, 3, -1, -1, -1)


def make_loader(d: DataSettings, seed: int):
    """The rank's exact, resumable loader; pixel samples get the frame subsampling and resizing of ``d``."""
    from loom.datasets.loader import LoomLoader
    from loom.datasets.transforms import frame_transform
    from loom.platform.shards import manifest_kind

    # Latents were made from whole videos at their rendered size: frames and size apply to pixels only.
    transform = None if manifest_kind(d.source) == "latents" else frame_transform(d.frames, d.size)
    return LoomLoader(d.source, d.batch_size, seed=seed, num_workers=d.num_workers, prefetch=d.prefetch,
                      transform=transform)
