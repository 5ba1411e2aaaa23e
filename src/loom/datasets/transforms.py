"""Training transforms on decoded samples (numpy dicts from ``decode_sample``): frame subsampling, and cropping /
resizing that keeps the intrinsics ``K`` exact.

Each transform is a function ``f(sample, ..., rng) -> new sample`` and a small callable class with the loader's
signature ``t(sample, rng)`` (:class:`LoomDataset` passes a generator seeded by (seed, epoch, sample), so random
crops are reproducible for any number of workers and after a resume). The input sample is not modified.
`frame_transform` is the video DiT's view of a turntable (``frames``, ``size``), one definition for training,
generation and evaluation.

Which arrays are what is declared here, by key, not guessed from shapes (a 4D sample's Q queries could equal T):

- per-frame arrays, first axis T: ``FRAME_KEYS``; per-pair arrays between consecutive frames, first axis T-1:
  ``PAIR_KEYS`` (flows, occlusions); ``flow_last_to_first`` relates the last frame to the first.
- image-like arrays, axes (T, H, W, ...): ``IMAGE_KEYS``; ``noise`` lives on the latent grid (T, C, h, w).

Resampling, with pixel centres at (u + 0.5, v + 0.5) as everywhere in Loom:

- ``rgb`` and ``video``: area averaging when shrinking, bilinear when enlarging (antialiased bilinear, torch).
  ``video`` has straight alpha, so colours are premultiplied for the filter and divided back after.
- everything else (depth, position, normal, mask, ids, edges, flow, occlusion): nearest (the source pixel whose
  cell holds the output pixel's centre). Filtering depth or position across a silhouette would invent surfaces
  that are neither the object nor the background; flow vectors are scaled by the resize factors.
- ``K``: a crop at (x0, y0) moves the principal point (cx - x0, cy - y0); a resize by (sx, sy) scales the first
  row by sx and the second by sy. With pixel centres at u + 0.5 both are exact: a world point projecting to
  (u, v) before projects to ((u - x0) * sx, (v - y0) * sy) after.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FRAME_KEYS = frozenset({"rgb", "normal", "position", "depth", "mask", "known", "K", "c2w", "object_id", "edges", "noise",
                        "surface", "sharp_surface", "queries", "sdf_points", "sdf", "video", "shape_latent",
                        "image_tokens"})
PAIR_KEYS = frozenset({"flow_fwd", "flow_bwd", "occlusion_fwd", "occlusion_bwd"})
IMAGE_KEYS = frozenset({"rgb", "video", "normal", "position", "depth", "mask", "known", "object_id", "edges", "flow_fwd",
                        "flow_bwd", "flow_last_to_first", "occlusion_fwd", "occlusion_bwd"})
FILTERED_KEYS = frozenset({"rgb", "video"})  # colour: area / bilinear; all other image keys: nearest
FLOW_KEYS = frozenset({"flow_fwd", "flow_bwd", "flow_last_to_first"})


def _num_frames(sample: dict[str, Any]) -> int:
    for k in ("K", "rgb", "video", "surface", "shape_latent"):
        if k in sample:
            return int(np.shape(sample[k])[0])
    raise ValueError(f"cannot tell the number of frames: none of K, rgb, video, surface, shape_latent in "
                     f"{sorted(sample)}")


def frame_indices(t: int, n: int, mode: str = "uniform", rng: np.random.Generator | None = None,
                  stride: int = 1) -> np.ndarray:
    """``n`` of ``t`` frame indices, increasing. ``uniform``: evenly spread, first and last included;
    ``random``: a sorted random subset; ``window``: ``n`` frames ``stride`` apart from a random start (start 0
    without ``rng``)."""
    if not 1 <= n <= t:
        raise ValueError(f"cannot take n={n} frames of a {t}-frame sample (need 1 <= n <= {t})")
    if mode == "uniform":
        return np.round(np.linspace(0, t - 1, n)).astype(np.int64)
    if mode == "random":
        if rng is None:
            raise ValueError("mode='random' needs an rng (the loader passes one per sample)")
        return np.sort(rng.choice(t, n, replace=False)).astype(np.int64)
    if mode == "window":
        span = (n - 1) * stride + 1
        if span > t:
            raise ValueError(f"a window of {n} frames {stride} apart spans {span} > {t} frames")
        start = int(rng.integers(0, t - span + 1)) if rng is not None else 0
        return start + stride * np.arange(n, dtype=np.int64)
    raise ValueError(f"unknown mode {mode!r}: use 'uniform', 'random' or 'window'")


def subsample_frames(sample: dict[str, Any], n: int, mode: str = "uniform", rng: np.random.Generator | None = None,
                     stride: int = 1, drop_flow: bool = False) -> dict[str, Any]:
    """Keep ``n`` frames of every per-frame array (K and c2w included) and of ``meta["frame_times"]``; adds
    ``frame_indices`` (n,) int64. Flows between consecutive frames stay valid only for a window with stride 1 (they
    are sliced); otherwise they are refused unless ``drop_flow`` removes them."""
    t = _num_frames(sample)
    idx = frame_indices(t, n, mode, rng, stride)
    consecutive = bool(np.all(np.diff(idx) == 1))
    out = dict(sample)
    for k, v in sample.items():
        if k in FRAME_KEYS and isinstance(v, np.ndarray):
            if v.shape[0] != t:
                raise ValueError(f"per-frame array {k!r} has {v.shape[0]} frames, expected {t}")
            out[k] = v[idx]
        elif k in PAIR_KEYS or k == "flow_last_to_first":
            keep = consecutive and k in PAIR_KEYS
            if keep:
                out[k] = v[idx[0]:idx[-1]]
            elif drop_flow:
                del out[k]
            else:
                raise ValueError(f"{k!r} relates consecutive frames (or the last to the first) and is not valid for "
                                 f"frames {idx.tolist()}: use mode='window' with stride=1, drop_flow=True, or decode "
                                 "without it (keys=...)")
    if isinstance(sample.get("meta"), dict) and isinstance(sample["meta"].get("frame_times"), list):
        ft = sample["meta"]["frame_times"]
        if len(ft) == t:
            out["meta"] = {**sample["meta"], "frame_times": [ft[i] for i in idx]}
    out["frame_indices"] = idx
    return out


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel: the input cell that holds the output pixel's centre."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _resize_filtered(x: np.ndarray, size: tuple[int, int], premultiply_alpha: bool) -> np.ndarray:
    """(T,h,w,C) uint8 -> (T,H,W,C): area averaging when shrinking, bilinear when enlarging."""
    import torch
    import torch.nn.functional as F

    h, w = x.shape[1:3]
    ty = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()  # (T,C,h,w)
    if premultiply_alpha:
        a = ty[:, 3:4] / 255.0
        ty = torch.cat([ty[:, :3] * a, ty[:, 3:4]], 1)
    if size[0] <= h and size[1] <= w and h % size[0] == 0 and w % size[1] == 0:
        y = F.interpolate(ty, size=size, mode="area")  # exact box average for integer factors
    else:
        y = F.interpolate(ty, size=size, mode="bilinear", align_corners=False, antialias=True)
    if premultiply_alpha:
        a = y[:, 3:4] / 255.0
        y = torch.cat([torch.where(a > 0, y[:, :3] / a.clamp_min(1e-6), torch.zeros_like(y[:, :3])), y[:, 3:4]], 1)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def crop_resize(sample: dict[str, Any], box: tuple[int, int, int, int], size: tuple[int, int] | None = None
                ) -> dict[str, Any]:
    """Crop every image-like array to ``box = (x0, y0, x1, y1)`` (pixel edges, x1/y1 exclusive) and resize to
    ``size = (H, W)`` (default: the box's size); update ``K`` exactly, scale flow vectors, crop ``noise`` on its
    latent grid (only if the box is aligned to it and there is no resize: resampling would break its Gaussianity).
    Adds nothing; the input is not modified."""
    x0, y0, x1, y1 = (int(v) for v in box)
    hw = None
    for k in IMAGE_KEYS:
        if k in sample:
            hw = sample[k].shape[1:3] if k != "flow_last_to_first" else sample[k].shape[0:2]
            break
    if hw is None:
        raise ValueError(f"no image-like array to crop in {sorted(sample)}")
    h, w = hw
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"crop box {box} is not inside the {w}x{h} image (x0 < x1 <= {w}, y0 < y1 <= {h})")
    bh, bw = y1 - y0, x1 - x0
    H, W = size if size is not None else (bh, bw)
    if H < 1 or W < 1:
        raise ValueError(f"size {size} must be positive")
    sx, sy = W / bw, H / bh
    iy, ix = _nearest_index(bh, H) + y0, _nearest_index(bw, W) + x0
    out = dict(sample)
    for k in IMAGE_KEYS & sample.keys():
        v = sample[k]
        lead = 0 if k == "flow_last_to_first" else 1
        if v.shape[lead:lead + 2] != (h, w):
            raise ValueError(f"image array {k!r} is {v.shape[lead:lead + 2]}, expected {(h, w)}")
        if k in FILTERED_KEYS and (H, W) != (bh, bw):
            out[k] = _resize_filtered(v[:, y0:y1, x0:x1], (H, W), premultiply_alpha=v.shape[-1] == 4)
        else:
            out[k] = v[:, iy][:, :, ix] if lead else v[iy][:, ix]
        if k in FLOW_KEYS:
            out[k] = (out[k] * np.array([sx, sy], dtype=out[k].dtype)).astype(v.dtype)
    if "K" in sample:
        K = np.array(sample["K"], dtype=np.float64)
        K[..., 0, 2] -= x0
        K[..., 1, 2] -= y0
        K[..., 0, :] *= sx
        K[..., 1, :] *= sy
        out["K"] = K.astype(np.asarray(sample["K"]).dtype)
    if "noise" in sample:
        lh, lw = sample["noise"].shape[2:]
        d = h // lh
        if (H, W) != (bh, bw) or d * lh != h or d * lw != w or any(c % d for c in (x0, y0, x1, y1)):
            raise ValueError(f"cannot crop/resize 'noise' (latent grid {lh}x{lw}, factor {d}) with box {box} and size "
                             f"{size}: use a box aligned to {d} px without resize, or decode without noise (keys=...)")
        out["noise"] = sample["noise"][:, :, y0 // d:y1 // d, x0 // d:x1 // d]
    return out


def center_box(h: int, w: int, aspect: float) -> tuple[int, int, int, int]:
    """The largest centred box of width/height ``aspect`` inside an h x w image."""
    bw = min(w, round(h * aspect))
    bh = min(h, round(bw / aspect))
    x0, y0 = (w - bw) // 2, (h - bh) // 2
    return x0, y0, x0 + bw, y0 + bh


def random_box(h: int, w: int, aspect: float, scale: tuple[float, float], rng: np.random.Generator
               ) -> tuple[int, int, int, int]:
    """A box of width/height ``aspect`` whose side is ``scale`` (uniform in the range) of the largest such box, at
    a uniform random position."""
    x0, y0, x1, y1 = center_box(h, w, aspect)
    s = rng.uniform(*scale)
    bw = max(1, round((x1 - x0) * s))
    bh = max(1, round((y1 - y0) * s))
    x = int(rng.integers(0, w - bw + 1))
    y = int(rng.integers(0, h - bh + 1))
    return x, y, x + bw, y + bh


class SubsampleFrames:
    """``subsample_frames`` with the loader's per-sample generator."""

    def __init__(self, n: int, mode: str = "uniform", stride: int = 1, drop_flow: bool = False):
        self.n, self.mode, self.stride, self.drop_flow = n, mode, stride, drop_flow

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        return subsample_frames(sample, self.n, self.mode, rng, self.stride, self.drop_flow)


class CropResize:
    """Crop to a box of the output's aspect ratio (centred, or random with side ``scale`` of the largest box when
    ``scale`` is given) and resize to ``size = (H, W)``."""

    def __init__(self, size: tuple[int, int], scale: tuple[float, float] | None = None):
        self.size, self.scale = tuple(size), scale

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        img = next(sample[k] for k in ("rgb", "video", "depth", "mask") if k in sample)
        h, w = img.shape[1:3]
        aspect = self.size[1] / self.size[0]
        if self.scale is None:
            box = center_box(h, w, aspect)
        else:
            if rng is None:
                raise ValueError("a random crop needs an rng (the loader passes one per sample)")
            box = random_box(h, w, aspect, self.scale, rng)
        return crop_resize(sample, box, self.size)


class Compose:
    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample


def frame_transform(frames: int = 0, size: int = 0) -> Compose | None:
    """The video DiT's view of a turntable sample, shared by training, generation and evaluation: ``frames``
    evenly spread frames (first and last included; 0 = all) and a centred crop resized to ``size`` x ``size``
    (0 = as stored), ``K`` kept exact. None when both are 0 (nothing to do)."""
    ts: list = []
    if frames:
        ts.append(SubsampleFrames(frames))
    if size:
        ts.append(CropResize((size, size)))
    return Compose(*ts) if ts else None


def composite(rgba: np.ndarray, background=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Straight-alpha (...,4) uint8 over a background colour -> (...,3) uint8."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    bg = np.asarray(background, np.float32) * 255.0
    return np.round(rgba[..., :3].astype(np.float32) * a + bg * (1.0 - a)).clip(0, 255).astype(np.uint8)
