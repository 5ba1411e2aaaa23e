"""``loom train vae``'s root config (:class:`TrainVAEJob`), its sections and recipes. The optimizer section and
:func:`absolute_path` are also the 4D shape DiT's (:mod:`loom.training.shape4d`), which builds on this line."""

from __future__ import annotations

import os
from typing import Literal

from loom.platform.hub import absolute_model_name
from loom.platform.config import config, field, recipe, require
from loom.platform.ray import RaySettings
from loom.platform.tracking import TrackingSettings
from loom.training.launch import TrainerSettings, ray_field

TINY = "tiny"


@config
class VAEDataSettings:
    source: str = field("out/4d", help="4D shards (`loom render 4d` output folder or fsspec URL)")
    batch_size: int = field(1, help="samples (sequences) per rank per step; their frames are flattened into the "
                            "batch (batch_size x frames shapes)")
    frames: int = field(0, help="random frames per sample (0 = all)")
    surface_points: int = field(0, help="random surface points per frame fed to the encoder (0 = all)")
    sharp_points: int = field(0, help="random sharp-edge points per frame fed to the encoder's sharp branch "
                              "(0 = all; only for a VAE with sharp edges)")
    sdf_points: int = field(16384, help="random SDF samples per frame supervising the decoder (0 = all)")
    queries: Literal["aligned", "fps"] = field("aligned", help="aligned: the shards' aligned query points (4D, "
                                               "3.1); fps: farthest point samples of the surface (static shapes, "
                                               "3DShape2VecSet; the 'w/o aligned latents' ablation)")
    num_queries: int = field(1024, help="queries per frame with data.queries=fps; with a sharp-edge VAE half are "
                             "FPS of the surface, half of the sharp-edge points (Step1X-3D: 2,048 latents)")
    num_workers: int = field(0, help="loader worker processes per rank")
    prefetch: int = field(2, help="batches a background thread reads ahead of the step (num_workers=0; 0 = off)")

    def __post_init__(self):
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        for name in ("frames", "surface_points", "sharp_points", "sdf_points"):
            require(getattr(self, name) >= 0, f"data.{name}", getattr(self, name), "must be >= 0 (0 = all)")
        require(self.num_queries >= 1, "data.num_queries", self.num_queries, "must be >= 1")


@config
class VAEModelSettings:
    size: Literal["paper", "tiny"] = field("paper", help="a fresh ShapeVAE: paper (Step1X-3D's released "
                                           "architecture, 191.6 M, sharp edges on) or tiny (tests, sharp edges off); "
                                           "ignored with model.init")
    init: str = field("", help="local folder of a saved ShapeVAE (ShapeVAE.save_pretrained, e.g. a previous "
                      "run's OUT/vae, or a released Step1X-3D folder) to continue training from")
    sharp_edges: bool | None = field(None, help="a fresh ShapeVAE with Step1X-3D's sharp-edge branch (reads the "
                                     "shards' sharp_surface); unset: the size's default; ignored with model.init")
    tau: float = field(0.01, help="SDF truncation the model predicts in units of (Step1X-3D: 0.01 in its [-1, 1] "
                       "box): the shards' points.sdf_truncation must be >= it; targets are clipped to it")
    kl_weight: float = field(1e-3, help="weight of the KL term (3DShape2VecSet: 1e-3)")

    def __post_init__(self):
        require(self.tau > 0, "model.tau", self.tau, "must be > 0")
        require(self.kl_weight >= 0, "model.kl_weight", self.kl_weight, "must be >= 0")


@config
class OptimSettings:
    lr: float = field(1e-4, help="AdamW learning rate")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_steps: int = field(0, help="linear warm-up steps, then constant")

    def __post_init__(self):
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")


@config
class MeshSampleSettings:
    every: int = field(0, help="log a sample mesh to MLflow every N steps (0 = at the end only)")
    resolution: int = field(128, help="marching-cubes grid of the sample meshes")

    def __post_init__(self):
        require(self.every >= 0, "sample.every", self.every, "must be >= 0")
        require(self.resolution >= 2, "sample.resolution", self.resolution, "must be >= 2")


@config
class TrainVAEJob:
    out: str = field("out/vae-train", help="run folder: config.yaml, checkpoints/, vae/, samples/")
    data: VAEDataSettings = field(default_factory=VAEDataSettings, help="training data")
    model: VAEModelSettings = field(default_factory=VAEModelSettings, help="the shape VAE")
    optim: OptimSettings = field(default_factory=OptimSettings, help="optimizer")
    sample: MeshSampleSettings = field(default_factory=MeshSampleSettings, help="sample meshes in MLflow")
    trainer: TrainerSettings = field(default_factory=TrainerSettings, help="Lightning / DeepSpeed")
    tracking: TrackingSettings = field(default_factory=TrackingSettings, help="MLflow")
    ray: RaySettings = ray_field()

    def __post_init__(self):
        require(not self.trainer.gradient_checkpointing, "trainer.gradient_checkpointing", True,
                "is not supported by the shape VAE (its activations are small next to the DiT's): leave it off")


@recipe(TrainVAEJob, "default", help="Step1X-3D's VAE (width 768, 8 + 16 layers, sharp edges), bf16, ZeRO-2 on "
        "GPUs")
def _vae_default() -> TrainVAEJob:
    return TrainVAEJob(trainer=TrainerSettings(precision="bf16-mixed", checkpoint_every=1000, log_every=10))


@recipe(TrainVAEJob, "tiny", help="ShapeVAE.tiny on CPU: a few steps on small shards (demo, tests)")
def _vae_tiny() -> TrainVAEJob:
    return TrainVAEJob(
        data=VAEDataSettings(sdf_points=256, num_queries=32),
        model=VAEModelSettings(size=TINY),
        optim=OptimSettings(lr=3e-3),
        sample=MeshSampleSettings(resolution=24),
        trainer=TrainerSettings(max_steps=8, accelerator="cpu", checkpoint_every=4, log_every=1))


def absolute_path(path: str) -> str:
    """A local path made absolute (Ray Train workers and a resumed run may start in another directory); empty,
    ``tiny`` and URLs stay as they are."""
    return path if not path or path == TINY or "://" in path else os.path.abspath(path)


def absolute_model(name: str) -> str:
    """A local model path made absolute; a Hugging Face repo id (not a local path) kept as it is."""
    return name if not name or name == TINY else absolute_model_name(name)
