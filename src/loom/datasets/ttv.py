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

On disk (one WebDataset sample = these tar members, ``<key>.<ext>``). The members every encoding shares:

- ``rgb.mkv``: FFV1 (lossless) in Matroska, pixel format bgr0, or ``rgb.mp4`` (H.264 CRF 18, yuv444p) when
  ``encode.rgb_codec=h264`` or the geometry encoding is ``model-input``.
- ``albedo.mkv`` (only with ``passes.albedo=true``): FFV1 (lossless) in Matroska, pixel format bgr0, whatever
  ``encode.rgb_codec`` is: it is a reference for exact checks, so it is never lossy.
- ``known.npz`` (only with ``passes.partial=true``): bool. ``camera.npz``: ``K`` and ``c2w`` float32.
- ``meta.json``: UTF-8 JSON.

Normal, position, depth and mask are stored in one of three encodings (``encoding.geometry`` of ``loom render ttv``;
the reader tells them apart by their members, so one reader reads every corpus):

- ``precise`` (the default of new corpora): ``position.q15.zst``, the position as 15-bit fixed point over [-1, 1]
  (codes 1..32767, step 2/32766 = 6.1e-5; code 0 = outside the mask, so there is no mask member), and
  ``normal.oct14.zst``, the normal as two 14-bit octahedral coordinates (0 outside the mask). Each holds its planes
  (T,P,H,W) as the residuals of predicting each value by the one above it, split into byte planes, as a .npy in a
  zstd frame (:func:`loom.datasets.codecs.encode_planes`; why this store: the measurements there). Depth is not
  stored: the renderer computes it from its position pass (camera-space z, see the render module), and so does the
  reader, from the decoded position and ``c2w``. 0.16-0.33 MB per 512x512 frame with FFV1 rgb, averaged over 4
  frames (single frames up to 0.38 MB; benchmarks/encodings.py; target <= 0.45 MB); decodes 1.6x faster than
  ``npz``. Samples written before the zstd store (``position.q15.npz`` / ``normal.oct14.npz``: zips of deflated
  left-neighbour residuals, ``LEGACY_LAYOUTS``) hold the same codes and decode to the same arrays.
- ``model-input``: what the video VAE sees, at 8 bits: ``position.q8.zst`` and ``normal.q8.zst`` (formerly
  ``.npz``, read likewise), x, y and z each as 8-bit fixed point over [-1, 1] (codes 1..255, step 2/254; 0 = outside
  the mask), stored the same way, and rgb always as H.264 (CRF 18, yuv444p). 0.05-0.10 MB per 512x512 frame (single
  frames up to 0.12; target <= 0.15 MB).
- ``npz`` (corpora made before these encodings, and ``encoding.geometry=npz``): ``normal.npz``, ``position.npz``
  (float16, ``np.savez_compressed``), ``depth.npz`` (float32), ``mask.npz`` (bool). ~1.2 MB per 512x512 frame.

Precision of the decoded arrays against the renderer's own float32 passes: the bound (by construction), and in
brackets the largest error measured by benchmarks/encodings.py on Blender renders of the five bundled assets at
512x512 (position and depth in world units, the object inside the unit sphere):

========  =============================================  ======================================  ======================
array     ``precise``                                    ``model-input``                         ``npz``
========  =============================================  ======================================  ======================
position  <= 3.07e-5 per coordinate: half a step      <= 3.94e-3 per coordinate (3.94e-3)     <= 4.9e-4 (2.4e-4)
          plus float32 (3.06e-5)
depth     <= 5.3e-5: the position's error along the      <= 6.9e-3 (5.2e-3)                      exact (float32)
          optical axis, plus float32 (4.0e-5)
normal    <= 3e-4 rad (2.6e-4)                           <= 1e-2 rad (6.8e-3), renormalised      ~4e-4 rad (4.0e-4)
mask      exact                                          exact                                   exact
rgb       ``encode.rgb_codec``                           H.264 CRF 18                            ``encode.rgb_codec``
========  =============================================  ======================================  ======================

Contract: every encoding decodes to the keys, shapes and dtypes of the table at the top. Inside the mask,
``position`` equals ``unproject_depth(depth, K, c2w)`` up to the renderer's own pixel-centre jitter (see the render
module) plus the rounding of the stored position (the position row above: ``npz``'s float16, or the fixed point of
``precise`` and ``model-input``, whose depth is derived from the decoded position and so adds nothing).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np

from loom.datasets.codecs import (decode_planes, decode_video, encode_planes, encode_video, fixed_point,
                                  from_fixed_point, iter_decoded, oct_decode, oct_encode)
from loom.datasets.codecs import npz as _npz
from loom.datasets.codecs import unnpz as _unnpz

KIND = "ttv"
RGB_EXTS = ("rgb.mkv", "rgb.mp4")
# The members of each geometry encoding besides rgb (and the optional albedo and known); the position member names it.
LAYOUTS = {
    "npz": ("normal.npz", "position.npz", "depth.npz", "mask.npz", "camera.npz", "meta.json"),
    "precise": ("normal.oct14.zst", "position.q15.zst", "camera.npz", "meta.json"),
    "model-input": ("normal.q8.zst", "position.q8.zst", "camera.npz", "meta.json"),
}
GEOMETRY_ENCODINGS = tuple(LAYOUTS)
# The members that Loom wrote for the same encodings before the zstd plane store (deflated zips, up to e20185c):
# read, never written. Same codes, so a sample decodes to the same arrays either way.
LEGACY_LAYOUTS = {
    "precise": ("normal.oct14.npz", "position.q15.npz", "camera.npz", "meta.json"),
    "model-input": ("normal.q8.npz", "position.q8.npz", "camera.npz", "meta.json"),
}
# precise positions: step 6.1e-5 (error <= 3.05e-5, 16x inside float16's 4.9e-4); 16 bits cost 44 kB more per
# 512x512 frame, which took the first frame of the bundled marble_shaderball past 0.45 MB
POS_BITS = 15
OCT_BITS = 14  # precise normals: <= 2.6e-4 rad, below float16's ~4e-4; 16 bits cost +27% for the normals
REQUIRED_EXTS = LAYOUTS["npz"]  # the layout of corpora made before the other encodings
# position member -> (encoding, its layout): the position member names the encoding and the store
_POSITION = {layout[1]: (e, layout) for layouts in (LAYOUTS, LEGACY_LAYOUTS) for e, layout in layouts.items()}


def encode_sample(arrays: dict[str, np.ndarray], meta: dict[str, Any], rgb_codec: str = "ffv1",
                  geometry: str = "npz") -> dict[str, bytes]:
    """Arrays as documented above -> ``{ext: bytes}`` for one tar sample, normal/position/depth/mask in the encoding
    ``geometry`` (``precise``, ``model-input`` or ``npz``; ``model-input`` writes rgb as H.264 whatever ``rgb_codec``
    is). Checks shapes and dtypes first, so a renderer bug is caught before anything is written. ``loom render ttv``
    passes its ``encoding.geometry`` (``precise`` for new corpora); the default here is the layout of earlier Loom
    versions, which every existing caller wrote."""
    if geometry not in LAYOUTS:
        raise ValueError(f"unknown geometry encoding {geometry!r}: use one of {list(GEOMETRY_ENCODINGS)}")
    check_arrays(arrays)
    # shards are data: colour at full resolution (yuv444p) when h264
    ext, video = encode_video(arrays["rgb"], "h264" if geometry == "model-input" else rgb_codec, full_chroma=True)
    optional = {}
    if "albedo" in arrays:  # always lossless: a reference for exact checks, whatever rgb_codec is
        albedo_ext, albedo_video = encode_video(arrays["albedo"], "ffv1", name="albedo")
        optional[albedo_ext] = albedo_video
    if "known" in arrays:
        optional["known.npz"] = _npz(known=arrays["known"].astype(bool))
    camera = _npz(K=arrays["K"].astype(np.float32), c2w=arrays["c2w"].astype(np.float32))
    return {ext: video, **optional, **_encode_geometry(arrays, geometry), "camera.npz": camera,
            "meta.json": json.dumps(meta, sort_keys=True).encode()}


def _encode_geometry(a: dict[str, np.ndarray], geometry: str) -> dict[str, bytes]:
    if geometry == "npz":
        return {"normal.npz": _npz(normal=a["normal"].astype(np.float16)),
                "position.npz": _npz(position=a["position"].astype(np.float16)),
                "depth.npz": _npz(depth=a["depth"].astype(np.float32)),
                "mask.npz": _npz(mask=a["mask"].astype(bool))}
    m = a["mask"]
    off = np.abs(np.linalg.norm(a["normal"][m], axis=-1) - 1)
    if (off > 1e-2).any():
        worst = np.linalg.norm(a["normal"][m], axis=-1)[np.argmax(off)]
        raise ValueError(f"array 'normal' has vectors of length {worst:.3g} inside the "
                         f"mask: the {geometry!r} encoding stores unit normals (encode with geometry='npz' to keep "
                         "them as they are)")
    bits = POS_BITS if geometry == "precise" else 8
    try:
        pos = fixed_point(a["position"], bits, m)
    except ValueError as e:
        raise ValueError(f"array 'position': {e}: the {geometry!r} encoding stores the unit sphere's coordinates "
                         "(world positions of the normalised asset); encode with geometry='npz' otherwise") from None
    if geometry == "precise":
        nrm = np.where(m[..., None], oct_encode(a["normal"], OCT_BITS), 0).astype(np.uint16)
    else:
        nrm = fixed_point(a["normal"], 8, m)
    names = LAYOUTS[geometry][1], LAYOUTS[geometry][0]
    planes = lambda x: np.moveaxis(x, -1, 1)  # noqa: E731  (T,H,W,C) -> (T,C,H,W)
    return {names[0]: encode_planes(planes(pos)), names[1]: encode_planes(planes(nrm))}


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


def geometry_encoding(files: dict[str, bytes]) -> str:
    """Which encoding a sample's normal/position/depth/mask are in, from its members."""
    return _layout(files)[0]


def _layout(files: dict[str, bytes]) -> tuple[str, tuple[str, ...]]:
    """(encoding, members) of a sample, from its position member."""
    found = [v for ext, v in _POSITION.items() if ext in files]
    if len(found) != 1:
        raise ValueError(f"sample has {'no' if not found else 'more than one'} position member (one of "
                         f"{sorted(_POSITION)}): not a complete turntable sample")
    return found[0]


def _read(files: dict[str, bytes], ext: str, decode: Callable[[bytes], Any]) -> Any:
    """``decode(files[ext])``, with a failure named by the member."""
    try:
        return decode(files[ext])
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"sample member {ext!r} is corrupt ({type(e).__name__}: {e}): rewrite its shard (rerun the "
                         "render job into the same folder after deleting that shard)") from None


def decode_sample(files: dict[str, bytes], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``{ext: bytes}`` -> the documented dict, whatever the geometry encoding. ``keys`` limits decoding to some
    passes (e.g. ("rgb", "meta")). ``albedo`` and ``known`` are decoded when the sample has them; asking for one
    (``keys``) from a sample without it is an error. A corrupt member is a ValueError that names it."""
    want = set(keys) if keys else None
    out: dict[str, Any] = {}

    def need(k: str) -> bool:
        return want is None or k in want

    geometry, layout = _layout(files)
    missing = [e for e in layout if e not in files] + \
        ([] if any(e in files for e in RGB_EXTS) else ["rgb"])
    if missing:
        raise ValueError(f"sample lacks {missing}: not a complete turntable sample ({geometry} encoding)")
    if need("rgb"):
        ext = "rgb.mkv" if "rgb.mkv" in files else "rgb.mp4"
        out["rgb"] = _read(files, ext, decode_video)
    if "albedo.mkv" in files and need("albedo"):
        out["albedo"] = _read(files, "albedo.mkv", decode_video)
    elif want is not None and "albedo" in want:
        raise ValueError("sample has no albedo.mkv: its corpus was rendered without passes.albedo=true; rerender "
                         "with it or do not ask for 'albedo'")
    if "known.npz" in files and need("known"):
        out["known"] = _read(files, "known.npz", lambda b: _unnpz(b)["known"]).astype(bool)
    elif want is not None and "known" in want:
        raise ValueError("sample has no known.npz: its corpus was rendered without passes.partial=true; rerender "
                         "with it or do not ask for 'known'")
    cam = None
    if need("K") or need("c2w") or (need("depth") and geometry != "npz"):
        cam = _read(files, "camera.npz", lambda b: {k: v for k, v in _unnpz(b).items() if k in ("K", "c2w")})
        if set(cam) != {"K", "c2w"}:
            raise ValueError(f"sample member 'camera.npz' holds {sorted(cam)}, expected ['K', 'c2w']")
    if geometry == "npz":
        for k in ("normal", "position", "depth", "mask"):
            if need(k):
                out[k] = _read(files, f"{k}.npz", lambda b, k=k: _unnpz(b)[k]).astype(np.float32 if k != "mask"
                                                                                      else bool)
    elif any(need(k) for k in ("normal", "position", "depth", "mask")):
        out.update(_decode_geometry(files, geometry, layout, need, cam))
    if need("K") or need("c2w"):
        out["K"], out["c2w"] = cam["K"], cam["c2w"]
    out["meta"] = _read(files, "meta.json", json.loads)
    return out


def _decode_geometry(files: dict[str, bytes], geometry: str, layout: tuple[str, ...], need: Callable[[str], bool],
                     cam: dict | None) -> dict[str, np.ndarray]:
    pos_ext, nrm_ext = layout[1], layout[0]
    bits = POS_BITS if geometry == "precise" else 8
    codes = _read(files, pos_ext, decode_planes)  # (T,3,H,W)
    if codes.dtype != (np.uint16 if bits > 8 else np.uint8) or codes.max(initial=0) >= 2**bits:
        raise ValueError(f"sample member {pos_ext!r} holds {codes.dtype} planes, expected {bits}-bit")
    mask = codes[:, 0] != 0
    out: dict[str, np.ndarray] = {}
    if need("mask"):
        out["mask"] = mask
    if need("position"):
        out["position"] = from_fixed_point(codes.transpose(0, 2, 3, 1), bits)  # (T,H,W,3)
    if need("depth"):
        c2w = cam["c2w"]
        if len(c2w) != len(codes):
            raise ValueError(f"sample member 'camera.npz' has {len(c2w)} cameras for {len(codes)} frames of "
                             f"{pos_ext!r}")
        out["depth"] = _depth(codes, bits, c2w)
    if need("normal"):
        ncodes = _read(files, nrm_ext, decode_planes)
        nplanes = 2 if geometry == "precise" else 3
        if ncodes.shape != (len(codes), nplanes) + codes.shape[2:] or ncodes.dtype != codes.dtype:
            raise ValueError(f"sample member {nrm_ext!r} holds {ncodes.shape} {ncodes.dtype} planes, which do not "
                             f"match {pos_ext!r}'s {codes.shape} {codes.dtype}")
        ncodes = ncodes.transpose(0, 2, 3, 1)
        if geometry == "precise":
            out["normal"] = oct_decode(ncodes, OCT_BITS, keep=mask)
        else:  # 0 outside the mask already (code 0); renormalised: unit inside
            nrm = from_fixed_point(ncodes, 8)
            length = np.sqrt(np.einsum("thwc,thwc->thw", nrm, nrm))
            out["normal"] = nrm / np.where(mask, length, np.float32(1.0))[..., None]
    return out


def _depth(codes: np.ndarray, bits: int, c2w: np.ndarray) -> np.ndarray:
    """Camera-space z of the positions of fixed-point ``codes`` (T,3,H,W), 0 where code 0 (outside the mask): the
    renderer's own definition, z = (p - c) . R[:, 2] for camera centre c and rotation R of ``c2w``, summed per axis
    through tables of each code's share (the constant -c . R[:, 2] folded into x's, whose code is never 0 inside)."""
    values = from_fixed_point(np.arange(2**bits, dtype=codes.dtype), bits).astype(np.float64)
    depth = np.empty((codes.shape[0],) + codes.shape[2:], np.float32)
    for t in range(len(codes)):
        axis, centre = c2w[t, :3, 2].astype(np.float64), c2w[t, :3, 3].astype(np.float64)
        tables = [(values * axis[k]).astype(np.float32) for k in range(3)]
        tables[0] = (values * axis[0] - centre @ axis).astype(np.float32)
        tables[0][0] = 0.0
        d = depth[t]
        np.take(tables[0], codes[t, 0], out=d)
        d += tables[1][codes[t, 1]]
        d += tables[2][codes[t, 2]]
    return depth


def iter_samples(url: str, keys: tuple[str, ...] | None = None,
                 part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Any]]:
    """Yield decoded samples from a shard, a folder of shards or a Loom output folder (manifest order).
    Each dict also carries ``__key__``, ``__shard__`` and ``__index__``. ``keys`` limits decoding to some passes;
    ``part=(rank, parts)`` yields every ``parts``-th sample from the ``rank``-th (the others are not decoded)."""
    return iter_decoded(url, decode_sample, keys, part)
