"""What training (`loom train shape4d`) and inference (`loom generate 4d`) share about ShapeGen4D's 4D shape model,
so that neither imports the other: the run config's ``model`` and ``flow`` sections, the builders of the three
networks from them, the check that they belong together, the base's digest, the spatiotemporal layers' weight
files, the sampler call and the mesh files.

Design choices:

- The 4D DiT of a run is a frozen base (``model.base``, a ``Shape4DDiT.save_pretrained`` folder saved with
  ``spatiotemporal=False``) plus the trained spatiotemporal layers; only those layers are written
  (``OUT/spatiotemporal``: ``config.json``, ``spatiotemporal.safetensors``, ``loom.json``). The base is never
  copied into a run, so a run folder is only as trustworthy as the base it names: :func:`base_digest` is taken
  when training starts and ends and checked again when a run is loaded.
- Every weight file read here is safetensors (or, for DINOv2, a local transformers folder with
  ``model.safetensors``): nothing in a run folder is unpickled.
- ``tiny`` in place of a folder builds a random tiny network from the run's seed (tests, demo); such weights are
  never saved and come back from the seed.
- No Lightning, DeepSpeed or Ray here; torch, safetensors and trimesh are imported inside the functions, so the
  config sections stay as light as the rest of a job's config.

Shapes::

    image tokens  (B, T, L, D_img)  per-frame DINOv2 features (`build_image_encoder(...).encode(video)`)
    latents       (B, T, Q, C)      shape-VAE latents of B sequences of T frames (`sample_latents`)
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Literal

import numpy as np

from loom.platform.hub import resolve_model_path
from loom.platform.config import config, field, require

if TYPE_CHECKING:
    import torch

TINY = "tiny"


# ============================================================================================== config sections


@config
class Shape4DModelSettings:
    base: str = field("", help="local folder of the pretrained base DiT (Shape4DDiT.save_pretrained with "
                      "spatiotemporal=False), or 'tiny' (random, tests)")
    vae: str = field("", help="local folder of the trained shape VAE (`loom train vae` OUT/vae), or 'tiny'")
    image_encoder: str = field("", help="local DINOv2 folder (transformers Dinov2Model, e.g. facebook/dinov2-large "
                               "copied to disk), or 'tiny'")
    image_size: int = field(0, help="DINOv2 input size (0 = the encoder's config: 518 for DINOv2-L, 1,370 tokens)")
    temporal: Literal["full", "1d"] = field("full", help="spatiotemporal attention over all tokens of all frames "
                                            "(full), or each token along time only (1d, ablation)")
    st_image_tokens: bool = field(True, help="image tokens take part in the spatiotemporal attention (false: "
                                  "ablation 'w/o image hidden states')")
    attention_backend: Literal["auto", "flash", "efficient", "math", "cudnn"] = field(
        "auto", help="SDPA kernels (auto never picks cuDNN: see loom.models.shape4d_dit)")
    latent_scale: float = field(1.0, help="x0 = VAE posterior mean x latent_scale (the base's latent scaling)")
    dtype: Literal["float32", "bfloat16"] = field("float32", help="dtype of the frozen VAE and image encoder")
    vae_chunk: int = field(16, help="frames the frozen VAE encodes at once")

    def __post_init__(self):
        require(self.image_size >= 0, "model.image_size", self.image_size, "must be >= 0 (0 = the encoder's)")
        require(self.latent_scale > 0, "model.latent_scale", self.latent_scale, "must be > 0")
        require(self.vae_chunk >= 1, "model.vae_chunk", self.vae_chunk, "must be >= 1")


@config
class Shape4DFlowSettings:
    shared_noise: bool = field(True, help="one noise for all frames of a sequence, in training and sampling (3.2; "
                               "false: ablation 'w/o shared noise')")
    train_shift: float = field(1.0, help="time shift of the training sigmas (3.2: of little effect; 1 = none)")
    density: Literal["uniform", "logit_normal"] = field("uniform", help="density of training sigmas before the "
                                                        "shift")
    shift: float = field(0.0, help="time shift of the sampler (0 = sqrt(frames), SD3's resolution rule; 1 = no "
                         "shift, ablation 'w/o time shift')")
    sample_steps: int = field(50, help="Euler steps of the sampler")
    guidance_scale: float = field(1.0, help="classifier-free guidance against zero image tokens (1 = off)")
    sample_every: int = field(0, help="log a sample mesh sequence to MLflow every N steps (0 = at the end only)")
    mesh_resolution: int = field(128, help="marching-cubes grid of the sample meshes")

    def __post_init__(self):
        require(self.train_shift > 0, "flow.train_shift", self.train_shift, "must be > 0")
        require(self.shift >= 0, "flow.shift", self.shift, "must be >= 0 (0 = sqrt(frames))")
        require(self.sample_steps >= 1, "flow.sample_steps", self.sample_steps, "must be >= 1")
        require(self.sample_every >= 0, "flow.sample_every", self.sample_every, "must be >= 0")
        require(self.mesh_resolution >= 2, "flow.mesh_resolution", self.mesh_resolution, "must be >= 2")


# ============================================================================================== networks


def build_base_dit(m: Shape4DModelSettings, seed: int):
    """The 4D DiT: the base from ``model.base`` (or tiny) with fresh zero-initialised spatiotemporal layers of the
    configured variant, the base frozen."""
    from loom.models.shape4d_dit import Shape4DDiT

    variant = dict(spatiotemporal=True, temporal=m.temporal, st_image_tokens=m.st_image_tokens,
                   attention_backend=m.attention_backend)
    if m.base == TINY:
        dit = Shape4DDiT.tiny(seed=seed, **variant)
    else:
        if not m.base:
            raise FileNotFoundError("model.base is not set: pass --set model.base=DIR (the released "
                                    "Step1X-3D-Geometry-1300m folder or its transformer/, local or in the Hugging "
                                    "Face cache, or a Loom base folder saved with spatiotemporal=False) or use "
                                    "--recipe tiny")
        dit = Shape4DDiT.from_pretrained(resolve_model_path(m.base, "model.base"), **variant)
    dit.freeze_base()
    return dit


def build_frozen_vae(m: Shape4DModelSettings, seed: int):
    """The trained shape VAE of ``model.vae`` (or tiny), in eval mode without gradients."""
    import torch

    from loom.models.shape_vae import ShapeVAE

    if m.vae == TINY:
        vae = ShapeVAE.tiny(seed=seed)
    else:
        if not m.vae:
            raise FileNotFoundError("model.vae is not set: pass --set model.vae=DIR (a trained shape VAE, "
                                    "`loom train vae` OUT/vae) or use --recipe tiny")
        vae = ShapeVAE.from_pretrained(resolve_model_path(m.vae, "model.vae"), torch_dtype=getattr(torch, m.dtype))
    return vae.eval().requires_grad_(False)


def build_image_encoder(m: Shape4DModelSettings, seed: int):
    """DINOv2 of ``model.image_encoder`` (or tiny), in eval mode without gradients."""
    from loom.models.shape4d_dit import ImageFeatures, load_image_features

    if m.image_encoder == TINY:
        enc = ImageFeatures.tiny(seed=seed, **({"image_size": m.image_size} if m.image_size else {}))
    else:
        if not m.image_encoder:
            raise FileNotFoundError("model.image_encoder is not set: pass --set model.image_encoder=DIR (a local "
                                    "DINOv2 folder, or facebook/dinov2-with-registers-large in the local Hugging "
                                    "Face cache: Step1X-3D's) or use --recipe tiny")
        enc = load_image_features(resolve_model_path(m.image_encoder, "model.image_encoder"), m.dtype,
                                  image_size=m.image_size or None)
    return enc.eval().requires_grad_(False)


def check_compatible(dit, vae, image) -> None:
    """Refuse a VAE or image encoder whose widths are not the DiT's."""
    c = dit.config
    if vae.config.latent_channels != c.latent_channels:
        raise ValueError(f"the shape VAE makes {vae.config.latent_channels}-channel latents but the DiT models "
                         f"{c.latent_channels}: model.vae and model.base must belong together")
    if image.dim != c.image_dim:
        raise ValueError(f"the image encoder gives {image.dim}-wide tokens but the DiT takes {c.image_dim}: "
                         "model.image_encoder and model.base must belong together")


def weights_digest(module, dtype: str = "float32", skip_prefix: str | None = None) -> str:
    """sha256 of a module's weights in sorted key order, each cast to ``dtype`` (names and values, keys starting
    with ``skip_prefix`` left out; the runs saved before this function existed hashed the same). Cast to bfloat16
    it names a frozen encoder whatever dtype it was loaded in: float32 weights and the same weights loaded as
    bfloat16 give one digest."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        if skip_prefix and k.startswith(skip_prefix):
            continue
        h.update(k.encode())
        h.update(v.detach().to(getattr(torch, dtype)).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_digest(dit, dtype: str = "float32") -> str:
    """sha256 of the base's weights (everything but the spatiotemporal layers), in sorted key order, as ``dtype``."""
    from loom.models.shape4d_dit import ST_PREFIX

    return weights_digest(dit, dtype, ST_PREFIX)


def encoder_record(vae, image) -> dict:
    """What names the frozen encoders whose outputs a 4D latent cache holds, so training can refuse a cache made
    with other ones: the weights of each (bfloat16 digest: the dtype they ran in does not matter), the latents'
    width and the image features' preprocessing, size and token count."""
    return {"vae": {"class": type(vae).__name__, "weights_bf16_sha256": weights_digest(vae, "bfloat16"),
                    "latent_channels": vae.config.latent_channels, "sharp_edges": bool(vae.config.sharp_edges)},
            "image_encoder": {"class": type(image.model).__name__,
                              "weights_bf16_sha256": weights_digest(image.model, "bfloat16"), "dim": image.dim,
                              "tokens": image.tokens, "image_size": image.image_size,
                              "preprocessing": image.preprocessing}}


# ============================================================================================== layer files

ST_WEIGHTS = "spatiotemporal.safetensors"
ST_INFO = "loom.json"


def save_spatiotemporal(dit, path: str, info: dict) -> None:
    """``path/config.json`` (the 4D DiT's config), ``path/spatiotemporal.safetensors`` (the trained layers only)
    and ``path/loom.json`` (the base they were trained on, its digests, the latents per frame)."""
    from safetensors.torch import save_file

    from loom.models.shape4d_dit import CONFIG_NAME

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump({"_class_name": type(dit).__name__, **dit.config.to_dict()}, f, indent=2, sort_keys=True)
    save_file({k: v.detach().float().contiguous() for k, v in dit.spatiotemporal_state_dict().items()},
              os.path.join(path, ST_WEIGHTS))
    with open(os.path.join(path, ST_INFO), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)


def load_spatiotemporal(dit, path: str) -> dict:
    """Load what :func:`save_spatiotemporal` wrote into a 4D DiT of the same variant; returns its loom.json."""
    from safetensors.torch import load_file

    from loom.models.shape4d_dit import CONFIG_NAME, ST_PREFIX

    for name in (CONFIG_NAME, ST_WEIGHTS, ST_INFO):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{path!r} has no {name}: is it the spatiotemporal/ folder of a finished "
                                    "`loom train shape4d` run?")
    with open(os.path.join(path, CONFIG_NAME)) as f:
        saved = json.load(f)
    saved.pop("_class_name", None)
    mine = dit.config.to_dict()
    differ = {k: (saved.get(k), v) for k, v in mine.items() if k != "attention_backend" and saved.get(k) != v}
    if differ:
        raise ValueError(f"{path!r} holds spatiotemporal layers of another model: (saved, this) differ in {differ}")
    state = load_file(os.path.join(path, ST_WEIGHTS))
    missing, unexpected = dit.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(ST_PREFIX)]
    if missing or unexpected:
        raise ValueError(f"{path!r}: weights do not match the spatiotemporal layers: missing {sorted(missing)[:4]} "
                         f"({len(missing)}), unexpected {sorted(unexpected)[:4]} ({len(unexpected)})")
    with open(os.path.join(path, ST_INFO)) as f:
        return json.load(f)


# ============================================================================================== sampling, meshes


def sample_latents(dit, image: torch.Tensor, flow: Shape4DFlowSettings, num_latents: int, latent_scale: float,
                   seed: int = 0, steps: int | None = None, shift: float | None = None,
                   guidance_scale: float | None = None) -> torch.Tensor:
    """Image tokens (B,T,L,D) -> VAE latents (B,T,Q,C) float32 (divided by ``latent_scale``) by
    `shape4d_flow.sample_4d`; ``None`` takes the ``flow`` section's value. The DiT is left in the mode it was."""
    import torch

    from loom.models.shape4d_flow import sample_4d

    shift = flow.shift if shift is None else shift
    was = dit.training
    dit.eval()
    try:
        with torch.no_grad():
            z = sample_4d(dit, image.to(dit.device), steps=steps or flow.sample_steps, shift=shift or None,
                          generator=torch.Generator().manual_seed(seed), shared=flow.shared_noise,
                          num_latents=num_latents,
                          guidance_scale=flow.guidance_scale if guidance_scale is None else guidance_scale)
    finally:
        dit.train(was)
    return z.float() / latent_scale


def write_mesh(path: str, vertices: np.ndarray, faces: np.ndarray) -> str:
    """A mesh file (.obj, .ply, ... by extension, through trimesh); an empty mesh is written as an empty file of
    that format, so a sequence keeps one file per frame."""
    import trimesh

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if len(faces) == 0 and path.lower().endswith(".obj"):  # trimesh writes a bare "v" and "f" line
        with open(path, "w") as f:
            f.write("# empty mesh: the signed distance does not cross zero inside the grid\n")
        return path
    trimesh.Trimesh(vertices=np.asarray(vertices, np.float64).reshape(-1, 3),
                    faces=np.asarray(faces, np.int64).reshape(-1, 3), process=False).export(path)
    return path


def write_mesh_sequence(vae, latents: torch.Tensor, out_dir: str, resolution: int) -> list[str]:
    """One sequence's latents (T,Q,C) -> ``out_dir/frame_000.obj`` ... by the VAE's decoder and marching cubes."""
    import torch

    paths = []
    with torch.no_grad():
        for i, z in enumerate(latents):
            v, f = vae.extract_mesh(z.to(vae.device), resolution=resolution)
            paths.append(write_mesh(os.path.join(out_dir, f"frame_{i:03d}.obj"), v, f))
    return paths
