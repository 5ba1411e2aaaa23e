"""Real-video clips for VideoFrom3D's GGI module (section 3.4): the schema, the on-disk encoding, the reader.
Written by ``loom prep videos`` (`loom.corpora.videos`).

A sample decodes to (T frames, H x W pixels, T' = 1 + ceil((T-1)/4) latent frames, h x w = H/8 x W/8):

======================  =================  =======  ===========================================================
key                     shape              dtype    meaning
======================  =================  =======  ===========================================================
``rgb``                 (T,H,W,3)          uint8    the clip's frames, fitted to H x W (scaled to cover, centre
                                                    crop)
``flow_fwd``            (T-1,H,W,2)        float32  optical flow (dx, dy) in pixels moving frame t to frame t+1
``flow_last_to_first``  (H,W,2)            float32  frame T-1 to frame 0 (computed directly between the two)
``noise``               (T',C,h,w)         float32  Gaussian noise of frame 0 warped along the flow at latent
                                                    resolution and latent frame rate: every latent frame i.i.d.
                                                    N(0, 1) (``loom.geometry.noise.compress_time``)
``depth``               (T,H,W)            float32  relative inverse depth in [0, 1] over the clip, 1 = nearest
                                                    (``meta["depth"]["method"]`` says which model, or that it is
                                                    the classical stand-in, which is not depth)
``edges``               (T,H,W)            uint8    edges of the depth maps, 0..255 (255 = edge; HED is soft,
                                                    Canny is 0/255): divide by 255 for [0, 1]
``meta``                dict                        caption, provenance (source path, sha256, frame indices, fps),
                                                    licence, seed, methods, versions, config hash
======================  =================  =======  ===========================================================

Real videos have no cameras: no ``K``/``c2w``, no ``mask``, no occlusion (a classical flow has no depth test). The
noise covers the clip padded to 1 + 4k frames by repeating its last frame (zero flow), as the authors pad 46 frames
to the 49 that CogVideoX takes; ``meta["noise"]["padded_frames"]`` is that length.

``meta``: ``kind`` ("clips"), ``uid`` (the video's), ``clip`` (its index in the video), ``caption``,
``caption_method``, ``source`` (path or URL), ``source_kind`` ("video" or "frames"), ``sha256`` (of the video file;
of a frame folder: of its listing, names and sizes), ``license``, ``frame_indices`` (source frame numbers),
``source_frames``, ``fps`` (the source's, 0 when unknown), ``clip_fps`` (fps / stride), ``source_size`` (w, h),
``flow``, ``depth``, ``edges``, ``noise`` (method and settings of each), ``seed``, ``job_seed``, ``loom_version``,
``config_hash``.

On disk: ``rgb.mkv`` (FFV1) or ``rgb.mp4`` (H.264 4:4:4, ``encode.rgb_codec=h264``), ``flow.npz`` (int16 in units of
1/32 px, ``FLOW_SCALE``: at most 1/64 px of error, +-1023 px of range; compressed, 10x smaller than float16 on a
panning test clip, because float16's low mantissa bits are incompressible noise), ``noise.npz`` (float16), ``depth.npz`` (float16:
steps of at most 2**-11 in [0, 1]), ``edges.npz`` (uint8), ``meta.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from loom.datasets.codecs import decode_video, encode_video, iter_decoded, npz, open_sample, unnpz
from loom.geometry.video_signals import latent_frames

KIND = "clips"
EXTS = ("rgb.mkv", "flow.npz", "noise.npz", "depth.npz", "edges.npz", "meta.json")
ARRAYS = ("rgb", "flow_fwd", "flow_last_to_first", "noise", "depth", "edges")
FLOW_SCALE = 32  # stored flow = round(flow * FLOW_SCALE) as int16
FLOW_KEYS = ("flow_fwd", "flow_last_to_first")


def quantise_flow(flow: np.ndarray) -> np.ndarray:
    """Flow in pixels -> int16 in 1/FLOW_SCALE px (clipped to the int16 range, +-1023 px)."""
    lim = np.iinfo(np.int16).max
    return np.clip(np.round(np.asarray(flow, np.float32) * FLOW_SCALE), -lim, lim).astype(np.int16)


def dequantise_flow(stored: np.ndarray) -> np.ndarray:
    if stored.dtype == np.int16:
        return stored.astype(np.float32) / FLOW_SCALE
    return stored.astype(np.float32)  # float16, as the first clips were written

def check_arrays(a: dict[str, np.ndarray]) -> None:
    """Refuse a sample whose arrays are missing, of the wrong shape or dtype, or not finite."""
    for k in ARRAYS:
        if k not in a:
            raise ValueError(f"clips sample is missing array {k!r}")
    if a["rgb"].ndim != 4 or a["rgb"].shape[-1] != 3 or a["rgb"].dtype != np.uint8:
        raise ValueError(f"array 'rgb' must be (T,H,W,3) uint8, got {a['rgb'].shape} {a['rgb'].dtype}")
    t, h, w, _ = a["rgb"].shape
    if a["noise"].ndim != 4:
        raise ValueError(f"array 'noise' must be (T',C,h,w), got shape {a['noise'].shape}")
    c, lh, lw = a["noise"].shape[1:]
    expect = {
        "flow_fwd": (t - 1, h, w, 2), "flow_last_to_first": (h, w, 2), "noise": (latent_frames(t), c, lh, lw),
        "depth": (t, h, w), "edges": (t, h, w),
    }
    for k, shape in expect.items():
        if tuple(a[k].shape) != shape:
            raise ValueError(f"array {k!r} has shape {tuple(a[k].shape)}, expected {shape}")
        if np.issubdtype(a[k].dtype, np.floating) and not np.isfinite(a[k]).all():
            raise ValueError(f"array {k!r} contains NaN or inf")
    if a["edges"].dtype != np.uint8:
        raise ValueError(f"array 'edges' must be uint8 0..255, got {a['edges'].dtype}")
    if h % lh or w % lw or h // lh != w // lw:
        raise ValueError(f"noise grid {lh}x{lw} is not the frame {h}x{w} divided by one factor")
    if float(a["depth"].min()) < 0 or float(a["depth"].max()) > 1:
        raise ValueError("array 'depth' must lie in [0, 1] (normalised relative depth)")


def encode_sample(a: dict[str, np.ndarray], meta: dict[str, Any], rgb_codec: str = "ffv1") -> dict[str, bytes]:
    check_arrays(a)
    ext, video = encode_video(a["rgb"], rgb_codec, full_chroma=True)
    return {
        ext: video,
        "flow.npz": npz(**{k: quantise_flow(a[k]) for k in FLOW_KEYS}),
        "noise.npz": npz(noise=np.asarray(a["noise"], dtype=np.float16)),
        "depth.npz": npz(depth=np.asarray(a["depth"], dtype=np.float16)),
        "edges.npz": npz(edges=np.asarray(a["edges"], dtype=np.uint8)),
        "meta.json": json.dumps({**meta, "kind": KIND}, sort_keys=True).encode(),
    }


def decode_sample(files: dict[str, bytes], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    need = open_sample(files, EXTS, "clips", keys)

    out: dict[str, Any] = {}
    if need("rgb"):
        out["rgb"] = decode_video(files.get("rgb.mkv") or files["rgb.mp4"])
    if need(*FLOW_KEYS):
        f = unnpz(files["flow.npz"])
        out.update({k: dequantise_flow(f[k]) for k in FLOW_KEYS})
    if need("noise"):
        out["noise"] = unnpz(files["noise.npz"])["noise"].astype(np.float32)
    if need("depth"):
        out["depth"] = unnpz(files["depth.npz"])["depth"].astype(np.float32)
    if need("edges"):
        out["edges"] = unnpz(files["edges.npz"])["edges"]
    out["meta"] = json.loads(files["meta.json"])
    return out


def iter_samples(url: str, keys: tuple[str, ...] | None = None,
                 part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Any]]:
    """Yield decoded clips from a shard, a folder of shards or a Loom output folder (manifest order)."""
    return iter_decoded(url, decode_sample, keys, part)


def check(url: str, limit: int | None = None) -> list[str]:
    """Decode the samples at ``url`` (the first ``limit``) and check each against the schema; returns the problems
    found ("<key>: <what>"), empty when all are well formed."""
    problems = []
    for i, s in enumerate(iter_samples(url)):
        if limit is not None and i >= limit:
            break
        try:
            check_arrays(s)
            if s["meta"].get("kind") != KIND:
                raise ValueError(f"meta kind is {s['meta'].get('kind')!r}, expected {KIND!r}")
            if not s["meta"].get("caption"):
                raise ValueError("meta has no caption")
        except ValueError as e:
            problems.append(f"{s['__key__']}: {e}")
    return problems
