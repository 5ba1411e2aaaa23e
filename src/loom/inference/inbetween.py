"""``loom generate inbetween``: VideoFrom3D's GGI module at inference (section 3.3): anchor views at keyframes of a
camera trajectory + the scene's structure (edges) and warped noise along it -> the video between them.

Data flow::

    coarse geometry + trajectory --`loom render scene` (the scene job: edges, geometric flow, warped noise)-->
        one scene sample: edges (T,H,W,4), noise (T,C,h,w) at the video frame rate          (or --data: given)
    anchors DIR: <frame index>.png (e.g. 0000.png, 0045.png, 0090.png), fitted to H x W
    for each pair of consecutive keyframes a < b (a segment of n = b - a + 1 frames):
        edges[a..b] (any edge kind)  -> padded to F = 1 + 4k frames (last frame repeated) -> [-1, 1], 3 channels
        noise[a..b] -> padded likewise -> `compress_time` (latent frame rate) -> blended with fresh noise
                       (variance-preserving, ``degradation``, the authors' 0.5)
        start = the anchor at a (the first segment) or the previous segment's last generated frame; end = anchor b
        GGI (`loom.models.ggi.sample`, the run's transformer and scheduler) -> F frames, the first n kept
    the segments joined: each segment after the first drops its first frame (the previous one's last), so the
    video has exactly max(index) - min(index) + 1 frames and no frame is shown twice at a join.

Chaining as the authors' script does: a segment starts from the frame the previous segment generated for the shared
keyframe, not from the anchor image again, so the join has no jump between two versions of one view.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


@dataclasses.dataclass
class GGIRun:
    """A trained `loom train ggi` run, ready to generate."""

    path: str
    transformer: Any
    vae: Any
    scheduler: Any
    text_len: int
    steps: int
    degradation: float
    text: Any = None  # loom.models.ggi.T5Prompts, when the run was trained with a text encoder
    prompt: str = ""  # the run's model.prompt
    guidance: float = 1.0
    structure: str = "edges"  # the run's data.structure: "none" for a model trained without the edge video


def load_ggi_run(run: str, steps: int | None = None, degradation: float | None = None,
                 guidance: float | None = None) -> GGIRun:
    """The run's trained transformer (``run/transformer``) and its frozen VAE, scheduler and sampling settings, from
    its config.yaml (read as data: generation needs no training code)."""
    import yaml

    from loom.models import ggi
    from loom.platform.config import from_dict

    from loom.inference.run import local_run

    run = local_run(run)  # an s3:// run: its local copy (config.yaml, transformer/)
    cfg_path = os.path.join(run, "config.yaml")
    folder = os.path.join(run, "transformer")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"--run {run}: no config.yaml: not a `loom train ggi` run folder")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"--run {run}: no transformer/ (written when training ends): finish the run, or "
                                "resume it with `loom train ggi --resume`")
    with open(cfg_path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw.get("model"), dict) or "objective" not in raw["model"]:
        raise ValueError(f"--run {run}: its config.yaml has no GGI model section: not a `loom train ggi` run")
    m = from_dict(ggi.GGIModelSettings, raw["model"], "model.")
    sample = raw.get("sample") or {}
    trained = dataclasses.replace(m, transformer=folder, flow_lora="")  # the saved transformer has it merged
    return GGIRun(path=run, transformer=ggi.build_transformer(trained).eval(), vae=ggi.build_vae(trained),
                  scheduler=ggi.make_scheduler(m.transformer, m.objective), text_len=m.text_len,
                  steps=steps or int(sample.get("steps", 50)),
                  degradation=float(sample.get("degradation", 0.5)) if degradation is None else degradation,
                  text=ggi.T5Prompts(m.text_encoder, m.tokenizer, m.text_len) if m.text_encoder else None,
                  prompt=m.prompt, guidance=float(sample.get("guidance", 1.0)) if guidance is None else guidance,
                  structure=str((raw.get("data") or {}).get("structure", "edges")))


def load_ggi_checkpoint(transformer: str, base: str, steps: int | None = None, degradation: float | None = None,
                        guidance: float | None = None) -> GGIRun:
    """A released GGI transformer (the authors' ``checkpoint-N/transformer``: 48 input channels, flow LoRA merged)
    with the VAE, T5 and scheduler of its base (a CogVideoX-5B-I2V diffusers folder), at the authors' inference
    settings unless given: 30 DDIM steps, degradation 0.5, guidance 6.0 (with T5; 1.0 without)."""
    import os as _os

    from loom.models import ggi

    root = resolve_base(base)
    has_text = _os.path.isdir(_os.path.join(root, "text_encoder"))
    m = ggi.GGIModelSettings(transformer=transformer, vae=root, text_encoder=root if has_text else "")
    folder = ggi.transformer_folder(transformer)
    with open(_os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("in_channels") != 3 * cfg.get("out_channels", -1):
        raise ValueError(f"--transformer {transformer} takes {cfg.get('in_channels')} input channels: not a GGI "
                         f"transformer ({3 * cfg.get('out_channels', 0)}: noisy + anchors + edges); a base I2V "
                         "model would generate without the edges: train one with `loom train ggi`")
    tr = ggi.build_transformer(m).eval()
    return GGIRun(path=transformer, transformer=tr, vae=ggi.build_vae(m), scheduler=ggi.make_scheduler(root),
                  text_len=m.text_len, steps=steps or 30, degradation=0.5 if degradation is None else degradation,
                  text=ggi.T5Prompts(root, "", m.text_len) if has_text else None, prompt="",
                  guidance=(6.0 if has_text else 1.0) if guidance is None else guidance)


def resolve_base(base: str) -> str:
    from loom.platform.hub import resolve_model_path

    root = resolve_model_path(base, "--base")
    if not os.path.isfile(os.path.join(root, "vae", "config.json")):
        raise FileNotFoundError(f"--base {base}: no vae/config.json: give CogVideoX-5B-I2V's diffusers folder "
                                "(vae/, scheduler/, text_encoder/, tokenizer/)")
    return root


def read_anchors(folder: str, size: tuple[int, int]) -> dict[int, np.ndarray]:
    """{frame index: (H,W,3) uint8} from images named by their frame index (``0045.png``), fitted to ``size``
    (W, H) by scaling to cover and centre-cropping."""
    from PIL import Image

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--anchors {folder} is not a folder: give a folder of keyframe images named by "
                                "frame index (0000.png, 0045.png, ...)")
    out: dict[int, np.ndarray] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS:
            continue
        if not re.fullmatch(r"\d+", stem):
            raise ValueError(f"--anchors {folder}/{name}: anchor images are named by their frame index "
                             "(e.g. 0045.png)")
        img = Image.open(os.path.join(folder, name)).convert("RGB")
        w, h = size
        s = max(w / img.width, h / img.height)
        img = img.resize((max(w, round(img.width * s)), max(h, round(img.height * s))), Image.BICUBIC)
        x0, y0 = (img.width - w) // 2, (img.height - h) // 2
        out[int(stem)] = np.asarray(img.crop((x0, y0, x0 + w, y0 + h)))
    if len(out) < 2:
        raise ValueError(f"--anchors {folder} has {len(out)} keyframe image(s): inbetweening needs at least two")
    return out


def segment_inputs(sample: dict, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames a..b of a scene sample -> (edges (F,H,W) float in [0,1], noise (F',C,h,w) at the latent frame rate),
    padded to F = 1 + 4k by repeating the last frame (the GGI training view, `loom.training.ggi.data.GGIView`)."""
    from loom.models.ggi import GGIView

    part = {k: sample[k][a: b + 1] for k in ("rgb", "edges", "noise")}
    view = GGIView()({**part, "meta": {"kind": sample.get("meta", {}).get("kind", "scene")}})
    return view["edges"], view["noise"]


def inbetween(model: GGIRun, sample: dict, anchors: dict[int, np.ndarray], seed: int = 0,
              progress=print, prompt: str | None = None, segments: str | None = None,
              structure: str | None = None) -> np.ndarray:
    """The video (T,H,W,3) uint8 over the anchors' frame range (module docstring); ``prompt`` (default: the run's
    model.prompt) needs a run trained with a text encoder. Segment i draws its noise from seed + i, so each segment
    is a function of its inputs alone: with ``segments`` (a folder), each finished segment is kept there as
    ``<a>-<b>.npy`` and a rerun takes it from there instead of generating it again (the caller keeps the folder
    for one set of settings). ``structure="none"``: the edge video is blank (for a model trained without
    structure, VideoFrom3D Tab. 3's first row; default: the run's ``data.structure``)."""
    import torch

    from loom.models import ggi

    keys = sorted(anchors)
    t = len(sample["rgb"])
    if keys[-1] >= t:
        raise ValueError(f"anchor frame {keys[-1]} is beyond the trajectory's {t} frames (0..{t - 1})")
    if any(b - a < 4 for a, b in zip(keys, keys[1:])):
        raise ValueError(f"keyframes {keys}: consecutive anchors must be at least 4 frames apart (two latent "
                         "frames, one per anchor)")
    if prompt is not None and model.text is None:
        raise ValueError("--prompt needs a text encoder: the run was trained without model.text_encoder")
    embeds = model.text.encode([prompt if prompt is not None else model.prompt]) if model.text is not None else None
    negative = model.text.encode([""]) if model.text is not None and model.guidance > 1 else None
    text = ggi.text_tokens(embeds, 1, model.transformer, model.text_len)
    neg = ggi.text_tokens(negative, 1, model.transformer, model.text_len) if negative is not None else None
    structure = structure or model.structure
    if structure not in ("edges", "none"):
        raise ValueError(f"structure={structure!r}: 'edges' (the scene's) or 'none'")
    frames: list[np.ndarray] = []

    def as_input(img: np.ndarray):  # (H,W,3) uint8 -> (1,3,H,W) in [-1, 1]
        return ggi.frames_input(np.asarray(img)[None, None])[:, :, 0]

    start = as_input(anchors[keys[0]])
    for i, (a, b) in enumerate(zip(keys, keys[1:])):
        kept = os.path.join(segments, f"{a:04d}-{b:04d}.npy") if segments else None
        if kept and os.path.isfile(kept):
            video = np.load(kept, allow_pickle=False)
            frames += list(video if i == 0 else video[1:])
            start = as_input(video[-1])
            progress(f"segment {i + 1}/{len(keys) - 1}: frames {a}..{b} kept from {kept}")
            continue
        g = torch.Generator().manual_seed(seed + i)
        edges, noise = segment_inputs(sample, a, b)
        if structure == "none":
            edges = np.zeros_like(edges)
        h_e = ggi.encode(model.vae, ggi.edges_input(edges[None]))
        eps = torch.from_numpy(noise)[None]
        if eps.shape != h_e.shape:
            raise ValueError(f"the scene's warped noise is {tuple(eps.shape[1:])} but the VAE's latents are "
                             f"{tuple(h_e.shape[1:])}: render the scene with noise.channels={h_e.shape[2]} and "
                             "noise.downsample=8")
        eps = ggi.blend_noise(eps, torch.randn(eps.shape, generator=g), model.degradation)
        end = as_input(anchors[b])
        v = ggi.anchor_latents(model.vae, start, end, eps.shape[1])
        z = ggi.sample(model.transformer, model.scheduler, eps, v, h_e, text, model.steps, generator=g,
                       guidance=model.guidance, negative=neg)
        video = ggi.decode(model.vae, z)[0].numpy()[: b - a + 1]  # drop the padding
        if kept:
            os.makedirs(segments, exist_ok=True)
            np.save(kept + ".part.npy", video)
            os.replace(kept + ".part.npy", kept)  # whole or absent: a kill never leaves half a segment
        frames += list(video if i == 0 else video[1:])
        start = as_input(video[-1])
        progress(f"segment {i + 1}/{len(keys) - 1}: frames {a}..{b} generated")
    return np.stack(frames)


def render_scene(scene: str, trajectory: str, frames: int, size: tuple[int, int], channels: int, out: str) -> str:
    """The scene's structure and warped noise along the trajectory by `loom render scene` (one sample), in ``out``."""
    from loom.corpora.assets import resolve_source
    from loom.corpora.base import job_spec
    from loom.corpora.scene import RenderSceneJob
    from loom.platform import config as cfgmod
    from loom.platform.jobs import run_job

    sets = [("scene", scene), ("trajectory", trajectory), ("out", out), ("camera.frames", frames),
            ("render.width", size[0]), ("render.height", size[1]), ("noise.channels", channels),
            ("noise.downsample", 8)]
    cfg = cfgmod.resolve(RenderSceneJob, "default", sets)
    summary = run_job(job_spec(cfg, resolve_source(scene)), progress=False)
    if summary.failed:
        raise ValueError(f"rendering {scene} along {trajectory} failed: {summary.failures[0]['reason']}")
    return out


def read_scene(data: str, key: str | None, keys: tuple[str, ...] | None = ("rgb", "edges", "noise")) -> dict:
    """Sample ``key`` (default: the first) of scene shards, with ``keys`` (None: every array)."""
    from loom.datasets.scene import iter_samples

    for s in iter_samples(data, keys=keys):
        if key is None or s["__key__"] == key:
            return s
    raise ValueError(f"--data {data}: " + (f"no sample {key!r}" if key else "no scene sample"))


def generate_inbetween(run: str | None, anchors: str, out: str, *, data: str | None = None, key: str | None = None,
                       scene: str | None = None, trajectory: str | None = None, size: tuple[int, int] = (720, 480),
                       seed: int = 0, steps: int | None = None, degradation: float | None = None,
                       prompt: str | None = None, guidance: float | None = None,
                       checkpoint: tuple[str, str] | None = None) -> str:
    """``loom generate inbetween``: the video, written as H.264 mp4 at ``out``, with ``<out>.json`` (keyframes,
    seeds, settings) beside it. ``run``: a `loom train ggi` run; or ``checkpoint`` = (released GGI transformer,
    CogVideoX-5B-I2V base)."""
    from loom.datasets.codecs import write_video

    if (run is None) == (checkpoint is None):
        raise ValueError("give --run RUN (a `loom train ggi` run) or --transformer DIR --base DIR (a released GGI "
                         "transformer and its CogVideoX-5B-I2V base), not both")
    model = (load_ggi_run(run, steps, degradation, guidance) if run is not None
             else load_ggi_checkpoint(*checkpoint, steps, degradation, guidance))
    if data is None:
        if not scene or not trajectory:
            raise ValueError("give --scene and --trajectory (rendered here by the scene job), or --data (scene "
                             "shards rendered along the trajectory)")
        names = [os.path.splitext(n)[0] for n in os.listdir(anchors) if n.lower().endswith(IMAGE_EXTS)] \
            if os.path.isdir(anchors) else []
        last = max((int(n) for n in names if n.isdigit()), default=0)
        data = render_scene(scene, trajectory, last + 1, size, model.vae.config.latent_channels,
                            os.path.splitext(out)[0] + "-scene")
    sample = read_scene(data, key)
    h, w = sample["rgb"].shape[1:3]
    keys = read_anchors(anchors, (w, h))
    video = inbetween(model, sample, keys, seed, prompt=prompt)
    path = write_video(out, video)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"run": os.path.abspath(model.path), "anchors": sorted(keys), "frames": int(len(video)), "seed": seed,
                   "prompt": prompt if prompt is not None else model.prompt,
                   "steps": model.steps, "degradation": model.degradation, "guidance": model.guidance, "scene": data,
                   "key": sample["__key__"]}, f, indent=2)
    return path
