"""Per-clip signals of real videos for VideoFrom3D's GGI training data (section 3.4): which frames make a clip,
how a frame is fitted to the training size, classical optical flow, depth normalisation and the edges of depth maps.
numpy, with OpenCV (``opencv-python-headless``) imported inside the functions that need it.

Design choices:

- **Clip rule** (:func:`clip_starts`): a clip is ``frames`` source frames ``stride`` apart, so it spans
  ``(frames - 1) * stride + 1`` source frames. A video with ``n`` frames has ``room = n - span + 1`` possible
  starts; its ``clips`` clips are stratified over them: clip ``c`` starts at ``floor((c + u_c) * room / clips)``
  with ``u_c ~ U[0, 1)`` drawn in order from the video's seed. So clips spread over the whole video, never overlap
  when the video is long enough (``room >= clips * span``), and the same (video, seed) gives the same clips. A
  video shorter than one span has no clip (the caller makes that a failure row that says so).
- **Fitting** (:func:`fit_frame`): scale to cover ``width x height`` keeping the aspect ratio, then crop the centre
  (area interpolation when shrinking, bicubic when enlarging). Nothing is stretched.
- **Flow** (:func:`optical_flow`): OpenCV on greyscale. ``dis`` (Dense Inverse Search, the MEDIUM preset) is the
  default: fast at 720x480 and robust to tens of pixels of motion; ``farneback`` is the older polynomial-expansion
  method. Both return ``flow[y, x] = (dx, dy)`` moving the pixel of frame a to frame b, the convention of
  :mod:`loom.geometry.flow` and :func:`loom.geometry.noise.warp_noise`. RAFT (what the paper uses) is a network:
  ``loom.models.raft``, passed to :func:`clip_flows` as ``model``.
- **Depth** is relative: monocular models predict inverse depth up to scale and shift, so a clip's maps are
  normalised together to [0, 1] (:func:`normalise_depth`, 1 = the nearest point of the clip).
- **Edges of depth** (:func:`depth_edges`): the paper runs HED on depth maps so that the edges show geometry and no
  texture. The classical default is Canny on the normalised depth (as 8-bit), after a light Gaussian blur that
  removes the depth model's pixel noise; a flat depth map has no edge whatever the image shows.

Shapes: frames (T,H,W,3) uint8; flows (T-1,H,W,2) float32; depth (T,H,W) float32; edges (T,H,W) uint8 (0 or 255).
"""

from __future__ import annotations

import math

import numpy as np

FLOW_METHODS = ("dis", "farneback")


def clip_span(frames: int, stride: int) -> int:
    """Source frames covered by a clip of ``frames`` frames taken ``stride`` apart."""
    return (frames - 1) * stride + 1


def clip_starts(n_frames: int, frames: int, stride: int, clips: int, seed: int) -> list[int]:
    """First source frame of each of the ``clips`` clips of a video with ``n_frames`` frames (the module's rule).
    Raises ValueError when the video is shorter than one clip."""
    span = clip_span(frames, stride)
    if n_frames < span:
        raise ValueError(f"the video has {n_frames} frames; a clip of {frames} frames at stride {stride} needs "
                         f"{span}: lower clip.frames or clip.stride, or drop the video")
    room = n_frames - span + 1
    u = np.random.default_rng(seed).random(clips)
    return [min(room - 1, int(math.floor((c + u[c]) * room / clips))) for c in range(clips)]


def frame_indices(start: int, frames: int, stride: int) -> list[int]:
    return [start + i * stride for i in range(frames)]


def fit_frame(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """(h,w,3) uint8 -> (height,width,3) uint8: scaled to cover, centre-cropped (no stretching)."""
    import cv2

    h, w = img.shape[:2]
    s = max(width / w, height / h)
    nw, nh = max(width, round(w * s)), max(height, round(h * s))
    if (nw, nh) != (w, h):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    x0, y0 = (nw - width) // 2, (nh - height) // 2
    return np.ascontiguousarray(img[y0:y0 + height, x0:x0 + width])


def _grey(img: np.ndarray) -> np.ndarray:
    import cv2

    return np.ascontiguousarray(cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY))


def optical_flow(a: np.ndarray, b: np.ndarray, method: str = "dis") -> np.ndarray:
    """Dense flow (H,W,2) float32 from RGB frame ``a`` to ``b`` (both (H,W,3) uint8): ``a[y, x]`` is seen at
    ``b[y + dy, x + dx]``."""
    import cv2

    ga, gb = _grey(a), _grey(b)
    if method == "dis":
        flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(ga, gb, None)
    elif method == "farneback":
        # OpenCV's documented defaults for video (pyramid 0.5 x 5 levels to reach large motions).
        flow = cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 5, 15, 3, 5, 1.2, 0)
    else:
        raise ValueError(f"unknown flow method {method!r}: use one of {FLOW_METHODS}")
    return np.asarray(flow, dtype=np.float32)


def clip_flows(frames: np.ndarray, method: str = "dis", model=None) -> tuple[np.ndarray, np.ndarray]:
    """(T,H,W,3) uint8 -> (flow_fwd (T-1,H,W,2): frame t to t+1, flow_last_to_first (H,W,2): frame T-1 to 0).
    ``model``: a callable (a, b) -> (H,W,2) flow (e.g. RAFT, ``loom.corpora.videos.flow_model``) used instead of
    the OpenCV ``method``."""
    t = frames.shape[0]
    flow = model if model is not None else (lambda a, b: optical_flow(a, b, method))
    fwd = np.stack([np.asarray(flow(frames[i], frames[i + 1]), np.float32) for i in range(t - 1)])
    return fwd, np.asarray(flow(frames[-1], frames[0]), np.float32)


def normalise_depth(depth: np.ndarray) -> np.ndarray:
    """(T,H,W) relative (inverse) depth of a clip -> float32 in [0, 1] over the whole clip; a constant clip -> 0."""
    d = np.asarray(depth, dtype=np.float32)
    lo, hi = float(d.min()), float(d.max())
    if not hi > lo:
        return np.zeros_like(d)
    return (d - lo) / (hi - lo)


def standin_depth(frames: np.ndarray, size_frac: float = 0.015) -> np.ndarray:
    """NOT depth: the classical stand-in used when no depth model is configured (smoke runs, CI). The luminance
    under a median filter ``size_frac`` of the image diagonal wide: fine texture is flattened while the boundaries of
    large regions stay sharp (a Gaussian blur would smear them below any edge threshold); normalised like depth.
    (T,H,W,3) uint8 -> (T,H,W) float32 in [0, 1]."""
    import cv2

    h, w = frames.shape[1:3]
    k = max(3, int(size_frac * math.hypot(h, w)) // 2 * 2 + 1)  # odd; OpenCV takes any odd size for uint8
    return normalise_depth(np.stack([cv2.medianBlur(_grey(f), k) for f in frames]).astype(np.float32))


def depth_edges(depth01: np.ndarray, low: float = 0.05, high: float = 0.1, blur: float = 1.0) -> np.ndarray:
    """Canny edges of depth maps (T,H,W) in [0, 1] -> (T,H,W) uint8, 255 on an edge. ``low``/``high``: the hysteresis
    thresholds as a fraction of the strongest possible gradient (a full-range step); ``blur``: Gaussian sigma in
    pixels applied first (0: none)."""
    import cv2

    d8 = np.clip(np.asarray(depth01, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out = np.empty(d8.shape, np.uint8)
    # With L2 gradients, Canny's magnitude of a 0 -> 255 step is 4 * 255 (the 3x3 Sobel's weights sum to 4).
    top = 4.0 * 255.0
    for i, d in enumerate(d8):
        if blur > 0:
            d = cv2.GaussianBlur(d, (0, 0), blur)
        out[i] = cv2.Canny(d, low * top, high * top, L2gradient=True)
    return out


def latent_frames(frames: int, factor: int = 4) -> int:
    """Latent frames of a causal video VAE for ``frames`` frames padded to 1 + factor*k: 1 + ceil((T-1)/factor)."""
    return 1 + -(-(frames - 1) // factor)
