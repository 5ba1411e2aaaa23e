"""``loom generate 4d``: a mesh sequence from a conditioning video with a finished ``loom train shape4d`` run,
without Lightning (also the generator of ``loom eval 4d --run``); ``loom generate 3d``: one mesh from one image with
the base model alone (`generate_3d`: the released Step1X-3D folder, or tiny), the check that its weights loaded
right.

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
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.inference.video4d import IMAGE_EXTS, VIDEO_EXTS, read_video
from loom.models.shape4d import Shape4DFlowSettings, Shape4DModelSettings

if TYPE_CHECKING:
    import torch



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
    from loom.inference.run import config_section, local_run, read_run_config
    from loom.models.shape4d import (base_digest, build_base_dit, build_frozen_vae, build_image_encoder,
                                     check_compatible, load_spatiotemporal)

    run = local_run(run, ["config.yaml", "spatiotemporal"])  # an s3:// run: its local copy
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
    is_file = os.path.isfile(data) and data.lower().endswith(VIDEO_EXTS)
    is_frames = (os.path.isdir(data) and not os.path.exists(os.path.join(data, "manifest.json"))
                 and any(n.lower().endswith(IMAGE_EXTS) for n in os.listdir(data)))
    if is_file or is_frames:
        v = read_video(data).frames
        if v.shape[-1] == 3:  # no alpha plane: all object
            v = np.concatenate([v, np.full(v.shape[:-1] + (1,), 255, np.uint8)], -1)
        return v, os.path.basename(os.path.normpath(data))
    from loom.datasets.shape4d import iter_samples

    try:
        for s in iter_samples(data, keys=("video",)):
            if key is None or s["__key__"] == key:
                return s["video"], s["__key__"]
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--data {data!r} is neither 4D shards, a video file ({', '.join(VIDEO_EXTS)}) nor a folder "
                         f"of frames ({', '.join(IMAGE_EXTS)}): {e}") from e
    raise KeyError(f"no sample {key!r} in {data}" if key else f"no samples in {data}")


BASELINES = {"step1x3d": False, "step1x3d-shared": True}  # Tab. 1: the base per frame, without / with shared noise


def generate_4d(run: str, data: str, out: str, *, key: str | None = None, frames: int | None = None,
                steps: int | None = None, shift: float | None = None, seed: int = 0,
                resolution: int | None = None, latents: int | None = None,
                guidance_scale: float | None = None, baseline: str | None = None) -> list[str]:
    """``loom generate 4d``: a conditioning video -> per-frame DINOv2 tokens -> `sample_4d` (shared noise, time
    shift) -> frozen VAE -> marching cubes: ``out/frame_000.obj`` ... one mesh per frame. ``baseline``: the rows of
    ShapeGen4D's Tab. 1 ablation from the same run's base, without its spatiotemporal layers: ``step1x3d`` (each
    frame on its own noise) or ``step1x3d-shared`` (one noise for all frames)."""
    import torch

    from loom.datasets.transforms import frame_indices

    model, info = load_run(run)
    if baseline is not None:
        if baseline not in BASELINES:
            raise ValueError(f"--baseline {baseline!r}: use one of {list(BASELINES)}")
        model.dit.spatiotemporal_layers = torch.nn.ModuleList()  # the base alone, run per frame
        model.flow = dataclasses.replace(model.flow, shared_noise=BASELINES[baseline])
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


# ============================================================================================== mesh sequences

SEQUENCE_MESH_EXTS = (".obj", ".ply", ".off", ".stl")
FRAME_FILE = re.compile(r"^frame_(\d+)\.(obj|ply|off|stl)$", re.IGNORECASE)


def frame_files(folder: str) -> list[str]:
    """The per-frame mesh files of a sequence folder (local or a URL), ``frame_000.obj``, ``frame_001.obj``, ... by
    frame number (what ``loom generate 4d`` writes and ``loom eval 4d`` reads); [] when there is none. Two files for
    one frame, or a gap in the numbering, is an error naming the folder."""
    from loom.platform import storage

    found = {}
    for name in storage.listdir(folder):
        m = FRAME_FILE.match(name)
        if m:
            i = int(m.group(1))
            if i in found:
                raise ValueError(f"{folder}: two files for frame {i}: {found[i]} and {name}")
            found[i] = name
    if found and sorted(found) != list(range(len(found))):
        raise ValueError(f"{folder}: frames {sorted(found)} are not numbered 0..{len(found) - 1}")
    return [storage.join(folder, found[i]) for i in sorted(found)]


def read_mesh(url: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A mesh file -> (vertices (V,3) float64, faces (F,3) int64, or None for a point cloud)."""
    import io

    import trimesh

    from loom.platform import storage

    data = storage.read_bytes(url)
    if not data.strip() or all(ln.startswith(b"#") for ln in data.strip().splitlines()):
        raise ValueError(f"{url} is an empty mesh")
    try:
        geom = trimesh.load(io.BytesIO(data), file_type=url.rsplit(".", 1)[-1].lower(), process=False)
    except Exception as e:  # trimesh raises many types for a broken file
        raise ValueError(f"{url}: not a readable mesh ({e})") from e
    if isinstance(geom, trimesh.Scene):
        geom = geom.dump(concatenate=True) if geom.geometry else None
    v = np.asarray(getattr(geom, "vertices", np.zeros((0, 3))), np.float64)
    if len(v) == 0:
        raise ValueError(f"{url} is an empty mesh")
    f = np.asarray(getattr(geom, "faces", np.zeros((0, 3))), np.int64).reshape(-1, 3)
    return v, (f if len(f) else None)


# ============================================================================================== loom generate 3d

MESH_EXTS = (".glb", ".obj", ".ply")
# Step1X-3D's pipeline defaults (`Step1X3DGeometryPipeline.__call__`): classifier-free guidance against zero image
# tokens at 7.5, and the object scaled to fill 90 % of the image before DINOv2 sees it.
STEP1X3D_GUIDANCE = 7.5
STEP1X3D_FOREGROUND = 0.9
# The release's image-encoder folder (Step1X-3D's own ``Dinov2Encoder`` wrapper, not a transformers folder) and the
# config fields in it that name the DINOv2 it wraps (frozen in training: the Hub checkpoint's weights).
RELEASE_IMAGE_ENCODER = "visual_encoder"
RELEASE_DINO_FIELDS = ("pretrained_dino_name_or_path", "dino_type")


@dataclasses.dataclass(frozen=True)
class Generated3D:
    """What ``loom generate 3d`` wrote: the mesh file and its size, and the folders the three networks came from."""

    path: str
    vertices: int
    faces: int
    base: str
    vae: str
    image_encoder: str


def read_image(path: str) -> np.ndarray:
    """An image file -> (H, W, 4) uint8 RGBA (straight alpha) or (H, W, 3) uint8 RGB (no alpha channel: taken as
    the object already on a white background, as Step1X-3D's preprocessing leaves it; nothing removes a
    background here)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path!r} does not exist: pass an image file of the object "
                                f"({', '.join(IMAGE_EXTS)}; RGBA with the background transparent, or RGB on white)")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            return np.array(im.convert("RGBA" if alpha else "RGB"))  # a writable copy for torch
    except UnidentifiedImageError as e:
        raise ValueError(f"--image {path!r} is not an image PIL can read: {e}") from e


def frame_object(image: np.ndarray, ratio: float = STEP1X3D_FOREGROUND) -> np.ndarray:
    """Step1X-3D's framing of an RGBA image: the alpha's bounding box scaled (aspect kept) to fill ``ratio`` of the
    image, centred, then padded to a square with transparency; (S, S, 4) uint8. RGB images, images with no
    transparent pixel, a blank alpha and ``ratio`` 0 are returned as they are (ImageFeatures then centre-crops)."""
    if not ratio or image.shape[-1] != 4 or image[..., 3].min() == 255 or not image[..., 3].any():
        return image
    from PIL import Image

    h, w = image.shape[:2]
    rows, cols = np.nonzero(image[..., 3])
    y1, y2, x1, x2 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    scale = min(h * ratio / (y2 - y1), w * ratio / (x2 - x1))
    size = (max(1, int((x2 - x1) * scale)), max(1, int((y2 - y1) * scale)))  # (W, H) for PIL
    # PIL premultiplies RGBA while resampling, so transparent pixels' colours do not bleed into the object's edge.
    obj = Image.fromarray(np.ascontiguousarray(image[y1:y2, x1:x2])).resize(size, Image.BICUBIC)
    side = max(h, w)
    canvas = np.zeros((side, side, 4), np.uint8)  # transparent
    top, left = (side - size[1]) // 2, (side - size[0]) // 2
    canvas[top: top + size[1], left: left + size[0]] = np.asarray(obj)
    return canvas


def _release_image_encoder(base: str) -> str:
    """The image encoder a base folder supplies ('' for none): ``BASE/visual_encoder`` when it is a transformers
    DINOv2 folder, else the Hub id its Step1X-3D ``Dinov2Encoder`` config names (found in the local cache)."""
    import json

    folder = os.path.join(base, RELEASE_IMAGE_ENCODER)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        return ""
    with open(cfg_path) as f:
        cfg = json.load(f)
    if str(cfg.get("model_type", "")).startswith("dinov2"):
        return folder
    for name in RELEASE_DINO_FIELDS:
        if cfg.get(name):
            return str(cfg[name])
    raise ValueError(f"{cfg_path} is neither a transformers DINOv2 config nor a Step1X-3D Dinov2Encoder config "
                     f"naming its DINOv2 ({' or '.join(RELEASE_DINO_FIELDS)}): pass --image-encoder DIR")


def resolve_3d_models(base: str, vae: str | None = None, image_encoder: str | None = None) -> Shape4DModelSettings:
    """The ``model`` section for ``--base`` [``--vae``] [``--image-encoder``]: local paths (Hugging Face repo ids
    resolved in the local cache), or ``tiny``. A released Step1X-3D folder (``Step1X-3D-Geometry-1300m``) supplies
    its own VAE (``BASE/vae``) and DINOv2 (``BASE/visual_encoder``) unless they are given."""
    from loom.models.shape4d import TINY
    from loom.platform.hub import resolve_model_path

    if not base:
        raise FileNotFoundError("--base is empty: pass the released Step1X-3D folder (Step1X-3D-Geometry-1300m, "
                                "local or a cached Hugging Face id such as stepfun-ai/Step1X-3D/"
                                "Step1X-3D-Geometry-1300m), a Shape4DDiT base folder, or 'tiny'")
    if base != TINY:
        try:
            base = resolve_model_path(base, "--base")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} (--base takes the released Step1X-3D-Geometry-1300m folder, a "
                                    "Shape4DDiT base folder, or 'tiny')") from e
        if not os.path.isdir(base):
            raise FileNotFoundError(f"--base {base!r} is a file: pass the base model's folder (the released "
                                    "Step1X-3D-Geometry-1300m folder or a Shape4DDiT base folder)")
    if vae:
        vae = vae if vae == TINY else resolve_model_path(vae, "--vae")
    elif base == TINY:
        vae = TINY
    elif os.path.isdir(os.path.join(base, "vae")):
        vae = os.path.join(base, "vae")
    else:
        raise FileNotFoundError(f"--vae is not given and --base {base!r} has no vae/ folder: pass --vae DIR (the "
                                "released Step1X-3D vae/ folder or a `loom train vae` OUT/vae)")
    if image_encoder:
        image_encoder = image_encoder if image_encoder == TINY else resolve_model_path(image_encoder,
                                                                                        "--image-encoder")
    elif base == TINY:
        image_encoder = TINY
    else:
        named = _release_image_encoder(base)
        if not named:
            raise FileNotFoundError(f"--image-encoder is not given and --base {base!r} has no {RELEASE_IMAGE_ENCODER}/"
                                    "folder: pass --image-encoder DIR (a local DINOv2 folder, or a cached Hugging "
                                    "Face id such as facebook/dinov2-with-registers-large)")
        image_encoder = resolve_model_path(named, f"--image-encoder (named by {base}/{RELEASE_IMAGE_ENCODER})")
    return Shape4DModelSettings(base=base, vae=vae, image_encoder=image_encoder)


def build_base_alone(m: Shape4DModelSettings, seed: int = 0):
    """The base DiT of ``m.base`` WITHOUT spatiotemporal layers (a 3D model: one frame), frozen, in eval mode.
    `build_base_dit` would add 36 zero-initialised layers at full size (0.89 B parameters) that change nothing."""
    from loom.models.shape4d import TINY
    from loom.models.shape4d_dit import Shape4DDiT

    variant = dict(spatiotemporal=False, attention_backend=m.attention_backend)
    dit = Shape4DDiT.tiny(seed=seed, **variant) if m.base == TINY else Shape4DDiT.from_pretrained(m.base, **variant)
    return dit.eval().requires_grad_(False)


def write_mesh_atomic(path: str, vertices: np.ndarray, faces: np.ndarray) -> str:
    """`write_mesh` to a temporary file beside ``path`` (same extension, so the same format), then renamed over it:
    a reader never sees half a mesh, and a failed write leaves no file behind."""
    from loom.models.shape4d import write_mesh

    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}{os.path.splitext(name)[1]}")
    try:
        write_mesh(tmp, vertices, faces)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def generate_3d(image: str, base: str, out: str, *, vae: str | None = None, image_encoder: str | None = None,
                steps: int | None = None, seed: int = 0, resolution: int | None = None, latents: int | None = None,
                guidance_scale: float = STEP1X3D_GUIDANCE, foreground_ratio: float = STEP1X3D_FOREGROUND,
                device: str | None = None) -> Generated3D:
    """``loom generate 3d``: the base shape model ALONE, one image -> one mesh (the check that a base's weights
    loaded right).

    image -> `frame_object` -> DINOv2 tokens (1, 1, L, D) -> `sample_latents` (the 4D sampler with T = 1: time shift
    sqrt(1) = 1, as the release's FlowMatchEuler; ``Shape4DFlowSettings`` defaults otherwise) -> latents (Q, C) ->
    shape VAE + marching cubes over [-1.05, 1.05]^3 -> ``out`` (.glb, .obj or .ply), written atomically.
    ``latents``: Q (default: the VAE's ``num_latents``, 2,048 for the release, as its pipeline draws);
    ``resolution``: the marching-cubes grid (default ``flow.mesh_resolution``). Nothing is logged to MLflow."""
    import torch

    from loom.models.shape4d import Shape4DFlowSettings, build_frozen_vae, build_image_encoder, check_compatible

    ext = os.path.splitext(out)[1].lower()
    if ext not in MESH_EXTS:
        raise ValueError(f"--out {out!r}: unknown mesh format {ext or '(no extension)'!r}; use one of "
                         f"{', '.join(MESH_EXTS)}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps} must be >= 1")
    if resolution is not None and resolution < 2:
        raise ValueError(f"--resolution {resolution} must be >= 2")
    if latents is not None and latents < 1:
        raise ValueError(f"--latents {latents} must be >= 1")
    if not 0.0 <= foreground_ratio <= 1.0:
        raise ValueError(f"foreground_ratio={foreground_ratio} must be in [0, 1] (0: no framing)")
    pixels = frame_object(read_image(image), foreground_ratio)
    model = resolve_3d_models(base, vae, image_encoder)
    flow = Shape4DFlowSettings()
    dit = build_base_alone(model, seed)
    shape_vae, encoder = build_frozen_vae(model, seed), build_image_encoder(model, seed)
    check_compatible(dit, shape_vae, encoder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for net in (dit, shape_vae, encoder):
        net.to(device)
    with torch.no_grad():
        tokens = encoder.encode(pixels[None, None])  # (1, 1, L, D)
    from loom.models.shape4d import sample_latents

    z = sample_latents(dit, tokens, flow, latents or shape_vae.config.num_latents, model.latent_scale, seed=seed,
                       steps=steps, guidance_scale=guidance_scale)  # (1, 1, Q, C)
    with torch.no_grad():
        v, f = shape_vae.extract_mesh(z[0, 0], resolution=resolution or flow.mesh_resolution)
    if len(f) == 0:
        raise RuntimeError(f"the generated shape is empty (its SDF does not cross zero in the grid); nothing written "
                           f"to {out}: check that --base, --vae and --image-encoder are the weights you meant")
    write_mesh_atomic(out, v, f)
    return Generated3D(path=out, vertices=len(v), faces=len(f), base=model.base, vae=model.vae,
                       image_encoder=model.image_encoder)
