"""The 4D shape DiT's data (``loom train shape4d``): evenly spread frames of each sequence with their surface
points (and sharp-edge points, for a frozen VAE with Step1X-3D's sharp branch), aligned queries and conditioning
video. The point subsets and the float hand-over are the shape VAE's
(:mod:`loom.training.vae.data`): the frozen VAE reads the same point sets it was trained on."""

from __future__ import annotations

from loom.training.shape4d.config import Shape4DDataSettings
from loom.models.shape_inputs import PointSubset
from loom.training.vae.data import POINT_FLOATS, FloatsAsNumpy

__all__ = ["make_shape4d_loader"]


def make_shape4d_loader(d: Shape4DDataSettings, seed: int, sharp: bool = False, cached: bool = False):
    """``sharp``: the frozen VAE has the sharp-edge branch, so batches carry ``sharp_surface`` (no sharp queries:
    the aligned queries are all the latents, ShapeGen4D 3.2). ``cached``: the source is a `loom cache 4d` corpus,
    so batches carry ``shape_latent`` and ``image_tokens`` (the point settings were the cache job's)."""
    from loom.datasets.loader import LoomLoader
    from loom.datasets.transforms import Compose, SubsampleFrames

    frames = [SubsampleFrames(d.frames, "uniform")] if d.frames else []
    if cached:
        if d.surface_points or d.sharp_points:
            raise ValueError(f"data.source={d.source!r} holds cached latents: data.surface_points and "
                             "data.sharp_points do not apply (the points were chosen when `loom cache 4d` ran: "
                             "its surface_points and sharp_points settings); leave them at 0")
        keys = ("shape_latent", "image_tokens")
        ts = frames
    else:
        n_sharp = d.sharp_points if sharp else 0
        ts = frames + ([PointSubset(d.surface_points, sharp=n_sharp)] if d.surface_points or n_sharp else [])
        keys = ("surface", "queries", "video") + (("sharp_surface",) if sharp else ())
    loader = LoomLoader(d.source, d.batch_size, seed=seed, num_workers=d.num_workers, prefetch=d.prefetch,
                        keys=keys, transform=Compose(*ts) if ts else None)
    return FloatsAsNumpy(loader, POINT_FLOATS + ("shape_latent", "image_tokens"))
