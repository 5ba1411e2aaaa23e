"""Byte encodings shared by every sample kind: lossless/lossy video through PyAV, compressed numpy arrays; and the
H.264 that media for people are written in."""

from __future__ import annotations

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
