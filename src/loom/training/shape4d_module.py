"""The Lightning modules of ``loom train vae`` and ``loom train shape4d`` and the sampler of ``loom generate 4d``
(data flow, configs and ablations: :mod:`loom.training.shape4d`; checkpoints, data position and MLflow:
:class:`loom.training.module.LoomModule`)."""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import torch

from loom.models.flow import FlowMatching, sample_generator
from loom.models.shape_vae import vae_loss
from loom.training.module import LoomModule
from loom.training.shape4d import (TrainShape4DJob, TrainVAEJob, as_tensor, base_digest, build_base_dit,
                                   build_frozen_vae, build_image_encoder, build_vae, check_batch_truncation,
                                   check_compatible, check_truncation, corpus_truncation, load_spatiotemporal,
                                   make_shape4d_loader, make_vae_loader, save_spatiotemporal, write_mesh)
from loom.models.shape4d_flow import sample_4d, training_inputs


def _warmup(step: int, warm: int) -> float:
    return min(1.0, (step + 1) / warm) if warm > 0 else 1.0


def _optimizer(params, o, name: str):
    opt = torch.optim.AdamW([{"params": params, "name": name}], lr=o.lr, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup, warm=o.warmup_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def samples_here(module: LoomModule) -> bool:
    """Whether this rank runs the sampling of sample meshes: under ZeRO-3 every rank holds a slice of the weights,
    so all ranks run the forward passes together (rank 0 writes); otherwise rank 0 samples alone."""
    t = module.cfg.trainer
    return module.global_rank == 0 or (t.strategy == "deepspeed" and t.zero_stage == 3)


# ================================================================================================ shape VAE


class VAEModule(LoomModule):
    """The shape VAE's training step (frames flattened into the batch), optimizer and sample meshes."""

    def __init__(self, cfg: TrainVAEJob):
        super().__init__(cfg)
        self.vae = build_vae(cfg.model, cfg.trainer.seed)
        self._sample: tuple[torch.Tensor, torch.Tensor] | None = None  # one training frame (surface, queries)

    def make_loader(self):
        d = self.cfg.data
        check_truncation(self.cfg.model.tau, corpus_truncation(d.source), f"the 4D job that wrote {d.source}")
        return make_vae_loader(d, self.cfg.trainer.seed)

    def context_params(self) -> dict[str, str]:
        found = corpus_truncation(self.cfg.data.source)
        return {"data.truncation": str(found) if found is not None else "unknown (checked on the batches)"}

    def training_step(self, batch: dict, batch_idx: int):
        self.take_data_state(batch)
        c = self.cfg
        surface, points, sdf = (as_tensor(batch[k]).float() for k in ("surface", "sdf_points", "sdf"))
        queries = as_tensor(batch["queries"]).float()
        check_batch_truncation(c.model.tau, sdf, batch.get("meta"))
        b, t = surface.shape[:2]
        if self._sample is None:
            self._sample = (surface[0, :1].clone(), queries[0, :1].clone())
        dev = self.device
        _, post = self.vae.encode(surface.flatten(0, 1).to(dev), queries.flatten(0, 1).to(dev), sample=False)
        # eps per sample from (seed, step, key): N ranks with batch b draw what 1 rank with batch N*b draws
        g = [sample_generator(c.trainer.seed, self.global_step, k) for k in batch["__key__"]]
        eps = torch.stack([torch.randn((t, *post.mean.shape[1:]), generator=gi) for gi in g]).flatten(0, 1)
        latents = post.mean + post.std * eps.to(post.mean)  # (B*T, Q, C)
        pred = self.vae.decode(latents, points.flatten(0, 1).to(dev)).view(b, t, -1)  # (B, T, M)
        kl = post.kl().view(b, t)
        target = sdf.to(dev)
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
            surface, queries = self._sample
            latents, _ = self.vae.encode(surface.to(self.device), queries.to(self.device), sample=False)
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
        return _optimizer([p for p in self.vae.parameters() if p.requires_grad], self.cfg.optim, "vae")


# ================================================================================================ 4D shape DiT


class Shape4DModule(LoomModule):
    """The spatiotemporal DiT's training step (frozen base, frozen VAE and DINOv2), optimizer and sample mesh
    sequences."""

    def __init__(self, cfg: TrainShape4DJob):
        super().__init__(cfg)
        m, seed = cfg.model, cfg.trainer.seed
        self.dit = build_base_dit(m, seed)
        if cfg.trainer.gradient_checkpointing:
            self.dit.enable_gradient_checkpointing()
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

    @property
    def vae(self):
        return self._vae[0]

    @property
    def image(self):
        return self._image[0]

    def make_loader(self):
        return make_shape4d_loader(self.cfg.data, self.cfg.trainer.seed)

    def setup(self, stage: str) -> None:
        dev = self.device if self.device.type != "cpu" else "cpu"
        self.vae.to(dev)
        self.image.to(dev)

    def context_params(self) -> dict[str, str]:
        m = self.cfg.model
        return {"context": f"latents: frozen VAE posterior mean ({m.vae}); image: DINOv2 ({m.image_encoder}); "
                           f"base frozen ({m.base})"}

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def condition(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Batch -> (x0 (B,T,Q,C) float32 or None without surfaces, image tokens (B,T,L,D) float32), on the
        module's device."""
        dev = self.device
        image = self.image.encode(batch["video"]).to(dev)  # (B, T, L, D)
        if "surface" not in batch:
            return None, image
        surface, queries = as_tensor(batch["surface"]).float(), as_tensor(batch["queries"]).float()
        b, t = surface.shape[:2]
        s, q = surface.flatten(0, 1), queries.flatten(0, 1)
        chunk = self.cfg.model.vae_chunk
        lat = [self.vae.encode(s[i: i + chunk], q[i: i + chunk], sample=False)[0].to(dev)
               for i in range(0, b * t, chunk)]
        x0 = torch.cat(lat).view(b, t, *lat[0].shape[1:]) * self.cfg.model.latent_scale
        return x0, image

    def training_step(self, batch: dict, batch_idx: int):
        self.take_data_state(batch)
        c = self.cfg
        x0, image = self.condition(batch)
        if self._sample_cond is None:
            self._sample_cond = (image[:1].detach().cpu(), x0.shape[2])
        g = [sample_generator(c.trainer.seed, self.global_step, k) for k in batch["__key__"]]
        x_t, t, target, _ = training_inputs(x0, g, self.flow, shared=c.flow.shared_noise)
        pred = self.dit(x_t, t, image)
        per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return self.log_loss(per, batch)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.cfg.flow.sample_every
        if every and self.global_step % every == 0 and 0 < self.global_step < self.trainer.max_steps:
            self.log_sample(f"step-{self.global_step:07d}")

    # ------------------------------------------------------------------ samples and the end

    @torch.no_grad()
    def generate(self, image: torch.Tensor, num_latents: int, seed: int = 0, steps: int | None = None,
                 shift: float | None = None, guidance_scale: float | None = None) -> torch.Tensor:
        """Image tokens (B,T,L,D) -> VAE latents (B,T,Q,C) (divided by ``latent_scale``)."""
        f = self.cfg.flow
        shift = f.shift if shift is None else shift
        was = self.dit.training
        self.dit.eval()
        z = sample_4d(self.dit, image.to(self.device), steps=steps or f.sample_steps, shift=shift or None,
                      generator=torch.Generator().manual_seed(seed), shared=f.shared_noise, num_latents=num_latents,
                      guidance_scale=f.guidance_scale if guidance_scale is None else guidance_scale)
        self.dit.train(was)
        return z.float() / self.cfg.model.latent_scale

    def meshes(self, latents: torch.Tensor, out_dir: str, resolution: int | None = None) -> list[str]:
        """One sequence's latents (T,Q,C) -> out_dir/frame_000.obj ... by the frozen VAE and marching cubes."""
        res = resolution or self.cfg.flow.mesh_resolution
        paths = []
        for i, z in enumerate(latents):
            v, f = self.vae.extract_mesh(z.to(self.vae.device), resolution=res)
            paths.append(write_mesh(os.path.join(out_dir, f"frame_{i:03d}.obj"), v, f))
        return paths

    def log_sample(self, name: str) -> None:
        if self._sample_cond is None or not samples_here(self):
            return
        image, q = self._sample_cond
        z = self.generate(image, q)
        if self.global_rank == 0:
            folder = os.path.join(self.cfg.out, "samples", name)
            self.meshes(z[0].cpu(), folder)
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
        return _optimizer([p for p in self.dit.parameters() if p.requires_grad], self.cfg.optim, "spatiotemporal")


# ================================================================================================ generation


def load_run(run: str) -> tuple[Shape4DModule, dict]:
    """A finished ``loom train shape4d`` run folder -> (its module with the trained spatiotemporal layers, the
    layers' loom.json), built from the run's own config.yaml (base, VAE and DINOv2 folders as trained). Refuses a
    base folder whose weights are no longer those the layers were trained on."""
    import yaml

    from loom.platform import config as cfgmod

    cfg_path, layers = os.path.join(run, "config.yaml"), os.path.join(run, "spatiotemporal")
    for p in (cfg_path, layers):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} does not exist: is {run!r} a finished `loom train shape4d` run folder?")
    with open(cfg_path) as f:
        cfg = cfgmod.from_dict(TrainShape4DJob, yaml.safe_load(f))
    module = Shape4DModule(cfg)
    info = load_spatiotemporal(module.dit, layers)
    if info.get("digest_dtype", "float32") != module.digest_dtype:
        module.digest_dtype = info["digest_dtype"]
        module.base_digest_start = base_digest(module.dit, module.digest_dtype)
    if info.get("base_digest_start") and info["base_digest_start"] != module.base_digest_start:
        raise ValueError(f"the base DiT at model.base={cfg.model.base!r} is not the one {run!r} was trained on "
                         "(its weights' digest differs): restore that base folder")
    module.dit.eval()
    return module, info


VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def read_video(data: str, key: str | None = None) -> tuple[np.ndarray, str]:
    """The conditioning video (T,H,W,4) uint8 and its name, from 4D shards (a sample's ``video``; ``key`` or the
    first), a video file, or a folder of frame images (sorted by name)."""
    from loom.datasets.codecs import decode_video

    if os.path.isfile(data) and data.lower().endswith(VIDEO_EXTS):
        with open(data, "rb") as f:
            return decode_video(f.read(), channels=4), os.path.basename(data)
    if os.path.isdir(data) and not os.path.exists(os.path.join(data, "manifest.json")):
        frames = sorted(n for n in os.listdir(data) if n.lower().endswith(IMAGE_EXTS))
        if frames:
            from PIL import Image

            imgs = [np.asarray(Image.open(os.path.join(data, n)).convert("RGBA")) for n in frames]
            return np.stack(imgs), os.path.basename(os.path.normpath(data))
    from loom.datasets.shape4d import iter_samples

    try:
        for s in iter_samples(data, keys=("video",)):
            if key is None or s["__key__"] == key:
                return s["video"], s["__key__"]
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--data {data!r} is neither 4D shards, a video file ({', '.join(VIDEO_EXTS)}) nor a folder "
                         f"of frames ({', '.join(IMAGE_EXTS)}): {e}") from e
    raise KeyError(f"no sample {key!r} in {data}" if key else f"no samples in {data}")


def generate_4d(run: str, data: str, out: str, *, key: str | None = None, frames: int | None = None,
                steps: int | None = None, shift: float | None = None, seed: int = 0,
                resolution: int | None = None, latents: int | None = None,
                guidance_scale: float | None = None) -> list[str]:
    """``loom generate 4d``: a conditioning video -> per-frame DINOv2 tokens -> `sample_4d` (shared noise, time
    shift) -> frozen VAE -> marching cubes: ``out/frame_000.obj`` ... one mesh per frame."""
    from loom.datasets.transforms import frame_indices

    module, info = load_run(run)
    if torch.cuda.is_available():
        for m in (module, module.vae, module.image):
            m.to("cuda")
    video, _ = read_video(data, key)
    n = frames if frames is not None else module.cfg.data.frames
    if n:
        video = video[frame_indices(len(video), n, "uniform")]
    image = module.image.encode(video[None])  # (1, T, L, D)
    q = latents or info.get("latents_per_frame") or module.dit.config.num_latents
    z = module.generate(image, q, seed=seed, steps=steps, shift=shift, guidance_scale=guidance_scale)
    return module.meshes(z[0].cpu(), out, resolution)

