"""The training data of ``loom train ggi``: a clip (``loom prep videos``) or a rendered scene (``loom render scene``)
-> the GGI module's view of it, in the loader's worker:

=========  ==================  =======  ==========================================================================
key        shape               dtype    meaning
=========  ==================  =======  ==========================================================================
``video``  (F,H,W,3)           uint8    the frames (``data.frames`` from the start), padded to F = 1 + 4k by
                                        repeating the last frame (46 -> 49, as the authors)
``edges``  (F,H,W)             float32  structure in [0, 1]: a clip's depth edges / 255; a scene's geometric
                                        edges (any of silhouette, crease, boundary, intersection) as 0/1; padded
``noise``  (F',C,h,w)          float32  the warped noise at the latent frame rate (F' = 1 + (F-1)/4): a clip's as
                                        stored (made for its padded length); a scene's (at the video frame rate)
                                        padded with its last frame (zero flow) and brought to the latent frame rate
                                        by `loom.geometry.noise.compress_time`
=========  ==================  =======  ==========================================================================

The two anchors of a training sample are its first and last (padded) frames: the end anchor is the last real frame,
which the padding repeats. Nothing is resized: the noise lives on the latent grid of the frames as stored, so the
corpus is made at the training size (``loom prep videos`` fits clips to it; the paper: 720x480).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loom.training.ggi.config import GGIDataSettings

KINDS = ("clips", "scene")


def pad_last(a: np.ndarray, n: int) -> np.ndarray:
    """Repeat the last entry of axis 0 up to ``n`` entries."""
    if len(a) >= n:
        return a[:n]
    return np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)])


class GGIView:
    """The loader transform (``t(sample, rng)``): a decoded clip or scene sample -> ``video``, ``edges``, ``noise``
    (above), plus ``meta``/keys untouched. Deterministic: ``rng`` is not used."""

    def __init__(self, frames: int = 0):
        self.frames = frames

    def __call__(self, sample: dict[str, Any], rng=None) -> dict[str, Any]:
        from loom.models.ggi import padded_frames

        kind = sample["meta"].get("kind")
        if kind not in KINDS:
            raise ValueError(f"sample {sample.get('__key__')} is of kind {kind!r}: GGI trains on {list(KINDS)} "
                             "(loom prep videos, loom render scene)")
        rgb = sample["rgb"]
        t = len(rgb) if not self.frames else self.frames
        if t > len(rgb):
            raise ValueError(f"data.frames={self.frames} but sample {sample.get('__key__')} has {len(rgb)} frames")
        f = padded_frames(t)
        h, w = rgb.shape[1:3]
        if h % 16 or w % 16:
            raise ValueError(f"sample {sample.get('__key__')} is {w}x{h}: GGI needs sides that are multiples of 16 "
                             "(VAE 8x, patch 2x); prep or render the corpus at such a size")
        if kind == "clips":
            edges = sample["edges"][:t].astype(np.float32) / 255.0
            noise = sample["noise"]
            need = 1 + (f - 1) // 4
            if self.frames and len(noise) < need:
                raise ValueError(f"sample {sample.get('__key__')}: its noise has {len(noise)} latent frames, "
                                 f"{need} are needed")
            noise = noise[:need]
        else:
            import torch

            from loom.geometry.noise import compress_time

            edges = sample["edges"][:t].any(-1).astype(np.float32)
            noise = compress_time(torch.from_numpy(pad_last(sample["noise"][:t], f))).numpy()
        out = {k: v for k, v in sample.items() if k.startswith("__") or k == "meta"}
        out.update(video=pad_last(rgb[:t], f), edges=pad_last(edges, f), noise=np.ascontiguousarray(noise,
                                                                                                      np.float32))
        return out


def make_loader(d: GGIDataSettings, seed: int):
    """The rank's exact, resumable loader over clips or scenes, each sample in the GGI view."""
    from loom.datasets.loader import LoomLoader

    return LoomLoader(d.source, d.batch_size, seed=seed, num_workers=d.num_workers, prefetch=d.prefetch,
                      transform=GGIView(d.frames))
