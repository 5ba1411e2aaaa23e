"""The 4D shape DiT's data (``loom train shape4d``): evenly spread frames of each sequence with their surface
points (and sharp-edge points, for a frozen VAE with Step1X-3D's sharp branch), aligned queries and conditioning
video. The point subsets and the float hand-over are the shape VAE's
(:mod:`loom.training.vae.data`): the frozen VAE reads the same point sets it was trained on."""

from __future__ import annotations

from loom.training.shape4d.config import Shape4DDataSettings
from loom.training.vae.data import POINT_FLOATS, FloatsAsNumpy, PointSubset, as_tensor, encoder_inputs

__all__ = ["as_tensor", "encoder_inputs", "make_shape4d_loader"]


def make_shape4d_loader(d: Shape4DDataSettings, seed: int, sharp: bool = False):
    """``sharp``: the frozen VAE has the sharp-edge branch, so batches carry ``sharp_surface`` (no sharp queries:
    the aligned queries are all the latents, ShapeGen4D 3.2)."""
    from loom.datasets.loader import LoomLoader
    from loom.datasets.transforms import Compose, SubsampleFrames

    n_sharp = d.sharp_points if sharp else 0
    ts = ([SubsampleFrames(d.frames, "uniform")] if d.frames else []) + (
        [PointSubset(d.surface_points, sharp=n_sharp)] if d.surface_points or n_sharp else [])
    keys = ("surface", "queries", "video") + (("sharp_surface",) if sharp else ())
    loader = LoomLoader(d.source, d.batch_size, seed=seed, num_workers=d.num_workers, prefetch=d.prefetch,
                        keys=keys, transform=Compose(*ts) if ts else None)
    return FloatsAsNumpy(loader, POINT_FLOATS)
