"""Peak signal-to-noise ratio.

Definition: for each image i (each frame of a video), ``PSNR_i = 10 log10(data_range^2 / MSE_i)`` with ``MSE_i``
the mean of the squared differences over its 3 x H x W values; the result is the mean of ``PSNR_i`` over images
(and frames), the per-frame average that video papers report (TAPESTRY Tab. 1). ``data_range`` is 1 for the [0,1]
inputs. An identical pair (MSE 0) gives +inf, which makes the mean +inf: that is the definition, not an error.
This equals torchmetrics' ``peak_signal_noise_ratio(p, t, data_range=1.0, dim=(1, 2, 3))``.

Precision: float32 inputs are summed in blocks of 2^16 squared differences whose sums are added in float64 (~1e-6
relative to the exact sum or better, 1e-7 typical, at any image size); float64 inputs are summed in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from loom.eval.metrics._common import as_images, check_unit_range, reduce, same_shape, unit_range_bits

_BLOCK = 1 << 16  # values per float32 partial sum (and per step of the small-image path): 256 KiB


def psnr(preds, target, *, data_range: float = 1.0, reduction: str = "mean"):
    """PSNR in dB of ``preds`` against ``target``: images (N,3,H,W) or videos (N,T,3,H,W) in [0,1].

    ``reduction="none"`` returns the (N,) or (N*T,) per-image values.
    """
    p, t = as_images(preds, "preds", check_range=False), as_images(target, "target", check_range=False)
    same_shape(p, t)
    if p.numel() == 0:
        check_unit_range(p, "preds")  # raises: empty
    n = p.shape[0]
    pf, tf = p.reshape(n, -1), t.reshape(n, -1)
    sse = _sse_cpu(pf, tf) if pf.dtype == tf.dtype else None
    if sse is None:  # another device or dtype: whole-tensor range checks, then blocks of images
        sse = _sse_torch(pf, tf)
    mse = sse / pf.shape[1]
    values = 10.0 * torch.log10(data_range**2 / mse)  # (N,)
    return reduce(values, reduction)


def _sse_cpu(pf: torch.Tensor, tf: torch.Tensor) -> torch.Tensor | None:
    """(N,) float64 sums of squared differences of float32/float64 CPU images, with the [0,1] check; else None.

    Memory-bound, so each value is read from DRAM once: per image, the difference goes to one reused buffer (BLAS dot
    of the buffer, no fresh multi-MB temporaries and their page faults), then the range test reads the image again
    while it is still in cache (L3), as unsigned integers (one max, see ``unit_range_bits``). numpy calls, since each
    Python call costs ~1 us of the ~0.18 ms a 256x256 image takes; smaller blocks, to re-read from L2, cost more in
    calls than they save (measured).
    """
    pb, tb = unit_range_bits(pf), unit_range_bits(tf)
    if pb is None or tb is None:
        return None
    (pu, one), (tu, _) = pb, tb
    n, d = pf.shape
    pu, tu = pu.reshape(n, d), tu.reshape(n, d)
    pn, tn = pf.detach().numpy(), tf.detach().numpy()
    dt = pn.dtype
    sse = np.empty(n, np.float64)
    hi = pu.dtype.type(0)
    vmax = np.maximum.reduce
    if d > _BLOCK // 2:  # one image at a time; float32 partial sums of <= _BLOCK values
        buf = np.empty(d, dt)
        parts = [buf] if dt == np.float64 else [buf[j : j + _BLOCK] for j in range(0, d, _BLOCK)]
        for i in range(n):
            np.subtract(pn[i], tn[i], out=buf)
            sse[i] = sum(float(np.dot(b, b)) for b in parts)
            hi = max(hi, vmax(pu[i]), vmax(tu[i]))
    else:  # small images: a block of whole images per step, one row sum per image
        g = _BLOCK // d
        buf = np.empty((g, d), dt)
        for i in range(0, n, g):
            j = min(i + g, n)
            b = np.subtract(pn[i:j], tn[i:j], out=buf[: j - i])
            np.square(b, out=b)
            sse[i:j] = b.sum(1, dtype=np.float64)
            hi = max(hi, vmax(pu[i:j], axis=None), vmax(tu[i:j], axis=None))
    if hi > one:  # out of range (or a -0.0, which is allowed): the exact test, with the error message
        check_unit_range(pf, "preds")
        check_unit_range(tf, "target")
    return torch.from_numpy(sse)


def _sse_torch(pf: torch.Tensor, tf: torch.Tensor) -> torch.Tensor:
    check_unit_range(pf, "preds")
    check_unit_range(tf, "target")
    n, d = pf.shape
    step = max(1, (1 << 24) // d)  # bounded temporaries for long videos on a GPU
    sse = []
    for i in range(0, n, step):
        diff = torch.sub(pf[i : i + step], tf[i : i + step])
        sse.append(diff.square_().sum(1, dtype=torch.float64))
    return torch.cat(sse).cpu()
