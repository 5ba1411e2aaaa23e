"""Peak signal-to-noise ratio.

Definition: for each image i (each frame of a video), ``PSNR_i = 10 log10(data_range^2 / MSE_i)`` with ``MSE_i``
the mean of the squared differences over its 3 x H x W values; the result is the mean of ``PSNR_i`` over images
(and frames), the per-frame average that video papers report (TAPESTRY Tab. 1). ``data_range`` is 1 for the [0,1]
inputs. An identical pair (MSE 0) gives +inf, which makes the mean +inf: that is the definition, not an error.
This equals torchmetrics' ``peak_signal_noise_ratio(p, t, data_range=1.0, dim=(1, 2, 3))``.
"""

from __future__ import annotations

import torch

from loom.eval.metrics._common import as_images, reduce, same_shape


def psnr(preds, target, *, data_range: float = 1.0, reduction: str = "mean"):
    """PSNR in dB of ``preds`` against ``target``: images (N,3,H,W) or videos (N,T,3,H,W) in [0,1].

    ``reduction="none"`` returns the (N,) or (N*T,) per-image values.
    """
    p, t = as_images(preds, "preds"), as_images(target, "target")
    same_shape(p, t)
    mse = (p.double() - t.double()).pow(2).flatten(1).mean(1)  # (N,)
    values = 10.0 * torch.log10(data_range**2 / mse)
    return reduce(values, reduction)
