"""The Lightning module of ``loom train style``: distribution alignment's step (`loom.models.sag.loss`), Adam(W), the
LoRA files and one sample anchor per identifier at the end. Checkpoints, data position and MLflow:
:class:`loom.training.module.LoomModule`."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import torch

from loom.models import sag
from loom.models.flow import sample_generator
from loom.training.module import LoomModule
from loom.models.sag import INDEX, LORA_DIR, REFERENCES
from loom.training.style.lora import add_style_lora, build_parts, lora_groups, save_style_lora
from loom.training.style.config import TrainStyleJob, slug
from loom.training.style.data import EdgeDetector, StyleBatches, load_references, to_input


class Frozen:
    """The SAG parts (VAE, text encoders, scheduler; the DiT and ControlNet are also the module's children) outside
    the module tree: DeepSpeed must not wrap, shard or cast the frozen encoders, nor checkpoints carry them."""

    def __init__(self, parts):
        self.parts = parts


class StyleModule(LoomModule):
    def __init__(self, cfg: TrainStyleJob):
        super().__init__(cfg)
        parts = build_parts(cfg.model, cfg.trainer.seed)
        self.lora_params = add_style_lora(parts, cfg.lora)
        self.transformer = parts.transformer
        self.controlnet = parts.controlnet
        self.frozen = Frozen(parts)
        self.detector = EdgeDetector(cfg.data)
        self.refs = load_references(cfg.data, self.detector)  # crops and edge maps, once
        # the authors' t: FLUX's shifted schedule at the sequence length of a data.size square (theirs: 1024)
        self.timesteps = sag.train_timesteps(parts.scheduler, (cfg.data.size // 16) ** 2)

    @property
    def parts(self):
        return self.frozen.parts

    def make_loader(self):
        world = self.trainer.world_size if self._trainer is not None else 1
        return StyleBatches(self.refs, self.cfg.data.aspect_ratios, self.cfg.data.batch_size, self.cfg.trainer.seed,
                            self.global_rank, world)

    def context_params(self) -> dict[str, str]:
        lora = self.cfg.lora
        n = len(lora_groups(lora.double_blocks, lora.single_blocks))
        return {"edges": self.detector.describe(),
                "references": str(len(self.refs)),
                "identifiers": ", ".join(dict.fromkeys(r.identifier for r in self.refs))[:500],
                "lora_layers": f"DiT {n * 4} Linears in {len(lora.double_blocks) + len(lora.single_blocks)} blocks, "
                               f"ControlNet {len(lora_groups(lora.controlnet_double_blocks, ())) * 4}; "
                               f"{sum(self.lora_params.values())} parameters",
                "timesteps": f"{len(self.timesteps)} shifted values for {(self.cfg.data.size // 16) ** 2} tokens"}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        parts = self.parts
        parts.vae.to(self.device)
        # every prompt training and the samples use, encoded once; T5 (9.5 GB in bf16 for FLUX) then leaves the GPU
        t = parts.text
        for enc in (t.clip, t.t5):
            enc.to(self.device)
        t.encode(sorted({r.prompt for r in self.refs} | {r.identifier for r in self.refs} | {""}))
        for enc in (t.clip, t.t5):
            enc.to("cpu")
        if self.global_rank == 0:
            self.write_references(os.path.join(self.cfg.out, REFERENCES))

    def write_references(self, folder: str) -> None:
        """Each reference as given, its crops and edge maps, and references.json (what `load_style_run` reads)."""
        from PIL import Image

        os.makedirs(folder, exist_ok=True)
        entries = []
        for i, ref in enumerate(self.refs):
            name = f"{i:02d}-{os.path.basename(ref.path)}"
            shutil.copyfile(ref.path, os.path.join(folder, name))
            crops = {}
            for r, (img, edges) in ref.crops.items():
                stem = f"{i:02d}-{r.replace(':', 'x')}"
                Image.fromarray(img).save(os.path.join(folder, f"{stem}.png"))
                Image.fromarray(edges).save(os.path.join(folder, f"{stem}-edges.png"))
                crops[r] = {"image": f"{stem}.png", "edges": f"{stem}-edges.png"}
            entries.append({"file": name, "source": ref.path, "identifier": ref.identifier, "prompt": ref.prompt,
                            "crops": crops})
        with open(os.path.join(folder, INDEX + ".part"), "w") as f:
            json.dump(entries, f, indent=2)
        os.replace(os.path.join(folder, INDEX + ".part"), os.path.join(folder, INDEX))

    def training_step(self, batch: dict, batch_idx: int):
        self.take_data_state(batch)
        parts, dev = self.parts, self.device
        g = [sample_generator(self.cfg.trainer.seed, self.global_step, k) for k in batch["__key__"]]
        with torch.no_grad():
            x0 = sag.encode(parts.vae, batch["image"].to(parts.vae.device)).to(dev)  # (B,16,H/8,W/8)
            tokens, pooled = parts.text.encode(batch["prompt"])  # (B,L,D), (B,P)
        ts = self.timesteps
        t = torch.stack([ts[torch.randint(len(ts), (1,), generator=gi)[0]] for gi in g]).to(dev)  # (B,)
        noise = torch.stack([torch.randn(tuple(x0.shape[1:]), generator=gi) for gi in g]).to(dev)
        per = sag.loss(parts, x0, batch["edges"].to(dev), tokens.to(dev), pooled.to(dev), t, noise)  # (B,)
        return self.log_loss(per, batch)

    def configure_optimizers(self):
        o = self.cfg.optim
        params = [p for p in self.parameters() if p.requires_grad]  # tied q/k/v down matrices once
        kind = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        opt = kind(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        warm = o.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        folder = os.path.join(self.cfg.out, LORA_DIR)
        with self.gathered([p for p in self.parameters() if p.requires_grad]):
            if self.global_rank == 0:
                save_style_lora(self.parts, folder)
        if self.global_rank != 0:
            return
        samples = self.log_samples()
        self.log_artifacts(folder, LORA_DIR)
        self.log_artifacts(os.path.join(self.cfg.out, REFERENCES), REFERENCES)
        if self.run_id():
            print(f"mlflow:   run {self.run_id()} ({self.logger._tracking_uri})", file=sys.stderr)
        print(f"lora:     {folder}  (diffusers FLUX LoRA + ControlNet LoRA)", file=sys.stderr)
        for p in samples:
            print(f"sample:   {p}", file=sys.stderr)

    @torch.no_grad()
    def log_samples(self) -> list[str]:
        """One anchor per identifier, sampled from its first reference's edge map (its 1:1 crop if trained on one)
        with the LoRAs on, to ``samples/`` and MLflow."""
        from PIL import Image

        s, seed, parts = self.cfg.sample, self.cfg.trainer.seed, self.parts
        nets = [n for n in (self.transformer, self.controlnet) if n is not None]
        was = [n.training for n in nets]
        for n in nets:
            n.eval()
        folder = os.path.join(self.cfg.out, "samples")
        os.makedirs(folder, exist_ok=True)
        written, done = [], set()
        for ref in self.refs:
            if ref.identifier in done:
                continue
            done.add(ref.identifier)
            _, edges = ref.crops.get("1:1") or next(iter(ref.crops.values()))
            h, w = edges.shape
            z = sag.sample(parts, ref.identifier, (h, w), edges=torch.from_numpy(to_input(edges))[None],
                           steps=s.steps, replace_steps=0, guidance=s.guidance, true_cfg=s.true_cfg,
                           control_weight=s.control_weight, generator=torch.Generator().manual_seed(seed),
                           device=self.device)
            image = sag.decode(parts.vae, z.to(parts.vae.device))[0]
            path = os.path.join(folder, f"{slug(ref.identifier)}.png")
            Image.fromarray(np.ascontiguousarray(image)).save(path)
            written.append(path)
        for n, w in zip(nets, was):
            n.train(w)
        self.log_artifacts(folder, "samples")
        return written
