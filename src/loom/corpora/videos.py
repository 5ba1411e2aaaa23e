"""Real-video training data for VideoFrom3D's GGI module (section 3.4): ``loom prep videos --videos SOURCE --out URL``.

The paper trains GGI on DL3DV-10K videos: per clip, optical flow (RAFT) and the noise warped along it, monocular
depth (MiDaS/DPT), HED edges of the depth maps (texture-free edges that mimic those of coarse geometry) and a BLIP
caption of the first frame. This job makes those samples (schema: `loom.datasets.clips`) on Loom's one job
mechanism (`loom.platform.jobs`: plan, Ray Data fan-out, sandboxed workers, atomic WebDataset shards, manifest,
failure rows, resume), like ``loom render scene`` does for rendered scenes.

Data flow::

    --videos SOURCE ──find_sources──> one record per video file or frame folder (path, sha256, licence)
        ──> one task per (video, clip c) keyed <uid>_c<c> ──> plan.json ──> Ray Data ──> ShardWorker sandbox:
            prep_entry: decode the clip's frames (PyAV or images) -> fit to WxH
                -> flow t->t+1 and T-1->0 (OpenCV DIS | Farneback)
                -> noise: frame 0's N(0,1) at (C, H/8, W/8) warped along the flows (clip padded to 1+4k frames by
                   repeating its last frame), then one latent frame per 4 frames (``compress_time``)
                -> depth (transformers DPT / Depth Anything from a local folder | classical stand-in) -> [0, 1]
                -> edges of the depth maps (HED: ControlNetHED.pth, loom.models.hed | Canny)
                -> caption of frame 0 (BLIP from a local folder | the prompt template) -> encode
        ──> shards/clips-*.tar + sidecars, manifest.json, failures.jsonl

Inputs (``--videos``): a video file, or a folder or fsspec URL scanned recursively (hidden names skipped) for

- video files: ``.mp4 .mov .webm .mkv .avi .m4v``, decoded with PyAV (frame count from the stream header, else by
  counting packets);
- frame folders: a folder holding two or more ``.png``/``.jpg``/``.jpeg`` files is one video, its frames in natural
  name order (``frame_2`` before ``frame_10``). DL3DV-10K's layout ``<scene>/images*/frame_00001.png`` is one video
  per scene: where a scene has several ``images*`` folders (resolutions), ``clip.frame_folder`` (``images_4``,
  960x540) is used when present, else the first in name order. Frame folders have no fps: ``clip.frames_fps``.

Clips: ``clip.clips_per_video`` clips of ``clip.frames`` frames ``clip.stride`` source frames apart, placed by the
stratified seeded rule of :func:`loom.geometry.video_signals.clip_starts` (seed: job seed + the video's sha256).
A video shorter than one clip is a failure row saying so; so is a video that cannot be decoded, naming the file.

Licence and provenance: a video's licence is the first line of a sidecar ``<video file>.license`` (for a frame
folder: ``<scene folder>.license`` beside it, or ``LICENSE``/``license.txt`` inside the scene folder), else its entry
in a ``LICENSES.json`` (``{"<path relative to the source root>": "<licence>"}``) at the source root, else the job's
``license`` field (e.g. DL3DV-10K's terms). Each sample's meta carries the source path, its sha256 (a frame folder's:
of its listing, file names and sizes), the source frame indices, the fps and the licence.

Models load from local folders only (``local_files_only``) and once per worker process. Without them the job still
runs (smoke runs, CI): depth falls back to a documented classical stand-in (``meta["depth"]["method"]`` says
``standin-median-luminance``: it is not depth), edges to Canny, the caption to the template. Not here: RAFT, the
paper's flow, runs with ``flow.method=raft`` and local torchvision ``raft_large`` weights (Loom's own network,
``loom.models.raft``: ptlflow and torchvision need a torchvision that Loom's CPU environment cannot import); OpenCV's
DIS is the CPU default.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import time
from typing import Any, ClassVar, Literal

import numpy as np

import loom
from loom.corpora.base import EncodeSettings, task_seed
from loom.platform.config import config, config_hash, field, recipe, require, to_dict
from loom.platform.jobs import JobSpec, ShardSettings, Task
from loom.platform.ray import RaySettings

KIND = "clips"
ENTRY = "loom.corpora.videos:prep_entry"
VIDEO_EXTS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
DEFAULT_PROMPT = "a video of a static scene, the camera moving through it"


# ------------------------------------------------------------------------------------------------------ config


@config
class ClipSettings:
    frames: int = field(46, help="frames per clip, N+1 (VideoFrom3D: N = 45, i.e. 46 frames)")
    width: int = field(720, help="clip width in pixels (frames are scaled to cover and centre-cropped)")
    height: int = field(480, help="clip height in pixels")
    stride: int = field(1, help="source frames between consecutive clip frames (2 = every other frame)")
    clips_per_video: int = field(1, help="clips taken from each video, stratified over its length (seeded)")
    frame_folder: str = field("images_4", help="of a scene's several images* frame folders (DL3DV-10K), the one "
                              "used when present (images_4 = 960x540); else the first in name order")
    frames_fps: float = field(0.0, help="fps recorded for frame folders, which carry none (0 = unknown)")

    def __post_init__(self):
        require(self.frames >= 2, "clip.frames", self.frames, "must be >= 2 (flow needs two frames)")
        require(16 <= self.width <= 8192, "clip.width", self.width, "must be in 16..8192")
        require(16 <= self.height <= 8192, "clip.height", self.height, "must be in 16..8192")
        require(self.stride >= 1, "clip.stride", self.stride, "must be >= 1")
        require(self.clips_per_video >= 1, "clip.clips_per_video", self.clips_per_video, "must be >= 1")
        require(self.frames_fps >= 0, "clip.frames_fps", self.frames_fps, "must be >= 0 (0 = unknown)")


@config
class FlowSettings:
    method: Literal["dis", "farneback", "raft"] = field("dis", help="optical flow: OpenCV DIS (MEDIUM preset, the "
                                                        "CPU default), Farneback, or RAFT (the paper's; "
                                                        "loom.models.raft with raft_weights)")
    raft_weights: str = field("", help="RAFT: local torchvision raft_large weights (raft_large_C_T_SKHT_V2-*.pth or "
                              ".safetensors) or the folder holding them")
    iters: int = field(12, help="RAFT: flow updates per pair (torchvision's default for raft_large)")
    device: Literal["cpu", "cuda"] = field("cpu", help="RAFT: where it runs (cuda needs ray.gpus_per_worker)")

    def __post_init__(self):
        require(self.iters >= 1, "flow.iters", self.iters, "must be >= 1")
        require(self.method != "raft" or bool(self.raft_weights), "flow.raft_weights", self.raft_weights,
                "must name the local RAFT weights file (or its folder) when flow.method=raft")


@config
class ClipNoiseSettings:
    channels: int = field(16, help="channels of the warped noise (CogVideoX's latent channels)")
    downsample: int = field(8, help="latent resolution = clip resolution / downsample (the VAE's spatial factor)")
    temporal: int = field(4, help="the VAE's temporal factor: frame 0, then one latent frame per this many frames")
    upsample: int = field(4, help="sub-pixel factor of the noise warping (loom.geometry.noise.warp_noise)")

    def __post_init__(self):
        require(self.channels >= 1, "noise.channels", self.channels, "must be >= 1")
        require(self.downsample >= 1, "noise.downsample", self.downsample, "must be >= 1")
        require(self.temporal >= 1, "noise.temporal", self.temporal, "must be >= 1")
        require(self.upsample >= 1, "noise.upsample", self.upsample, "must be >= 1")


@config
class DepthSettings:
    model: str = field("", help="local folder of a transformers depth model (DPTForDepthEstimation, e.g. "
                       "Intel/dpt-hybrid-midas as in the paper, or Depth Anything) with its preprocessor_config.json; "
                       "empty: the classical stand-in (median-filtered luminance, NOT depth; for smoke runs)")
    device: Literal["cpu", "cuda"] = field("cpu", help="where the depth model runs (cuda needs ray.gpus_per_worker)")
    batch: int = field(8, help="frames per depth forward pass")
    standin_size: float = field(0.015, help="stand-in only: median filter width as a fraction of the diagonal")

    def __post_init__(self):
        require(self.batch >= 1, "depth.batch", self.batch, "must be >= 1")
        require(0 < self.standin_size < 0.5, "depth.standin_size", self.standin_size, "must be in (0, 0.5)")


@config
class DepthEdgeSettings:
    method: Literal["canny", "hed"] = field("canny", help="edges of the depth maps: Canny (CPU default) or HED "
                                            "(the paper's; ControlNet's HED network, loom.models.hed, with "
                                            "hed_weights)")
    hed_weights: str = field("", help="HED: local ControlNetHED.pth (lllyasviel/Annotators) or the folder holding it")
    source: Literal["depth", "rgb"] = field("depth", help="what the edges are OF: the depth maps (the paper's HED-S, "
                                            "mimicking coarse geometry) or the frames themselves (HED: the ablation "
                                            "of VideoFrom3D Tab. 3)")
    low: float = field(0.05, help="Canny: low hysteresis threshold, as a fraction of a full-range depth step's "
                       "gradient")
    high: float = field(0.1, help="Canny: high threshold, same unit (0.1: a jump of a tenth of the clip's depth "
                        "range starts an edge)")
    blur: float = field(1.0, help="Canny: Gaussian sigma in pixels applied to the depth first (0: none)")

    def __post_init__(self):
        require(0 < self.low <= self.high <= 1, "edges.low", (self.low, self.high), "need 0 < low <= high <= 1")
        require(self.blur >= 0, "edges.blur", self.blur, "must be >= 0")
        require(self.method != "hed" or bool(self.hed_weights), "edges.hed_weights", self.hed_weights,
                "must name the local ControlNetHED.pth (or its folder) when edges.method=hed")


@config
class CaptionSettings:
    model: str = field("", help="local folder of a BLIP captioning model (BlipForConditionalGeneration + processor, "
                       "e.g. Salesforce/blip-image-captioning-large); empty: the prompt template")
    prompt: str = field(DEFAULT_PROMPT, help="caption when no model is set (or the model returns nothing): a "
                        "str.format template of {uid}, {name}")
    max_new_tokens: int = field(30, help="BLIP: longest caption in tokens")
    device: Literal["cpu", "cuda"] = field("cpu", help="where BLIP runs")

    def __post_init__(self):
        require(bool(self.prompt.strip()), "caption.prompt", self.prompt, "must not be empty")
        try:
            self.prompt.format(uid="u", name="n")
        except (KeyError, IndexError, ValueError) as e:
            require(False, "caption.prompt", self.prompt, f"is not a template of {{uid}}, {{name}} ({e!r})")
        require(self.max_new_tokens >= 1, "caption.max_new_tokens", self.max_new_tokens, "must be >= 1")


@config
class PrepVideosJob:
    KIND: ClassVar[str] = KIND
    # Fields that do not change what a sample holds: left out of the provenance hash.
    NON_SAMPLE_FIELDS: ClassVar[tuple[str, ...]] = ("videos", "out", "ray", "shards", "timeout_s", "limit")

    videos: str = field("", help="a video file, or a folder / fsspec URL of videos (mp4, mov, webm, mkv, avi, m4v) "
                        "and frame folders (DL3DV-10K's <scene>/images*/frame_*.png)")
    out: str = field("out/clips", help="output folder or fsspec URL for shards and manifests")
    seed: int = field(0, help="job seed; clip placement and noise derive from it and the video's sha256")
    license: str = field("unknown", help="licence of videos without a sidecar or LICENSES.json entry")
    limit: int = field(0, help="use only the first N videos in path order (0 = all)")
    clip: ClipSettings = field(default_factory=ClipSettings, help="clip length, size and sampling")
    flow: FlowSettings = field(default_factory=FlowSettings, help="optical flow")
    noise: ClipNoiseSettings = field(default_factory=ClipNoiseSettings, help="warped noise")
    depth: DepthSettings = field(default_factory=DepthSettings, help="monocular depth")
    edges: DepthEdgeSettings = field(default_factory=DepthEdgeSettings, help="edges of the depth maps")
    caption: CaptionSettings = field(default_factory=CaptionSettings, help="caption of the first frame")
    encode: EncodeSettings = field(default_factory=EncodeSettings, help="on-disk encoding")
    timeout_s: float = field(1800.0, help="seconds one clip may take before its worker is killed (failure row)")
    shards: ShardSettings = field(default_factory=lambda: ShardSettings(samples_per_shard=4), help="sharding")
    ray: RaySettings = field(default_factory=RaySettings, help="Ray: address, workers, CPUs and GPUs per worker")

    def __post_init__(self):
        d = self.noise.downsample
        require(self.clip.width % d == 0 and self.clip.height % d == 0, "noise.downsample", d,
                f"must divide clip.width and clip.height ({self.clip.width}x{self.clip.height})")
        require(self.limit >= 0, "limit", self.limit, "must be >= 0")
        require(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")
        for what, dev in (("depth.device", self.depth.device), ("caption.device", self.caption.device),
                          ("flow.device", self.flow.device)):
            require(dev == "cpu" or self.ray.gpus_per_worker > 0, what, dev,
                    "cuda needs ray.gpus_per_worker > 0 so Ray gives each worker a GPU")


@recipe(PrepVideosJob, "default", help="VideoFrom3D's clips: 46 frames at 720x480, noise at 16 x 60 x 90 x 13 latent "
        "frames")
def _default() -> PrepVideosJob:
    return PrepVideosJob()


@recipe(PrepVideosJob, "tiny", help="tests and smoke runs: 9 frames at 64x48, 4 noise channels, 1 clip per video")
def _tiny() -> PrepVideosJob:
    return PrepVideosJob(out="out/clips-tiny", clip=ClipSettings(frames=9, width=64, height=48),
                         noise=ClipNoiseSettings(channels=4), shards=ShardSettings(samples_per_shard=2),
                         timeout_s=300.0)


# ------------------------------------------------------------------------------------------------------ sources


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _read_license(fs, candidates: list[str]) -> str | None:
    for p in candidates:
        if fs.isfile(p):
            with fs.open(p, "rb") as f:
                line = f.read(4096).decode("utf-8", errors="replace").splitlines()
            if line and line[0].strip():
                return line[0].strip()
    return None


def find_sources(url: str, *, frame_folder: str = "images_4", default_license: str = "unknown") -> list[dict]:
    """The videos at ``url`` (the module docstring's rules), sorted by path: dicts with ``uid``, ``source`` (``url``),
    ``path`` (URL of the file or frame folder), ``kind`` ("video" | "frames"), ``rel``, ``sha256``, ``size``,
    ``license`` and, for frame folders, ``frames`` (the image names in order)."""
    from loom.corpora.assets import sha256_file, uid_from_relpath
    from loom.platform import storage

    if not url:
        raise ValueError("videos is not set: pass --videos FOLDER|URL|FILE (videos or frame folders)")
    fs, root = storage.filesystem(url)
    if not fs.exists(root):
        raise FileNotFoundError(f"--videos {url}: no such file or folder")
    root = root.rstrip("/")
    videos: list[str] = []
    frame_dirs: dict[str, list[str]] = {}
    if fs.isfile(root):
        if not root.lower().endswith(VIDEO_EXTS):
            raise ValueError(f"--videos {url} is a file but not a video ({', '.join(VIDEO_EXTS)})")
        videos, base = [root], posixpath.dirname(root)
    else:
        base = root
        for dirpath, dirs, files in fs.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            names = sorted((f for f in files if not f.startswith(".")), key=_natural_key)
            videos += [posixpath.join(dirpath, f) for f in names if f.lower().endswith(VIDEO_EXTS)]
            images = [f for f in names if f.lower().endswith(IMAGE_EXTS)]
            if len(images) >= 2:
                frame_dirs[dirpath.rstrip("/")] = images
    # One frame folder per scene: DL3DV keeps a scene's resolutions side by side as images, images_2, images_4 ...
    by_scene: dict[str, list[str]] = {}
    for d in sorted(frame_dirs):
        scene = posixpath.dirname(d) if posixpath.basename(d).startswith("images") and d != root else d
        by_scene.setdefault(scene, []).append(d)
    scenes = {scene: next((d for d in ds if posixpath.basename(d) == frame_folder), ds[0])
              for scene, ds in by_scene.items()}
    licenses: dict[str, str] = {}
    lic_map = posixpath.join(base, "LICENSES.json")
    if fs.isfile(lic_map):
        try:
            licenses = {str(k): str(v) for k, v in json.loads(fs.cat_file(lic_map)).items()}
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{fs.unstrip_protocol(lic_map)} must be a JSON object {{relative path: licence}}: {e}")
    out = []
    for p in videos:
        rel = posixpath.relpath(p, base)
        lic = _read_license(fs, [p + ".license"]) or licenses.get(rel) or default_license
        out.append(dict(uid=uid_from_relpath(rel), source=url, path=fs.unstrip_protocol(p), kind="video", rel=rel,
                        sha256=sha256_file(p, fs), size=int(fs.size(p)), license=lic))
    for scene, d in sorted(scenes.items()):
        rel = posixpath.relpath(scene, base) if scene != base else posixpath.basename(scene)
        images = frame_dirs[d]
        h = hashlib.sha256()
        sizes = 0
        for f in images:  # the listing, not the pixels: hashing every frame of 10K scenes would take hours
            s = int(fs.size(posixpath.join(d, f)))
            sizes += s
            h.update(f"{f}\t{s}\n".encode())
        lic = (_read_license(fs, [scene + ".license", posixpath.join(scene, "LICENSE"),
                                  posixpath.join(scene, "license.txt")])
               or licenses.get(rel) or default_license)
        out.append(dict(uid=uid_from_relpath(rel), source=url, path=fs.unstrip_protocol(d), kind="frames", rel=rel,
                        sha256=h.hexdigest(), size=sizes, license=lic, frames=images))
    out.sort(key=lambda r: r["rel"])
    seen: dict[str, str] = {}
    for r in out:
        if r["uid"] in seen:
            raise ValueError(f"{r['rel']} and {seen[r['uid']]} get the same id {r['uid']!r}: rename one")
        seen[r["uid"]] = r["rel"]
    return out


# ------------------------------------------------------------------------------------------------------ tasks


def sample_config_hash(cfg: PrepVideosJob) -> str:
    return config_hash(cfg, exclude=cfg.NON_SAMPLE_FIELDS)


def build_tasks(cfg: PrepVideosJob, sources: list[dict]) -> list[Task]:
    """One task per (video, clip index), keyed ``<uid>_c<clip>``: a pure function of (video sha256, clip, seed)."""
    chash = sample_config_hash(cfg)
    settings = {k: to_dict(getattr(cfg, k)) for k in ("clip", "flow", "noise", "depth", "edges", "caption")}
    tasks = []
    for src in sources:
        asset = {k: v for k, v in src.items() if k != "frames"}
        for c in range(cfg.clip.clips_per_video):
            seed = task_seed(cfg.seed, src["sha256"], c)
            params = {
                "kind": KIND, "video": src, "clip_index": c, "frames": cfg.clip.frames,
                "starts_seed": task_seed(cfg.seed, src["sha256"], -1),  # shared by the video's clips
                "seed": seed, "rgb_codec": cfg.encode.rgb_codec, **settings,
                "meta": {"uid": src["uid"], "clip": c, "source": src["path"], "source_kind": src["kind"],
                         "sha256": src["sha256"], "sha256_of": "file" if src["kind"] == "video" else "listing",
                         "license": src["license"], "seed": seed, "job_seed": cfg.seed,
                         "loom_version": loom.__version__, "config_hash": chash},
            }
            tasks.append(Task(key=f"{src['uid']}_c{c}", asset=asset, params=params, frames=cfg.clip.frames))
    return tasks


def job_spec(cfg: PrepVideosJob, sources: list[dict]) -> JobSpec:
    return JobSpec(
        kind=KIND, entry=ENTRY, tasks=build_tasks(cfg, sources), out=cfg.out, config=to_dict(cfg),
        config_hash=sample_config_hash(cfg), timeout_s=cfg.timeout_s, ray=cfg.ray,
        samples_per_shard=cfg.shards.samples_per_shard,
        env={"OMP_NUM_THREADS": str(cfg.ray.cpus_per_worker)}, fetch=None, verb="prep",
        preload=("torch", "cv2", "av"),  # imported once per worker at start-up, not in its first clip
    )


# ------------------------------------------------------------------------------------------------------ worker

_MODELS: dict[tuple, Any] = {}  # loaded once per sandbox process, keyed by (what, path, device)


def _count_frames(container, stream) -> int:
    if stream.frames:
        return int(stream.frames)
    n = sum(1 for p in container.demux(stream) if p.size)  # webm and some mkv carry no frame count
    container.seek(0)
    return n


def read_clip_frames(video: dict, clip: dict, clip_index: int, starts_seed: int, workdir: str) -> tuple[
        np.ndarray, dict]:
    """The clip's frames (T,H,W,3) uint8, fitted to the clip size, and what meta records about them."""
    from loom.geometry.video_signals import clip_starts, fit_frame, frame_indices
    from loom.platform import storage

    frames, stride = clip["frames"], clip["stride"]
    if video["kind"] == "frames":
        names = video["frames"]
        start = clip_starts(len(names), frames, stride, clip["clips_per_video"], starts_seed)[clip_index]
        idx = frame_indices(start, frames, stride)
        import cv2

        out = []
        for i in idx:
            url = storage.join(video["path"], names[i])
            img = cv2.imdecode(np.frombuffer(storage.read_bytes(url), np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"cannot decode image {url}")
            out.append(fit_frame(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), clip["width"], clip["height"]))
            size = (img.shape[1], img.shape[0])
        return np.stack(out), {"frame_indices": idx, "source_frames": len(names), "fps": clip["frames_fps"],
                               "source_size": list(size)}
    import av

    path = video["path"]
    fs, p = storage.filesystem(path)
    local = p if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) else None
    if local is None:  # remote: PyAV reads local files; copy the one video (not the corpus) to the task's folder
        local = os.path.join(workdir, "video" + os.path.splitext(p)[1])
        fs.get(p, local)
    try:
        with av.open(local) as c:
            stream = c.streams.video[0]
            n = _count_frames(c, stream)
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            start = clip_starts(n, frames, stride, clip["clips_per_video"], starts_seed)[clip_index]
            idx = frame_indices(start, frames, stride)
            want, out = set(idx), []
            for i, f in enumerate(c.decode(stream)):
                if i in want:
                    out.append(fit_frame(f.to_ndarray(format="rgb24"), clip["width"], clip["height"]))
                    size = (f.width, f.height)
                if i >= idx[-1]:
                    break
    except (av.error.FFmpegError, IndexError) as e:  # IndexError: no video stream
        raise ValueError(f"cannot decode video {path}: {type(e).__name__}: {e}") from None
    if len(out) < frames:
        raise ValueError(f"video {path} ended after {len(out)} of the clip's frames {idx[0]}..{idx[-1]} (its header "
                         f"says {n} frames): the file is truncated or its frame count is wrong")
    return np.stack(out), {"frame_indices": idx, "source_frames": n, "fps": fps, "source_size": list(size)}


def clip_noise(flow_fwd: np.ndarray, p: dict, seed: int) -> tuple[np.ndarray, int]:
    """(T',C,h,w) warped noise at latent resolution and frame rate, and the padded length 1 + temporal*k."""
    import torch

    from loom.geometry.noise import compress_time, resize_flow, warp_noise

    t = flow_fwd.shape[0] + 1
    k = p["temporal"]
    padded = 1 + k * -(-(t - 1) // k)
    h, w = flow_fwd.shape[1] // p["downsample"], flow_fwd.shape[2] // p["downsample"]
    flows = torch.from_numpy(np.ascontiguousarray(flow_fwd, dtype=np.float32))
    # The padding repeats the last frame: zero flow, so the last frame's noise is carried unchanged.
    flows = torch.cat([flows, flows.new_zeros((padded - t, *flows.shape[1:]))])
    g = torch.Generator().manual_seed(int(seed))
    noise0 = torch.randn((p["channels"], h, w), generator=g)
    noise = warp_noise(noise0, resize_flow(flows, (h, w)), generator=g, upsample=p["upsample"])
    return compress_time(noise, k).numpy(), padded


def estimate_depth(frames: np.ndarray, p: dict) -> tuple[np.ndarray, str]:
    """(T,H,W) depth in [0, 1] (1 = nearest) and the method's name for meta."""
    from loom.geometry.video_signals import normalise_depth, standin_depth

    if not p["model"]:
        return standin_depth(frames, p["standin_size"]), "standin-median-luminance"
    import torch
    import torch.nn.functional as F

    key = ("depth", p["model"], p["device"])
    if key not in _MODELS:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        if not os.path.isdir(p["model"]):
            raise FileNotFoundError(f"depth.model={p['model']!r} is not a local folder: point it at a transformers "
                                    "depth model folder (config.json, weights, preprocessor_config.json)")
        model = AutoModelForDepthEstimation.from_pretrained(p["model"], local_files_only=True).eval().to(p["device"])
        _MODELS[key] = (model, AutoImageProcessor.from_pretrained(p["model"], local_files_only=True))
    model, proc = _MODELS[key]
    h, w = frames.shape[1:3]
    out = []
    with torch.inference_mode():
        for i in range(0, len(frames), p["batch"]):
            inp = proc(images=list(frames[i:i + p["batch"]]), return_tensors="pt").to(p["device"])
            d = model(**inp).predicted_depth  # (B,h',w') relative inverse depth
            out.append(F.interpolate(d[:, None].float(), size=(h, w), mode="bicubic", align_corners=False)[:, 0].cpu())
    depth = torch.cat(out).numpy()
    return normalise_depth(depth), f"{type(model).__name__}:{os.path.basename(os.path.normpath(p['model']))}"


def flow_model(p: dict):
    """The flow method for :func:`loom.geometry.video_signals.clip_flows`: its name, or for RAFT a callable
    (a, b) -> flow running Loom's RAFT with the local weights (loaded once per worker process)."""
    if p["method"] != "raft":
        return None
    from loom.models.raft import load_raft, raft_flow

    key = ("raft", p["raft_weights"], p["device"])
    if key not in _MODELS:
        _MODELS[key] = load_raft(p["raft_weights"]).to(p["device"])
    net = _MODELS[key]
    return lambda a, b: raft_flow(a, b, net, iters=p["iters"], device=p["device"])


def edges_of_depth(depth: np.ndarray, p: dict) -> tuple[np.ndarray, str]:
    """(T,H,W) uint8 0..255 edges of the depth maps and the method's name for meta."""
    from loom.geometry.video_signals import depth_edges

    if p["method"] == "canny":
        return depth_edges(depth, p["low"], p["high"], p["blur"]), "canny-of-depth"
    import cv2

    from loom.models.hed import hed_edges, load_hed

    key = ("hed", p["hed_weights"])
    if key not in _MODELS:
        _MODELS[key] = load_hed(p["hed_weights"])
    net = _MODELS[key]
    h, w = depth.shape[1:]
    d8 = np.clip(depth * 255 + 0.5, 0, 255).astype(np.uint8)
    out = np.stack([cv2.resize(hed_edges(net, d), (w, h), interpolation=cv2.INTER_LINEAR) for d in d8])
    return out.astype(np.uint8), "hed-of-depth"


def edges_of_frames(rgb: np.ndarray, p: dict) -> tuple[np.ndarray, str]:
    """(T,H,W) uint8 edges of the frames themselves (``edges.source=rgb``, Tab. 3's "HED" row): HED of the RGB
    frames, or Canny of their luminance scaled to [0, 1] as the depth would be."""
    if p["method"] == "canny":
        grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
        edges, _ = edges_of_depth(grey, p)
        return edges, "canny-of-frames"
    from loom.models.hed import hed_edges, load_hed

    key = ("hed", p["hed_weights"])
    if key not in _MODELS:
        _MODELS[key] = load_hed(p["hed_weights"])
    import cv2

    h, w = rgb.shape[1:3]
    out = np.stack([cv2.resize(hed_edges(_MODELS[key], f), (w, h), interpolation=cv2.INTER_LINEAR) for f in rgb])
    return out.astype(np.uint8), "hed-of-frames"


def caption_frame(frame: np.ndarray, p: dict, fields: dict) -> tuple[str, str]:
    """(caption, method) of the clip's first frame."""
    template = p["prompt"].format(**fields)
    if not p["model"]:
        return template, "template"
    import torch

    key = ("blip", p["model"], p["device"])
    if key not in _MODELS:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if not os.path.isdir(p["model"]):
            raise FileNotFoundError(f"caption.model={p['model']!r} is not a local folder: point it at a BLIP "
                                    "captioning model folder (e.g. Salesforce/blip-image-captioning-large)")
        model = BlipForConditionalGeneration.from_pretrained(p["model"], local_files_only=True).eval()
        _MODELS[key] = (model.to(p["device"]), BlipProcessor.from_pretrained(p["model"], local_files_only=True))
    model, proc = _MODELS[key]
    with torch.inference_mode():
        inp = proc(images=frame, return_tensors="pt").to(p["device"])
        ids = model.generate(**inp, max_new_tokens=p["max_new_tokens"])
    text = proc.decode(ids[0], skip_special_tokens=True).strip()
    return (text, "blip") if text else (template, "template (BLIP returned nothing)")


def prep_entry(params: dict) -> dict:
    """The sandbox entry: one clip of one video -> the sample's files (`loom.datasets.clips`) and stage timings."""
    from loom.datasets.clips import encode_sample
    from loom.geometry.video_signals import clip_flows

    t0 = time.monotonic()
    video, clip = params["video"], params["clip"]
    rgb, src = read_clip_frames(video, clip, params["clip_index"], params["starts_seed"], params["workdir"])
    t1 = time.monotonic()
    flow_fwd, flow_l2f = clip_flows(rgb, params["flow"]["method"], flow_model(params["flow"]))
    t2 = time.monotonic()
    noise, padded = clip_noise(flow_fwd, params["noise"], params["seed"])
    t3 = time.monotonic()
    depth, depth_method = estimate_depth(rgb, params["depth"])
    t4 = time.monotonic()
    if params["edges"].get("source", "depth") == "rgb":
        edges, edge_method = edges_of_frames(rgb, params["edges"])
    else:
        edges, edge_method = edges_of_depth(depth, params["edges"])
    t5 = time.monotonic()
    caption, caption_method = caption_frame(rgb[0], params["caption"], {"uid": video["uid"],
                                                                        "name": posixpath.basename(video["rel"])})
    t6 = time.monotonic()
    fps = float(src["fps"])
    meta = {
        **params["meta"], **src, "clip_fps": fps / clip["stride"], "caption": caption,
        "caption_method": caption_method, "size": [clip["width"], clip["height"]],
        "flow": ({"method": "raft", "weights": os.path.basename(os.path.normpath(params["flow"]["raft_weights"])),
                  "iters": params["flow"]["iters"]} if params["flow"]["method"] == "raft"
                 else {"method": params["flow"]["method"]}),
        "noise": {**params["noise"], "padded_frames": padded, "latent_frames": int(noise.shape[0])},
        "depth": {"method": depth_method, "normalised": "per clip to [0, 1], 1 = nearest"},
        "edges": {"method": edge_method, **({k: params["edges"][k] for k in ("low", "high", "blur")}
                                            if edge_method.startswith("canny") else {})},
    }
    arrays = {"rgb": rgb, "flow_fwd": flow_fwd, "flow_last_to_first": flow_l2f, "noise": noise, "depth": depth,
              "edges": edges}
    files = encode_sample(arrays, meta, params["rgb_codec"])
    t7 = time.monotonic()
    timings = {"decode": t1 - t0, "flow": t2 - t1, "noise": t3 - t2, "depth": t4 - t3, "edges": t5 - t4,
               "caption": t6 - t5, "encode": t7 - t6, "task": t7 - t0}
    return {"files": files, "timings": timings, "warnings": []}
