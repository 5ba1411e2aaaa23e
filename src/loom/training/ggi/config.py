"""The root config of ``loom train ggi`` (`TrainGGIJob`), its sections and its named recipes. The ``model`` section
(`loom.models.ggi.GGIModelSettings`) lives with the model line, because ``loom generate inbetween`` reads it from a
run's config.yaml too."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from loom.models.ggi import TINY, GGIModelSettings
from loom.platform.config import config, field, recipe, require
from loom.platform.hub import absolute_model_name
from loom.platform.ray import RaySettings
from loom.platform.tracking import TrackingSettings
from loom.training.launch import TrainerSettings, ray_field


@config
class GGIDataSettings:
    source: str = field("out/clips", help="training shards: `loom prep videos` clips (real videos) or `loom render "
                        "scene` scenes (edges and flow from geometry)")
    batch_size: int = field(1, help="samples per rank per step")
    frames: int = field(0, help="frames per clip, from its start (0 = all; the paper: 46); padded to 1 + 4k by "
                        "repeating the last frame, as the authors pad 46 to 49")
    structure: Literal["edges", "none"] = field("edges", help="structure condition: the corpus's edges (clips: "
                                                "edges of depth, HED-S; or of the frames, HED: prep videos "
                                                "edges.source), or 'none' (a blank edge video): the rows of "
                                                "VideoFrom3D Tab. 3")
    num_workers: int = field(0, help="loader worker processes per rank")
    prefetch: int = field(2, help="batches a background thread reads ahead of the step (num_workers=0; 0 = off)")

    def __post_init__(self):
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        require(self.frames == 0 or self.frames >= 5, "data.frames", self.frames,
                "must be 0 (all) or >= 5 (two latent frames: the two anchors)")


@config
class GGIOptimSettings:
    lr: float = field(5e-5, help="AdamW learning rate (the authors' code: 5e-5)")
    weight_decay: float = field(1e-4, help="AdamW weight decay")
    warmup_steps: int = field(100, help="linear warm-up steps, then constant")

    def __post_init__(self):
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0")


@config
class GGISampleSettings:
    steps: int = field(50, help="DDIM sampler steps of the sample videos (the authors' inference: 30)")
    degradation: float = field(0.5, help="share of fresh noise blended into the warped noise when sampling "
                               "(variance-preserving; the authors' inference: 0.5)")
    every: int = field(0, help="log a sample video to MLflow every N steps (0 = at the end only)")
    guidance: float = field(1.0, help="classifier-free guidance on the prompt (the authors' inference: 6.0; 1 = "
                            "off; needs model.text_encoder to mean anything)")

    def __post_init__(self):
        require(self.steps >= 1, "sample.steps", self.steps, "must be >= 1")
        require(0.0 <= self.degradation <= 1.0, "sample.degradation", self.degradation, "must be in [0, 1]")
        require(self.guidance >= 1.0, "sample.guidance", self.guidance, "must be >= 1 (1 = off)")


@config
class TrainGGIJob:
    out: str = field("out/ggi-train", help="run folder: config.yaml, checkpoints/, transformer/, samples/")
    data: GGIDataSettings = field(default_factory=GGIDataSettings, help="training data")
    model: GGIModelSettings = field(default_factory=GGIModelSettings, help="networks")
    optim: GGIOptimSettings = field(default_factory=GGIOptimSettings, help="optimizer")
    sample: GGISampleSettings = field(default_factory=GGISampleSettings, help="sample videos")
    trainer: TrainerSettings = field(default_factory=TrainerSettings, help="Lightning / DeepSpeed")
    tracking: TrackingSettings = field(default_factory=TrackingSettings, help="MLflow")
    ray: RaySettings = ray_field()


COGVIDEOX_I2V = "THUDM/CogVideoX-5b-I2V"


@recipe(TrainGGIJob, "default", help=f"the paper's recipe: {COGVIDEOX_I2V} (local Hugging Face cache, or set "
        "model.transformer and model.vae), 46 frames of 720x480 padded to 49, batch 16 (2 a GPU on 8 GPUs), 1,300 "
        "steps, AdamW lr 5e-5, bf16, ZeRO-2, gradient checkpointing; set model.flow_lora to Go-with-the-Flow's LoRA")
def _default() -> TrainGGIJob:
    return TrainGGIJob(
        data=GGIDataSettings(frames=46, batch_size=2),
        model=GGIModelSettings(transformer=COGVIDEOX_I2V, vae=COGVIDEOX_I2V, text_encoder=COGVIDEOX_I2V,
                               dtype="bfloat16"),
        trainer=TrainerSettings(precision="bf16-mixed", gradient_checkpointing=True, max_steps=1300, devices=8,
                                checkpoint_every=100, log_every=10))


@recipe(TrainGGIJob, "tiny", help="random tiny CogVideoX transformer and VAE on CPU: a few steps (tests, demo)")
def _tiny() -> TrainGGIJob:
    return TrainGGIJob(
        model=GGIModelSettings(transformer=TINY, vae=TINY, text_len=8),
        optim=GGIOptimSettings(lr=1e-3, warmup_steps=0),
        sample=GGISampleSettings(steps=2),
        trainer=TrainerSettings(max_steps=4, accelerator="cpu", checkpoint_every=2, log_every=1))


def _abs(path: str) -> str:
    return path if not path or path == TINY or "://" in path else os.path.abspath(path)


def absolute_paths(cfg: TrainGGIJob) -> TrainGGIJob:
    """Local paths made absolute: Ray Train workers (and a resumed run) may start in another directory."""
    m = cfg.model

    def model(name: str) -> str:
        return name if not name or name == TINY else absolute_model_name(name)

    return dataclasses.replace(
        cfg, out=_abs(cfg.out), data=dataclasses.replace(cfg.data, source=_abs(cfg.data.source)),
        model=dataclasses.replace(m, transformer=model(m.transformer), vae=model(m.vae),
                                  flow_lora=_abs(m.flow_lora), text_encoder=model(m.text_encoder),
                                  tokenizer=model(m.tokenizer)))
