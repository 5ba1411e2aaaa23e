"""The 4D shape DiT's data (``loom train shape4d``): evenly spread frames of each sequence with their surface
points (and sharp-edge points, for a frozen VAE with Step1X-3D's sharp branch), aligned queries and conditioning
video. The point subsets and the float hand-over are the shape VAE's
(:mod:`loom.training.vae.data`): the frozen VAE reads the same point sets it was trained on."""

from __future__ import annotations

import functools
import hashlib
from typing import Literal

import numpy as np

from loom.datasets.loader import LoomDataset, LoomLoader
from loom.datasets.order import epoch_order, rank_batches
from loom.training.shape4d.config import Shape4DDataSettings
from loom.models.shape_inputs import PointSubset
from loom.training.vae.data import POINT_FLOATS, FloatsAsNumpy

__all__ = ["HeldOut", "is_val_key", "key_unit", "make_shape4d_loader"]

FLOATS = POINT_FLOATS + ("shape_latent", "image_tokens")

Split = Literal["all", "train", "val"]


def key_unit(key: str) -> float:
    """A sample key's fixed place in [0, 1) (sha256 of the key): the validation split's coordinate. It depends on
    the key alone, so the split is the same for every seed, world size, shard layout and resume."""
    h = hashlib.sha256(b"loom-val\0" + key.encode()).digest()
    return int.from_bytes(h[:8], "little") / 2.0**64


def is_val_key(key: str, fraction: float) -> bool:
    """Whether the sequence ``key`` is held out by ``data.val_fraction``."""
    return key_unit(key) < fraction


def _in_split(key: str, fraction: float, val: bool) -> bool:
    return is_val_key(key, fraction) == val


class KeySubsetDataset(LoomDataset):
    """A LoomDataset over the samples of its shards whose key ``keep`` accepts: its epochs, order, rank split,
    padding and resume state are those of a corpus of just these samples (global ids stay the full corpus's, so a
    sample's transform draws are the same as without the split)."""

    def __init__(self, url, batch_size: int, *, keep, what: str, **kw):
        super().__init__(url, batch_size, **kw)
        ids = [int(self.offsets[s]) + i for s, ix in enumerate(self.index) for i, k in enumerate(ix.keys) if keep(k)]
        if not ids:
            raise ValueError(f"data.val_fraction leaves no {what} sequences in {url} ({self.num_samples} "
                             "sequences): choose another data.val_fraction, or give held-out shards as "
                             "data.val_source")
        self.subset = np.asarray(ids, dtype=np.int64)
        self.num_samples = len(ids)

    def batches(self, epoch: int, start_sample: int = 0):
        order = self.subset[epoch_order([len(self.subset)], self.seed, epoch, self.shuffle, self.shuffle_buffer)]
        return rank_batches(order, self.batch_size, self.rank, self.world_size, self.drop_last, start_sample)


class SubsetLoader(LoomLoader):
    """A LoomLoader over a :class:`KeySubsetDataset`."""

    def __init__(self, url, batch_size: int, *, keep, what: str, num_workers: int = 0, prefetch: int = 0, **kw):
        super().__init__(url, batch_size, num_workers=num_workers, prefetch=prefetch, **kw)
        self.dataset = KeySubsetDataset(url, batch_size, keep=keep, what=what, **kw)


class HeldOut:
    """Validation batches: the same batches from the start of epoch 0 at every pass (same samples, same point
    subsets), floats as numpy like the training batches."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        self.loader.set_epoch(0)
        yield from FloatsAsNumpy(self.loader, FLOATS)

    def __len__(self) -> int:
        return len(self.loader)


def make_shape4d_loader(d: Shape4DDataSettings, seed: int, sharp: bool = False, cached: bool = False,
                        split: Split = "all", source: str | None = None):
    """``sharp``: the frozen VAE has the sharp-edge branch, so batches carry ``sharp_surface`` (no sharp queries:
    the aligned queries are all the latents, ShapeGen4D 3.2). ``cached``: the source is a `loom cache 4d` corpus,
    so batches carry ``shape_latent`` and ``image_tokens`` (the point settings were the cache job's).
    ``split``: "train" leaves out, "val" keeps only, the sequences held out by ``data.val_fraction`` ("all" and a
    zero fraction: every sequence). ``source``: another corpus than ``data.source`` (``data.val_source``)."""
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
    val = split == "val"
    # validation: the corpus in its stored order (no shuffle), every rank a part of it, padding flagged
    kw = dict(seed=seed, num_workers=d.num_workers, prefetch=d.prefetch, keys=keys,
              transform=Compose(*ts) if ts else None, shuffle=not val)
    if split != "all" and d.val_fraction > 0 and source is None:
        f = d.val_fraction
        keep = functools.partial(_in_split, fraction=f, val=val)
        loader = SubsetLoader(d.source, d.batch_size, keep=keep, what=split, **kw)
    else:
        loader = LoomLoader(source or d.source, d.batch_size, **kw)
    return HeldOut(loader) if val else FloatsAsNumpy(loader, FLOATS)
