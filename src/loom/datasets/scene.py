"""Scene videos from coarse geometry (VideoFrom3D sections 3.1-3.4): the schema, the on-disk encoding, the reader.

A sample decodes to (T frames, H x W pixels):

======================  =================  =======  ===========================================================
key                     shape              dtype    meaning
======================  =================  =======  ===========================================================
``rgb``                 (T,H,W,3)          uint8    beauty render, sRGB, over the background colour
``depth``               (T,H,W)            float32  camera-space z, 0 where nothing is hit
``mask``                (T,H,W)            bool     geometry at the pixel centre
``object_id``           (T,H,W)            uint16   1..N in ``meta["objects"]`` order, 0 = background
``edges``               (T,H,W,4)          bool     silhouette, crease, object boundary, intersection
``flow_fwd``            (T-1,H,W,2)        float32  pixel (dx, dy) moving frame t to frame t+1
``flow_bwd``            (T-1,H,W,2)        float32  pixel (dx, dy) moving frame t+1 to frame t (index t)
``flow_last_to_first``  (H,W,2)            float32  frame T-1 to frame 0
``occlusion_fwd``       (T-1,H,W)          bool     the pixel's point is hidden or outside in the target frame
``occlusion_bwd``       (T-1,H,W)          bool     same for flow_bwd
``noise``               (T,C,h,w)          float32  Gaussian noise of frame 0 warped along the flow at latent
                                                    resolution: every frame i.i.d. N(0, 1)
``K``, ``c2w``          (T,3,3), (T,4,4)   float32  as for turntable videos (OpenCV, world +Z up)
``meta``                dict                        seed, scene sha256, objects, trajectory, versions, config hash
======================  =================  =======  ===========================================================

Flow is geometric: each pixel's 3D point (from depth) reprojected into the other camera, with a depth test for
occlusion (``loom.geometry.flow``). On disk: ``rgb.mkv`` (FFV1), ``geometry.npz`` (depth float32, mask,
object_id), ``edges.npz`` (bool), ``flow.npz`` (flows as float16: at most 2**-11 relative error, i.e. 0.05 px at
100 px of motion; occlusions bool), ``noise.npz`` (float16 noise), ``camera.npz``, ``meta.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from loom.datasets.codecs import decode_video, encode_video, iter_decoded, npz, open_sample, unnpz

KIND = "scene"
EDGE_KINDS = ("silhouette", "crease", "boundary", "intersection")
EXTS = ("rgb.mkv", "geometry.npz", "edges.npz", "flow.npz", "noise.npz", "camera.npz", "meta.json")
FLOW_KEYS = ("flow_fwd", "flow_bwd", "flow_last_to_first", "occlusion_fwd", "occlusion_bwd")


def check_arrays(a: dict[str, np.ndarray]) -> None:
    t, h, w, _ = a["rgb"].shape
    c = a["noise"].shape[1]
    lh, lw = a["noise"].shape[2:]
    expect = {
        "rgb": (t, h, w, 3), "depth": (t, h, w), "mask": (t, h, w), "object_id": (t, h, w), "edges": (t, h, w, 4),
        "flow_fwd": (t - 1, h, w, 2), "flow_bwd": (t - 1, h, w, 2), "flow_last_to_first": (h, w, 2),
        "occlusion_fwd": (t - 1, h, w), "occlusion_bwd": (t - 1, h, w), "noise": (t, c, lh, lw),
        "K": (t, 3, 3), "c2w": (t, 4, 4),
    }
    for k, shape in expect.items():
        if k not in a:
            raise ValueError(f"scene sample is missing array {k!r}")
        if tuple(a[k].shape) != shape:
            raise ValueError(f"array {k!r} has shape {tuple(a[k].shape)}, expected {shape}")
        if np.issubdtype(a[k].dtype, np.floating) and not np.isfinite(a[k]).all():
            raise ValueError(f"array {k!r} contains NaN or inf")


def encode_sample(a: dict[str, np.ndarray], meta: dict[str, Any], rgb_codec: str = "ffv1") -> dict[str, bytes]:
    check_arrays(a)
    # shards are data: colour at full resolution (yuv444p) when h264
    ext, video = encode_video(a["rgb"], rgb_codec, full_chroma=True)
    return {
        ext: video,
        "geometry.npz": npz(depth=a["depth"].astype(np.float32), mask=a["mask"].astype(bool),
                            object_id=a["object_id"].astype(np.uint16)),
        "edges.npz": npz(edges=a["edges"].astype(bool)),
        "flow.npz": npz(**{k: a[k].astype(np.float16 if k.startswith("flow") else bool) for k in FLOW_KEYS}),
        "noise.npz": npz(noise=np.asarray(a["noise"], dtype=np.float16)),
        "camera.npz": npz(K=a["K"].astype(np.float32), c2w=a["c2w"].astype(np.float32)),
        "meta.json": json.dumps(meta, sort_keys=True).encode(),
    }


def decode_sample(files: dict[str, bytes], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    need = open_sample(files, EXTS, "scene", keys)

    out: dict[str, Any] = {}
    if need("rgb"):
        out["rgb"] = decode_video(files.get("rgb.mkv") or files["rgb.mp4"])
    if need("depth", "mask", "object_id"):
        g = unnpz(files["geometry.npz"])
        out.update(depth=g["depth"], mask=g["mask"], object_id=g["object_id"])
    if need("edges"):
        out["edges"] = unnpz(files["edges.npz"])["edges"]
    if need(*FLOW_KEYS):
        f = unnpz(files["flow.npz"])
        out.update({k: f[k].astype(np.float32) if k.startswith("flow") else f[k] for k in FLOW_KEYS})
    if need("noise"):
        out["noise"] = unnpz(files["noise.npz"])["noise"].astype(np.float32)
    if need("K", "c2w"):
        c = unnpz(files["camera.npz"])
        out["K"], out["c2w"] = c["K"], c["c2w"]
    out["meta"] = json.loads(files["meta.json"])
    return out


def iter_samples(url: str, keys: tuple[str, ...] | None = None) -> Iterator[dict[str, Any]]:
    """Yield decoded scene samples from a shard, a folder of shards or a Loom output folder (manifest order)."""
    return iter_decoded(url, decode_sample, keys)
