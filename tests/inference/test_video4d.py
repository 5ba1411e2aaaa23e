"""An in-the-wild video as the 4D model's conditioning video (`loom.inference.video4d`): the frame-sampling rule, the
corpus' framing (checked on a disc drawn at a known place and size, and against `fit_fov`'s own framing of a
sphere), masks from a mask video, the video's own alpha, and background removal through rembg with a local ONNX
model (skipped only where rembg is not installed)."""

import base64
import importlib.util
import math
import os

import numpy as np
import pytest

from loom.datasets.codecs import encode_video
from loom.inference.video4d import (
    CORPUS_FILL,
    CORPUS_SIZE,
    MODEL_FRAMES,
    corpus_crop,
    frame_like_corpus,
    masks_from_video,
    prepare_video,
    read_video,
    remove_background,
    sample_frames,
)

H, W = 100, 160
DISC = (250, 240, 230)
BACKGROUND = (30, 60, 40)


def disc_video(t=20, r=12, x0=50, dx=3, y=46):
    """(T,H,W,3) a bright disc of radius r moving right by dx px a frame on a dark ground, and its masks. Pixel
    centres at k + 0.5 and integer centres make each mask's box exactly the disc's [c - r, c + r]."""
    yy, xx = np.mgrid[:H, :W] + 0.5
    frames = np.empty((t, H, W, 3), np.uint8)
    frames[:] = BACKGROUND
    masks = np.zeros((t, H, W), bool)
    for i in range(t):
        masks[i] = (xx - (x0 + dx * i)) ** 2 + (yy - y) ** 2 <= r * r
        frames[i][masks[i]] = DISC
    # the union box: x from x0 - r to x0 + dx (t-1) + r, y from y - r to y + r
    return frames, masks, (x0 - r, y - r, x0 + dx * (t - 1) + r, y + r)


def coverage_extent(alpha: np.ndarray, axis: int) -> tuple[float, float]:
    """(span, centre) in pixels of the union's alpha coverage along one image axis (1: x, 0: y), sub-pixel."""
    a = alpha.astype(np.float64).max(axis=0) / 255.0  # union over time, (S, S)
    profile = a.max(axis=1 - axis) if axis == 1 else a.max(axis=1)
    centres = np.arange(len(profile)) + 0.5
    return float(profile.sum()), float((profile * centres).sum() / profile.sum())


def test_constants_are_the_corpus_own():
    from loom.render.anim import CAMERA_DEFAULTS, DEFAULTS

    assert CORPUS_FILL == CAMERA_DEFAULTS["fill"]
    assert MODEL_FRAMES == DEFAULTS["frames"]
    assert CORPUS_SIZE == DEFAULTS["width"] == DEFAULTS["height"]


def test_sampling_rule():
    idx = sample_frames(100, 16)
    assert idx[0] == 0 and idx[-1] == 99 and len(idx) == 16  # the whole clip, first and last included
    assert np.array_equal(idx, np.round(np.linspace(0, 99, 16)).astype(int))
    assert np.ptp(np.diff(idx)) <= 1  # evenly spread
    assert np.array_equal(sample_frames(16, 16), np.arange(16))
    assert np.array_equal(sample_frames(100, 4, "stride", stride=5), [0, 5, 10, 15])
    assert np.array_equal(sample_frames(7, 0), np.arange(7))
    with pytest.raises(ValueError, match="has 10 frames but the model takes 16"):
        sample_frames(10, 16)
    with pytest.raises(ValueError, match="rule"):
        sample_frames(100, 16, "random")
    with pytest.raises(ValueError, match="spans"):
        sample_frames(20, 16, "stride", stride=2)


@pytest.mark.parametrize("x0,size", [(50, 64), (14, 96)])  # the second overhangs the frame's left edge
def test_frame_like_corpus_centres_the_object_at_fill(x0, size):
    frames, masks, (bx0, by0, bx1, by1) = disc_video(x0=x0)
    out = frame_like_corpus(frames, masks, size)
    assert out.shape == (20, size, size, 4) and out.dtype == np.uint8
    span_x, cx = coverage_extent(out[..., 3], axis=1)
    span_y, cy = coverage_extent(out[..., 3], axis=0)
    larger = max(bx1 - bx0, by1 - by0)
    assert larger == bx1 - bx0  # the motion makes the union wider than tall
    assert abs(span_x - CORPUS_FILL * size) <= 1.0  # the larger side spans fill of the frame
    assert abs(span_y - (by1 - by0) * CORPUS_FILL * size / larger) <= 1.0  # aspect kept
    assert abs(cx - size / 2) <= 1.0 and abs(cy - size / 2) <= 1.0  # centred
    info = corpus_crop(masks, size)
    assert info["object_box"] == (bx0, by0, bx1, by1)
    assert info["scale"] == pytest.approx(CORPUS_FILL * size / larger)
    # One crop for the whole clip: the first frame's disc sits left of centre, the last one's right of it.
    first, last = coverage_extent(out[:1, ..., 3], 1)[1], coverage_extent(out[-1:, ..., 3], 1)[1]
    assert first < size / 2 - 5 < size / 2 + 5 < last
    # Straight alpha from the mask: opaque disc colour inside, transparent black outside.
    inside = out[..., 3] == 255
    assert inside.any() and np.abs(out[inside][:, :3].astype(int) - DISC).max() <= 1
    assert (out[out[..., 3] == 0][:, :3] == 0).all()
    assert out[:, 0, 0, 3].max() == 0


def test_framing_matches_fit_fov_on_a_centred_sphere():
    """The corpus fits the field of view with margin 1/fill - 1; a sphere at the origin projects to a centred disc,
    so its box already spans fill of the frame there, and frame_like_corpus leaves that framing as it is."""
    from loom.geometry.camera import fit_fov, intrinsics, look_at, pixel_rays

    s, radius, distance = 128, 0.5, 2.5
    eye = distance * np.array([math.cos(0.26), 0.0, math.sin(0.26)])
    c2w = look_at(eye)
    i = np.arange(4000) + 0.5  # points on the sphere (Fibonacci)
    phi, theta = np.arccos(1 - 2 * i / 4000), math.pi * (1 + 5 ** 0.5) * i
    pts = radius * np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)
    fov = fit_fov(pts, c2w, s, s, 1.0 / CORPUS_FILL - 1.0)
    rays = pixel_rays(intrinsics(fov, s, s), c2w, s, s)  # (S,S,3)
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    to_centre = -eye / distance
    mask = (rays @ to_centre) >= math.cos(math.asin(radius / distance))  # the sphere's silhouette
    info = corpus_crop(mask[None], s)
    x0, y0, x1, y1 = info["object_box"]
    assert abs((x1 - x0) - CORPUS_FILL * s) <= 2 and abs((x1 + x0) / 2 - s / 2) <= 1
    assert np.allclose(info["crop"], (0, 0, s, s), atol=2.0) and info["scale"] == pytest.approx(1.0, abs=0.02)


def test_masks_from_a_mask_video_and_length_mismatch(tmp_path):
    frames, masks, _ = disc_video(t=18)
    grey = np.repeat(np.where(masks, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)
    grey[..., 0] = np.where(masks, 200, 60)  # not a pure grey: the luma decides, >= 128 is the object
    ext, data = encode_video(grey, "ffv1")
    path = str(tmp_path / ext)
    with open(path, "wb") as f:
        f.write(data)
    got = masks_from_video(path, 18)
    assert got.dtype == bool and np.array_equal(got, masks)
    with pytest.raises(ValueError, match=r"has 18 frames but the video has 20"):
        masks_from_video(path, 20)
    video, _, _ = disc_video(t=20)
    with pytest.raises(ValueError, match=r"mask .* has 18 frames but the video has 20"):
        prepare_video(video, mask=path)
    prep = prepare_video(frames, mask=path, size=64)
    assert prep.alpha_source == "mask" and prep.frames.shape == (16, 64, 64, 4)
    assert np.array_equal(prep.indices, sample_frames(18, 16))


def test_video_alpha_is_kept_and_used(tmp_path):
    frames, masks, _ = disc_video(t=16)
    rgba = np.concatenate([frames, np.where(masks, 255, 0).astype(np.uint8)[..., None]], -1)
    ext, data = encode_video(rgba, "ffv1")
    path = str(tmp_path / ext)
    with open(path, "wb") as f:
        f.write(data)
    video = read_video(path)
    assert video.has_alpha and video.frames.shape == (16, H, W, 4) and np.array_equal(video.frames, rgba)
    prep = prepare_video(path, size=64)
    assert prep.alpha_source == "alpha"
    assert np.array_equal(prep.frames, frame_like_corpus(frames, masks, 64))
    # An RGB video without mask or model is refused, saying what to pass.
    ext, data = encode_video(frames, "ffv1")
    rgb = str(tmp_path / ("rgb_" + ext))
    with open(rgb, "wb") as f:
        f.write(data)
    assert not read_video(rgb).has_alpha
    with pytest.raises(ValueError, match="no alpha channel.*mask"):
        prepare_video(rgb)


def test_frame_folder_and_clear_errors(tmp_path):
    from PIL import Image

    frames, masks, _ = disc_video(t=3)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"frame_{i:04d}.png")
    video = read_video(str(tmp_path))
    assert not video.has_alpha and np.array_equal(video.frames, frames)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_video(str(tmp_path / "nope.mp4"))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot decode"):
        read_video(str(bad))
    empty = tmp_path / "models"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.onnx file.*nothing is downloaded"):
        remove_background(frames, str(empty))
    with pytest.raises(ValueError, match="empty in every frame"):
        frame_like_corpus(frames, np.zeros_like(masks), 32)


# A U^2-Net-shaped ONNX model (input "input.1" 1x3x320x320, first output 1x1x320x320), 365 bytes: torch 2.13's
# TorchScript exporter (opset 11) on nn.Sequential(nn.Conv2d(3, 1, 1) with weights 1 and bias 0, nn.Sigmoid()):
# the foreground is where the ImageNet-normalised channels sum high: bright pixels (the disc on its dark ground).
TINY_U2NET_ONNX = (
    "CAYSB3B5dG9yY2gaBjIuMTMuMDrTAgqaAQoHaW5wdXQuMQoIMC53ZWlnaHQKBjAuYmlhcxIQLzAvQ29udl9vdXRwdXRfMBoHLzAvQ29udiIEQ29u"
    "dioSCglkaWxhdGlvbnNAAUABoAEHKgwKBWdyb3VwGAGgAQIqFQoMa2VybmVsX3NoYXBlQAFAAaABByoRCgRwYWRzQABAAEAAQACgAQcqEAoHc3Ry"
    "aWRlc0ABQAGgAQcKKwoQLzAvQ29udl9vdXRwdXRfMBICZDAaCi8xL1NpZ21vaWQiB1NpZ21vaWQSCm1haW5fZ3JhcGgqIggBCAMIAQgBEAFCCDAu"
    "d2VpZ2h0SgwAAIA/AACAPwAAgD8qEggBEAFCBjAuYmlhc0oEAAAAAFojCgdpbnB1dC4xEhgKFggBEhIKAggBCgIIAwoDCMACCgMIwAJiHgoCZDAS"
    "GAoWCAESEgoCCAEKAggBCgMIwAIKAwjAAkICEAs="
)


@pytest.mark.skipif(importlib.util.find_spec("rembg") is None or importlib.util.find_spec("onnxruntime") is None,
                    reason="needs rembg and onnxruntime (pip install rembg onnxruntime)")
def test_background_removal_through_rembg_with_a_local_model(tmp_path):
    models = tmp_path / "matting"
    models.mkdir()
    (models / "tiny_u2net.onnx").write_bytes(base64.b64decode(TINY_U2NET_ONNX))
    home = {k: os.environ.get(k) for k in ("REMBG_HOME", "U2NET_HOME")}
    frames, masks, box = disc_video(t=16)
    alpha = remove_background(frames[:2], str(models))
    assert alpha.shape == (2, H, W) and alpha.dtype == np.uint8
    got = alpha >= 128
    iou = (got & masks[:2]).sum() / (got | masks[:2]).sum()
    assert iou > 0.9
    assert {k: os.environ.get(k) for k in home} == home  # the environment is restored
    prep = prepare_video(frames, matting=str(models), size=64)
    assert prep.alpha_source == "matting"
    assert np.allclose(prep.object_box, box, atol=2)
    span_x, cx = coverage_extent(prep.frames[..., 3], axis=1)
    assert abs(span_x - CORPUS_FILL * 64) <= 2.0 and abs(cx - 32) <= 1.5
