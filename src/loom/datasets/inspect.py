"""Look at samples: shapes, metadata, and a contact sheet of a sample's passes."""

from __future__ import annotations

from typing import Any

import numpy as np


def describe_sample(sample: dict[str, Any]) -> list[str]:
    lines = []
    for k, v in sample.items():
        if isinstance(v, np.ndarray):
            rng = f"[{v.min():.3g}, {v.max():.3g}]" if v.size and v.dtype != bool else f"{v.mean():.3f} true"
            lines.append(f"  {k:10s} {str(v.shape):22s} {str(v.dtype):8s} {rng}")
    m = sample.get("meta", {})
    keep = ("kind", "uid", "variant", "seed", "asset_sha256", "blender_version", "loom_version", "config_hash",
            "lighting", "orbit", "warnings", "frame_times", "animation", "half_extent", "camera",
            # clips (loom prep videos)
            "caption", "source_kind", "sha256", "frame_indices", "fps")
    lines += [f"  meta.{k}: {m[k]}" for k in keep if k in m]
    return lines


def contact_sheet(sample: dict[str, Any], max_frames: int = 6) -> np.ndarray:
    """(rows = frames, columns = rgb | normal | position | depth | mask [| albedo]) uint8 image of one sample; the
    albedo column only when the sample has one (``passes.albedo=true``)."""
    t = sample["rgb"].shape[0]
    idx = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    mask = sample["mask"][idx]
    depth = sample["depth"][idx]
    d = np.zeros_like(depth)
    if mask.any():
        lo, hi = depth[mask].min(), depth[mask].max()
        d = np.where(mask, 1.0 - (depth - lo) / max(hi - lo, 1e-6) * 0.8, 0.0)
    cols = [
        sample["rgb"][idx].astype(np.float32) / 255.0,
        np.where(mask[..., None], sample["normal"][idx] * 0.5 + 0.5, 0.0),
        np.where(mask[..., None], np.clip(sample["position"][idx] * 0.5 + 0.5, 0, 1), 0.0),
        np.repeat(d[..., None], 3, -1),
        np.repeat(mask[..., None].astype(np.float32), 3, -1),
    ]
    if "albedo" in sample:
        cols.append(sample["albedo"][idx].astype(np.float32) / 255.0)
    grid = np.concatenate([np.concatenate(list(c), axis=0) for c in cols], axis=1)  # (rows*H, 5*W or 6*W, 3)
    return (np.clip(grid, 0, 1) * 255 + 0.5).astype(np.uint8)


def _splat(img: np.ndarray, pts: np.ndarray, K: np.ndarray, c2w: np.ndarray, colors: np.ndarray, r: int = 1) -> None:
    from loom.geometry.camera import project

    uv, z = project(pts.astype(np.float64), K.astype(np.float64), c2w.astype(np.float64))
    h, w = img.shape[:2]
    order = np.argsort(-z)  # far first, near last
    for dy in range(-r + 1, r):
        for dx in range(-r + 1, r):
            u = (uv[order, 0] + dx).astype(int)
            v = (uv[order, 1] + dy).astype(int)
            ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
            img[v[ok], u[ok]] = colors[order][ok]


def contact_sheet_4d(sample: dict[str, Any], max_frames: int = 6) -> np.ndarray:
    """Rows = frames; columns: video over a checkerboard | aligned queries coloured by index (the same colour is
    the same physical point in every row) | surface points coloured by normal."""
    t, h, w, _ = sample["video"].shape
    idx = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    yy, xx = np.mgrid[:h, :w]
    checker = np.where(((yy // 8) + (xx // 8)) % 2 == 0, 0.8, 0.6)[..., None]
    q = sample["queries"].shape[1]
    hue = np.linspace(0, 1, q, endpoint=False)
    qcol = np.stack([0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)], axis=1)
    rows = []
    for i in idx:
        rgba = sample["video"][i].astype(np.float32) / 255.0
        comp = rgba[..., :3] * rgba[..., 3:] + checker * (1 - rgba[..., 3:])
        qimg = np.zeros((h, w, 3), np.float32)
        _splat(qimg, sample["queries"][i], sample["K"][i], sample["c2w"][i], qcol, r=2)
        simg = np.zeros((h, w, 3), np.float32)
        surf = sample["surface"][i]
        _splat(simg, surf[:, :3], sample["K"][i], sample["c2w"][i], surf[:, 3:] * 0.5 + 0.5)
        rows.append(np.concatenate([comp, qimg, simg], axis=1))
    grid = np.concatenate(rows, axis=0)
    return (np.clip(grid, 0, 1) * 255 + 0.5).astype(np.uint8)


def _flow_rgb(flow: np.ndarray) -> np.ndarray:
    """Flow (H,W,2) -> colour: hue = direction, brightness = magnitude (normalised to the frame's maximum)."""
    mag = np.linalg.norm(flow, axis=-1)
    ang = np.arctan2(flow[..., 1], flow[..., 0])
    v = mag / max(float(mag.max()), 1e-6)
    return np.stack([v * (0.5 + 0.5 * np.cos(ang + k * 2 * np.pi / 3)) for k in range(3)], axis=-1)


def contact_sheet_scene(sample: dict[str, Any], max_frames: int = 6) -> np.ndarray:
    """Rows = frames; columns: rgb | edges (red silhouette, green crease, blue boundary, yellow intersection) |
    forward flow (hue = direction; black on occluded pixels) | warped noise, channel 0, upsampled."""
    t, h, w, _ = sample["rgb"].shape
    idx = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    colours = np.array([[1, 0, 0], [0, 1, 0], [0.2, 0.4, 1], [1, 1, 0]], np.float32)
    rows = []
    for i in idx:
        e = sample["edges"][i].astype(np.float32)
        eimg = np.clip(e @ colours, 0, 1)
        if i < t - 1:
            fimg = np.where(sample["occlusion_fwd"][i][..., None], 0.0, _flow_rgb(sample["flow_fwd"][i]))
        else:
            fimg = _flow_rgb(sample["flow_last_to_first"])
        n = sample["noise"][i, 0]
        nimg = np.kron(np.clip(n * 0.25 + 0.5, 0, 1), np.ones((h // n.shape[0], w // n.shape[1])))
        nimg = np.repeat(nimg[..., None], 3, -1)
        rows.append(np.concatenate([sample["rgb"][i] / 255.0, eimg, fimg, nimg], axis=1))
    return (np.clip(np.concatenate(rows, 0), 0, 1) * 255 + 0.5).astype(np.uint8)


def contact_sheet_clips(sample: dict[str, Any], max_frames: int = 6) -> np.ndarray:
    """Rows = frames; columns: frame | depth (white = near) | edges of depth | flow to the next frame (the last row:
    last-to-first; hue = direction) | warped noise, channel 0, of the latent frame that covers the row's frame
    (frame 0 -> latent 0, frames 4j-3..4j -> latent j), upsampled."""
    t, h, w, _ = sample["rgb"].shape
    idx = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    noise = sample["noise"]
    factor = max(1, -(-(t - 1) // max(noise.shape[0] - 1, 1)))
    rows = []
    for i in idx:
        fimg = _flow_rgb(sample["flow_fwd"][i]) if i < t - 1 else _flow_rgb(sample["flow_last_to_first"])
        n = noise[min(-(-i // factor), noise.shape[0] - 1), 0]
        nimg = np.kron(np.clip(n * 0.25 + 0.5, 0, 1), np.ones((h // n.shape[0], w // n.shape[1])))
        grey = [np.repeat(np.asarray(x, np.float32)[..., None], 3, -1)
                for x in (sample["depth"][i], sample["edges"][i] / 255.0, nimg)]
        rows.append(np.concatenate([sample["rgb"][i] / 255.0, grey[0], grey[1], fimg, grey[2]], axis=1))
    return (np.clip(np.concatenate(rows, 0), 0, 1) * 255 + 0.5).astype(np.uint8)
