"""The Lightning module of ``loom train ttv``: the video DiT's training step, LoRA+ optimizer and sample videos.
Data flow: :mod:`loom.training.ttv`; conditioning and sampling: :mod:`loom.models.ttv`; checkpoints, data position
and MLflow: :class:`loom.training.module.LoomModule`."""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import torch

from loom.models.flow import FlowMatching, sample_generator
from loom.models.ttv import (
    Conditioner,
    PartialTextures,
    build_dit,
    build_encoders,
    build_vae,
    latents_to_uint8,
    sample_latents,
)
from loom.training.module import LoomModule
from loom.training.ttv.config import TrainTTVJob
from loom.training.ttv.data import make_loader


class TTVModule(LoomModule):
    def __init__(self, cfg: TrainTTVJob):
        super().__init__(cfg)
        self.dit = build_dit(cfg.model, cfg.trainer.seed)
        # trainer.gradient_checkpointing (and ZeRO-3 leaves) are applied by launch.apply_sharding_intent
        if cfg.model.compile:
            self.dit.transformer.compile_repeated_blocks(fullgraph=True)
        # The frozen VAE and encoders sit in a plain object, outside the module tree: DeepSpeed must not wrap,
        # shard or cast them, and checkpoints must not carry them.
        d = cfg.data
        self.conditioner = Conditioner(build_vae(cfg.model, cfg.trainer.seed), build_encoders(cfg.model),
                                       position_radius=d.position_radius, text_len=d.text_len,
                                       image_len=d.image_len, prompt=d.prompt)
        self.flow = FlowMatching(shift=cfg.flow.shift, density=cfg.flow.density)
        self._sample_cond: dict | None = None

    @property
    def vae(self):
        return self.conditioner.vae

    # ------------------------------------------------------------------ data

    def make_loader(self):
        return make_loader(self.cfg.data, self.cfg.trainer.seed)

    def setup(self, stage: str) -> None:
        self.vae.to(self.device if self.device.type != "cpu" else "cpu")

    def condition(self, batch: dict, g: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """Batch -> the DiT's inputs: x0 (B,C,T',H',W') and the conditions, with partial textures, the reference
        frame and the condition dropouts drawn from the per-sample generators ``g``."""
        d = self.cfg.data
        known = PartialTextures(d.known_prob, g, d.visibility_share)
        return self.conditioner(batch, self.dit, self.device, known=known, draws=(self.cfg.cond, g))

    def context_params(self) -> dict[str, str]:
        m = self.cfg.model
        return {"context": "text: cached embeddings, else " + ("umT5 on the fly" if m.text_encoder else "zeros") +
                "; image: cached embeddings, else " + ("CLIP on the fly" if m.image_encoder else "zeros")}

    # ------------------------------------------------------------------ step

    def training_step(self, batch: dict, batch_idx: int):
        self.take_data_state(batch)
        g = [sample_generator(self.cfg.trainer.seed, self.global_step, k) for k in batch["__key__"]]
        with torch.no_grad():
            cond = self.condition(batch, g)
            if self._sample_cond is None:  # the sample videos get generation's inputs: no draws, nothing known
                first = {k: v[:1] if isinstance(v, (list, tuple, torch.Tensor)) else v for k, v in batch.items()}
                self._sample_cond = {k: v[:1].detach().cpu()
                                     for k, v in self.conditioner(first, self.dit, self.device).items()}
        x0 = cond.pop("x0")
        x_t, t, target, _ = self.flow.draw(x0, g)
        pred = self.dit(x_t, t, **cond)
        per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return self.log_loss(per, batch)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.cfg.flow.sample_every
        if every and self.global_step % every == 0 and self.global_step > 0:
            self.log_sample(f"step-{self.global_step:07d}")

    def on_train_end(self) -> None:
        self.log_sample(f"step-{self.global_step:07d}")
        path = os.path.join(self.cfg.out, "lora")
        with self.gathered(p for p in self.dit.parameters() if p.requires_grad):
            if self.global_rank == 0:
                self.dit.save_lora(path)
        self.log_artifacts(path, "lora")
        if self.global_rank == 0:
            if self.run_id():
                print(f"mlflow:   run {self.run_id()} ({self.logger._tracking_uri})", file=sys.stderr)
            print(f"lora:     {path}  (diffusers format)", file=sys.stderr)

    # ------------------------------------------------------------------ optimizer

    def configure_optimizers(self):
        o = self.cfg.optim
        groups = self.dit.lora_plus_param_groups(o.lr, o.lora_plus_ratio, o.weight_decay)
        opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup, warm=o.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ samples

    def log_sample(self, name: str) -> None:
        """Rank 0: a sample video of the first training sample's conditions beside its ground truth, to MLflow."""
        from loom.datasets.codecs import write_video

        if self.global_rank != 0 or self._sample_cond is None:
            return
        was = self.dit.training
        self.dit.eval()
        z = sample_latents(self.dit, self._sample_cond, self.cfg.flow.sample_steps, self.cfg.flow.shift,
                           device=self.device)
        self.dit.train(was)
        video = latents_to_uint8(self.vae, z.float().cpu())[0]  # (T,H,W,3)
        truth = latents_to_uint8(self.vae, self._sample_cond["x0"])[0]
        path = write_video(os.path.join(self.cfg.out, "samples", f"{name}.mp4"), np.concatenate([video, truth], 2))
        self.log_artifacts(path, "samples")


def _warmup(step: int, warm: int) -> float:
    return min(1.0, (step + 1) / warm) if warm > 0 else 1.0
