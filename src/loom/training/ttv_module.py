"""The Lightning module of ``loom train ttv`` (data flow and conditioning: :mod:`loom.training.ttv`)."""

from __future__ import annotations

import functools
import os
import sys

import lightning as L
import numpy as np
import torch

from loom.platform.config import to_dict
from loom.platform.tracking import flatten
from loom.training.flow import FlowMatching, euler_sample, sample_generator
from loom.training.ttv import (TrainBatches, TrainTTVJob, build_dit, build_encoders, build_vae, make_loader, pad_tokens,
                               partial_known, prompt_for)




class TTVModule(L.LightningModule):
    """The video DiT's training step, optimizer (LoRA+ groups), checkpoint extras and sample videos."""

    def __init__(self, cfg: TrainTTVJob):
        super().__init__()
        self.cfg = cfg
        # Checkpoints leave the frozen base out (it comes back from its own weights), so loading is not strict.
        self.strict_loading = False
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
        self.batches: TrainBatches | None = None
        self._data_state: dict | None = None
        self._sample_cond: dict | None = None
        self._const: dict = {}
        self.losses: list[tuple[int, float]] = []

    @property
    def vae(self):
        return self._vae[0]

    # ------------------------------------------------------------------ data

    def train_dataloader(self):
        if self.batches is None:
            self.batches = TrainBatches(make_loader(self.cfg.data, self.cfg.trainer.seed))
        return self.batches

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
        from loom.pipelines.latents import frame_indices

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

    def context_source(self) -> str:
        m = self.cfg.model
        return ("text: cached embeddings, else " + ("umT5 on the fly" if m.text_encoder else "zeros") +
                "; image: cached embeddings, else " + ("CLIP on the fly" if m.image_encoder else "zeros"))

    # ------------------------------------------------------------------ step

    def training_step(self, batch: dict, batch_idx: int):
        self._data_state = batch.pop("__loader_state__", None)
        step = self.global_step
        g = [sample_generator(self.cfg.trainer.seed, step, k) for k in batch["__key__"]]
        with torch.no_grad():
            cond = self.condition(batch, g)
        if self._sample_cond is None:
            self._sample_cond = {k: v[:1].detach().cpu() for k, v in cond.items()}
            self._sample_cond["rgb"] = batch["rgb"][:1].cpu() if "rgb" in batch else None
        x0 = cond.pop("x0")
        x_t, t, target, _ = self.flow.draw(x0, g)
        pred = self.dit(x_t, t, **cond)
        keep = ~torch.as_tensor(batch.get("__pad__", torch.zeros(x0.shape[0], dtype=torch.bool))).to(pred.device)
        per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        loss = (per * keep).sum() / keep.sum().clamp_min(1)  # padding repeats at an epoch's end weigh nothing
        # the mean over all ranks' real samples: N ranks with batch b log what 1 rank with batch N*b logs
        stats = torch.stack([(per * keep).sum().detach().float(), keep.sum().float()])
        if self.trainer.world_size > 1:
            stats = self.all_gather(stats).reshape(-1, 2).sum(0)
        self.log("train/loss", stats[0] / stats[1].clamp_min(1), prog_bar=True, on_step=True, on_epoch=False,
                 rank_zero_only=True)
        for i, group in enumerate(self.optimizers().param_groups):
            name = str(group.get("name", i)).replace("+", "_")  # MLflow metric names allow _ / . and space
            self.log(f"lr/{name}", float(group["lr"]), on_step=True, on_epoch=False, rank_zero_only=True)
        self.losses.append((step, float(loss.detach())))
        fail = os.environ.get("LOOM_FAIL_AT_STEP")  # crash injection for the resume tests
        if fail and step == int(fail):
            os._exit(17)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.cfg.flow.sample_every
        if every and self.global_step % every == 0 and self.global_step > 0:
            self.log_sample(f"step-{self.global_step:07d}")

    def on_fit_start(self) -> None:
        run_id = self._run_id()
        if self.global_rank != 0 or run_id is None:
            return
        client = self.logger.experiment
        existing = client.get_run(run_id).data.params
        params = flatten(to_dict(self.cfg))
        # a resumed run keeps its first values (MLflow refuses changed params; e.g. a raised max_steps)
        for k, v in params.items():
            if k not in existing:
                client.log_param(run_id, k, v)
        if "context" not in existing:
            client.log_param(run_id, "context", self.context_source())
        cfg_path = os.path.join(self.cfg.out, "config.yaml")
        if os.path.isfile(cfg_path):
            client.log_artifact(run_id, cfg_path)

    def on_train_end(self) -> None:
        self.log_sample(f"step-{self.global_step:07d}")
        path = os.path.join(self.cfg.out, "lora")
        with self._gathered():
            if self.global_rank == 0:
                self.dit.save_lora(path)
        if self.global_rank == 0:
            run_id = self._run_id()
            if run_id:
                self.logger.experiment.log_artifacts(run_id, path, "lora")
                print(f"mlflow:   run {run_id} ({self.logger._tracking_uri})", file=sys.stderr)
            print(f"lora:     {path}  (diffusers format)", file=sys.stderr)

    def _run_id(self) -> str | None:
        return getattr(self.logger, "run_id", None) if self.logger else None

    def _gathered(self):
        """ZeRO-3 keeps each rank's slice of the parameters: gather the trainable ones (on every rank) to save."""
        import contextlib

        if self.cfg.trainer.strategy == "deepspeed" and self.cfg.trainer.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters([p for p in self.dit.parameters() if p.requires_grad],
                                                     modifier_rank=None)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ optimizer

    def configure_optimizers(self):
        o = self.cfg.optim
        groups = self.dit.lora_plus_param_groups(o.lr, o.lora_plus_ratio, o.weight_decay)
        opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        warm = o.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup, warm=warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        logger = self.logger
        checkpoint["loom"] = {
            "data": self._data_state,
            "mlflow_run_id": getattr(logger, "run_id", None) if logger else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
            "config": to_dict(self.cfg),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("loom") or {}
        if extra.get("rng"):
            torch.set_rng_state(extra["rng"]["torch"])
            np.random.set_state(extra["rng"]["numpy"])
        if extra.get("data") is not None:
            self.train_dataloader().resume = extra["data"]

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
        logger = self.logger
        if logger is not None and getattr(logger, "run_id", None):
            logger.experiment.log_artifact(logger.run_id, path, "samples")


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
