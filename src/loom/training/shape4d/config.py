"""``loom train shape4d``'s root config (:class:`TrainShape4DJob`), its sections and recipes. The ``model`` and
``flow`` sections are :mod:`loom.models.shape4d`'s, because ``loom generate 4d`` reads them back from a run's
``config.yaml`` without this training package; the optimizer section is the shape VAE's."""

from __future__ import annotations

from loom.models.shape4d import TINY, Shape4DFlowSettings, Shape4DModelSettings
from loom.platform.config import config, field, recipe, require
from loom.platform.ray import RaySettings
from loom.platform.tracking import TrackingSettings
from loom.training.launch import TrainerSettings, ray_field
from loom.training.vae.config import OptimSettings

__all__ = ["Shape4DDataSettings", "Shape4DFlowSettings", "Shape4DModelSettings", "Shape4DOptimSettings",
           "TrainShape4DJob"]


@config
class Shape4DDataSettings:
    source: str = field("out/4d", help="4D shards (`loom render 4d` output folder or fsspec URL)")
    batch_size: int = field(4, help="sequences per rank per step (paper: 64 on 16 GPUs)")
    frames: int = field(0, help="evenly spread frames per sequence (0 = all; paper: 16, ablations: 8)")
    surface_points: int = field(0, help="random surface points per frame fed to the frozen VAE (0 = all)")
    sharp_points: int = field(0, help="random sharp-edge points per frame fed to the frozen VAE's sharp branch "
                              "(0 = all; only for a VAE with sharp edges)")
    num_workers: int = field(0, help="loader worker processes per rank")
    prefetch: int = field(2, help="batches a background thread reads ahead of the step (num_workers=0; 0 = off)")
    val_source: str = field("", help="held-out sequences for trainer.val_every: 4D shards or a `loom cache 4d` "
                            "corpus (empty = none)")
    val_fraction: float = field(0.0, help="hold out this fraction of data.source's sequences for validation, "
                                "chosen by a hash of the sample key: the same split for any seed, world size and "
                                "resume, never shared with training (0 = none; not with val_source)")

    def __post_init__(self):
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        require(self.frames >= 0, "data.frames", self.frames, "must be >= 0 (0 = all)")
        require(self.surface_points >= 0, "data.surface_points", self.surface_points, "must be >= 0 (0 = all)")
        require(self.sharp_points >= 0, "data.sharp_points", self.sharp_points, "must be >= 0 (0 = all)")
        require(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "must be in [0, 1)")
        require(not (self.val_source and self.val_fraction), "data.val_fraction", self.val_fraction,
                "give either data.val_source (a held-out corpus) or data.val_fraction (a split of data.source), "
                "not both")


@config
class Shape4DOptimSettings(OptimSettings):
    lr: float = field(5e-5, help="AdamW learning rate of the spatiotemporal layers (paper: 5e-5)")


@config
class TrainShape4DJob:
    out: str = field("out/shape4d-train", help="run folder: config.yaml, checkpoints/, spatiotemporal/, samples/")
    data: Shape4DDataSettings = field(default_factory=Shape4DDataSettings, help="training data")
    model: Shape4DModelSettings = field(default_factory=Shape4DModelSettings, help="networks")
    optim: Shape4DOptimSettings = field(default_factory=Shape4DOptimSettings, help="optimizer")
    flow: Shape4DFlowSettings = field(default_factory=Shape4DFlowSettings, help="flow matching and sampling")
    trainer: TrainerSettings = field(default_factory=TrainerSettings, help="Lightning / DeepSpeed")
    tracking: TrackingSettings = field(default_factory=TrackingSettings, help="MLflow")
    ray: RaySettings = ray_field()


@recipe(TrainShape4DJob, "default", help="paper shape: a pretrained base from local folders, 16 frames x 1,024 "
        "latents, lr 5e-5, 25k steps, bf16, gradient checkpointing, ZeRO-2 on GPUs")
def _shape4d_default() -> TrainShape4DJob:
    return TrainShape4DJob(
        model=Shape4DModelSettings(dtype="bfloat16"),
        trainer=TrainerSettings(max_steps=25000, precision="bf16-mixed", gradient_checkpointing=True,
                                checkpoint_every=500, log_every=10))


@recipe(TrainShape4DJob, "tiny", help="random tiny base DiT, VAE and DINOv2 on CPU: a few steps (demo, tests)")
def _shape4d_tiny() -> TrainShape4DJob:
    return TrainShape4DJob(
        data=Shape4DDataSettings(batch_size=1),
        model=Shape4DModelSettings(base=TINY, vae=TINY, image_encoder=TINY),
        optim=Shape4DOptimSettings(lr=1e-3),
        flow=Shape4DFlowSettings(sample_steps=2, mesh_resolution=24),
        trainer=TrainerSettings(max_steps=8, accelerator="cpu", checkpoint_every=4, log_every=1))
