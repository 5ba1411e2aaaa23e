"""Warped noise: frame 0's Gaussian noise carried along the optical flow so that every frame stays i.i.d. N(0, 1)
(VideoFrom3D section 3.3, after Go-with-the-Flow, Burgert et al. 2025). Pure torch.

Why not just resample the noise along the flow: bilinear interpolation averages neighbouring values and lowers the
variance (blurred noise is no longer white), and nearest-neighbour copying duplicates values where the flow
stretches (neighbouring pixels become correlated). Both drift away from the N(0, I) the diffusion model expects.

Algorithm (the discrete "integral noise" of Chang et al. 2024, "How I Warped Your Noise", which Go-with-the-Flow
approximates in real time), one step from frame t to t+1, at latent resolution (C,h,w):

1. **Conditional upsampling.** Each pixel value ``n`` becomes a ``k x k`` block of sub-pixels
   ``s = n / k + (Z - mean_block(Z))`` with ``Z ~ N(0, 1)`` i.i.d. Then ``sum(block) / k == n`` exactly, every
   sub-pixel is N(0, 1) and all sub-pixels are mutually independent (their covariance is
   ``1/k^2 + (-1/k^2) = 0`` within a block): the sub-pixel field is a finer white noise whose block sums are the
   frame's noise.
2. **Transport.** Each sub-pixel centre moves by the forward flow, read bilinearly at that centre (flow vectors are
   defined at pixel centres). It lands in the pixel ``floor(position)`` of frame t+1; sub-pixels that leave the
   image are dropped.
3. **Aggregation.** A pixel of frame t+1 that receives ``m >= 1`` sub-pixels gets ``sum / sqrt(m)``: a normalised
   sum of ``m`` distinct independent N(0, 1) values, hence N(0, 1); different pixels sum disjoint sets, hence are
   independent. A pixel that receives none (disocclusion, the image border) gets fresh N(0, 1) noise.

So every frame is exactly i.i.d. N(0, 1) given the flows, whatever the flows are (stretching, shrinking,
disocclusion), while the pattern moves with the flow: an integer translation moves whole blocks and reproduces the
shifted frame exactly, and the identity flow keeps it unchanged. The next step upsamples frame t+1 afresh
(conditionally on its values) rather than carrying the sub-pixel field: the pixel values are all that exactness
needs, and a carried field would have blocks of uneven sizes to renormalise. ``k`` (``upsample``) sets how finely a
pixel can be split; a local zoom beyond ``k`` per step leaves some pixels empty, and those get fresh noise.

Video models denoise at a latent frame rate (CogVideoX's causal VAE: frame 0, then one latent frame per 4 frames):
:func:`compress_time` brings warped noise there by taking one frame per group, which keeps it exactly i.i.d.
N(0, 1) (a scaled sum of the group would not be: its frames are correlated along the flow).

Randomness is drawn only from the ``generator`` (or torch's global generator when None), in a fixed order, so a
seeded generator gives the same noise on the same device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _conditional_upsample(n: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """(C,h,w) i.i.d. N(0,1) -> (C,h*k,w*k) i.i.d. N(0,1) sub-pixels whose k x k block sums divided by k equal n."""
    c, h, w = n.shape
    z = torch.randn((c, h, k, w, k), generator=generator, dtype=n.dtype, device=n.device)
    z = z - z.mean(dim=(2, 4), keepdim=True)
    return (z + n[:, :, None, :, None] / k).reshape(c, h * k, w * k)


def warp_noise(
    noise0: torch.Tensor,
    flows: torch.Tensor,
    generator: torch.Generator | None = None,
    upsample: int = 4,
) -> torch.Tensor:
    """Carry ``noise0`` (C,h,w) along the forward ``flows`` (T-1,h,w,2) and return the noise of every frame
    (T,C,h,w), frame 0 being ``noise0`` itself.

    ``flows[t][y, x] = (dx, dy)`` in pixels of the noise (latent) grid moves the pixel centred at
    ``(x + 0.5, y + 0.5)`` of frame t to ``(x + 0.5 + dx, y + 0.5 + dy)`` of frame t+1 (the convention of
    :mod:`loom.geometry.flow`; bring pixel flows to latent resolution with :func:`resize_flow`). ``noise0`` should
    be i.i.d. N(0,1); ``upsample`` is the sub-pixel factor ``k`` of the module docstring.
    """
    if noise0.ndim != 3:
        raise ValueError(f"expected noise0 (C,h,w), got shape {tuple(noise0.shape)}")
    c, h, w = noise0.shape
    if flows.ndim != 4 or tuple(flows.shape[1:]) != (h, w, 2):
        raise ValueError(f"expected flows (T-1,{h},{w},2) for noise0 {tuple(noise0.shape)}, got {tuple(flows.shape)}")
    if upsample < 1:
        raise ValueError(f"upsample must be >= 1, got {upsample}")
    if not noise0.is_floating_point():
        raise ValueError(f"noise0 must be a floating-point tensor, got {noise0.dtype}")
    k = upsample
    device, dtype = noise0.device, noise0.dtype
    flows = flows.to(device=device, dtype=torch.float32)

    # Sub-pixel centres in continuous pixel coordinates, and the same points in grid_sample's [-1, 1] coordinates
    # (align_corners=False: -1 and 1 are the outer edges of the border pixels, matching centres at i + 0.5).
    xs = (torch.arange(w * k, device=device, dtype=torch.float32) + 0.5) / k  # (w*k,)
    ys = (torch.arange(h * k, device=device, dtype=torch.float32) + 0.5) / k  # (h*k,)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (h*k, w*k)
    grid = torch.stack([2 * gx / w - 1, 2 * gy / h - 1], dim=-1)[None]  # (1, h*k, w*k, 2)

    out = torch.empty((flows.shape[0] + 1, c, h, w), dtype=dtype, device=device)
    out[0] = noise0
    for t in range(flows.shape[0]):
        sub = _conditional_upsample(out[t], k, generator).reshape(c, -1)  # (C, h*k*w*k)
        fresh = torch.randn((c, h, w), generator=generator, dtype=dtype, device=device)
        f = F.grid_sample(flows[t].permute(2, 0, 1)[None], grid, mode="bilinear", padding_mode="border",
                          align_corners=False)[0]  # (2, h*k, w*k): flow at each sub-pixel centre
        tx = torch.floor(gx + f[0]).reshape(-1)
        ty = torch.floor(gy + f[1]).reshape(-1)
        keep = (tx >= 0) & (tx < w) & (ty >= 0) & (ty < h)
        idx = (ty[keep] * w + tx[keep]).long()  # target pixel of each kept sub-pixel
        count = torch.bincount(idx, minlength=h * w).to(dtype)  # (h*w,)
        total = torch.zeros((c, h * w), dtype=dtype, device=device).index_add_(1, idx, sub[:, keep])
        warped = (total / count.clamp(min=1).sqrt()).reshape(c, h, w)
        out[t + 1] = torch.where((count > 0).reshape(1, h, w), warped, fresh)
    return out


def resize_flow(
    flow: torch.Tensor,
    size: tuple[int, int],
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Downsample pixel flows (T,H,W,2) to a coarser grid ``size = (h, w)`` (the latent resolution): the vectors are
    averaged over each cell (area pooling) and scaled by ``w / W`` (dx) and ``h / H`` (dy), so they are in pixels
    of the coarse grid.

    ``valid`` (T,H,W) bool, optional (e.g. ``~occlusion_fwd``): average only valid vectors, so the zero flow of
    occluded pixels does not drag a cell's motion towards zero; a cell with no valid vector gets 0.
    Returns (T,h,w,2) float32 (or the input's floating dtype).
    """
    flow = torch.as_tensor(flow)
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"expected flow (T,H,W,2), got shape {tuple(flow.shape)}")
    big_h, big_w = int(flow.shape[1]), int(flow.shape[2])
    h, w = int(size[0]), int(size[1])
    if not (1 <= h <= big_h and 1 <= w <= big_w):
        raise ValueError(f"size {tuple(size)} must be between (1, 1) and the flow's ({big_h}, {big_w}): "
                         "resize_flow only downsamples")
    if not flow.is_floating_point():
        flow = flow.float()
    x = flow.permute(0, 3, 1, 2)  # (T,2,H,W)
    if valid is None:
        pooled = F.adaptive_avg_pool2d(x, (h, w))
    else:
        valid = torch.as_tensor(valid, device=flow.device)
        if tuple(valid.shape) != tuple(flow.shape[:3]):
            raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {tuple(flow.shape[:3])}")
        m = valid.to(flow.dtype)[:, None]  # (T,1,H,W)
        num = F.adaptive_avg_pool2d(x * m, (h, w))
        den = F.adaptive_avg_pool2d(m, (h, w))
        pooled = torch.where(den > 0, num / den.clamp(min=torch.finfo(flow.dtype).tiny), torch.zeros_like(num))
    scale = torch.tensor([w / big_w, h / big_h], dtype=flow.dtype, device=flow.device)
    return pooled.permute(0, 2, 3, 1) * scale


def compress_time(noise: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Warped noise (T,C,h,w) at the video's frame rate -> (1 + (T-1)/factor, C,h,w) at the latent frame rate of a
    causal video VAE that keeps frame 0 alone and folds each following group of ``factor`` frames into one latent
    frame (CogVideoX and Wan: factor 4, so 49 frames -> 13 latent frames). ``T`` must be ``1 + factor * k``: pad the
    video (e.g. repeat its last frame, as VideoFrom3D pads 46 frames to 49) before warping.

    Latent frame 0 is frame 0 and latent frame ``j >= 1`` is frame ``factor * j``, the last frame of the group it
    covers (so the last latent frame is the last video frame, the GGI end anchor). Each one is a frame of
    :func:`warp_noise`'s output, hence exactly i.i.d. N(0, 1), and consecutive latent frames still follow the flow
    composed over their ``factor`` steps.

    Why not sum the group's frames and divide by ``sqrt(factor)`` (2 for 4 frames): that is N(0, 1) only when the
    frames are independent, and warped frames are not: they are the same noise moved along the flow. Under a slow
    camera the 4 frames are almost equal and the scaled sum has variance close to ``factor`` (4), not 1; the exact
    variance of each latent pixel would depend on how many sub-pixels its 4 frames share. Averaging (Go-with-the-Flow's
    'blend') has the converse problem (variance 1/factor under fast motion). Selecting a frame has neither.
    """
    if noise.ndim != 4:
        raise ValueError(f"expected noise (T,C,h,w), got shape {tuple(noise.shape)}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    t = int(noise.shape[0])
    if (t - 1) % factor:
        raise ValueError(f"noise has {t} frames; the VAE's temporal compression by {factor} needs 1 + {factor}*k "
                         f"frames (e.g. {1 + factor * ((t - 1) // factor + 1)}): pad the video, e.g. by repeating its "
                         "last frame (zero flow), before warping")
    return noise[::factor].clone()
