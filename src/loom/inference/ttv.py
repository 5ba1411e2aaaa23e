"""``loom generate ttv``: sample a trained turntable-video run (TAPESTRY) without Lightning, DeepSpeed or the
training package. Used by the CLI and by ``loom eval ttv|texture --run``.

A run folder (``loom train ttv --out RUN``) holds ``config.yaml`` (the resolved training config) and ``lora/``:
``pytorch_lora_weights.safetensors`` (diffusers' Wan LoRA format) and ``fusion/`` (``config.json`` +
``model.safetensors``). :func:`load_run` reads the sections of config.yaml that generation needs, builds the
networks as training built them (`loom.models.ttv`: base model folders as trained, ``tiny`` from the run's seed)
and loads the trained weights from safetensors only: nothing in a run folder is unpickled, so a run on a shared
volume cannot run code on whoever generates from it (the Lightning checkpoints in ``checkpoints/`` are not read).

Generation conditions on the sample's normal, position and mask renders with nothing known (the first pass of
TAPESTRY's texturing), its first rgb frame (or ``reference``) as the reference latent and CLIP image, and the
prompt (or the run's prompt template when it has a text encoder); the noise comes from ``seed`` alone.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch

from loom.datasets.codecs import write_video
from loom.models.ttv import (Conditioner, ModelSettings, build_dit, build_encoders, build_vae, latents_to_uint8,
                             sample_latents)

__all__ = ["TTVRun", "condition_batch", "generate_ttv", "latents_to_uint8", "load_run", "read_condition",
           "write_video"]

CONDITION_KEYS = ("rgb", "normal", "position", "mask")
# The fields of a `loom train ttv` config.yaml that generation reads, besides the whole ``model`` section.
RUN_FIELDS = ("data.frames", "data.size", "data.position_radius", "data.text_len", "data.image_len", "data.prompt",
              "flow.shift", "flow.sample_steps", "trainer.seed")


@dataclasses.dataclass
class TTVRun:
    """A trained run, ready to generate: its networks and the settings it was trained with."""

    path: str
    model: ModelSettings
    dit: Any  # loom.models.ttv_dit.TTVDiT, LoRA and fusion weights loaded, eval mode
    conditioner: Conditioner  # the frozen VAE and encoders
    frames: int  # data.frames: frames per video (0 = all)
    size: int  # data.size: frame size (0 = as rendered)
    sample_steps: int
    shift: float
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def vae(self):
        return self.conditioner.vae

    @property
    def text_encoder(self):
        return self.conditioner.encoders["text"]

    def transform(self):
        """The frame subsampling and resizing of the run's training data (None: none)."""
        from loom.datasets.transforms import frame_transform

        return frame_transform(self.frames, self.size)

    def condition(self, batch: dict, known=None) -> dict[str, torch.Tensor]:
        """A batch of condition renders -> the DiT's inputs: nothing known, or the known and inpainting-mask videos
        ``known`` makes from the batch (`loom.models.ttv.KnownVideos`: 3D-aware inpainting, `loom texture`)."""
        with torch.no_grad():
            return self.conditioner(batch, self.dit, self.device, known=known)

    def generate(self, cond: dict[str, torch.Tensor], seed: int = 0) -> torch.Tensor:
        """Conditions -> latents (B,C,T',H',W'), ``sample_steps`` Euler steps from the noise of ``seed``."""
        return sample_latents(self.dit, cond, self.sample_steps, self.shift, seed=seed, device=self.device)

    def video(self, batch: dict, seed: int = 0, known=None) -> np.ndarray:
        """A batch of one -> its generated video (T,H,W,3) uint8 (``known``: see `condition`)."""
        z = self.generate(self.condition(batch, known), seed)
        with torch.no_grad():
            return latents_to_uint8(self.vae, z.float().cpu())[0]


def _read_fields(raw: dict, path: str) -> dict[str, Any]:
    out = {}
    for dotted in RUN_FIELDS:
        node: Any = raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"{path} has no {dotted}: is it the config.yaml of a `loom train ttv` run?")
            node = node[part]
        out[dotted] = node
    return out


def load_run(run: str, *, steps: int | None = None) -> TTVRun:
    """A trained run folder (``loom train ttv --out RUN``) -> its networks with the trained LoRA and fusion
    weights, built from the run's own config.yaml; ``steps`` overrides the run's ``flow.sample_steps``."""
    from loom.inference.run import config_section, local_run, read_run_config

    run = local_run(run, ["config.yaml", "lora"])  # an s3:// run: its local copy
    raw, cfg_path = read_run_config(run, "lora", "loom train ttv")
    lora = os.path.join(run, "lora")
    model = config_section(raw, "model", ModelSettings, cfg_path, required=True)
    f = _read_fields(raw, cfg_path)
    seed = int(f["trainer.seed"])
    dit = build_dit(model, seed)
    dit.load_lora(lora)  # safetensors (LoRA) + GeometryFusion.from_pretrained (safetensors)
    dit.eval()
    vae = build_vae(model, seed)
    conditioner = Conditioner(vae, build_encoders(model), position_radius=float(f["data.position_radius"]),
                              text_len=int(f["data.text_len"]), image_len=int(f["data.image_len"]),
                              prompt=str(f["data.prompt"]))
    return TTVRun(path=run, model=model, dit=dit, conditioner=conditioner, frames=int(f["data.frames"]),
                  size=int(f["data.size"]), sample_steps=int(steps or f["flow.sample_steps"]),
                  shift=float(f["flow.shift"]))


def condition_batch(sample: dict, transform=None) -> dict:
    """One decoded turntable sample (its condition renders) -> a batch of one, after ``transform``."""
    if transform is not None:
        sample = transform(sample, np.random.default_rng(0))
    batch = {k: torch.from_numpy(np.ascontiguousarray(sample[k]))[None] for k in CONDITION_KEYS}
    batch.update({"__key__": [sample["__key__"]], "meta": [sample["meta"]]})
    return batch


def read_condition(data: str, key: str | None, transform=None) -> dict:
    """The sample ``key`` (default: the first) of turntable shards as a batch of one."""
    from loom.datasets.ttv import iter_samples

    for s in iter_samples(data, keys=CONDITION_KEYS):
        if key is None or s["__key__"] == key:
            return condition_batch(s, transform)
    raise KeyError(f"no sample {key!r} in {data}" if key else f"no samples in {data}")


def generate_ttv(run: str, data: str, out: str, *, key: str | None = None, reference: str | None = None,
                 prompt: str | None = None, steps: int | None = None, seed: int = 0) -> str:
    """``loom generate ttv``: condition renders of a mesh (a turntable sample: normal, position and mask videos),
    a reference image (default: the sample's first rgb frame) and a prompt -> a turntable video (H.264 mp4)."""
    model = load_run(run, steps=steps)
    batch = read_condition(data, key, model.transform())
    return write_video(out, model.video(steer(model, batch, reference, prompt), seed))


def steer(model: TTVRun, batch: dict, reference: str | None = None, prompt: str | None = None) -> dict:
    """A batch of one with a user's reference image (as frame 0 of rgb, which the reference latent and the CLIP
    tokens come from; resized to the frames) and prompt (umT5 embeddings of it: the run must have a text encoder);
    unchanged without them. ``loom generate ttv`` and ``loom texture --run`` (every stage) steer with it."""
    check_steering(model, reference, prompt)
    if reference:
        from PIL import Image

        h, w = batch["rgb"].shape[2:4]
        img = np.asarray(Image.open(reference).convert("RGB").resize((w, h), Image.BICUBIC))
        batch = {**batch, "rgb": batch["rgb"].clone()}
        batch["rgb"][:, 0] = torch.from_numpy(img)
    if prompt is not None:
        batch = {**batch, "text_embed": model.text_encoder.encode([prompt])}
    return batch


def check_steering(model: TTVRun, reference: str | None, prompt: str | None) -> None:
    """Refuse a reference image that is not there, or a prompt for a run without a text encoder, by name."""
    if reference and not os.path.isfile(reference):
        raise FileNotFoundError(f"--reference {reference} does not exist: pass an image file (PNG, JPEG)")
    if prompt is not None and model.text_encoder is None:
        raise ValueError("--prompt needs a text encoder: the run was trained without model.text_encoder")
