"""The Lightning module of ``loom train vae`` (data flow: :mod:`loom.training.vae`; checkpoints, data position and
MLflow: :class:`loom.training.module.LoomModule`). :func:`adamw_with_warmup` and :func:`samples_here` are also the
4D shape DiT's module's."""

from __future__ import annotations

import functools
import os
import sys

import torch

from loom.models.flow import sample_generator
from loom.models.shape4d import write_mesh
from loom.models.shape_vae import vae_loss
from loom.training.module import LoomModule
from loom.training.vae.config import TINY, TrainVAEJob, VAEModelSettings
from loom.models.shape_inputs import as_tensor, check_box, encoder_inputs
from loom.training.vae.data import (check_batch_truncation, check_sharp_points, check_truncation, corpus_truncation,
                                    make_vae_loader)


def _warmup(step: int, warm: int) -> float:
    return min(1.0, (step + 1) / warm) if warm > 0 else 1.0


def adamw_with_warmup(params, o, name: str) -> dict:
    """Lightning's ``configure_optimizers`` answer: AdamW over ``params`` (one group called ``name``, logged as
    ``lr/<name>``) with ``o.warmup_steps`` of linear warm-up, stepped every step."""
    opt = torch.optim.AdamW([{"params": params, "name": name}], lr=o.lr, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup, warm=o.warmup_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def samples_here(module: LoomModule) -> bool:
    """Whether this rank runs the sampling of sample meshes: under ZeRO-3 every rank holds a slice of the weights,
    so all ranks run the forward passes together (rank 0 writes); otherwise rank 0 samples alone."""
    t = module.cfg.trainer
    return module.global_rank == 0 or (t.strategy == "deepspeed" and t.zero_stage == 3)


def build_vae(m: VAEModelSettings, seed: int):
    """The trainable shape VAE: from ``model.init`` or fresh (``model.size``, ``model.sharp_edges``) with
    ``model.tau``."""
    from loom.models.shape_vae import ShapeVAE, ShapeVAEConfig

    if m.init:
        from loom.platform.hub import resolve_model_path

        vae = ShapeVAE.from_pretrained(resolve_model_path(m.init, "model.init"))
        check_truncation(m.tau, vae.config.tau, f"the VAE in model.init={m.init!r}")
        return vae
    sharp = {} if m.sharp_edges is None else {"sharp_edges": m.sharp_edges}
    cfg = (ShapeVAEConfig.tiny if m.size == TINY else ShapeVAEConfig.paper)(tau=m.tau, **sharp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ShapeVAE(cfg)


class VAEModule(LoomModule):
    """The shape VAE's training step (frames flattened into the batch), optimizer and sample meshes."""

    def __init__(self, cfg: TrainVAEJob):
        super().__init__(cfg)
        self.vae = build_vae(cfg.model, cfg.trainer.seed)
        self._sample: dict[str, torch.Tensor] | None = None  # one training frame's encoder inputs

    def make_loader(self):
        d, sharp = self.cfg.data, self.vae.config.sharp_edges
        check_truncation(self.cfg.model.tau, corpus_truncation(d.source), f"the 4D job that wrote {d.source}")
        check_sharp_points(sharp, d.source, "the VAE (model.size / model.init / model.sharp_edges)")
        return make_vae_loader(d, self.cfg.trainer.seed, sharp=sharp)

    def context_params(self) -> dict[str, str]:
        found = corpus_truncation(self.cfg.data.source)
        return {"data.truncation": str(found) if found is not None else "unknown (checked on the batches)"}

    def training_step(self, batch: dict, batch_idx: int):
        self.take_data_state(batch)
        c = self.cfg
        points, sdf = (as_tensor(batch[k]).float() for k in ("sdf_points", "sdf"))
        check_batch_truncation(c.model.tau, sdf, batch.get("meta"))
        check_box(self.vae.config.sharp_edges, batch.get("meta"))
        b, t = sdf.shape[:2]
        dev = self.device
        inputs = {k: v.to(dev) for k, v in encoder_inputs(batch, self.vae.config.sharp_edges).items()}  # (B*T, ...)
        if self._sample is None:
            self._sample = {k: v[:1].detach().clone() for k, v in inputs.items()}
        _, post = self.vae.encode(sample=False, **inputs)
        # eps per sample from (seed, step, key): N ranks with batch b draw what 1 rank with batch N*b draws
        g = [sample_generator(c.trainer.seed, self.global_step, k) for k in batch["__key__"]]
        eps = torch.stack([torch.randn((t, *post.mean.shape[1:]), generator=gi) for gi in g]).flatten(0, 1)
        latents = post.mean + post.std * eps.to(post.mean)  # (B*T, Q, C)
        pred = self.vae.decode(latents, points.flatten(0, 1).to(dev)).view(b, t, -1)  # (B, T, M)
        kl = post.kl().view(b, t)
        # shards truncated at >= tau (checked) hold clip(sdf, tau) exactly; upstream clips its stored SDF the same way
        target = sdf.to(dev).clamp(-c.model.tau, c.model.tau)
        parts = [vae_loss(pred[i], target[i], kl[i], c.model.kl_weight, c.model.tau) for i in range(b)]
        self.log("train/sdf", torch.stack([p["sdf"] for p in parts]).mean().detach(), on_step=True, on_epoch=False,
                 rank_zero_only=True)
        self.log("train/kl", torch.stack([p["kl"] for p in parts]).mean().detach(), on_step=True, on_epoch=False,
                 rank_zero_only=True)
        return self.log_loss(torch.stack([p["loss"] for p in parts]), batch)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.cfg.sample.every
        if every and self.global_step % every == 0 and 0 < self.global_step < self.trainer.max_steps:
            self.log_sample(f"step-{self.global_step:07d}")

    def log_sample(self, name: str) -> None:
        """Marching cubes of the first training frame's reconstruction at ``sample.resolution``: a .obj in
        OUT/samples and in the run's artifacts."""
        if self._sample is None or not samples_here(self):
            return
        was = self.vae.training
        self.vae.eval()
        with torch.no_grad():
            latents, _ = self.vae.encode(sample=False, **{k: v.to(self.device) for k, v in self._sample.items()})
            v, f = self.vae.extract_mesh(latents, resolution=self.cfg.sample.resolution)
        self.vae.train(was)
        if self.global_rank == 0:
            path = write_mesh(os.path.join(self.cfg.out, "samples", f"{name}.obj"), v, f)
            self.log_artifacts(path, "samples")

    def on_train_end(self) -> None:
        self.log_sample(f"step-{self.global_step:07d}")
        path = os.path.join(self.cfg.out, "vae")
        with self.gathered(self.vae.parameters()):
            if self.global_rank == 0:
                self.vae.save_pretrained(path)
        self.log_artifacts(path, "vae")
        if self.global_rank == 0:
            if self.run_id():
                print(f"mlflow:   run {self.run_id()} ({self.logger._tracking_uri})", file=sys.stderr)
            print(f"vae:      {path}  (ShapeVAE.from_pretrained; loom train shape4d --set model.vae={path})",
                  file=sys.stderr)

    def configure_optimizers(self):
        return adamw_with_warmup([p for p in self.vae.parameters() if p.requires_grad], self.cfg.optim, "vae")
