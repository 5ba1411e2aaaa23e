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

from loom.models.ggi import GGIView  # the view lives with the model line: generation and the cache use it too
from loom.training.ggi.config import GGIDataSettings


def make_loader(d: GGIDataSettings, seed: int):
    """The rank's exact, resumable loader over clips or scenes, each sample in the GGI view."""
    from loom.datasets.loader import LoomLoader
    from loom.platform.shards import manifest_kind

    # `loom cache ggi` latents are read as they are (their view was taken when they were cached)
    cached = manifest_kind(d.source) == "latents-ggi"
    if cached and d.structure == "none":
        raise ValueError(f"data.structure=none: {d.source} is a `loom cache ggi` cache with the edges encoded; "
                         "train the no-structure model from the clip or scene shards")
    transform = None if cached else GGIView(d.frames, d.structure)
    return LoomLoader(d.source, d.batch_size, seed=seed, num_workers=d.num_workers, prefetch=d.prefetch,
                      transform=transform)
