"""``loom train shape4d``: the spatiotemporal layers of ShapeGen4D's 4D shape DiT (sections 3.2 and 5.1) on Loom's
4D shards, on the video DiT's machinery (Lightning + DeepSpeed + Ray Train + MLflow + exact resume:
:mod:`loom.training.launch`, :class:`loom.training.module.LoomModule`). ``config`` holds the job and its recipes,
``data`` the loader, ``module`` the Lightning module; what ``loom generate 4d`` shares with it (the networks'
builders, the layer files, the sampler call, mesh files) is :mod:`loom.models.shape4d`, and the sampling of a
finished run is :mod:`loom.inference.shape4d`. The shape VAE it encodes with is trained by :mod:`loom.training.vae`.

Data flow of one step::

    LoomLoader -> per sample: data.frames evenly spread frames (0 = all; the paper's ablations use 8 of 16)
      -> frozen shape VAE (model.vae): surface[t], queries[t] [, sharp_surface[t] for Step1X-3D's sharp branch; no
         sharp queries: the aligned queries are all the latents] -> posterior mean -> x0 (B,T,Q,C) x latent_scale
      -> frozen DINOv2 (model.image_encoder): video[t] -> image tokens (B,T,L,D_img)
      -> shape4d_flow.training_inputs: ONE sigma per sequence, noise shared by all frames (flow.shared_noise),
         both from (seed, step, sample key)  ->  x_sigma, timestep, velocity target
      -> Shape4DDiT (frozen base + trainable spatiotemporal layers)(x_sigma, timestep, image tokens) -> v
      -> loss = |v - (noise - x0)|^2

    or, from a `loom cache 4d` corpus (kind "latents4d"): shape_latent x latent_scale = x0, image_tokens = the
    image tokens (the cache's encoders checked against model.vae and model.image_encoder first); same step after.

The base DiT comes from ``model.base`` (the released Step1X-3D-Geometry-1300m folder or its ``transformer/``, or a
``Shape4DDiT.save_pretrained`` folder of a base saved with ``spatiotemporal=False``), gets fresh zero-initialised
spatiotemporal layers and is frozen (``freeze_base``): only those layers train and only they are saved
(``OUT/spatiotemporal``). The frozen VAE and DINOv2 live outside the
module tree, so DeepSpeed neither wraps, casts nor checkpoints them. A digest of the base weights is taken when the
run starts and when it ends and written beside the layers: ``loom generate 4d`` refuses a base folder that has
changed since.

Ablations (Table 3) by config: ``model.temporal=1d`` (1D temporal attention), ``model.st_image_tokens=false``
(without image hidden states), ``flow.shared_noise=false`` (independent noise), ``flow.shift=1`` (no sampling
time shift); "w/o aligned latents" is a VAE trained and used with ``data.queries=fps``.
"""

from __future__ import annotations

import dataclasses

from loom.training.shape4d.config import TrainShape4DJob
from loom.training.vae.config import absolute_model, absolute_path

__all__ = ["TrainShape4DJob", "absolute_paths", "train"]


def make_shape4d(cfg: TrainShape4DJob):
    """(module, None): the module brings its own train iterable. Module-level so Ray can pickle it."""
    import torch

    from loom.training.shape4d.module import Shape4DModule

    torch.manual_seed(cfg.trainer.seed)
    return Shape4DModule(cfg), None


def absolute_paths(cfg: TrainShape4DJob) -> TrainShape4DJob:
    """Local paths made absolute: Ray Train workers (and a resumed run) may start in another directory."""
    r, m = dataclasses.replace, cfg.model
    model = r(m, base=absolute_model(m.base), vae=absolute_model(m.vae), image_encoder=absolute_model(m.image_encoder))
    d = cfg.data
    data = r(d, source=absolute_path(d.source), val_source=absolute_path(d.val_source) if d.val_source else "")
    return r(cfg, out=absolute_path(cfg.out), data=data, model=model)


def train(cfg: TrainShape4DJob, *, resume: bool = False) -> None:
    """Write the resolved config beside the run, then train here or on Ray Train (``ray.address``)."""
    from loom.training import launch

    if not isinstance(cfg, TrainShape4DJob):
        raise TypeError(f"loom.training.shape4d.train() takes a TrainShape4DJob, not {type(cfg).__name__}")
    launch.train_run(absolute_paths(cfg), make_shape4d, resume=resume)
