"""Input checks and batching shared by the image and video metrics."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch


def as_images(x, name: str = "images", allow_video: bool = True, check_range: bool = True) -> torch.Tensor:
    """(N,3,H,W) float in [0,1]; with ``allow_video`` a (N,T,3,H,W) video batch is flattened to (N*T,3,H,W)."""
    t = torch.as_tensor(x)
    if allow_video and t.ndim == 5:
        t = t.reshape(-1, *t.shape[2:])
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"{name}: expected (N,3,H,W) images" + (" or (N,T,3,H,W) videos" if allow_video else "")
                         + f", got shape {tuple(t.shape)}")  # fmt: skip
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected float values in [0,1], got dtype {t.dtype}")
    if check_range:
        check_unit_range(t, name)
    return t


def check_unit_range(t: torch.Tensor, name: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    lo, hi = (float(v) for v in torch.aminmax(t))
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"{name}: values must lie in [0,1], got [{lo:.4g}, {hi:.4g}] (scale [0,255] by 1/255)")


def same_shape(a: torch.Tensor, b: torch.Tensor, na: str = "preds", nb: str = "target") -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def batches(x, batch_size: int) -> Iterator[torch.Tensor]:
    """Split a tensor into batches of ``batch_size``; an iterable of tensors (a stream) is passed through."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(x)
        for i in range(0, t.shape[0], batch_size):
            yield t[i : i + batch_size]
    elif isinstance(x, Iterable):
        yield from (torch.as_tensor(b) for b in x)
    else:
        raise TypeError(f"expected a tensor or an iterable of tensor batches, got {type(x).__name__}")


def reduce(values: torch.Tensor, reduction: str):
    if reduction == "mean":
        return float(values.double().mean())
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
