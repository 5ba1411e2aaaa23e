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
            "lighting", "orbit", "warnings")
    lines += [f"  meta.{k}: {m[k]}" for k in keep if k in m]
    return lines


def contact_sheet(sample: dict[str, Any], max_frames: int = 6) -> np.ndarray:
    """(rows = frames, columns = rgb | normal | position | depth | mask) uint8 image of one sample."""
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
    grid = np.concatenate([np.concatenate(list(c), axis=0) for c in cols], axis=1)  # (rows*H, 5*W, 3)
    return (np.clip(grid, 0, 1) * 255 + 0.5).astype(np.uint8)
