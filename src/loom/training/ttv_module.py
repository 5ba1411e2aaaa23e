"""The Lightning module of ``loom train ttv`` (data flow and conditioning: :mod:`loom.training.ttv`)."""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import torch

from loom.models.flow import FlowMatching, euler_sample, sample_generator
from loom.training.module import LoomModule
from loom.training.ttv import (TrainTTVJob, build_dit, build_encoders, build_vae, make_loader, pad_tokens,
                               partial_known, prompt_for)




class TTVModule(LoomModule):
    """The video DiT's training step, optimizer (LoRA+ groups) and sample videos (checkpoints, data position and
    MLflow: :class:`loom.training.module.LoomModule`)."""

    def __init__(self, cfg: TrainTTVJob):
        super().__init__(cfg)
        self.dit = build_dit(cfg.model, cfg.trainer.seed)
        if cfg.trainer.gradient_checkpointing:
            self.dit.enable_gradient_checkpointing()
        if cfg.model.compile:
            self.dit.transformer.compile_repeated_blocks(fullgraph=True)
        # The frozen VAE is kept outside the module tree: DeepSpeed must not wrap, shard or cast it, and
        # checkpoints must not carry it.
        self._vae = [build_vae(cfg.model, cfg.trainer.seed)]
        self._encoders = [build_encoders(cfg.model)]
        self.flow = FlowMatching(shift=cfg.flow.shift, density=cfg.flow.density)
        self._sample_cond: dict | None = None
        self._const: dict = {}

    @property
    def vae(self):
        return self._vae[0]

    # ------------------------------------------------------------------ data

    def make_loader(self):
        return make_loader(self.cfg.data, self.cfg.trainer.seed)

    def setup(self, stage: str) -> None:
        self.vae.to(self.device if self.device.type != "cpu" else "cpu")

    def _const_latent(self, kind: str, t: int, h: int, w: int) -> torch.Tensor:
        """Latent of an all-zeros known video or an all-generate mask video of a shape (latent shards)."""
        key = (kind, t, h, w)
        if key not in self._const:
            f = self.vae.temporal_factor
            s = self.vae.spatial_factor
            x = torch.full((1, 3, 1 + f * (t - 1), h * s, w * s), 0.0 if kind == "known" else 1.0)
            self._const[key] = self.vae.encode(x)
        return self._const[key]

    def condition(self, batch: dict, g: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """Batch -> the DiT's inputs: x0 (B,C,T',H',W') and the conditions (see the module docstring)."""
        from loom.corpora.latents import frame_indices

        dev = self.device
        if "rgb_latent" in batch:
            x0 = batch["rgb_latent"].float()
            b, _, t, h, w = x0.shape
            geo = [batch["normal_latent"].float(), batch["position_latent"].float(),
                   self._const_latent("known", t, h, w).expand(b, -1, -1, -1, -1),
                   self._const_latent("mask", t, h, w).expand(b, -1, -1, -1, -1)]
        else:
            rgb = batch["rgb"]
            idx = frame_indices(rgb.shape[1], "trim", self.vae.temporal_factor)
            rgb = rgb[:, idx].float() / 127.5 - 1
            normal = batch["normal"][:, idx].float().clamp(-1, 1)
            pos = batch["position"][:, idx].float()
            posn = (pos / self.cfg.data.position_radius).clamp(-1, 1)
            known, gen = partial_known(rgb, pos, batch["mask"][:, idx].bool(), self.cfg.data.known_prob, g)
            videos = torch.cat([rgb.permute(0, 4, 1, 2, 3), normal.permute(0, 4, 1, 2, 3),
                                posn.permute(0, 4, 1, 2, 3), known, gen])  # (5B, 3, T, H, W)
            z = self.vae.encode(videos)
            b = rgb.shape[0]
            x0, geo = z[:b], [z[b * i: b * (i + 1)] for i in range(1, 5)]
        dit = self.dit
        cond = {
            "x0": x0.to(dev),
            "geometry": torch.cat(geo, 1).to(dev),
            "reference": dit.reference_latent(x0[:, :, :1], x0.shape[2]).to(dev),
            "text": pad_tokens(self._text(batch, b), self.cfg.data.text_len, dit.text_dim, b).to(dev),
        }
        if dit.image_dim is not None:
            img = batch.get("image_embed")
            if img is None and self._encoders[0]["image"] is not None and "rgb" in batch:
                img = self._encoders[0]["image"].encode(batch["rgb"][:, 0].numpy())
            cond["image"] = (torch.as_tensor(img).float() if img is not None
                             else torch.zeros(b, self.cfg.data.image_len, dit.image_dim)).to(dev)
        return cond

    def _text(self, batch: dict, b: int):
        if batch.get("text_embed") is not None:
            return batch["text_embed"]
        enc = self._encoders[0]["text"]
        if enc is None:
            return None
        metas = batch.get("meta") or [{}] * b
        return enc.encode([prompt_for(self.cfg.data.prompt, m) for m in metas])

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
        if self._sample_cond is None:
            self._sample_cond = {k: v[:1].detach().cpu() for k, v in cond.items()}
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
        warm = o.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup, warm=warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ samples

    @torch.no_grad()
    def generate(self, cond: dict[str, torch.Tensor], seed: int = 0) -> torch.Tensor:
        """Conditions of one or more samples -> latents (B,C,T',H',W') with the few-step sampler."""
        ref = cond["reference"]
        noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed)).to(ref)
        kw = {k: v.to(self.device) for k, v in cond.items() if k not in ("x0", "rgb") and v is not None}
        return euler_sample(lambda x, t: self.dit(x, t, **kw), noise.to(self.device), self.cfg.flow.sample_steps,
                            self.cfg.flow.shift)

    def log_sample(self, name: str) -> None:
        if self.global_rank != 0 or self._sample_cond is None:
            return
        was = self.dit.training
        self.dit.eval()
        z = self.generate(self._sample_cond)
        self.dit.train(was)
        video = latents_to_uint8(self.vae, z.float().cpu())[0]  # (T,H,W,3)
        truth = latents_to_uint8(self.vae, self._sample_cond["x0"])[0]
        path = write_video(os.path.join(self.cfg.out, "samples", f"{name}.mp4"), np.concatenate([video, truth], 2))
        self.log_artifacts(path, "samples")


def _warmup(step: int, warm: int) -> float:
    return min(1.0, (step + 1) / warm) if warm > 0 else 1.0


def latents_to_uint8(vae, z: torch.Tensor) -> np.ndarray:
    x = vae.decode(z)  # (B,3,T,H,W) in [-1, 1]
    return ((x.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def write_video(path: str, frames: np.ndarray, fps: int = 12) -> str:
    from loom.datasets.codecs import encode_video

    os.makedirs(os.path.dirname(path), exist_ok=True)
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:  # H.264 4:4:4 still wants even sizes
        frames = frames[:, : h - h % 2, : w - w % 2]
    _, data = encode_video(frames, "h264", fps=fps, name="sample")
    with open(path, "wb") as f:
        f.write(data)
    return path




# ------------------------------------------------------------------------------------------ generation


def load_run(run: str) -> TTVModule:
    """A trained run folder (``loom train ttv --out RUN``) -> its module with the trained LoRA and fusion weights,
    built from the run's own config.yaml (base model folders as trained)."""
    import dataclasses

    import yaml

    from loom.platform import config as cfgmod

    cfg_path, lora = os.path.join(run, "config.yaml"), os.path.join(run, "lora")
    for p in (cfg_path, lora):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} does not exist: is {run!r} a finished `loom train ttv` run folder?")
    with open(cfg_path) as f:
        cfg = cfgmod.from_dict(TrainTTVJob, yaml.safe_load(f))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, known_prob=0.0))  # nothing known: 1st pass
    module = TTVModule(cfg)
    module.dit.load_lora(lora)
    module.dit.eval()
    return module


def read_condition(data: str, key: str | None, transform) -> dict:
    """One turntable sample (the mesh's condition renders) as a batch of one."""
    from loom.datasets.ttv import iter_samples

    for s in iter_samples(data, keys=("rgb", "normal", "position", "mask")):
        if key is None or s["__key__"] == key:
            if transform is not None:
                s = transform(s, np.random.default_rng(0))
            batch = {k: torch.from_numpy(np.ascontiguousarray(s[k]))[None] for k in ("rgb", "normal", "position",
                                                                                     "mask")}
            batch.update({"__key__": [s["__key__"]], "meta": [s["meta"]]})
            return batch
    raise KeyError(f"no sample {key!r} in {data}" if key else f"no samples in {data}")


def generate_ttv(run: str, data: str, out: str, *, key: str | None = None, reference: str | None = None,
                 prompt: str | None = None, steps: int | None = None, seed: int = 0) -> str:
    """``loom generate ttv``: condition renders of a mesh (a turntable sample: normal, position and mask videos),
    a reference image (default: the sample's first rgb frame) and a prompt -> a turntable video (H.264 mp4)."""
    import dataclasses

    from loom.training.ttv import train_transform

    module = load_run(run)
    if steps:
        module.cfg = dataclasses.replace(module.cfg, flow=dataclasses.replace(module.cfg.flow, sample_steps=steps))
    batch = read_condition(data, key, train_transform(module.cfg.data))
    if reference:
        from PIL import Image

        h, w = batch["rgb"].shape[2:4]
        img = np.asarray(Image.open(reference).convert("RGB").resize((w, h), Image.BICUBIC))
        batch["rgb"] = batch["rgb"].clone()
        batch["rgb"][:, 0] = torch.from_numpy(img)  # the reference latent and CLIP tokens come from frame 0
    if prompt is not None:
        enc = module._encoders[0]["text"]
        if enc is None:
            raise ValueError("--prompt needs a text encoder: the run was trained without model.text_encoder")
        batch["text_embed"] = enc.encode([prompt])
    g = [torch.Generator().manual_seed(seed)]
    cond = module.condition(batch, g)
    z = module.generate(cond, seed=seed)
    video = latents_to_uint8(module.vae, z.float().cpu())[0]
    return write_video(out, video)
