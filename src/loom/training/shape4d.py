"""``loom train vae`` and ``loom train shape4d``: the two trainings of ShapeGen4D (sections 3.1, 3.2 and 5.1) on
Loom's 4D shards, on the video DiT's machinery (Lightning + DeepSpeed + Ray Train + MLflow + exact resume:
:mod:`loom.training.launch`, :class:`loom.training.module.LoomModule`). One mechanism, two models.

Shape VAE (``loom train vae``, :class:`TrainVAEJob`), data flow of one step::

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

4D shape DiT (``loom train shape4d``, :class:`TrainShape4DJob`), data flow of one step::

    LoomLoader -> per sample: data.frames evenly spread frames (0 = all; the paper's ablations use 8 of 16)
      -> frozen shape VAE (model.vae): surface[t], queries[t] -> posterior mean -> x0 (B,T,Q,C) x latent_scale
      -> frozen DINOv2 (model.image_encoder): video[t] -> image tokens (B,T,L,D_img)
      -> shape4d_flow.training_inputs: ONE sigma per sequence, noise shared by all frames (flow.shared_noise),
         both from (seed, step, sample key)  ->  x_sigma, timestep, velocity target
      -> Shape4DDiT (frozen base + trainable spatiotemporal layers)(x_sigma, timestep, image tokens) -> v
      -> loss = |v - (noise - x0)|^2

  The base DiT comes from ``model.base`` (a local ``Shape4DDiT.save_pretrained`` folder of the base, saved with
  ``spatiotemporal=False``), gets fresh zero-initialised spatiotemporal layers and is frozen (``freeze_base``):
  only those layers train and only they are saved (``OUT/spatiotemporal``). The frozen VAE and DINOv2 live outside
  the module tree, so DeepSpeed neither wraps, casts nor checkpoints them. A digest of the base weights is taken
  when the run starts and when it ends and written beside the layers: ``loom generate 4d`` refuses a base folder
  that has changed since.

Ablations (Table 3) by config: ``model.temporal=1d`` (1D temporal attention), ``model.st_image_tokens=false``
(without image hidden states), ``flow.shared_noise=false`` (independent noise), ``flow.shift=1`` (no sampling
time shift); "w/o aligned latents" is a VAE trained and used with ``data.queries=fps``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from loom.platform.config import config, field, recipe, require
from loom.platform.tracking import TrackingSettings
from loom.platform.ray import RaySettings
from loom.training.launch import TrainerSettings, train_ray

if TYPE_CHECKING:
    import torch

TINY = "tiny"
DTYPES = ("float32", "bfloat16")


# ============================================================================================== shape VAE


@config
class VAEDataSettings:
    source: str = field("out/4d", help="4D shards (`loom render 4d` output folder or fsspec URL)")
    batch_size: int = field(1, help="samples (sequences) per rank per step; their frames are flattened into the "
                            "batch (batch_size x frames shapes)")
    frames: int = field(0, help="random frames per sample (0 = all)")
    surface_points: int = field(0, help="random surface points per frame fed to the encoder (0 = all)")
    sdf_points: int = field(16384, help="random SDF samples per frame supervising the decoder (0 = all)")
    queries: Literal["aligned", "fps"] = field("aligned", help="aligned: the shards' aligned query points (4D, "
                                               "3.1); fps: farthest point samples of the surface (static shapes, "
                                               "3DShape2VecSet; the 'w/o aligned latents' ablation)")
    num_queries: int = field(1024, help="queries per frame with data.queries=fps")
    num_workers: int = field(0, help="loader worker processes per rank")
    prefetch: int = field(2, help="batches a background thread reads ahead of the step (num_workers=0; 0 = off)")

    def __post_init__(self):
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        for name in ("frames", "surface_points", "sdf_points"):
            require(getattr(self, name) >= 0, f"data.{name}", getattr(self, name), "must be >= 0 (0 = all)")
        require(self.num_queries >= 1, "data.num_queries", self.num_queries, "must be >= 1")


@config
class VAEModelSettings:
    size: Literal["paper", "tiny"] = field("paper", help="a fresh ShapeVAE: paper (Hunyuan3D-2 sizes, 328 M) or "
                                           "tiny (tests); ignored with model.init")
    init: str = field("", help="local folder of a saved ShapeVAE (ShapeVAE.save_pretrained, e.g. a previous "
                      "run's OUT/vae) to continue training from")
    tau: float = field(0.05, help="SDF truncation the model predicts in units of: must equal the shards' "
                       "points.sdf_truncation")
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
    ray: RaySettings = field(default_factory=train_ray, help="Ray Train (multi-node): ray.address set = "
                           "ray.workers ranks with ray.cpus_per_worker / ray.gpus_per_worker each")

    def __post_init__(self):
        require(not self.trainer.gradient_checkpointing, "trainer.gradient_checkpointing", True,
                "is not supported by the shape VAE (its activations are small next to the DiT's): leave it off")


@recipe(TrainVAEJob, "default", help="paper-sized ShapeVAE (width 1024, 8 + 16 layers), bf16, ZeRO-2 on GPUs")
def _vae_default() -> TrainVAEJob:
    return TrainVAEJob(trainer=TrainerSettings(precision="bf16-mixed", checkpoint_every=1000, log_every=10))


@recipe(TrainVAEJob, "tiny", help="ShapeVAE.tiny on CPU: a few steps on small shards (demo, tests)")
def _vae_tiny() -> TrainVAEJob:
    return TrainVAEJob(
        data=VAEDataSettings(sdf_points=256, num_queries=32),
        model=VAEModelSettings(size="tiny"),
        optim=OptimSettings(lr=3e-3),
        sample=MeshSampleSettings(resolution=24),
        trainer=TrainerSettings(max_steps=8, accelerator="cpu", checkpoint_every=4, log_every=1))


# ============================================================================================== 4D shape DiT


@config
class Shape4DDataSettings:
    source: str = field("out/4d", help="4D shards (`loom render 4d` output folder or fsspec URL)")
    batch_size: int = field(4, help="sequences per rank per step (paper: 64 on 16 GPUs)")
    frames: int = field(0, help="evenly spread frames per sequence (0 = all; paper: 16, ablations: 8)")
    surface_points: int = field(0, help="random surface points per frame fed to the frozen VAE (0 = all)")
    num_workers: int = field(0, help="loader worker processes per rank")
    prefetch: int = field(2, help="batches a background thread reads ahead of the step (num_workers=0; 0 = off)")

    def __post_init__(self):
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        require(self.frames >= 0, "data.frames", self.frames, "must be >= 0 (0 = all)")
        require(self.surface_points >= 0, "data.surface_points", self.surface_points, "must be >= 0 (0 = all)")


@config
class Shape4DModelSettings:
    base: str = field("", help="local folder of the pretrained base DiT (Shape4DDiT.save_pretrained with "
                      "spatiotemporal=False), or 'tiny' (random, tests)")
    vae: str = field("", help="local folder of the trained shape VAE (`loom train vae` OUT/vae), or 'tiny'")
    image_encoder: str = field("", help="local DINOv2 folder (transformers Dinov2Model, e.g. facebook/dinov2-large "
                               "copied to disk), or 'tiny'")
    image_size: int = field(0, help="DINOv2 input size (0 = the encoder's config: 518 for DINOv2-L, 1,370 tokens)")
    temporal: Literal["full", "1d"] = field("full", help="spatiotemporal attention over all tokens of all frames "
                                            "(full), or each token along time only (1d, ablation)")
    st_image_tokens: bool = field(True, help="image tokens take part in the spatiotemporal attention (false: "
                                  "ablation 'w/o image hidden states')")
    attention_backend: Literal["auto", "flash", "efficient", "math", "cudnn"] = field(
        "auto", help="SDPA kernels (auto never picks cuDNN: see loom.models.shape4d_dit)")
    latent_scale: float = field(1.0, help="x0 = VAE posterior mean x latent_scale (the base's latent scaling)")
    dtype: Literal["float32", "bfloat16"] = field("float32", help="dtype of the frozen VAE and image encoder")
    vae_chunk: int = field(16, help="frames the frozen VAE encodes at once")

    def __post_init__(self):
        require(self.image_size >= 0, "model.image_size", self.image_size, "must be >= 0 (0 = the encoder's)")
        require(self.latent_scale > 0, "model.latent_scale", self.latent_scale, "must be > 0")
        require(self.vae_chunk >= 1, "model.vae_chunk", self.vae_chunk, "must be >= 1")


@config
class Shape4DFlowSettings:
    shared_noise: bool = field(True, help="one noise for all frames of a sequence, in training and sampling (3.2; "
                               "false: ablation 'w/o shared noise')")
    train_shift: float = field(1.0, help="time shift of the training sigmas (3.2: of little effect; 1 = none)")
    density: Literal["uniform", "logit_normal"] = field("uniform", help="density of training sigmas before the "
                                                        "shift")
    shift: float = field(0.0, help="time shift of the sampler (0 = sqrt(frames), SD3's resolution rule; 1 = no "
                         "shift, ablation 'w/o time shift')")
    sample_steps: int = field(50, help="Euler steps of the sampler")
    guidance_scale: float = field(1.0, help="classifier-free guidance against zero image tokens (1 = off)")
    sample_every: int = field(0, help="log a sample mesh sequence to MLflow every N steps (0 = at the end only)")
    mesh_resolution: int = field(128, help="marching-cubes grid of the sample meshes")

    def __post_init__(self):
        require(self.train_shift > 0, "flow.train_shift", self.train_shift, "must be > 0")
        require(self.shift >= 0, "flow.shift", self.shift, "must be >= 0 (0 = sqrt(frames))")
        require(self.sample_steps >= 1, "flow.sample_steps", self.sample_steps, "must be >= 1")
        require(self.sample_every >= 0, "flow.sample_every", self.sample_every, "must be >= 0")
        require(self.mesh_resolution >= 2, "flow.mesh_resolution", self.mesh_resolution, "must be >= 2")


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
    ray: RaySettings = field(default_factory=train_ray, help="Ray Train (multi-node): ray.address set = "
                           "ray.workers ranks with ray.cpus_per_worker / ray.gpus_per_worker each")


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


# ============================================================================================== data


class PointSubset:
    """Per frame: random subsets of the surface points and of the SDF samples (the loader's per-sample generator,
    so the draw is the same for any number of workers and after a resume), and optionally the query points
    replaced by farthest point samples of the (subset) surface (static shapes)."""

    def __init__(self, surface: int = 0, sdf: int = 0, fps: int = 0):
        self.surface, self.sdf, self.fps = surface, sdf, fps

    @staticmethod
    def _take(a: np.ndarray, n: int, rng: np.random.Generator, key: str) -> np.ndarray:
        t, m = a.shape[:2]
        if n > m:
            raise ValueError(f"cannot take {n} of the {m} {key} per frame of this sample: lower the data setting "
                             "(0 = all)")
        return np.stack([rng.choice(m, n, replace=False) for _ in range(t)])  # (T, n)

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        out = dict(sample)
        rng = rng if rng is not None else np.random.default_rng(0)
        if self.surface:
            idx = self._take(sample["surface"], self.surface, rng, "surface points")
            out["surface"] = np.take_along_axis(sample["surface"], idx[..., None], 1)
        if self.sdf and "sdf" in sample:
            idx = self._take(sample["sdf"], self.sdf, rng, "SDF samples")
            out["sdf"] = np.take_along_axis(sample["sdf"], idx, 1)
            out["sdf_points"] = np.take_along_axis(sample["sdf_points"], idx[..., None], 1)
        if self.fps:
            import torch

            from loom.models.shape_vae import fps_queries

            surf = torch.from_numpy(np.ascontiguousarray(out["surface"]))
            if self.fps > surf.shape[1]:
                raise ValueError(f"data.num_queries={self.fps} exceeds the {surf.shape[1]} surface points per frame")
            out["queries"] = fps_queries(surf, self.fps).numpy()
        return out


class FloatsAsNumpy:
    """The loader's batches with their float arrays handed over as numpy. Lightning's precision plugin casts every
    floating *tensor* of a batch to bf16 under bf16 precision before the module sees it: coordinates would be
    rounded to an 8-bit mantissa (~2e-3 in the unit box, 4% of the SDF truncation) before the VAE's float32
    Fourier features. Resume state is the wrapped loader's."""

    def __init__(self, loader, keys: tuple[str, ...]):
        self.loader, self.keys = loader, keys

    def __iter__(self):
        import torch

        for batch in self.loader:
            for k in self.keys:
                if isinstance(batch.get(k), torch.Tensor) and batch[k].is_floating_point():
                    batch[k] = batch[k].numpy()
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def as_tensor(x) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)


def make_vae_loader(d: VAEDataSettings, seed: int):
    from loom.datasets.loader import LoomLoader
    from loom.datasets.transforms import Compose, SubsampleFrames

    keys = ("surface", "sdf") + (("queries",) if d.queries == "aligned" else ())
    ts = ([SubsampleFrames(d.frames, "random")] if d.frames else []) + [
        PointSubset(d.surface_points, d.sdf_points, d.num_queries if d.queries == "fps" else 0)]
    loader = LoomLoader(d.source, d.batch_size, seed=seed, num_workers=d.num_workers, prefetch=d.prefetch,
                        keys=keys, transform=Compose(*ts))
    return FloatsAsNumpy(loader, ("surface", "queries", "sdf_points", "sdf"))


def make_shape4d_loader(d: Shape4DDataSettings, seed: int):
    from loom.datasets.loader import LoomLoader
    from loom.datasets.transforms import Compose, SubsampleFrames

    ts = ([SubsampleFrames(d.frames, "uniform")] if d.frames else []) + (
        [PointSubset(d.surface_points)] if d.surface_points else [])
    loader = LoomLoader(d.source, d.batch_size, seed=seed, num_workers=d.num_workers, prefetch=d.prefetch,
                        keys=("surface", "queries", "video"), transform=Compose(*ts) if ts else None)
    return FloatsAsNumpy(loader, ("surface", "queries"))


# ============================================================================================== truncation


def corpus_truncation(url: str) -> float | None:
    """The SDF truncation of the 4D corpus at ``url`` from the 4D job's ``config.yaml`` beside its shards
    (``points.sdf_truncation``), or None when there is none (a bare shard, another writer)."""
    import yaml

    from loom.platform import storage

    path = storage.join(url, "config.yaml")
    try:
        if not storage.exists(path):
            return None
        doc = yaml.safe_load(storage.read_bytes(path)) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None
    value = (doc.get("points") or {}).get("sdf_truncation") if isinstance(doc, dict) else None
    return float(value) if value is not None else None


def check_truncation(tau: float, found: float | None, where: str) -> None:
    """Refuse a model whose ``tau`` is not the data's truncation ``found`` (None: unknown, nothing to check)."""
    if found is not None and not math.isclose(found, tau, rel_tol=1e-4):
        raise ValueError(f"model.tau={tau} but {where} truncates the signed distances at {found}: the VAE predicts "
                         f"sdf / tau, so the two must be equal. Pass --set model.tau={found} (or make the shards "
                         "with points.sdf_truncation equal to model.tau)")


def batch_truncation(sdf: torch.Tensor) -> float | None:
    """The truncation visible in truncated SDF samples: values clipped at +-t pile up at |sdf| = t (a fifth of the
    4D job's samples at the default settings). None when fewer than 1% sit at the maximum (no clipping seen)."""
    a = sdf.detach().abs().flatten().float()
    if a.numel() == 0:
        return None
    top = float(a.max())
    return top if top > 0 and float((a >= top * (1 - 1e-5)).float().mean()) >= 0.01 else None


def check_batch_truncation(tau: float, sdf: torch.Tensor, meta: list | None) -> None:
    for m in meta or []:
        if isinstance(m, dict) and m.get("sdf_truncation") is not None:
            check_truncation(tau, float(m["sdf_truncation"]), f"sample {m.get('uid', '?')} (meta sdf_truncation)")
    top = float(sdf.detach().abs().max()) if sdf.numel() else 0.0
    seen = batch_truncation(sdf)
    if seen is not None:
        check_truncation(tau, seen, "the batch (clipped |sdf| values)")
    elif top > tau * (1 + 1e-4):
        raise ValueError(f"model.tau={tau} but the batch holds |sdf| up to {top:.4g}: the shards are truncated "
                         f"farther out than the model's tau. Pass --set model.tau=<the shards' sdf_truncation>")


# ============================================================================================== models


def build_vae(m: VAEModelSettings, seed: int):
    """The trainable shape VAE: from ``model.init`` or fresh (``model.size``) with ``model.tau``."""
    import torch

    from loom.models.shape_vae import ShapeVAE, ShapeVAEConfig

    if m.init:
        vae = ShapeVAE.from_pretrained(m.init)
        check_truncation(m.tau, vae.config.tau, f"the VAE in model.init={m.init!r}")
        return vae
    cfg = (ShapeVAEConfig.tiny if m.size == TINY else ShapeVAEConfig.paper)(tau=m.tau)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ShapeVAE(cfg)


def build_base_dit(m: Shape4DModelSettings, seed: int):
    """The 4D DiT: the base from ``model.base`` (or tiny) with fresh zero-initialised spatiotemporal layers of the
    configured variant, the base frozen."""
    from loom.models.shape4d_dit import Shape4DDiT

    variant = dict(spatiotemporal=True, temporal=m.temporal, st_image_tokens=m.st_image_tokens,
                   attention_backend=m.attention_backend)
    if m.base == TINY:
        dit = Shape4DDiT.tiny(seed=seed, **variant)
    else:
        if not m.base:
            raise FileNotFoundError("model.base is not set: pass --set model.base=DIR (a local Shape4DDiT base "
                                    "folder, saved with spatiotemporal=False) or use --recipe tiny")
        dit = Shape4DDiT.from_pretrained(m.base, **variant)
    dit.freeze_base()
    return dit


def build_frozen_vae(m: Shape4DModelSettings, seed: int):
    import torch

    from loom.models.shape_vae import ShapeVAE

    if m.vae == TINY:
        vae = ShapeVAE.tiny(seed=seed)
    else:
        if not m.vae:
            raise FileNotFoundError("model.vae is not set: pass --set model.vae=DIR (a trained shape VAE, "
                                    "`loom train vae` OUT/vae) or use --recipe tiny")
        vae = ShapeVAE.from_pretrained(m.vae, torch_dtype=getattr(torch, m.dtype))
    return vae.eval().requires_grad_(False)


def build_image_encoder(m: Shape4DModelSettings, seed: int):
    from loom.models.shape4d_dit import ImageFeatures, load_image_features

    if m.image_encoder == TINY:
        enc = ImageFeatures.tiny(seed=seed, **({"image_size": m.image_size} if m.image_size else {}))
    else:
        if not m.image_encoder:
            raise FileNotFoundError("model.image_encoder is not set: pass --set model.image_encoder=DIR (a local "
                                    "DINOv2 folder, e.g. facebook/dinov2-large) or use --recipe tiny")
        enc = load_image_features(m.image_encoder, m.dtype, image_size=m.image_size or None)
    return enc.eval().requires_grad_(False)


def check_compatible(dit, vae, image) -> None:
    c = dit.config
    if vae.config.latent_channels != c.latent_channels:
        raise ValueError(f"the shape VAE makes {vae.config.latent_channels}-channel latents but the DiT models "
                         f"{c.latent_channels}: model.vae and model.base must belong together")
    if image.dim != c.image_dim:
        raise ValueError(f"the image encoder gives {image.dim}-wide tokens but the DiT takes {c.image_dim}: "
                         "model.image_encoder and model.base must belong together")


def base_digest(dit, dtype: str = "float32") -> str:
    """sha256 of the base's weights (everything but the spatiotemporal layers), in sorted key order, as ``dtype``."""
    import hashlib

    import torch

    from loom.models.shape4d_dit import ST_PREFIX

    h = hashlib.sha256()
    for k, v in sorted(dit.state_dict().items()):
        if k.startswith(ST_PREFIX):
            continue
        h.update(k.encode())
        h.update(v.detach().to(getattr(torch, dtype)).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


ST_WEIGHTS = "spatiotemporal.safetensors"
ST_INFO = "loom.json"


def save_spatiotemporal(dit, path: str, info: dict) -> None:
    """``path/config.json`` (the 4D DiT's config), ``path/spatiotemporal.safetensors`` (the trained layers only)
    and ``path/loom.json`` (the base they were trained on, its digests, the latents per frame)."""
    import json

    from safetensors.torch import save_file

    from loom.models.shape4d_dit import CONFIG_NAME

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump({"_class_name": type(dit).__name__, **dit.config.to_dict()}, f, indent=2, sort_keys=True)
    save_file({k: v.detach().float().contiguous() for k, v in dit.spatiotemporal_state_dict().items()},
              os.path.join(path, ST_WEIGHTS))
    with open(os.path.join(path, ST_INFO), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)


def load_spatiotemporal(dit, path: str) -> dict:
    """Load what :func:`save_spatiotemporal` wrote into a 4D DiT of the same variant; returns its loom.json."""
    import json

    from safetensors.torch import load_file

    from loom.models.shape4d_dit import CONFIG_NAME, ST_PREFIX

    for name in (CONFIG_NAME, ST_WEIGHTS, ST_INFO):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{path!r} has no {name}: is it the spatiotemporal/ folder of a finished "
                                    "`loom train shape4d` run?")
    with open(os.path.join(path, CONFIG_NAME)) as f:
        saved = json.load(f)
    saved.pop("_class_name", None)
    mine = dit.config.to_dict()
    differ = {k: (saved.get(k), v) for k, v in mine.items() if k != "attention_backend" and saved.get(k) != v}
    if differ:
        raise ValueError(f"{path!r} holds spatiotemporal layers of another model: (saved, this) differ in {differ}")
    state = load_file(os.path.join(path, ST_WEIGHTS))
    missing, unexpected = dit.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(ST_PREFIX)]
    if missing or unexpected:
        raise ValueError(f"{path!r}: weights do not match the spatiotemporal layers: missing {sorted(missing)[:4]} "
                         f"({len(missing)}), unexpected {sorted(unexpected)[:4]} ({len(unexpected)})")
    with open(os.path.join(path, ST_INFO)) as f:
        return json.load(f)


def write_mesh(path: str, vertices: np.ndarray, faces: np.ndarray) -> str:
    """A mesh file (.obj, .ply, ... by extension, through trimesh); an empty mesh is written as an empty file of
    that format, so a sequence keeps one file per frame."""
    import trimesh

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if len(faces) == 0 and path.lower().endswith(".obj"):  # trimesh writes a bare "v" and "f" line
        with open(path, "w") as f:
            f.write("# empty mesh: the signed distance does not cross zero inside the grid\n")
        return path
    trimesh.Trimesh(vertices=np.asarray(vertices, np.float64).reshape(-1, 3),
                    faces=np.asarray(faces, np.int64).reshape(-1, 3), process=False).export(path)
    return path


# ============================================================================================== jobs


def make_vae(cfg: TrainVAEJob):
    """(module, None): the module brings its own train iterable. Module-level so Ray can pickle it."""
    import torch

    from loom.training.shape4d_module import VAEModule

    torch.manual_seed(cfg.trainer.seed)
    return VAEModule(cfg), None


def make_shape4d(cfg: TrainShape4DJob):
    import torch

    from loom.training.shape4d_module import Shape4DModule

    torch.manual_seed(cfg.trainer.seed)
    return Shape4DModule(cfg), None


def _abs(path: str) -> str:
    return path if not path or path == TINY or "://" in path else os.path.abspath(path)


def absolute_paths(cfg):
    """Local paths made absolute: Ray Train workers (and a resumed run) may start in another directory."""
    r = dataclasses.replace
    data = r(cfg.data, source=_abs(cfg.data.source))
    m = cfg.model
    if isinstance(cfg, TrainVAEJob):
        model = r(m, init=_abs(m.init))
    else:
        model = r(m, base=_abs(m.base), vae=_abs(m.vae), image_encoder=_abs(m.image_encoder))
    return r(cfg, out=_abs(cfg.out), data=data, model=model)


def train(cfg: TrainVAEJob | TrainShape4DJob, *, resume: bool = False) -> None:
    """Write the resolved config beside the run, then train here or on Ray Train (``ray.address``)."""
    from loom.platform import config as cfgmod
    from loom.training import launch

    if not isinstance(cfg, (TrainVAEJob, TrainShape4DJob)):
        raise TypeError(f"train() takes a TrainVAEJob or a TrainShape4DJob, not {type(cfg).__name__}")
    cfg = absolute_paths(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.yaml"), "w") as f:
        f.write(cfgmod.dump_yaml(cfg))
    make = make_vae if isinstance(cfg, TrainVAEJob) else make_shape4d
    launch.run(functools.partial(make, cfg), cfg.trainer, cfg.tracking, cfg.ray, cfg.out, resume=resume)
