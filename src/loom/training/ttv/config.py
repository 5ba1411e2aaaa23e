"""The root config of ``loom train ttv`` (`TrainTTVJob`), its sections and its named recipes. The ``model`` section
(`loom.models.ttv.ModelSettings`) lives with the model line, because generation reads it from a run's config.yaml
too."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from loom.models.ttv import DEFAULT_PROMPT, TINY, ConditionSettings, ModelSettings
from loom.platform.config import config, field, recipe, require
from loom.platform.hub import absolute_model_name
from loom.platform.ray import RaySettings
from loom.platform.tracking import TrackingSettings
from loom.training.launch import TrainerSettings, ray_field


@config
class DataSettings:
    source: str = field("out/ttv", help="Loom output folder or fsspec URL: turntable shards (pixels) or latent "
                        "shards from `loom cache latents`")
    batch_size: int = field(1, help="samples per rank per step")
    frames: int = field(0, help="frames per sample, 1 + 4k (0 = all, trimmed to 1 + 4k); pixels only")
    size: int = field(0, help="resize frames to size x size (multiple of 16; 0 = as rendered); pixels only")
    num_workers: int = field(0, help="loader worker processes per rank")
    prefetch: int = field(2, help="batches a background thread reads ahead of the step (num_workers=0; 0 = off)")
    known_prob: float = field(0.5, help="probability of a partial-texture known video")
    visibility_share: float = field(0.75, help="share of the partial textures of a sample with the render's known "
                                    "pass (render ttv --set passes.partial=true) taken from it; the rest cut the "
                                    "object by a random plane (pixels only)")
    position_radius: float = field(1.0, help="positions are divided by this before the VAE (unit sphere -> 1)")
    text_len: int = field(512, help="text tokens per sample (embeddings zero-padded to it; Wan: 512)")
    prompt: str = field(DEFAULT_PROMPT, help="prompt template for the text encoder when the shards hold no text "
                        "embeddings (fields of the sample's meta, e.g. {uid})")
    image_len: int = field(257, help="image tokens when no image embeddings are cached (CLIP ViT-H/14: 257)")

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.frames == 0 or (self.frames - 1) % 4 == 0, "frames", self.frames, "must be 0 or 1 + 4k")
        require(self.size % 16 == 0, "size", self.size, "must be a multiple of 16 (VAE 8x, patch 2x)")
        require(0.0 <= self.known_prob <= 1.0, "known_prob", self.known_prob, "must be in [0, 1]")
        require(0.0 <= self.visibility_share <= 1.0, "visibility_share", self.visibility_share, "must be in [0, 1]")
        require(self.text_len >= 1, "text_len", self.text_len, "must be >= 1")


@config
class OptimSettings:
    lr: float = field(1e-4, help="base learning rate (LoRA A matrices)")
    lora_plus_ratio: float = field(4.0, help="LoRA+: B matrices and the fusion module learn this much faster")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_steps: int = field(0, help="linear warm-up steps, then constant")

    def __post_init__(self):
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(self.lora_plus_ratio > 0, "lora_plus_ratio", self.lora_plus_ratio, "must be > 0")


@config
class FlowSettings:
    shift: float = field(5.0, help="time shift of training and sampling sigmas (Wan 480p: 5)")
    density: Literal["uniform", "logit_normal"] = field("uniform", help="density of training sigmas before the shift")
    sample_steps: int = field(4, help="Euler steps of the sampler (TAPESTRY: 4)")
    sample_every: int = field(0, help="log a sample video to MLflow every N steps (0 = at the end only)")


@config
class TrainTTVJob:
    out: str = field("out/ttv-train", help="run folder: config.yaml, checkpoints/, lora/, samples/")
    data: DataSettings = field(default_factory=DataSettings, help="training data")
    model: ModelSettings = field(default_factory=ModelSettings, help="networks")
    cond: ConditionSettings = field(default_factory=ConditionSettings, help="training draws of the conditions: "
                                    "reference frame and dropouts (VideoX-Fun's V1.1 recipe; loom.models.ttv)")
    optim: OptimSettings = field(default_factory=OptimSettings, help="optimizer")
    flow: FlowSettings = field(default_factory=FlowSettings, help="flow matching and sampling")
    trainer: TrainerSettings = field(default_factory=TrainerSettings, help="Lightning / DeepSpeed")
    tracking: TrackingSettings = field(default_factory=TrackingSettings, help="MLflow")
    ray: RaySettings = ray_field()


# The releases as published: a local folder, or these repo ids found in the local Hugging Face cache.
WAN_FUN_1_3B = "alibaba-pai/Wan2.1-Fun-V1.1-1.3B-Control"
WAN_FUN_14B = "alibaba-pai/Wan2.1-Fun-V1.1-14B-Control"


@recipe(TrainTTVJob, "default", help=f"{WAN_FUN_1_3B} as released (local Hugging Face cache, or set model.transformer "
        "and model.vae to its folder), LoRA r128, bf16, ZeRO-2 on GPUs")
def _default() -> TrainTTVJob:
    return TrainTTVJob(trainer=TrainerSettings(precision="bf16-mixed", gradient_checkpointing=True,
                                               checkpoint_every=500, log_every=10),
                       model=ModelSettings(transformer=WAN_FUN_1_3B, vae=WAN_FUN_1_3B, dtype="bfloat16"))


@recipe(TrainTTVJob, "tiny", help="random tiny DiT and VAE on CPU: a few steps on fresh shards (demo, tests)")
def _tiny() -> TrainTTVJob:
    return TrainTTVJob(
        data=DataSettings(frames=5, size=32, text_len=512, image_len=4),
        model=ModelSettings(transformer=TINY, vae=TINY, lora_rank=4),
        optim=OptimSettings(lr=1e-3),
        trainer=TrainerSettings(max_steps=8, accelerator="cpu", checkpoint_every=4, log_every=1),
        flow=FlowSettings(sample_steps=2))


@recipe(TrainTTVJob, "wan14b", help="Wan2.1-Fun-V1.1-14B-Control, LoRA r128, bf16, ZeRO-3 over 8 GPUs a node: "
        "~33 GiB a GPU at 81 frames of 480x832 (benchmarks/memory_14b.py)")
def _wan14b() -> TrainTTVJob:
    """The default recipe with the 14B's sharding. ZeRO-3 partitions the frozen bf16 base (32.8 GB) and the LoRA's
    optimizer state over the ranks and gathers one block at a time (the blocks are ZeRO-3 leaf modules,
    `loom.training.launch.apply_sharding_intent`). No offload: on 80 GB GPUs it is not needed, and parameter
    offload would move the whole base over PCIe three times a step (forward, recomputation, backward)."""
    d = _default()
    return dataclasses.replace(d, trainer=dataclasses.replace(d.trainer, zero_stage=3, devices=8),
                               model=dataclasses.replace(d.model, transformer=WAN_FUN_14B, vae=WAN_FUN_14B))


@recipe(TrainTTVJob, "wan14b-offload", help="wan14b with the optimizer state and the parameters in host memory "
        "(ZeRO-3 offload): ~28 GiB a GPU, ~63 GiB of host memory a node of 8 (benchmarks/memory_14b.py)")
def _wan14b_offload() -> TrainTTVJob:
    """For GPUs that cannot hold wan14b's ~33 GiB: activations (~25 GiB with checkpointing) stay on the GPU, so
    offload saves ~5 GiB a GPU. DeepSpeed still places the whole bf16 module (32 GB) on each GPU once at start-up,
    before partitioning it, so GPUs under ~36 GB do not work either way."""
    w = _wan14b()
    return dataclasses.replace(w, trainer=dataclasses.replace(w.trainer, offload=True))


def _abs(path: str) -> str:
    return path if not path or path == TINY or "://" in path else os.path.abspath(path)


def _abs_model(name: str) -> str:
    """A local model path made absolute; a Hugging Face repo id (not a local path) kept as it is."""
    return name if not name or name == TINY else absolute_model_name(name)


def absolute_paths(cfg: TrainTTVJob) -> TrainTTVJob:
    """Local paths made absolute: Ray Train workers (and a resumed run) may start in another directory."""
    m = cfg.model
    return dataclasses.replace(
        cfg, out=_abs(cfg.out), data=dataclasses.replace(cfg.data, source=_abs(cfg.data.source)),
        model=dataclasses.replace(m, transformer=_abs_model(m.transformer), vae=_abs_model(m.vae),
                                  fusion=_abs(m.fusion), text_encoder=_abs_model(m.text_encoder),
                                  image_encoder=_abs_model(m.image_encoder)))
