"""``loom generate 4d``: a mesh sequence from a conditioning video with a finished ``loom train shape4d`` run,
without Lightning (also the generator of ``loom eval 4d --run``).

A run folder holds ``config.yaml`` (the job's resolved config) and ``spatiotemporal/`` (the trained layers as
safetensors, `loom.models.shape4d.save_spatiotemporal`); the base DiT, the shape VAE and DINOv2 come from the
folders its ``model`` section names, as trained. Only the ``model``, ``flow``, ``data.frames`` and ``trainer``
(seed, precision) entries of the config are read, through the same sections training uses
(:mod:`loom.models.shape4d`), so this package never imports :mod:`loom.training`. Nothing here unpickles: the
config is read with ``yaml.safe_load`` and every weight file is safetensors.

Data flow::

    video (T,H,W,4) uint8 -> evenly spread frames -> DINOv2 -> image tokens (1,T,L,D)
      -> sample_4d (shared noise, time shift) -> latents (1,T,Q,C) -> frozen VAE + marching cubes
      -> out/frame_000.obj ... one mesh per frame
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.models.shape4d import Shape4DFlowSettings, Shape4DModelSettings

if TYPE_CHECKING:
    import torch

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


@dataclasses.dataclass
class Shape4DRun:
    """The networks of a finished 4D run, ready to sample: the 4D DiT (base + trained spatiotemporal layers), the
    frozen shape VAE and DINOv2, with the run's ``model`` and ``flow`` sections and ``data.frames``."""

    model: Shape4DModelSettings
    flow: Shape4DFlowSettings
    frames: int  # the run's data.frames: evenly spread frames of a video (0 = all)
    dit: Any
    vae: Any
    image: Any

    def to(self, device) -> Shape4DRun:
        for net in (self.dit, self.vae, self.image):
            net.to(device)
        return self

    def generate(self, image: torch.Tensor, num_latents: int, seed: int = 0, steps: int | None = None,
                 shift: float | None = None, guidance_scale: float | None = None) -> torch.Tensor:
        """Image tokens (B,T,L,D) -> VAE latents (B,T,Q,C) (divided by ``latent_scale``); ``None`` takes the run's
        ``flow`` settings."""
        from loom.models.shape4d import sample_latents

        return sample_latents(self.dit, image, self.flow, num_latents, self.model.latent_scale, seed=seed,
                              steps=steps, shift=shift, guidance_scale=guidance_scale)

    def meshes(self, latents: torch.Tensor, out_dir: str, resolution: int | None = None) -> list[str]:
        """One sequence's latents (T,Q,C) -> ``out_dir/frame_000.obj`` ... (``flow.mesh_resolution`` by
        default)."""
        from loom.models.shape4d import write_mesh_sequence

        return write_mesh_sequence(self.vae, latents, out_dir, resolution or self.flow.mesh_resolution)


def load_run(run: str) -> tuple[Shape4DRun, dict]:
    """A finished ``loom train shape4d`` run folder -> (its networks with the trained spatiotemporal layers, the
    layers' loom.json), built from the run's own config.yaml (base, VAE and DINOv2 folders as trained). Refuses a
    base folder whose weights are no longer those the layers were trained on."""
    from loom.inference.run import config_section, read_run_config
    from loom.models.shape4d import (base_digest, build_base_dit, build_frozen_vae, build_image_encoder,
                                     check_compatible, load_spatiotemporal)

    doc, cfg_path = read_run_config(run, "spatiotemporal", "loom train shape4d")
    layers = os.path.join(run, "spatiotemporal")
    model = config_section(doc, "model", Shape4DModelSettings, cfg_path)
    flow = config_section(doc, "flow", Shape4DFlowSettings, cfg_path)
    data, trainer = doc.get("data") or {}, doc.get("trainer") or {}
    seed = int(trainer.get("seed", 0))  # tiny networks are rebuilt from the seed they were trained with
    dit = build_base_dit(model, seed)
    vae, image = build_frozen_vae(model, seed), build_image_encoder(model, seed)
    check_compatible(dit, vae, image)
    info = load_spatiotemporal(dit, layers)
    # DeepSpeed cast the base to bf16 under bf16 precision, so training took its digest in that dtype.
    precision = str(trainer.get("precision", "32"))
    dtype = info.get("digest_dtype") or ("bfloat16" if precision.startswith("bf16") else "float32")
    if info.get("base_digest_start") and info["base_digest_start"] != base_digest(dit, dtype):
        raise ValueError(f"the base DiT at model.base={model.base!r} is not the one {run!r} was trained on "
                         "(its weights' digest differs): restore that base folder")
    dit.eval()
    return Shape4DRun(model=model, flow=flow, frames=int(data.get("frames", 0)), dit=dit, vae=vae,
                      image=image), info


def read_conditioning_video(data: str, key: str | None = None) -> tuple[np.ndarray, str]:
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
    import torch

    from loom.datasets.transforms import frame_indices

    model, info = load_run(run)
    if torch.cuda.is_available():
        model.to("cuda")
    video, _ = read_conditioning_video(data, key)
    n = frames if frames is not None else model.frames
    if n:
        video = video[frame_indices(len(video), n, "uniform")]
    with torch.no_grad():
        image = model.image.encode(video[None])  # (1, T, L, D)
    q = latents or info.get("latents_per_frame") or model.dit.config.num_latents
    z = model.generate(image, q, seed=seed, steps=steps, shift=shift, guidance_scale=guidance_scale)
    return model.meshes(z[0].cpu(), out, resolution)
