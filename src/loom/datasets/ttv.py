"""Turntable-video samples: the schema, the on-disk encoding, and the reader.

A sample decodes to a dict of arrays (T frames, H x W pixels):

=============  =================  =========  ===================================================================
key            shape              dtype      meaning
=============  =================  =========  ===================================================================
``rgb``        (T,H,W,3)          uint8      beauty render, sRGB ('Standard' view transform), object composited over
                                             the job's background colour
``normal``     (T,H,W,3)          float32    world-space unit normals inside the mask, 0 outside
``position``   (T,H,W,3)          float32    world coordinates of the surface point at the pixel centre, 0 outside
``depth``      (T,H,W)            float32    camera-space z (along the optical axis, world units), 0 outside
``mask``       (T,H,W)            bool       object coverage at the pixel centre
``albedo``     (T,H,W,3)          uint8      optional (``passes.albedo=true``): unlit diffuse colour, i.e. Cycles'
                                             Diffuse Color pass (the material's base colour at the visible surface),
                                             sRGB, composited over the background with rgb's coverage; absent
                                             when the job did not render it
``known``      (T,H,W)            bool       optional (``passes.partial=true``): the partial-texture training target,
                                             true on the object's pixels whose surface an earlier orbit of the
                                             object under another base rotation saw (``meta["partial"]``: the
                                             tilt, the camera count, the known fraction); absent otherwise
``K``          (T,3,3)            float32    pinhole intrinsics in pixels, pixel centres at (u+0.5, v+0.5)
``c2w``        (T,4,4)            float32    OpenCV camera-to-world (x right, y down, z forward; world +Z up)
``meta``       dict                          seed, variant, uid, asset_sha256, loom/blender versions, config hash,
                                             normalisation matrix, fov, lighting, warnings
=============  =================  =========  ===================================================================

World coordinates are those of the normalised, rotated asset: inside the unit sphere, centred at the origin.
``meta["normalization"]`` is the 4x4 matrix taking the asset file's own coordinates there.

On disk (one WebDataset sample = these tar members, ``<key>.<ext>``):

- ``rgb.mkv``: FFV1 (lossless) in Matroska, pixel format bgr0, or ``rgb.mp4`` (H.264 CRF 18, yuv444p) when
  ``encode.rgb_codec=h264``.
- ``albedo.mkv`` (only with ``passes.albedo=true``): FFV1 (lossless) in Matroska, pixel format bgr0, whatever
  ``encode.rgb_codec`` is: it is a reference for exact checks, so it is never lossy.
- ``normal.npz``, ``position.npz``: float16 arrays (``np.savez_compressed``). Precision: float16 has a relative
  error of at most 2**-11, i.e. at most 4.9e-4 for coordinates inside the unit sphere.
- ``depth.npz``: float32. ``mask.npz`` and ``known.npz`` (only with ``passes.partial=true``): bool.
  ``camera.npz``: ``K`` and ``c2w`` float32.
- ``meta.json``: UTF-8 JSON.

Contract: inside the mask, ``position`` equals ``unproject_depth(depth, K, c2w)`` up to the float16 rounding of the
stored position (<= 4.9e-4 per coordinate) plus the renderer's own pixel-centre jitter (see the render module).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from loom.datasets.codecs import decode_video, encode_video, iter_decoded
from loom.datasets.codecs import npz as _npz
from loom.datasets.codecs import unnpz as _unnpz

KIND = "ttv"
RGB_EXTS = ("rgb.mkv", "rgb.mp4")
REQUIRED_EXTS = ("normal.npz", "position.npz", "depth.npz", "mask.npz", "camera.npz", "meta.json")


def encode_sample(arrays: dict[str, np.ndarray], meta: dict[str, Any], rgb_codec: str = "ffv1") -> dict[str, bytes]:
    """Arrays as documented above -> ``{ext: bytes}`` for one tar sample. Checks shapes and dtypes first, so a
    renderer bug is caught before anything is written."""
    check_arrays(arrays)
    # shards are data: colour at full resolution (yuv444p) when h264
    ext, video = encode_video(arrays["rgb"], rgb_codec, full_chroma=True)
    optional = {}
    if "albedo" in arrays:  # always lossless: a reference for exact checks, whatever rgb_codec is
        albedo_ext, albedo_video = encode_video(arrays["albedo"], "ffv1", name="albedo")
        optional[albedo_ext] = albedo_video
    if "known" in arrays:
        optional["known.npz"] = _npz(known=arrays["known"].astype(bool))
    return {
        ext: video,
        **optional,
        "normal.npz": _npz(normal=arrays["normal"].astype(np.float16)),
        "position.npz": _npz(position=arrays["position"].astype(np.float16)),
        "depth.npz": _npz(depth=arrays["depth"].astype(np.float32)),
        "mask.npz": _npz(mask=arrays["mask"].astype(bool)),
        "camera.npz": _npz(K=arrays["K"].astype(np.float32), c2w=arrays["c2w"].astype(np.float32)),
        "meta.json": json.dumps(meta, sort_keys=True).encode(),
    }


def check_arrays(a: dict[str, np.ndarray]) -> None:
    """Raise ValueError naming the first array whose shape or dtype breaks the schema."""
    t, h, w, _ = a["rgb"].shape
    expect = {
        "rgb": ((t, h, w, 3), np.uint8),
        "normal": ((t, h, w, 3), np.floating),
        "position": ((t, h, w, 3), np.floating),
        "depth": ((t, h, w), np.floating),
        "mask": ((t, h, w), np.bool_),
        "K": ((t, 3, 3), np.floating),
        "c2w": ((t, 4, 4), np.floating),
    }
    for k, (shape, dt) in expect.items():
        if k not in a:
            raise ValueError(f"sample is missing array {k!r}")
        if a[k].shape != shape or not np.issubdtype(a[k].dtype, dt):
            raise ValueError(f"array {k!r} has shape {a[k].shape} dtype {a[k].dtype}, expected {shape} {dt.__name__}")
        if np.issubdtype(a[k].dtype, np.floating) and not np.isfinite(a[k]).all():
            raise ValueError(f"array {k!r} contains NaN or inf")
    if "albedo" in a and (a["albedo"].shape != (t, h, w, 3) or a["albedo"].dtype != np.uint8):
        raise ValueError(f"array 'albedo' has shape {a['albedo'].shape} dtype {a['albedo'].dtype}, expected "
                         f"{(t, h, w, 3)} uint8")
    if "known" in a:
        if a["known"].shape != (t, h, w) or a["known"].dtype != np.bool_:
            raise ValueError(f"array 'known' has shape {a['known'].shape} dtype {a['known'].dtype}, expected "
                             f"{(t, h, w)} bool")
        if (a["known"] & ~a["mask"]).any():
            raise ValueError("array 'known' is true outside the mask: only the object's pixels can be known")


def decode_sample(files: dict[str, bytes], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``{ext: bytes}`` -> the documented dict. ``keys`` limits decoding to some passes (e.g. ("rgb", "meta")).
    ``albedo`` and ``known`` are decoded when the sample has them; asking for one (``keys``) from a sample without it
    is an error."""
    want = set(keys) if keys else None
    out: dict[str, Any] = {}

    def need(k: str) -> bool:
        return want is None or k in want

    missing = [e for e in REQUIRED_EXTS if e not in files] + ([] if any(e in files for e in RGB_EXTS) else ["rgb"])
    if missing:
        raise ValueError(f"sample lacks {missing}: not a complete turntable sample")
    if need("rgb"):
        out["rgb"] = decode_video(files["rgb.mkv"] if "rgb.mkv" in files else files["rgb.mp4"])
    if "albedo.mkv" in files and need("albedo"):
        out["albedo"] = decode_video(files["albedo.mkv"])
    elif want is not None and "albedo" in want:
        raise ValueError("sample has no albedo.mkv: its corpus was rendered without passes.albedo=true; rerender "
                         "with it or do not ask for 'albedo'")
    if "known.npz" in files and need("known"):
        out["known"] = _unnpz(files["known.npz"])["known"].astype(bool)
    elif want is not None and "known" in want:
        raise ValueError("sample has no known.npz: its corpus was rendered without passes.partial=true; rerender "
                         "with it or do not ask for 'known'")
    for k in ("normal", "position", "depth", "mask"):
        if need(k):
            out[k] = _unnpz(files[f"{k}.npz"])[k].astype(np.float32 if k != "mask" else bool)
    if need("K") or need("c2w"):
        cam = _unnpz(files["camera.npz"])
        out["K"], out["c2w"] = cam["K"], cam["c2w"]
    out["meta"] = json.loads(files["meta.json"])
    return out


def iter_samples(url: str, keys: tuple[str, ...] | None = None,
                 part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Any]]:
    """Yield decoded samples from a shard, a folder of shards or a Loom output folder (manifest order).
    Each dict also carries ``__key__``, ``__shard__`` and ``__index__``. ``keys`` limits decoding to some passes;
    ``part=(rank, parts)`` yields every ``parts``-th sample from the ``rank``-th (the others are not decoded)."""
    return iter_decoded(url, decode_sample, keys, part)
