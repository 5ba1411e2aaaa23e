"""The 4D shape DiT's data (``loom train shape4d``): evenly spread frames of each sequence with their surface
points, aligned queries and conditioning video. The point subsets and the float hand-over are the shape VAE's
(:mod:`loom.training.vae.data`): the frozen VAE reads the same point sets it was trained on."""

from __future__ import annotations

from loom.training.shape4d.config import Shape4DDataSettings
from loom.training.vae.data import FloatsAsNumpy, PointSubset, as_tensor

__all__ = ["as_tensor", "make_shape4d_loader"]


def make_shape4d_loader(d: Shape4DDataSettings, seed: int):
    from loom.datasets.loader import LoomLoader
    from loom.datasets.transforms import Compose, SubsampleFrames

    ts = ([SubsampleFrames(d.frames, "uniform")] if d.frames else []) + (
        [PointSubset(d.surface_points)] if d.surface_points else [])
    loader = LoomLoader(d.source, d.batch_size, seed=seed, num_workers=d.num_workers, prefetch=d.prefetch,
                        keys=("surface", "queries", "video"), transform=Compose(*ts) if ts else None)
    return FloatsAsNumpy(loader, ("surface", "queries"))
