"""The Lightning module of ``loom train ggi``: VideoFrom3D's GGI step (`loom.models.ggi`), AdamW, sample videos.
Checkpoints, data position and MLflow: :class:`loom.training.module.LoomModule`."""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from loom.models import ggi
from loom.models.flow import sample_generator
from loom.training.ggi.config import TrainGGIJob
from loom.training.ggi.data import make_loader
from loom.training.module import LoomModule


class Frozen:
    """The frozen VAE and T5, outside the module tree: DeepSpeed must not wrap, shard or cast them, nor checkpoints
    carry them."""

    def __init__(self, vae, text=None):
        self.vae = vae
        self.text = text


class GGIModule(LoomModule):
    def __init__(self, cfg: TrainGGIJob):
        super().__init__(cfg)
        self.transformer = ggi.build_transformer(cfg.model, cfg.trainer.seed)
        self.frozen = Frozen(ggi.build_vae(cfg.model, cfg.trainer.seed))
        self.scheduler = ggi.make_scheduler(cfg.model.transformer, cfg.model.objective)
        m = cfg.model
        self.frozen.text = ggi.T5Prompts(m.text_encoder, m.tokenizer, m.text_len) if m.text_encoder else None
        self._sample: dict | None = None
        self._cache_checked = False

    @property
    def vae(self):
        return self.frozen.vae

    def make_loader(self):
        return make_loader(self.cfg.data, self.cfg.trainer.seed)

    def setup(self, stage: str) -> None:
        self.frozen.vae.to(self.device if self.device.type != "cpu" else "cpu")

    def context_params(self) -> dict[str, str]:
        text = "T5 of each clip's caption (else model.prompt)" if self.frozen.text else "zeros (unconditional)"
        return {"context": f"text: {text}", "objective": self.cfg.model.objective}

    def condition(self, batch: dict) -> dict[str, torch.Tensor]:
        """Batch -> x0, the anchor latents V, the edge latents H_e, the warped noise and the text tokens (from
        pixels, or as `loom cache ggi` stored them)."""
        if "video_latent" in batch:
            return self.cached(batch)
        c = ggi.encode_clip(self.vae, batch["video"].cpu(), batch["edges"].cpu())  # on the VAE's device
        x0 = c["x0"].to(self.device)  # (B,F',C,h,w)
        noise = batch["noise"].to(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"the shards' warped noise is {tuple(noise.shape[1:])} per sample but the VAE's latents "
                             f"are {tuple(x0.shape[1:])}: make the corpus with the model's latent channels "
                             f"({x0.shape[2]}) and 8x downsampling (noise.channels, noise.downsample)")
        return {"x0": x0, "anchors": ggi.anchor_layout(c["anchor_pair"], x0.shape[1]).to(x0),
                "edges": c["edges"].to(x0), "noise": noise, "text": self.text(batch, x0.shape[0]).to(x0)}

    def cached(self, batch: dict) -> dict[str, torch.Tensor]:
        if not self._cache_checked:
            from loom.corpora.latents_ggi import check_cache, digests

            m = self.cfg.model
            check_cache(batch["meta"], digests(m.vae, m.text_encoder, self.cfg.trainer.seed), self.cfg.data.source)
            self._cache_checked = True
        x0 = batch["video_latent"].to(self.device).float()
        b = x0.shape[0]
        embeds = batch.get("text_embed")
        text = (ggi.text_tokens(embeds, b, self.transformer, self.cfg.model.text_len) if embeds is not None
                else self.text(batch, b))
        return {"x0": x0, "anchors": ggi.anchor_layout(batch["anchor_latent"].to(x0), x0.shape[1]),
                "edges": batch["edge_latent"].to(x0), "noise": batch["noise"].to(x0), "text": text.to(x0)}

    def text(self, batch: dict, b: int) -> torch.Tensor:
        """(B, text_len, D): T5 of the samples' captions (or model.prompt), or zeros without a text encoder."""
        m = self.cfg.model
        embeds = (self.frozen.text.encode(ggi.prompts_of(batch["meta"], m.prompt)) if self.frozen.text is not None
                  else None)
        return ggi.text_tokens(embeds, b, self.transformer, m.text_len)

    def training_step(self, batch: dict, batch_idx: int):
        self.take_data_state(batch)
        g = [sample_generator(self.cfg.trainer.seed, self.global_step, k) for k in batch["__key__"]]
        with torch.no_grad():
            c = self.condition(batch)
            if self._sample is None:  # the sample videos: the first training sample's conditions
                self._sample = {k: v[:1].detach().cpu() for k, v in c.items()}
        n = self.scheduler.config.num_train_timesteps
        t = torch.cat([torch.randint(0, n, (1,), generator=gi) for gi in g]).to(self.device)
        per = ggi.loss(self.transformer, self.scheduler, c["x0"], c["noise"], t, c["anchors"], c["edges"], c["text"],
                       self.cfg.model.objective)
        return self.log_loss(per, batch)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.cfg.sample.every
        if every and self.global_step % every == 0 and self.global_step > 0:
            self.log_sample(f"step-{self.global_step:07d}")

    def on_train_end(self) -> None:
        self.log_sample(f"step-{self.global_step:07d}")
        path = os.path.join(self.cfg.out, "transformer")
        with self.gathered(self.transformer.parameters()):
            if self.global_rank == 0:
                save_transformer(self.transformer, path)
        self.log_artifacts(path, "transformer")
        if self.global_rank == 0:
            if self.run_id():
                print(f"mlflow:   run {self.run_id()} ({self.logger._tracking_uri})", file=sys.stderr)
            print(f"model:    {path}  (diffusers CogVideoXTransformer3DModel, flow LoRA merged)", file=sys.stderr)

    def configure_optimizers(self):
        o = self.cfg.optim
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        warm = o.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def log_sample(self, name: str) -> None:
        """Rank 0: the first training sample inbetweened from its own anchors, edges and warped noise, beside the
        truth, to MLflow."""
        from loom.datasets.codecs import write_video

        if self.global_rank != 0 or self._sample is None:
            return
        s = {k: v.to(self.device) for k, v in self._sample.items()}
        g = torch.Generator().manual_seed(self.cfg.trainer.seed)
        fresh = torch.randn(s["noise"].shape, generator=g).to(s["noise"])
        noise = ggi.blend_noise(s["noise"], fresh, self.cfg.sample.degradation)
        was = self.transformer.training
        self.transformer.eval()
        neg = None
        if self.frozen.text is not None and self.cfg.sample.guidance > 1:
            neg = ggi.text_tokens(self.frozen.text.encode([""]), 1, self.transformer, self.cfg.model.text_len)
        z = ggi.sample(self.transformer, self.scheduler, noise, s["anchors"], s["edges"], s["text"],
                       self.cfg.sample.steps, generator=g, guidance=self.cfg.sample.guidance,
                       negative=None if neg is None else neg.to(s["text"]))
        self.transformer.train(was)
        video = ggi.decode(self.vae, z.cpu())[0].numpy()
        truth = ggi.decode(self.vae, s["x0"].cpu())[0].numpy()
        path = write_video(os.path.join(self.cfg.out, "samples", f"{name}.mp4"), np.concatenate([video, truth], 2))
        self.log_artifacts(path, "samples")


def save_transformer(transformer, path: str) -> None:
    """The trained transformer in diffusers' layout with the flow LoRA merged (the released GGI checkpoint's form),
    so `loom.models.ggi.build_transformer` and the authors' pipeline both load it. Merges IN PLACE (no second copy
    of a 5B model in memory): call it when training is over."""
    if getattr(transformer, "peft_config", None):
        transformer.fuse_lora(adapter_names=list(transformer.peft_config))
        transformer.unload_lora()
    transformer.save_pretrained(path)
