"""The training data of ``loom train ttv``: the rank's loader over turntable shards (pixels) or latent shards, and
the partial textures drawn for TAPESTRY 3.2's context-aware inpainting.

Known video and inpainting mask: with probability ``data.known_prob`` a sample gets a "partial texture", else
nothing is known (zeros, mask all +1), which is also what generation from an untextured mesh feeds. A partial
texture keeps the colour of the object's known pixels; unknown pixels are 0 (mid-grey in [-1, 1]) and the mask video
is +1 where the model must generate and -1 where the content is given. Which pixels are known:

- the render's own ``known`` pass (``render ttv --set passes.partial=true``: the surface an earlier orbit of the
  object under another base rotation saw, the holes an inpainting stage meets) for a share
  ``data.visibility_share`` of the partial draws of samples that have it;
- otherwise the object's pixels on one side of a random plane through the unit sphere, taken in world coordinates
  from the position pass, so the known region is consistent across views as a partially textured mesh would be.

Latent shards hold one partial texture per sample, encoded when the cache was made (`loom cache latents`), taken
with the same probability (`loom.models.ttv.PartialTextures`). The rest of the conditioning is the model line's
(`loom.models.ttv.Conditioner`), shared with generation.
"""

from __future__ import annotations

# The draw lives with the model line (`loom cache latents` draws one per sample too); re-exported here.
from loom.models.ttv import partial_known  # noqa: F401
from loom.training.ttv.config import DataSettings


def make_loader(d: DataSettings, seed: int):
    """The rank's exact, resumable loader; pixel samples get the frame subsampling and resizing of ``d``."""
    from loom.datasets.loader import LoomLoader
    from loom.datasets.transforms import frame_transform
    from loom.platform.shards import manifest_kind

    # Latents were made from whole videos at their rendered size: frames and size apply to pixels only.
    transform = None if manifest_kind(d.source) == "latents" else frame_transform(d.frames, d.size)
    return LoomLoader(d.source, d.batch_size, seed=seed, num_workers=d.num_workers, prefetch=d.prefetch,
                      transform=transform)
