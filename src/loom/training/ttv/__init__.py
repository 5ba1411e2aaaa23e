"""``loom train ttv``: fine-tune the geometry-conditioned video DiT of TAPESTRY (sections 3.1, 4.1) on Loom's
turntable shards, with Lightning + DeepSpeed, on one CPU or many GPU nodes (Ray Train), tracked in MLflow.

Where things are: the job's config and recipes in :mod:`.config`; the loader and the partial textures in
:mod:`.data`; the Lightning module in :mod:`.module`; the networks, their builders, the conditioning and the
sampler, which generation shares, in :mod:`loom.models.ttv`.

Data flow of one step::

    LoomLoader (exact, resumable, rank-split)                       turntable shards (pixels) or latent shards
      -> batch: rgb/normal/position/mask videos (B,T,H,W,..)   |   rgb/normal/position latents (B,C,T',H',W')
      -> frozen video VAE (pixels only): rgb -> x0; normal, position, known video, inpainting mask -> latents
      -> geometry = concat(normal, position, known, mask latents)  (B, 4C, T', H', W')
      -> reference = x0's first latent frame, zeros after it        (B, C, T', H', W')
      -> sigma ~ shift(U(0,1)), noise ~ N(0,1) from (seed, step, rank)  ->  x_sigma = (1-sigma) x0 + sigma noise
      -> TTVDiT(x_sigma, 1000 sigma, geometry, reference, text, image) -> v;  loss = |v - (noise - x0)|^2

Text and image context: ``text_embed`` / ``image_embed`` from latent shards written by ``loom cache latents``
with encoders configured; else encoded on the fly by ``model.text_encoder`` (the ``data.prompt`` template) and
``model.image_encoder`` (the first rgb frame) when those are set; else zeros of ``data.text_len`` /
``data.image_len`` tokens (an unconditional model; the run's ``context`` param says which).

The run folder (``out``): ``config.yaml`` (the resolved config, which ``loom generate ttv`` reads), Lightning
checkpoints, ``lora/`` (diffusers-format LoRA safetensors + the fusion module) and ``samples/``.
"""

from __future__ import annotations

from loom.training.ttv.config import TrainTTVJob, absolute_paths

__all__ = ["TrainTTVJob", "absolute_paths", "make", "train"]


def make(cfg: TrainTTVJob):
    """(module, None): the module brings its own train iterable. Module-level so Ray can pickle it."""
    import torch

    from loom.training.ttv.module import TTVModule

    torch.manual_seed(cfg.trainer.seed)
    return TTVModule(cfg), None


def train(cfg: TrainTTVJob, *, resume: bool = False) -> None:
    """Write the resolved config beside the run, then train here or on Ray Train (``ray.address``)."""
    from loom.training import launch

    launch.train_run(absolute_paths(cfg), make, resume=resume)
