"""Animated 4D samples (ShapeGen4D sections 3.1 and 5.1): the schema, the on-disk encoding, and the reader.

A sample decodes to (T frames, default 16):

================  ===============  =======  ===============================================================
key               shape            dtype    meaning
================  ===============  =======  ===============================================================
``surface``       (T,S,6)          float32  points on the watertight mesh of each frame and their unit outward
                                            normals (xyz, nx ny nz); S = 32,768 by default
``sharp_surface`` (T,S',6)         float32  OPTIONAL (``points.sharp_points`` > 0): sharp-edge salient points of
                                            each frame's watertight mesh and their unit normals, sampled as
                                            Dora/Step1X-3D do (:mod:`loom.geometry.sharp`); S' = 32,768 by
                                            default; the input of the VAE's sharp branch (``sharp_surface=``)
``queries``       (T,Q,3)          float32  aligned query points: query i is the same physical point of the
                                            animated (original, non-watertight) mesh in every frame; Q = 1,024
``query_faces``   (Q,)             int64    triangle of the original mesh each query lies on
``query_bary``    (Q,3)            float32  its barycentric coordinates (the same in every frame)
``sdf_points``    (T,M,3)          float32  points near the surface and uniform in the box
``sdf``           (T,M)            float32  signed distance to the frame's watertight mesh, truncated to
                                            [-tau, tau], NEGATIVE INSIDE
``video``         (T,H,W,4)        uint8    fixed-view conditioning video, sRGB, straight alpha
``K``             (T,3,3)          float32  intrinsics (pixels, pixel centres at u+0.5)
``c2w``           (T,4,4)          float32  OpenCV camera-to-world (world +Z up)
``meta``          dict                      seed, uid, asset_sha256, frame_times, normalization,
                                            root_offsets (T,3), root_rotations (T,3,3), root_origin (3,),
                                            root_rotation_mode, animation, versions, config hash, half_extent,
                                            sdf_truncation, and with sharp points ``sharp_edges`` (sharp edges
                                            found per frame; 0 = that frame fell back to surface points)
================  ===============  =======  ===============================================================

Coordinates and units: root motion removed (the root's translation since frame 0, and its rotation since frame 0 as
``meta["root_rotation_mode"]`` says: none, yaw or full; the removed ``root_offsets``/``root_rotations`` about
``root_origin`` are world units before ``normalization``, so ``loom.geometry.sequence.restore_root_transform`` undoes
it; older corpora have only ``root_offsets``: no rotation was removed), then one similarity for the whole sequence so
every frame of the animated mesh lies in the box ``[-h, h]^3`` (``meta["half_extent"]``). Corpora written since the
Step1X-3D base use its frame, ``h = 1`` (Step1X-3D's shapes fill [-1, 1]^3, meshes are extracted in +-1.05), and
truncate the signed distances at tau = 0.01 in those units (``meta["sdf_truncation"]``), so the released VAE reads them
as they are; older corpora have ``h = 0.5`` and tau = 0.05 (no ``sdf_truncation`` in their meta: see the job's
config.yaml). All lengths (positions, sdf, tau) are in the units of that box. The watertight surface (``surface``,
``sharp_surface``, ``sdf``) lies slightly outside the original one: about 1/resolution of the box side (0.022 for h = 1
at the default 20,000).

On disk: ``surface.npz``, ``queries.npz``, ``sdf.npz`` (float32, zip-compressed numpy), ``video.mkv`` (FFV1
lossless with alpha), ``camera.npz``, ``meta.json``, and with sharp points ``sharp.npz`` (float32; absent in
corpora written with ``points.sharp_points=0`` and in older ones).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from loom.datasets.codecs import decode_video, encode_video, iter_decoded, npz, unnpz

KIND = "4d"
EXTS = ("surface.npz", "queries.npz", "sdf.npz", "video.mkv", "camera.npz", "meta.json")
# Optional members: present only when the job wrote them.
SHARP = "sharp.npz"
# What to tell a reader that needs sharp-edge points from shards without them.
SHARP_MISSING = ("4D sample has no 'sharp_surface' (sharp-edge points, the input of the Step1X-3D VAE's sharp "
                 "branch): its corpus was written with points.sharp_points=0 or before they existed. Re-render it "
                 "with `loom render 4d --set points.sharp_points=32768` (the default recipe writes them)")


def check_arrays(a: dict[str, np.ndarray]) -> None:
    """Raise ValueError naming the first array whose shape or dtype breaks the schema."""
    t, s, _ = a["surface"].shape
    q = a["queries"].shape[1]
    m = a["sdf"].shape[1]
    h, w = a["video"].shape[1:3]
    expect = {
        "surface": (t, s, 6), "queries": (t, q, 3), "query_faces": (q,), "query_bary": (q, 3),
        "sdf_points": (t, m, 3), "sdf": (t, m), "video": (t, h, w, 4), "K": (t, 3, 3), "c2w": (t, 4, 4),
    }
    for k, shape in expect.items():
        if k not in a:
            raise ValueError(f"4D sample is missing array {k!r}")
        if a[k].shape != shape:
            raise ValueError(f"array {k!r} has shape {a[k].shape}, expected {shape}")
        if np.issubdtype(a[k].dtype, np.floating) and not np.isfinite(a[k]).all():
            raise ValueError(f"array {k!r} contains NaN or inf")
    if "sharp_surface" in a:
        sh = a["sharp_surface"].shape
        if len(sh) != 3 or sh[0] != t or sh[2] != 6:
            raise ValueError(f"array 'sharp_surface' has shape {sh}, expected ({t}, S', 6)")
        if not np.isfinite(a["sharp_surface"]).all():
            raise ValueError("array 'sharp_surface' contains NaN or inf")
    if a["video"].dtype != np.uint8:
        raise ValueError(f"video must be uint8, got {a['video'].dtype}")


def encode_sample(a: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, bytes]:
    check_arrays(a)
    ext, video = encode_video(a["video"], "ffv1", name="video")
    sharp = {SHARP: npz(sharp_surface=a["sharp_surface"].astype(np.float32))} if "sharp_surface" in a else {}
    return {
        "surface.npz": npz(surface=a["surface"].astype(np.float32)),
        "queries.npz": npz(queries=a["queries"].astype(np.float32), faces=a["query_faces"].astype(np.int64),
                           bary=a["query_bary"].astype(np.float32)),
        "sdf.npz": npz(points=a["sdf_points"].astype(np.float32), sdf=a["sdf"].astype(np.float32)),
        ext: video,
        "camera.npz": npz(K=a["K"].astype(np.float32), c2w=a["c2w"].astype(np.float32)),
        "meta.json": json.dumps(meta, sort_keys=True).encode(),
        **sharp,
    }


def decode_sample(files: dict[str, bytes], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    missing = [e for e in EXTS if e not in files]
    if missing:
        raise ValueError(f"sample lacks {missing}: not a complete 4D sample")
    want = set(keys) if keys else None

    def need(*ks: str) -> bool:
        return want is None or any(k in want for k in ks)

    out: dict[str, Any] = {}
    if need("surface"):
        out["surface"] = unnpz(files["surface.npz"])["surface"]
    if keys and "sharp_surface" in keys and SHARP not in files:
        raise ValueError(SHARP_MISSING)
    if SHARP in files and (want is None or "sharp_surface" in want):
        out["sharp_surface"] = unnpz(files[SHARP])["sharp_surface"]
    if need("queries", "query_faces", "query_bary"):
        q = unnpz(files["queries.npz"])
        out["queries"], out["query_faces"], out["query_bary"] = q["queries"], q["faces"], q["bary"]
    if need("sdf", "sdf_points"):
        d = unnpz(files["sdf.npz"])
        out["sdf_points"], out["sdf"] = d["points"], d["sdf"]
    if need("video"):
        out["video"] = decode_video(files["video.mkv"], channels=4)
    if need("K", "c2w"):
        c = unnpz(files["camera.npz"])
        out["K"], out["c2w"] = c["K"], c["c2w"]
    out["meta"] = json.loads(files["meta.json"])
    return out


def iter_samples(url: str, keys: tuple[str, ...] | None = None,
                 part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Any]]:
    """Yield decoded 4D samples from a shard, a folder of shards or a Loom output folder (manifest order)."""
    return iter_decoded(url, decode_sample, keys, part)
