"""Byte encodings shared by every sample kind: lossless/lossy video through PyAV, compressed numpy arrays; and the
H.264 that media for people are written in."""

from __future__ import annotations

import functools
import io
import os
import tempfile

import numpy as np


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def unnpz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def encode_video(frames: np.ndarray, codec: str = "ffv1", fps: int = 24, name: str = "rgb", *,
                 full_chroma: bool = False) -> tuple[str, bytes]:
    """(T,H,W,3) or (T,H,W,4) uint8 -> (extension, bytes). Single-threaded bitexact encoders, so the same frames
    give the same bytes.

    - ``ffv1``: lossless (keeps alpha), in Matroska: data, e.g. the shards' rgb.
    - ``h264``: H.264 CRF 18, yuv420p, in MP4 with the index first (``+faststart``): media for people (sample and
      generated videos, evaluation media), which every browser plays, also while it downloads. Width and height
      must be even (4:2:0 halves the colour planes).
    - ``h264`` with ``full_chroma=True``: yuv444p instead, ~40x smaller than FFV1 with colour at full resolution:
      for data that may be lossy (``encode.rgb_codec=h264`` shards). Many browsers and players do not play it.
    """
    import av  # imported here: only writers and readers of videos need it

    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise ValueError(f"expected (T,H,W,3|4) uint8 frames, got {frames.shape} {frames.dtype}")
    t, h, w, c = frames.shape
    src_fmt = "rgb24" if c == 3 else "rgba"
    muxer = {"fflags": "+bitexact"}
    if codec == "ffv1":
        ext, fmt, codec_name, pix, opts = f"{name}.mkv", "matroska", "ffv1", "bgr0" if c == 3 else "bgra", {}
    elif codec == "h264":
        if c == 4:
            raise ValueError("H.264 has no alpha channel: use codec 'ffv1' for RGBA video")
        if h % 2 or w % 2:
            raise ValueError(f"H.264 needs even width and height, got {w}x{h}: crop or pad the frames by one pixel")
        pix = "yuv444p" if full_chroma else "yuv420p"
        ext, fmt, codec_name, opts = f"{name}.mp4", "mp4", "libx264", {"crf": "18", "preset": "medium"}
        if not full_chroma:
            muxer["movflags"] = "+faststart"
    else:
        raise ValueError(f"unknown rgb codec {codec!r}: use 'ffv1' or 'h264'")
    if "movflags" not in muxer:
        buf = io.BytesIO()
        _mux(buf, frames, fmt, muxer, codec_name, pix, opts, fps, src_fmt)
        return ext, buf.getvalue()
    # +faststart moves the index in front once the file is complete, by reading the file back through its name:
    # a temporary file rather than memory.
    with tempfile.TemporaryDirectory(prefix="loom-video-") as tmp:
        path = os.path.join(tmp, ext)
        _mux(path, frames, fmt, muxer, codec_name, pix, opts, fps, src_fmt)
        with open(path, "rb") as f:
            return ext, f.read()


def _mux(target, frames: np.ndarray, fmt: str, muxer: dict[str, str], codec_name: str, pix: str,
         opts: dict[str, str], fps: int, src_fmt: str) -> None:
    import av

    t, h, w, _ = frames.shape
    # bitexact: no random segment UIDs or encoder version strings, so the same frames give the same bytes.
    with av.open(target, "w", format=fmt, options=muxer) as c:
        s = c.add_stream(codec_name, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix
        s.options = opts
        s.codec_context.thread_count = 1
        s.codec_context.flags |= av.codec.context.Flags.bitexact
        # Matroska writes wall-clock metadata unless told otherwise: keep the bytes deterministic.
        c.metadata["creation_time"] = "1970-01-01T00:00:00Z"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format=src_fmt)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def decode_video(data: bytes, channels: int = 3) -> np.ndarray:
    import av

    fmt = {3: "rgb24", 4: "rgba"}[channels]
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format=fmt) for f in c.decode(video=0)])


def open_sample(files: dict[str, bytes], exts: tuple[str, ...], what: str, keys: tuple[str, ...] | None):
    """The start of a kind's ``decode_sample``: refuse a sample without one of ``exts`` (``rgb.mkv`` may be
    ``rgb.mp4``), naming what is missing, and return ``need(*names)``: whether any of those arrays is asked for
    (everything when ``keys`` is None)."""
    missing = [e for e in exts if e not in files and not (e == "rgb.mkv" and "rgb.mp4" in files)]
    if missing:
        raise ValueError(f"sample lacks {missing}: not a complete {what} sample")
    want = set(keys) if keys else None

    def need(*names: str) -> bool:
        return want is None or any(k in want for k in names)

    return need


def iter_decoded(url: str, decode, keys: tuple[str, ...] | None = None, part: tuple[int, int] = (0, 1)):
    """Yield ``decode(files, keys)`` for every sample of the shards at ``url`` (a shard, a folder of shards or a
    Loom output folder, in manifest order), with ``__key__``, ``__shard__`` and ``__index__`` (its position in that
    order) added. ``part=(rank, parts)``: only the samples whose index is ``rank`` modulo ``parts`` (the others are
    read past, not decoded)."""
    from loom.platform.shards import iter_tar, shard_urls

    rank, parts = part
    if not 0 <= rank < parts:
        raise ValueError(f"part={part}: rank must be in [0, {parts})")
    i = 0
    for shard in shard_urls(url):
        for key, files in iter_tar(shard):
            if i % parts == rank:
                sample = decode(files, keys)
                sample["__key__"], sample["__shard__"], sample["__index__"] = key, shard, i
                yield sample
            i += 1


def write_video(path: str, frames: np.ndarray, fps: int = 12) -> str:
    """(T,H,W,3) uint8 -> an H.264 mp4 file at ``path`` (folders made) for people to watch: sample and generated
    videos. An odd height or width loses its last row or column, which H.264 cannot encode. Returns ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        frames = frames[:, : h - h % 2, : w - w % 2]
    _, data = encode_video(frames, "h264", fps=fps, name="sample")
    with open(path, "wb") as f:
        f.write(data)
    return path


# ---------------------------------------------------------------------------------------------- geometry planes
# Fixed-point and octahedral codes for unit-range geometry (turntable positions and normals), and a lossless store of
# integer planes. Measured on Blender renders of the five bundled assets at 512x512 (4 frames each; 15-bit position
# codes in kB per frame, decode ms per frame on one core of this 2-core machine):
# - compressors of left-neighbour residuals split into high and low byte planes, 16-bit position codes: lzma-6 114
#   (18), FFV1 gray16le of the stacked planes 125 (25), zstd-19 130 (2), zlib-9 145 (4), FFV1 gbrp16le 154, 16-bit
#   PNG (cv2) 189, float16 npz 392 (19); with the 15-bit codes stored now, zstd-19 109 (2.6), zlib-9 124 (4.4). lzma
#   is ~12% smaller than zstd but decodes 9x slower: zstd won.
# - predictors: the upper neighbour beats the left one by 3% on positions (106.5 vs 109.4 kB at zstd-19) and 1% on
#   normals; zigzag-mapped residuals and the MED, gradient and second-order predictors did not help. NumPy undoes the
#   left one with a cumsum over each row (2.1 ns a value: the largest cost of decoding, more than inflating) but the
#   upper one with one vector add per image row (1.1 ns a value).
# - zstd levels (upper residuals, position + 14-bit octahedral normal, kB per frame, encode ms per frame): 15 219
#   (104), 17 205 (148), 19 199 (372); zlib-9 220 (the position alone 99). Level 17: zstd-19's size within 3% at
#   40% of its encode time, and about what zlib-9 cost to encode (once per sample, in the render worker).
# Until 2026-12 (Loom e20185c) the store was a zip of deflated left-neighbour residuals: still read, never written.
PLANES_ZSTD_LEVEL = 17
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PLANES_MAX_BYTES = 1 << 32  # refuse a store that claims more (a corrupt or hostile frame header), before allocating


def fixed_point(x: np.ndarray, bits: int, keep: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> codes 1 .. 2**bits - 1 (step 2 / (2**bits - 2)) where ``keep``, 0 elsewhere: code 0 is
    reserved (a turntable's position plane carries the mask in it). ``keep`` is (...) for values (...) or (..., C).
    Values beyond [-1, 1] (by more than float rounding) are refused."""
    x = np.asarray(x)
    keep = keep[..., None] if x.ndim > keep.ndim else keep
    worst = float(np.abs(np.where(keep, x, 0)).max(initial=0.0))
    if not worst <= 1.0 + 1e-4:
        raise ValueError(f"fixed point over [-1, 1] cannot store values up to {worst:.6g} in magnitude")
    levels = 2**bits - 2
    codes = np.rint((np.clip(x, -1.0, 1.0) + 1.0) * (levels / 2.0)) + 1.0
    return np.where(keep, codes, 0).astype(np.uint16 if bits > 8 else np.uint8)


def from_fixed_point(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes of :func:`fixed_point` -> float32 values (code 0 -> 0), through a table of the 2**bits values."""
    return _fixed_point_table(bits)[codes]


@functools.lru_cache(maxsize=None)
def _fixed_point_table(bits: int) -> np.ndarray:
    step = 2.0 / (2**bits - 2)
    table = (np.arange(2**bits, dtype=np.float64) - 1.0) * step - 1.0
    table[0] = 0.0
    return table.astype(np.float32)


def oct_encode(n: np.ndarray, bits: int = 14) -> np.ndarray:
    """Unit vectors (..., 3) -> octahedral codes (..., 2) in 0 .. 2**bits - 1 (Cigolle et al. 2014, "A Survey of
    Efficient Representations for Independent Unit Vectors"): the vector divided by its L1 norm, the lower half-space
    folded over the diagonals. At most 2.6e-4 rad off with 14 bits, 6.4e-5 with 16 (measured on 200k random and on
    rendered normals)."""
    n = np.asarray(n, dtype=np.float64)
    p = n / np.maximum(np.abs(n).sum(-1, keepdims=True), 1e-30)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    sx, sy = np.where(x >= 0, 1.0, -1.0), np.where(y >= 0, 1.0, -1.0)
    u = np.where(z < 0, (1.0 - np.abs(y)) * sx, x)
    v = np.where(z < 0, (1.0 - np.abs(x)) * sy, y)
    top = 2**bits - 1
    return np.rint((np.stack([u, v], -1) + 1.0) * (top / 2.0)).astype(np.uint16 if bits > 8 else np.uint8)


def oct_decode(codes: np.ndarray, bits: int = 14, keep: np.ndarray | None = None) -> np.ndarray:
    """Octahedral codes (..., 2) of :func:`oct_encode` -> float32 unit vectors (..., 3); 0 where ``keep`` (...) is
    False. Worked through in blocks of 32k vectors that stay in cache (25% faster than whole arrays)."""
    table, one, block = _oct_table(bits), np.float32(1.0), 1 << 15
    cu, cv = codes[..., 0].reshape(-1), codes[..., 1].reshape(-1)
    kp = np.ones(cu.size, np.float32) if keep is None else keep.reshape(-1)
    out = np.empty((cu.size, 3), np.float32)
    u, v, z, t, s = (np.empty(min(block, cu.size), np.float32) for _ in range(5))
    for i in range(0, cu.size, block):
        j = min(i + block, cu.size)
        uu, vv, zz, tt, ss = u[: j - i], v[: j - i], z[: j - i], t[: j - i], s[: j - i]
        np.take(table, cu[i:j], out=uu)
        np.take(table, cv[i:j], out=vv)
        np.abs(uu, out=zz)
        np.abs(vv, out=tt)
        zz += tt
        np.subtract(one, zz, out=zz)  # z = 1 - |u| - |v|
        np.negative(zz, out=tt)
        np.maximum(tt, 0, out=tt)  # the folded lower half (z < 0): move back towards the axes by -z
        np.copysign(tt, uu, out=ss)
        uu -= ss
        np.copysign(tt, vv, out=ss)
        vv -= ss
        np.multiply(uu, uu, out=ss)
        np.multiply(vv, vv, out=tt)
        ss += tt
        np.multiply(zz, zz, out=tt)
        ss += tt
        np.sqrt(ss, out=ss)
        np.divide(kp[i:j], ss, out=ss)  # 1/length, or 0 outside keep
        o = out[i:j]
        np.multiply(uu, ss, out=o[:, 0])
        np.multiply(vv, ss, out=o[:, 1])
        np.multiply(zz, ss, out=o[:, 2])
    return out.reshape(codes.shape[:-1] + (3,))


@functools.lru_cache(maxsize=None)
def _oct_table(bits: int) -> np.ndarray:
    return (np.arange(2**bits, dtype=np.float64) * (2.0 / (2**bits - 1)) - 1.0).astype(np.float32)


def encode_planes(planes: np.ndarray) -> bytes:
    """(T,P,H,W) uint8 or uint16 integer planes -> lossless bytes: the residual of predicting each value by the one
    above it (modulo 2**bits; the first row as is), split into byte planes (high bytes first), saved as the .npy of a
    (bytes, T, P, H, W) uint8 array, compressed as one zstd frame (level ``PLANES_ZSTD_LEVEL``, content size and
    checksum in the frame: a flipped bit is an error, not other planes). Deterministic: the same planes give the
    same bytes. Outside Loom: ``zstd -d``, then ``np.load``."""
    import zstandard

    planes = np.ascontiguousarray(planes)
    if planes.ndim != 4 or planes.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected (T,P,H,W) uint8 or uint16 planes, got {planes.shape} {planes.dtype}")
    res = planes.copy()
    res[..., 1:, :] -= planes[..., :-1, :]  # wraps modulo 2**bits: exact
    split = np.stack([(res >> 8).astype(np.uint8), (res & 0xFF).astype(np.uint8)]) if res.dtype == np.uint16 \
        else res[None]
    npy = io.BytesIO()
    np.save(npy, split, allow_pickle=False)
    return zstandard.ZstdCompressor(level=PLANES_ZSTD_LEVEL, write_content_size=True,
                                     write_checksum=True).compress(npy.getvalue())


def decode_planes(data: bytes) -> np.ndarray:
    """Bytes of :func:`encode_planes` (or of the deflated zip store Loom wrote before) -> the (T,P,H,W) uint8 or
    uint16 planes. Raises ValueError when the bytes are not such planes (the caller names the member)."""
    if data[:4] == _ZSTD_MAGIC:
        split = _load_zstd_npy(data)
        upper = True
    elif data[:4] == b"PK\x03\x04":
        split = _load_zip_npy(data)
        upper = False
    else:
        raise ValueError(f"not a store of residual planes (starts with {bytes(data[:4])!r}: neither zstd nor zip)")
    if split.dtype != np.uint8 or split.ndim != 5 or split.shape[0] not in (1, 2):
        raise ValueError(f"expected (1 or 2, T, P, H, W) uint8 byte planes, got {split.shape} {split.dtype}")
    res = split[0].copy() if split.shape[0] == 1 else (split[0].astype(np.uint16) << 8) | split[1]
    if not upper:  # the zip store: left-neighbour residuals
        return np.cumsum(res, axis=-1, dtype=res.dtype)
    rows = res.reshape((-1,) + res.shape[2:])  # (T*P, H, W), a view: summed in place, one image row at a time
    for i in range(1, rows.shape[1]):
        np.add(rows[:, i], rows[:, i - 1], out=rows[:, i])
    return res


def _load_zstd_npy(data: bytes) -> np.ndarray:
    import zstandard

    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise ValueError(f"not a zstd frame ({e})") from None
    if size < 0 or size > _PLANES_MAX_BYTES:
        raise ValueError(f"zstd frame declares {'no' if size < 0 else size} content size (Loom writes it, "
                         f"<= {_PLANES_MAX_BYTES} bytes)")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data)
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (zstandard.ZstdError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"not a zstd-compressed .npy of residual planes ({type(e).__name__}: {e})") from None


def _load_zip_npy(data: bytes) -> np.ndarray:
    import zipfile

    try:
        # the member read whole (one inflate), not streamed through np.load's zip reader in 8 KB pieces: 2x faster
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return np.load(io.BytesIO(z.read("residual.npy")), allow_pickle=False)
    except (zipfile.BadZipFile, KeyError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"not a .npz of residual planes ({type(e).__name__}: {e})") from None
