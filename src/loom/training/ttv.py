"""``loom train ttv``: fine-tune the geometry-conditioned video DiT of TAPESTRY (sections 3.1, 4.1) on Loom's
turntable shards, with Lightning + DeepSpeed, on one CPU or many GPU nodes (Ray Train), tracked in MLflow.

Data flow of one step::

    LoomLoader (exact, resumable, rank-split)                       turntable shards (pixels) or latent shards
      -> batch: rgb/normal/position/mask videos (B,T,H,W,..)   |   rgb/normal/position latents (B,C,T',H',W')
      -> frozen video VAE (pixels only): rgb -> x0; normal, position, known video, inpainting mask -> latents
      -> geometry = concat(normal, position, known, mask latents)  (B, 4C, T', H', W')
      -> reference = x0's first latent frame, zeros after it        (B, C, T', H', W')
      -> sigma ~ shift(U(0,1)), noise ~ N(0,1) from (seed, step, rank)  ->  x_sigma = (1-sigma) x0 + sigma noise
      -> TTVDiT(x_sigma, 1000 sigma, geometry, reference, text, image) -> v;  loss = |v - (noise - x0)|^2

Known video and inpainting mask (TAPESTRY 3.2's context-aware inpainting): with probability ``data.known_prob``
a sample gets a "partial texture": the object's pixels on one side of a random plane through the unit sphere,
taken in world coordinates from the position pass, so the known region is consistent across views as a partially
textured mesh would be. Unknown pixels are 0 (mid-grey in [-1, 1]); the mask video is +1 where the model must
generate and -1 where the content is given. Otherwise nothing is known (zeros, mask all +1), which is also what
generation from an untextured mesh feeds. Latent shards cannot re-draw the plane, so with them every sample is
"nothing known" (the constant latents of those two videos).

Text and image context: ``text_embed`` / ``image_embed`` from latent shards written by ``loom cache latents``
with encoders configured; else encoded on the fly by ``model.text_encoder`` (the ``data.prompt`` template) and
``model.image_encoder`` (the first rgb frame) when those are set; else zeros of ``data.text_len`` /
``data.image_len`` tokens (an unconditional model; the run's ``context`` param says which).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Literal

from loom.platform.config import config, field, recipe, require
from loom.platform.tracking import TrackingSettings
from loom.platform.ray import RaySettings
from loom.training.launch import TrainerSettings, train_ray

if TYPE_CHECKING:
    import torch

TINY = "tiny"


@config
class DataSettings:
    source: str = field("out/ttv", help="Loom output folder or fsspec URL: turntable shards (pixels) or latent "
                        "shards from `loom cache latents`")
    batch_size: int = field(1, help="samples per rank per step")
    frames: int = field(0, help="frames per sample, 1 + 4k (0 = all, trimmed to 1 + 4k); pixels only")
    size: int = field(0, help="resize frames to size x size (multiple of 16; 0 = as rendered); pixels only")
    num_workers: int = field(0, help="loader worker processes per rank")
    prefetch: int = field(2, help="batches a background thread reads ahead of the step (num_workers=0; 0 = off)")
    known_prob: float = field(0.5, help="probability of a partial-texture known video (pixels only)")
    position_radius: float = field(1.0, help="positions are divided by this before the VAE (unit sphere -> 1)")
    text_len: int = field(512, help="text tokens per sample (embeddings zero-padded to it; Wan: 512)")
    prompt: str = field("a 360-degree turntable video of a 3D object", help="prompt template for the text encoder "
                        "when the shards hold no text embeddings (fields of the sample's meta, e.g. {uid})")
    image_len: int = field(257, help="image tokens when no image embeddings are cached (CLIP ViT-H/14: 257)")

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.frames == 0 or (self.frames - 1) % 4 == 0, "frames", self.frames, "must be 0 or 1 + 4k")
        require(self.size % 16 == 0, "size", self.size, "must be a multiple of 16 (VAE 8x, patch 2x)")
        require(0.0 <= self.known_prob <= 1.0, "known_prob", self.known_prob, "must be in [0, 1]")
        require(self.text_len >= 1, "text_len", self.text_len, "must be >= 1")


@config
class ModelSettings:
    transformer: str = field("", help="local folder of a diffusers WanTransformer3DModel in the Wan2.1-Fun-Control "
                             "layout (<Wan2.1-Fun-V1.1-1.3B-Control>/transformer), or 'tiny' (random, tests)")
    vae: str = field("", help="local folder of a diffusers AutoencoderKLWan (<checkpoint>/vae), or 'tiny'")
    fusion: str = field("", help="local folder of a saved geometry fusion module (empty: fresh initialisation)")
    lora_rank: int = field(128, help="LoRA rank on every linear layer of the DiT blocks")
    lora_alpha: float = field(0.0, help="LoRA alpha (0 = the rank, i.e. scale 1)")
    text_encoder: str = field("", help="local umT5 folder (<Wan checkpoint>/text_encoder, tokenizer beside it): "
                              "encode prompts on the fly when the shards hold no text_embed")
    image_encoder: str = field("", help="local CLIP vision folder (<Wan I2V checkpoint>/image_encoder): encode the "
                               "first frame on the fly when the shards hold no image_embed")
    dtype: Literal["float32", "bfloat16"] = field("float32", help="dtype of the frozen VAE and encoders")
    compile: bool = field(False, help="torch.compile the repeated DiT blocks (diffusers compile_repeated_blocks; "
                          "GPUs: ~1.4x a step at the Wan 1.3B shape, after ~30 s of compiling)")

    def __post_init__(self):
        require(self.lora_rank >= 1, "lora_rank", self.lora_rank, "must be >= 1")


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
    optim: OptimSettings = field(default_factory=OptimSettings, help="optimizer")
    flow: FlowSettings = field(default_factory=FlowSettings, help="flow matching and sampling")
    trainer: TrainerSettings = field(default_factory=TrainerSettings, help="Lightning / DeepSpeed")
    tracking: TrackingSettings = field(default_factory=TrackingSettings, help="MLflow")
    ray: RaySettings = field(default_factory=train_ray, help="Ray Train (multi-node): ray.address set = "
                           "ray.workers ranks with ray.cpus_per_worker / ray.gpus_per_worker each")


@recipe(TrainTTVJob, "default", help="Wan2.1-Fun-1.3B-Control from local folders, LoRA r128, bf16, ZeRO-2 on GPUs")
def _default() -> TrainTTVJob:
    return TrainTTVJob(trainer=TrainerSettings(precision="bf16-mixed", gradient_checkpointing=True,
                                               checkpoint_every=500, log_every=10),
                       model=ModelSettings(dtype="bfloat16"))


@recipe(TrainTTVJob, "tiny", help="random tiny DiT and VAE on CPU: a few steps on fresh shards (demo, tests)")
def _tiny() -> TrainTTVJob:
    return TrainTTVJob(
        data=DataSettings(frames=5, size=32, text_len=512, image_len=4),
        model=ModelSettings(transformer=TINY, vae=TINY, lora_rank=4),
        optim=OptimSettings(lr=1e-3),
        trainer=TrainerSettings(max_steps=8, accelerator="cpu", checkpoint_every=4, log_every=1),
        flow=FlowSettings(sample_steps=2))


# --------------------------------------------------------------------------------------------- model parts


def build_dit(m: ModelSettings, seed: int):
    from loom.models.ttv_dit import TTVDiT

    if m.transformer == TINY:
        dit = TTVDiT.tiny(seed=seed)
    else:
        if not m.transformer:
            raise FileNotFoundError("model.transformer is not set: pass --set model.transformer=DIR (a local "
                                    "Wan2.1-Fun-Control transformer folder) or use --recipe tiny")
        dit = TTVDiT.from_pretrained(m.transformer, m.fusion or None)
    dit.add_lora(rank=m.lora_rank, alpha=m.lora_alpha or None)
    return dit


def build_vae(m: ModelSettings, seed: int):
    from loom.models.video_vae import build_tiny_vae, load_video_vae

    if m.vae == TINY:
        return build_tiny_vae(seed)
    if not m.vae:
        raise FileNotFoundError("model.vae is not set: pass --set model.vae=DIR (a local AutoencoderKLWan folder, "
                                "<Wan2.1 checkpoint>/vae) or use --recipe tiny")
    return load_video_vae(m.vae, m.dtype)


def build_encoders(m: ModelSettings) -> dict:
    """The optional frozen text (umT5) and image (CLIP) encoders, from local folders."""
    enc: dict = {"text": None, "image": None}
    if m.text_encoder:
        from loom.models.text_encoder import load_text_encoder

        enc["text"] = load_text_encoder(m.text_encoder, m.dtype)
    if m.image_encoder:
        from loom.models.image_encoder import load_image_encoder

        enc["image"] = load_image_encoder(m.image_encoder, m.dtype)
    return enc


def prompt_for(template: str, meta: dict) -> str:
    try:
        return template.format(**meta)
    except (KeyError, IndexError) as e:
        raise ValueError(f"data.prompt={template!r} names {e}, which the sample's meta lacks (it has "
                         f"{sorted(meta)})") from e


def partial_known(rgb: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, prob: float,
                  generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """(known video, inpainting-mask video), both (B, 3, T, H, W) in [-1, 1], from rgb (B,T,H,W,3) in [-1, 1],
    world positions (B,T,H,W,3) and the object mask (B,T,H,W) bool. See the module docstring."""
    import torch

    b = rgb.shape[0]
    draws = [(torch.rand(1, generator=g), torch.randn(3, generator=g), torch.rand(1, generator=g)) for g in generators]
    use = torch.cat([d[0] for d in draws]) < prob
    n = torch.stack([d[1] for d in draws])
    n = n / n.norm(dim=1, keepdim=True).clamp_min(1e-6)
    c = (torch.cat([d[2] for d in draws]) * 2 - 1) * 0.5  # the plane passes within half the radius of the centre
    side = (position * n.view(b, 1, 1, 1, 3)).sum(-1) > c.view(b, 1, 1, 1)
    keep = side & mask & use.view(b, 1, 1, 1)  # (B,T,H,W)
    known = torch.where(keep[..., None], rgb, torch.zeros_like(rgb))
    gen = (~keep).float() * 2 - 1
    return known.permute(0, 4, 1, 2, 3), gen[:, None].expand(-1, 3, -1, -1, -1)


def pad_tokens(embeds: list[torch.Tensor] | torch.Tensor | None, length: int, dim: int, b: int) -> torch.Tensor:
    """Context tokens (B, length, dim): per-sample (L_i, dim) embeddings zero-padded / cut to ``length`` (Wan pads
    umT5 output with zeros to 512), or zeros when there are none."""
    import torch

    out = torch.zeros(b, length, dim)
    if embeds is None:
        return out
    for i, e in enumerate(embeds):
        e = torch.as_tensor(e, dtype=torch.float32)
        if e.shape[-1] != dim:
            raise ValueError(f"cached embeddings have width {e.shape[-1]} but the DiT expects {dim}: the latent "
                             "cache was made with another encoder than this model's")
        out[i, : min(length, e.shape[0])] = e[:length]
    return out


# ----------------------------------------------------------------------------------------------- data


def train_transform(d: DataSettings):
    """Frame subsampling and resizing of pixel samples (K kept exact), or None."""
    from loom.datasets.transforms import Compose, CropResize, SubsampleFrames

    ts = []
    if d.frames:
        ts.append(SubsampleFrames(d.frames))
    if d.size:
        ts.append(CropResize((d.size, d.size)))
    return Compose(*ts) if ts else None


def source_kind(url: str) -> str | None:
    """The corpus kind from its manifest ('ttv', 'latents'), or None for a bare shard or folder of tars."""
    from loom.platform import shards

    try:
        return shards.read_manifest(url).get("kind")
    except FileNotFoundError:
        return None


def make_loader(d: DataSettings, seed: int):
    from loom.datasets.loader import LoomLoader

    # Latents were made from whole videos at their rendered size: frames and size apply to pixels only.
    transform = None if source_kind(d.source) == "latents" else train_transform(d)
    return LoomLoader(d.source, d.batch_size, seed=seed, num_workers=d.num_workers, prefetch=d.prefetch,
                      transform=transform)


# ------------------------------------------------------------------------------------------------ job


def make(cfg: TrainTTVJob):
    """(module, None): the module brings its own train iterable. Module-level so Ray can pickle it."""
    import torch

    from loom.training.ttv_module import TTVModule

    torch.manual_seed(cfg.trainer.seed)
    return TTVModule(cfg), None


def _abs(path: str) -> str:
    return path if not path or path == TINY or "://" in path else os.path.abspath(path)


def absolute_paths(cfg: TrainTTVJob) -> TrainTTVJob:
    """Local paths made absolute: Ray Train workers (and a resumed run) may start in another directory."""
    import dataclasses

    m = cfg.model
    return dataclasses.replace(
        cfg, out=_abs(cfg.out), data=dataclasses.replace(cfg.data, source=_abs(cfg.data.source)),
        model=dataclasses.replace(m, transformer=_abs(m.transformer), vae=_abs(m.vae), fusion=_abs(m.fusion),
                                  text_encoder=_abs(m.text_encoder), image_encoder=_abs(m.image_encoder)))


def train(cfg: TrainTTVJob, *, resume: bool = False) -> None:
    """Write the resolved config beside the run, then train here or on Ray Train (``ray.address``)."""
    from loom.platform import config as cfgmod
    from loom.training import launch

    cfg = absolute_paths(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.yaml"), "w") as f:
        f.write(cfgmod.dump_yaml(cfg))
    launch.run(functools.partial(make, cfg), cfg.trainer, cfg.tracking, cfg.ray, cfg.out, resume=resume)
