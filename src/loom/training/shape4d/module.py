"""The Lightning module of ``loom train shape4d`` (data flow, configs and ablations: :mod:`loom.training.shape4d`;
checkpoints, data position and MLflow: :class:`loom.training.module.LoomModule`). The networks are built, checked,
sampled and saved by :mod:`loom.models.shape4d`, which ``loom generate 4d`` uses without Lightning."""

from __future__ import annotations

import os
import sys

import torch

from loom.models.flow import FlowMatching, sample_generator
from loom.models.shape4d import (base_digest, build_base_dit, build_frozen_vae, build_image_encoder,
                                 check_compatible, encoder_record, sample_latents, save_spatiotemporal,
                                 write_mesh_sequence)
from loom.models.shape4d_flow import training_inputs
from loom.training.module import LoomModule
from loom.training.shape4d.config import TrainShape4DJob
from loom.platform.shards import manifest_kind
from loom.training.shape4d.data import make_shape4d_loader
from loom.models.shape_inputs import as_tensor, encode_frames
from loom.corpora.latents4d import KIND as CACHE_KIND, check_cache
from loom.training.vae.data import check_sharp_points
from loom.training.vae.module import adamw_with_warmup, samples_here


VAL_STEP = -1  # the `step` of the validation draws: no training step has it


class Shape4DModule(LoomModule):
    """The spatiotemporal DiT's training step (frozen base, frozen VAE and DINOv2), optimizer and sample mesh
    sequences."""

    def __init__(self, cfg: TrainShape4DJob):
        super().__init__(cfg)
        m, seed = cfg.model, cfg.trainer.seed
        self.dit = build_base_dit(m, seed)
        # trainer.gradient_checkpointing (and ZeRO-3 leaves) are applied by launch.apply_sharding_intent
        # Frozen networks are kept outside the module tree: DeepSpeed must not wrap, shard or cast them, and
        # checkpoints must not carry them.
        self._vae = [build_frozen_vae(m, seed)]
        self._image = [build_image_encoder(m, seed)]
        check_compatible(self.dit, self.vae, self.image)
        self.flow = FlowMatching(shift=cfg.flow.train_shift, density=cfg.flow.density)
        # DeepSpeed casts the whole module (the frozen base too) to bf16: compare the base in that dtype.
        self.digest_dtype = "bfloat16" if cfg.trainer.precision.startswith("bf16") else "float32"
        self.base_digest_start = base_digest(self.dit, self.digest_dtype)
        self._sample_cond: tuple[torch.Tensor, int] | None = None  # first sequence's image tokens, latents/frame
        # A `loom cache 4d` corpus holds the frozen encoders' outputs: they are checked against this run's, not run.
        self.cached = manifest_kind(cfg.data.source) == CACHE_KIND
        self.val_cached = manifest_kind(cfg.data.val_source) == CACHE_KIND if cfg.data.val_source else self.cached
        self._expected: dict | None = None

    @property
    def vae(self):
        return self._vae[0]

    @property
    def image(self):
        return self._image[0]

    def make_loader(self):
        d, sharp = self.cfg.data, self.vae.config.sharp_edges
        if self.cached:
            self._expected = encoder_record(self.vae, self.image)
            return make_shape4d_loader(d, self.cfg.trainer.seed, cached=True)
        check_sharp_points(sharp, d.source, f"the frozen VAE (model.vae={self.cfg.model.vae})")
        return make_shape4d_loader(d, self.cfg.trainer.seed, sharp=sharp, split="train")

    def make_val_loader(self):
        """``data.val_source`` (4D shards or a `loom cache 4d` corpus), or the sequences of ``data.source`` held
        out by ``data.val_fraction``; None without either."""
        d, sharp, seed = self.cfg.data, self.vae.config.sharp_edges, self.cfg.trainer.seed
        if not d.val_source and not d.val_fraction:
            return None
        source = d.val_source or None
        if self.val_cached:
            self._expected = self._expected or encoder_record(self.vae, self.image)
            return make_shape4d_loader(d, seed, cached=True, split="val", source=source)
        check_sharp_points(sharp, d.val_source or d.source, f"the frozen VAE (model.vae={self.cfg.model.vae})")
        return make_shape4d_loader(d, seed, sharp=sharp, split="val", source=source)

    def setup(self, stage: str) -> None:
        dev = self.device if self.device.type != "cpu" else "cpu"
        self.vae.to(dev)  # decodes the sample meshes, and encodes frames without a cache
        if not self.cached or (self.cfg.trainer.val_every and not self.val_cached):
            self.image.to(dev)

    def context_params(self) -> dict[str, str]:
        m = self.cfg.model
        return {"context": f"latents: frozen VAE posterior mean ({m.vae}); image: DINOv2 ({m.image_encoder}); "
                           f"base frozen ({m.base})"}

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def condition(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Batch -> (x0 (B,T,Q,C) float32 or None without surfaces, image tokens (B,T,L,D) float32), on the
        module's device: encoded by the frozen VAE and DINOv2, or read from a `loom cache 4d` corpus."""
        dev, scale = self.device, self.cfg.model.latent_scale
        if "shape_latent" in batch:
            check_cache(batch.get("meta"), self._expected, self.cfg.data.val_source if self.validating
                        else self.cfg.data.source)
            return (as_tensor(batch["shape_latent"]).float().to(dev) * scale,
                    as_tensor(batch["image_tokens"]).float().to(dev))
        image = self.image.encode(batch["video"]).to(dev)  # (B, T, L, D)
        if "surface" not in batch:
            return None, image
        return encode_frames(self.vae, batch, self.cfg.model.vae_chunk, dev) * scale, image

    def training_step(self, batch: dict, batch_idx: int):
        self.take_data_state(batch)
        x0, image = self.condition(batch)
        if self._sample_cond is None:
            self._sample_cond = (image[:1].detach().cpu(), x0.shape[2])
        return self.log_loss(self.per_sample_loss(x0, image, batch["__key__"], self.global_step), batch)

    def per_sample_loss(self, x0: torch.Tensor, image: torch.Tensor, keys: list[str], step: int) -> torch.Tensor:
        """(B,) flow-matching loss, sequence i's sigma and noise drawn from (seed, ``step``, its key)."""
        c = self.cfg
        g = [sample_generator(c.trainer.seed, step, k) for k in keys]
        x_t, t, target, _ = training_inputs(x0, g, self.flow, shared=c.flow.shared_noise)
        pred = self.dit(x_t, t, image)
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)

    validating = False

    @torch.no_grad()
    def val_loss(self, batch: dict) -> torch.Tensor:
        """The training loss of a held-out batch with the draws of step ``VAL_STEP`` (-1, no training step's):
        one fixed sigma and noise per sequence key, whatever the step of the run."""
        self.validating = True
        try:
            x0, image = self.condition(batch)
        finally:
            self.validating = False
        return self.per_sample_loss(x0, image, batch["__key__"], VAL_STEP)

    def save_best(self, folder: str) -> None:
        """The best weights as ``loom generate 4d`` reads them: ``OUT/best/spatiotemporal`` (the layers only)."""
        path = os.path.join(folder, "spatiotemporal")
        with self.gathered(self.dit.parameters()):
            if self.global_rank == 0:
                info = {"base": self.cfg.model.base, "digest_dtype": self.digest_dtype,
                        "base_digest_start": self.base_digest_start, "base_digest_end": self.base_digest_start,
                        "latents_per_frame": self._sample_cond[1] if self._sample_cond else None,
                        "step": self.global_step}
                save_spatiotemporal(self.dit, path, info)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.cfg.flow.sample_every
        if every and self.global_step % every == 0 and 0 < self.global_step < self.trainer.max_steps:
            self.log_sample(f"step-{self.global_step:07d}")

    # ------------------------------------------------------------------ samples and the end

    def log_sample(self, name: str) -> None:
        if self._sample_cond is None or not samples_here(self):
            return
        image, q = self._sample_cond
        c = self.cfg
        z = sample_latents(self.dit, image.to(self.device), c.flow, q, c.model.latent_scale)
        if self.global_rank == 0:
            folder = os.path.join(c.out, "samples", name)
            write_mesh_sequence(self.vae, z[0].cpu(), folder, c.flow.mesh_resolution)
            self.log_artifacts(folder, f"samples/{name}")

    def on_train_end(self) -> None:
        self.log_sample(f"step-{self.global_step:07d}")
        path = os.path.join(self.cfg.out, "spatiotemporal")
        with self.gathered(self.dit.parameters()):  # all of them: the base's digest too
            if self.global_rank == 0:
                end = base_digest(self.dit, self.digest_dtype)
                info = {"base": self.cfg.model.base, "digest_dtype": self.digest_dtype,
                        "base_digest_start": self.base_digest_start, "base_digest_end": end,
                        "latents_per_frame": self._sample_cond[1] if self._sample_cond else None,
                        "step": self.global_step}
                save_spatiotemporal(self.dit, path, info)
                if end != self.base_digest_start:
                    print("WARNING: the frozen base changed during training (digest differs): report this",
                          file=sys.stderr)
        self.log_artifacts(path, "spatiotemporal")
        if self.global_rank == 0:
            if self.run_id():
                print(f"mlflow:   run {self.run_id()} ({self.logger._tracking_uri})", file=sys.stderr)
            print(f"layers:   {path}  (loom generate 4d --run {self.cfg.out} --data VIDEO)", file=sys.stderr)

    def configure_optimizers(self):
        return adamw_with_warmup([p for p in self.dit.parameters() if p.requires_grad], self.cfg.optim,
                                 "spatiotemporal")
