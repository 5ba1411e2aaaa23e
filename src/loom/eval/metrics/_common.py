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


# float32 / float64 bit patterns of 1.0: read as unsigned integers, the floats in [+0, 1] are exactly the integers
# 0..ONE (a negative float, -0.0 included, has the sign bit set; NaN and inf lie above 1.0's pattern).
_ONE_BITS = {
    torch.float32: (np.uint32, np.uint32(0x3F800000)),
    torch.float64: (np.uint64, np.uint64(0x3FF0000000000000)),
}


def unit_range_bits(t: torch.Tensor):
    """(unsigned-integer view of ``t`` as a numpy array, the pattern of 1.0) for a contiguous float32/float64 CPU
    tensor, else None. ``np.maximum.reduce(view) <= one`` is a one-pass, one-comparison test of "all in [0,1]" (a
    sufficient test: -0.0 fails it, so a failure is confirmed by ``check_unit_range``)."""
    if t.device.type != "cpu" or t.dtype not in _ONE_BITS or t.is_neg() or not t.is_contiguous():
        return None
    kind, one = _ONE_BITS[t.dtype]
    return t.detach().numpy().reshape(-1).view(kind), one


def check_unit_range(t: torch.Tensor, name: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    bits = unit_range_bits(t)
    if bits is not None and np.maximum.reduce(bits[0]) <= bits[1]:
        return  # the exact test below reads the data twice as slowly
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
