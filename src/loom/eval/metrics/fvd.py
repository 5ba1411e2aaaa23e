"""Frechet Video Distance (Unterthiner et al. 2018).

Definition: the Frechet distance (:func:`loom.eval.metrics.fid.frechet_distance`) between Gaussians fitted to the
400-d logits of the Kinetics-400 I3D (:mod:`loom.eval.networks.i3d`) of two video sets. Videos are (N,T,3,H,W) in
[0,1], T >= 9 (the protocol uses 16 frames); each frame is resized to 224x224 (TF1 bilinear, as the reference
code) and scaled to [-1,1] before I3D, see :class:`loom.eval.networks.i3d.I3DFeatures`.

Known failures of other tools that this avoids: the symmetric eigenvalue form of the trace term cannot go negative
(no ``scipy.linalg.sqrtm`` of a non-symmetric product); inputs outside [0,1] are refused, so a [0,255] or [-1,1]
video cannot be silently double-scaled; statistics are float64 sums that merge exactly, so the value is the same
on 1 or N processes: each process calls :func:`video_stats` on its shard and the results are merged
(:meth:`FeatureStats.merge`, or an all-reduce SUM of :meth:`FeatureStats.state_dict`) before
:func:`fvd_from_stats`. (The I3D features themselves are float32: a CPU/GPU convolution can round differently
for another batch size, ~1e-7 relative; with the same batches the merged value equals the single-process one to
float64 rounding, tested.)
"""

from __future__ import annotations

import torch

from loom.eval.metrics.fid import FeatureStats, feature_stats, frechet_distance_from_stats


def video_stats(videos, network: torch.nn.Module | None = None, batch_size: int = 8) -> FeatureStats:
    """Streaming I3D statistics of ``videos``: a (N,T,3,H,W) tensor in [0,1] or an iterable of such batches."""
    if network is None:
        from loom.eval.networks import i3d

        network = i3d.load()
    return feature_stats(videos, network, batch_size)


def fvd_from_stats(fake: FeatureStats, real: FeatureStats) -> float:
    return frechet_distance_from_stats(fake, real)


def fvd(preds, target, *, network: torch.nn.Module | None = None, batch_size: int = 8) -> float:
    """FVD between generated videos ``preds`` and reference videos ``target`` ((N,T,3,H,W) in [0,1] or iterables
    of batches). ``network`` defaults to the real I3D from the weights directory."""
    if network is None:
        from loom.eval.networks import i3d

        network = i3d.load()
    return fvd_from_stats(video_stats(preds, network, batch_size), video_stats(target, network, batch_size))
