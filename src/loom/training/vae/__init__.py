"""``loom train vae``: the VecSet shape VAE of ShapeGen4D (section 3.1) on Loom's 4D (or static) shards, on the
video DiT's machinery (Lightning + DeepSpeed + Ray Train + MLflow + exact resume: :mod:`loom.training.launch`,
:class:`loom.training.module.LoomModule`). ``config`` holds the job and its recipes, ``data`` the loader and the
truncation checks, ``module`` the Lightning module. The 4D shape DiT (:mod:`loom.training.shape4d`) trains on top
of a VAE made here.

Data flow of one step::

    LoomLoader (exact, resumable, rank-split)                           4D shards (loom render 4d)
      -> per sample: data.frames random frames, data.surface_points / data.sharp_points / data.sdf_points random
         points per frame, queries: the shards' aligned queries, or (data.queries=fps) farthest point samples of
         the surface (with a sharp-edge VAE: num_queries/2 of the surface + num_queries/2 of the sharp points as
         sharp_queries, Step1X-3D's 1,024 + 1,024)
      -> frames flattened into the batch: surface (B*T,S,6), queries (B*T,Q,3), sdf_points (B*T,M,3), sdf (B*T,M)
         [, sharp_surface (B*T,S',6), sharp_queries (B*T,Q',3)]  (data.encoder_inputs)
      -> ShapeVAE.encode -> posterior; latents = mean + std * eps, eps from (seed, step, sample key)
      -> ShapeVAE.decode(latents, sdf_points) -> sdf;  loss = vae_loss (SDF MSE in tau units + kl_weight * KL)

Static shapes: any shards of the 4D schema (one frame is fine) with ``data.queries=fps`` train the VAE as
3DShape2VecSet does (Q = FPS(P)); on 4D shards this is also the "w/o aligned latents" ablation (Table 3).
The model predicts ``clip(sdf, -tau, tau) / tau``: the shards' truncation must be at least ``model.tau`` (the step
clips the targets to tau, as Step1X-3D clips its stored SDF when it loads it), which is checked against the 4D
job's ``config.yaml`` beside the shards (``points.sdf_truncation``), a ``sdf_truncation`` in the samples' meta,
and the batches themselves (clipped values pile up at ``|sdf| = truncation``).

Step1X-3D's VAE (``model.size=paper``, or its released folder as ``model.init``) has the sharp-edge branch: it
reads the shards' ``sharp_surface`` (the 4D job's ``points.sharp_points``; a corpus without them is refused before
the first step, naming the setting) and shapes in its [-1, 1] box (``meta["half_extent"]`` must be 1, the 4D job's
default), with tau 0.01 (``model.tau``, the 4D job's default ``points.sdf_truncation``; older corpora truncated at
0.05 serve any tau <= 0.05). The tiny recipe has no sharp branch and the same tau.
"""

from __future__ import annotations

import dataclasses

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
    from loom.training import launch

    if not isinstance(cfg, TrainVAEJob):
        raise TypeError(f"loom.training.vae.train() takes a TrainVAEJob, not {type(cfg).__name__}")
    launch.train_run(absolute_paths(cfg), make_vae, resume=resume)
