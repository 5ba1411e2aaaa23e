"""``loom train ggi``: train VideoFrom3D's Geometry-guided Generative Inbetweening module (sections 3.3, 3.4) on real
video clips (``loom prep videos``) or rendered scenes (``loom render scene``), with Lightning + DeepSpeed, on one CPU
or many GPU nodes (Ray Train), tracked in MLflow.

Where things are: the config and recipes in :mod:`.config`; the loader view in :mod:`.data`; the Lightning module in
:mod:`.module`; the networks, input layout, objective and sampler, which generation shares, in
:mod:`loom.models.ggi`.

Data flow of one step::

    LoomLoader (exact, resumable, rank-split) -> GGIView: video (B,F,H,W,3), edges (B,F,H,W), noise (B,F',C,h,w)
      -> frozen CogVideoX VAE: x0 = E(video); V = [E(first), 0.., E(last)]; H_e = E(edges)   (B,F',C,h,w) each
      -> t ~ U{0..999} from (seed, step, sample); x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps_w  (the warped noise)
      -> transformer(x_t (+) V (+) H_e, t, text) -> v (default) or epsilon; MSE against its target

The run folder (``out``): ``config.yaml`` (read by ``loom generate inbetween``), Lightning checkpoints,
``transformer/`` (the trained transformer in diffusers' layout, flow LoRA merged) and ``samples/``.
"""

from __future__ import annotations

from loom.training.ggi.config import TrainGGIJob, absolute_paths

__all__ = ["TrainGGIJob", "absolute_paths", "make", "train"]


def make(cfg: TrainGGIJob):
    """(module, None): the module brings its own train iterable. Module-level so Ray can pickle it."""
    import torch

    from loom.training.ggi.module import GGIModule

    torch.manual_seed(cfg.trainer.seed)
    return GGIModule(cfg), None


def train(cfg: TrainGGIJob, *, resume: bool = False) -> None:
    """Write the resolved config beside the run, then train here or on Ray Train (``ray.address``)."""
    from loom.training import launch

    launch.train_run(absolute_paths(cfg), make, resume=resume)
