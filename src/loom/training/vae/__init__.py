"""``loom train vae``: the VecSet shape VAE of ShapeGen4D (section 3.1) on Loom's 4D (or static) shards, on the
video DiT's machinery (Lightning + DeepSpeed + Ray Train + MLflow + exact resume: :mod:`loom.training.launch`,
:class:`loom.training.module.LoomModule`). ``config`` holds the job and its recipes, ``data`` the loader and the
truncation checks, ``module`` the Lightning module. The 4D shape DiT (:mod:`loom.training.shape4d`) trains on top
of a VAE made here.

Data flow of one step::

    LoomLoader (exact, resumable, rank-split)                           4D shards (loom render 4d)
      -> per sample: data.frames random frames, data.surface_points / data.sdf_points random points per frame,
         queries: the shards' aligned queries, or (data.queries=fps) farthest point samples of the surface
      -> frames flattened into the batch: surface (B*T,S,6), queries (B*T,Q,3), sdf_points (B*T,M,3), sdf (B*T,M)
      -> ShapeVAE.encode -> posterior; latents = mean + std * eps, eps from (seed, step, sample key)
      -> ShapeVAE.decode(latents, sdf_points) -> sdf;  loss = vae_loss (SDF MSE in tau units + kl_weight * KL)

Static shapes: any shards of the 4D schema (one frame is fine) with ``data.queries=fps`` train the VAE as
3DShape2VecSet does (Q = FPS(P)); on 4D shards this is also the "w/o aligned latents" ablation (Table 3).
The model predicts ``sdf / tau``: ``model.tau`` must be the shards' truncation, which is checked against the
4D job's ``config.yaml`` beside the shards (``points.sdf_truncation``), a ``sdf_truncation`` in the samples'
meta, and the batches themselves (clipped values pile up at ``|sdf| = truncation``).
"""

from __future__ import annotations

import dataclasses
import functools
import os

from loom.training.vae.config import TrainVAEJob, absolute_model, absolute_path

__all__ = ["TrainVAEJob", "absolute_paths", "train"]


def make_vae(cfg: TrainVAEJob):
    """(module, None): the module brings its own train iterable. Module-level so Ray can pickle it."""
    import torch

    from loom.training.vae.module import VAEModule

    torch.manual_seed(cfg.trainer.seed)
    return VAEModule(cfg), None


def absolute_paths(cfg: TrainVAEJob) -> TrainVAEJob:
    """Local paths made absolute: Ray Train workers (and a resumed run) may start in another directory."""
    r = dataclasses.replace
    return r(cfg, out=absolute_path(cfg.out), data=r(cfg.data, source=absolute_path(cfg.data.source)),
             model=r(cfg.model, init=absolute_model(cfg.model.init)))


def train(cfg: TrainVAEJob, *, resume: bool = False) -> None:
    """Write the resolved config beside the run, then train here or on Ray Train (``ray.address``)."""
    from loom.platform import config as cfgmod
    from loom.training import launch

    if not isinstance(cfg, TrainVAEJob):
        raise TypeError(f"loom.training.vae.train() takes a TrainVAEJob, not {type(cfg).__name__}")
    cfg = absolute_paths(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.yaml"), "w") as f:
        f.write(cfgmod.dump_yaml(cfg))
    launch.run(functools.partial(make_vae, cfg), cfg.trainer, cfg.tracking, cfg.ray, cfg.out, resume=resume)
