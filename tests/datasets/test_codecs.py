"""Video encodings: media for people (sample, generated and evaluation videos) are H.264 yuv420p MP4s that every
browser plays; data stays as it was (FFV1 lossless, and the shards' optional H.264 keeps full-resolution colour).
Each file is probed with PyAV as a player would see it."""

import io

import numpy as np
import pytest

from loom.datasets.codecs import decode_video, encode_video, write_video

av = pytest.importorskip("av")


def probe(data: bytes) -> dict:
    """The first video stream as a player sees it, and where the MP4 index sits."""
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        return {"codec": s.codec_context.name, "pix_fmt": s.codec_context.pix_fmt, "size": (s.width, s.height),
                "format": c.format.name, "moov_first": 0 <= data.find(b"moov") < data.find(b"mdat")}


def smooth(t=5, h=32, w=48, channels=3) -> np.ndarray:
    """Gradients (compress well, so a lossy codec's error is small and a wrong channel order is large)."""
    y, x = np.mgrid[0:h, 0:w]
    f = [np.stack([(x * 255 // w + 9 * k) % 256, y * 255 // h, np.full_like(x, 40 * k % 256), np.full_like(x, 200)][
        :channels], -1) for k in range(t)]  # fmt: skip
    return np.asarray(f, np.uint8)


def test_h264_for_people_is_yuv420p_with_the_index_first_and_deterministic():
    frames = smooth()
    ext, data = encode_video(frames, "h264", fps=12, name="sample")
    assert ext == "sample.mp4"
    p = probe(data)
    assert p["codec"] == "h264" and p["pix_fmt"] == "yuv420p" and p["size"] == (48, 32)
    assert p["moov_first"]  # a browser can start playing before the whole file has arrived
    assert encode_video(frames, "h264", fps=12, name="sample")[1] == data  # same frames, same bytes
    back = decode_video(data)
    assert back.shape == frames.shape and np.abs(back.astype(int) - frames).mean() < 5  # 4:2:0 halves colour


def test_h264_refuses_odd_sizes_and_alpha_naming_what_to_do():
    with pytest.raises(ValueError, match="even width and height, got 47x32"):
        encode_video(smooth(w=47), "h264")
    with pytest.raises(ValueError, match="alpha"):
        encode_video(smooth(channels=4), "h264")


def test_data_codecs_are_unchanged_ffv1_lossless_and_shard_h264_full_colour():
    for channels, pix in ((3, "bgr0"), (4, "bgra")):
        frames = smooth(channels=channels)
        ext, data = encode_video(frames, "ffv1")
        p = probe(data)
        assert ext == "rgb.mkv" and p["codec"] == "ffv1" and p["pix_fmt"] == pix
        assert np.array_equal(decode_video(data, channels), frames)  # lossless, alpha kept
    _, data = encode_video(smooth(), "h264", full_chroma=True)
    assert probe(data)["pix_fmt"] == "yuv444p"


def test_shards_written_with_h264_keep_full_resolution_colour():
    from loom.datasets import ttv

    rgb = smooth(t=3, h=16, w=16)
    a = {"rgb": rgb, "normal": np.zeros((3, 16, 16, 3), np.float16), "position": np.zeros((3, 16, 16, 3), np.float16),
         "depth": np.zeros((3, 16, 16), np.float32), "mask": np.ones((3, 16, 16), bool),
         "K": np.eye(3, dtype=np.float32)[None].repeat(3, 0), "c2w": np.eye(4, dtype=np.float32)[None].repeat(3, 0)}
    files = ttv.encode_sample(a, {"key": "k"}, "h264")
    assert probe(files["rgb.mp4"])["pix_fmt"] == "yuv444p"
    files = ttv.encode_sample(a, {"key": "k"}, "ffv1")
    assert np.array_equal(decode_video(files["rgb.mkv"]), rgb)


def test_write_video_for_people_crops_odd_sizes_to_even_yuv420p(tmp_path):
    path = write_video(str(tmp_path / "samples" / "step-1.mp4"), smooth(h=33, w=47))
    p = probe(open(path, "rb").read())
    assert p["codec"] == "h264" and p["pix_fmt"] == "yuv420p" and p["size"] == (46, 32)


def test_evaluation_media_are_yuv420p_h264_even_for_odd_sizes(tmp_path):
    from loom.eval.benchmarks import write_media

    pred, gt = smooth(t=4, h=31, w=33), smooth(t=3, h=31, w=33)
    paths = write_media(str(tmp_path), "k", pred, gt)
    mp4 = next(p for p in paths if p.endswith(".mp4"))
    p = probe(open(mp4, "rb").read())
    assert p["codec"] == "h264" and p["pix_fmt"] == "yuv420p" and p["moov_first"]
    assert p["size"][0] % 2 == 0 and p["size"][1] % 2 == 0 and p["size"][0] >= 33 * 2
