"""Geometric optical flow of a static scene seen by a moving camera (VideoFrom3D section 3.1, SPEC section 2).

The scene is static, so a pixel's 3D point is fixed and only the camera moves: the flow from frame ``a`` to frame
``b`` is found by unprojecting each pixel of ``a`` at its centre with its depth and projecting the point into
camera ``b`` (the paper does the same with a coordinate-encoded colour map; reprojecting the depth is exact and
needs no renderer).

Conventions (those of :mod:`loom.geometry.camera`: OpenCV cameras, pixel centres at ``u + 0.5``, depth =
camera-space z):

- ``flow_a_to_b[v, u] = (dx, dy)``: the pixel of frame ``a`` centred at ``(u + 0.5, v + 0.5)`` shows a point that
  appears at ``(u + 0.5 + dx, v + 0.5 + dy)`` in frame ``b``. Pixels, ``dx`` to the right, ``dy`` down. Forward
  flow is ``a = t, b = t + 1``; backward flow is ``a = t + 1, b = t``.
- ``occluded[v, u]`` is True where the pixel of ``a`` has no visible correspondence in ``b``: no depth in ``a``
  (background), the point is behind camera ``b``, it projects outside image ``b``, or the depth test fails (another
  surface is in front of it in ``b``). Flow is 0 there.

The depth test compares the point's camera-``b`` depth ``z`` with ``depth_b`` at the four pixel centres around its
projection (the bilinear stencil): the point is visible when ``min - tol <= z <= max + tol`` over those of the four
with depth, ``tol = rel_tol * z + abs_tol``. For a plane, ``1/depth`` is affine in the image, so the true depth at
the projection lies between the four values and slanted or grazing surfaces pass without a large tolerance (a
single nearest-pixel test fails there); the price is leniency within one pixel of a depth edge.
"""

from __future__ import annotations

import numpy as np

from loom.geometry.camera import project, unproject_depth


def _valid_depth(depth: np.ndarray) -> np.ndarray:
    return np.isfinite(depth) & (depth > 0)


def _check_camera(K, c2w, name: str) -> tuple[np.ndarray, np.ndarray]:
    K = np.asarray(K, dtype=np.float64)
    c2w = np.asarray(c2w, dtype=np.float64)
    if K.shape != (3, 3) or c2w.shape != (4, 4):
        raise ValueError(f"camera {name}: expected K (3,3) and c2w (4,4), got {K.shape} and {c2w.shape}")
    return K, c2w


def flow_between(
    depth_a: np.ndarray,
    K_a: np.ndarray,
    c2w_a: np.ndarray,
    depth_b: np.ndarray,
    K_b: np.ndarray,
    c2w_b: np.ndarray,
    mask_a: np.ndarray | None = None,
    rel_tol: float = 0.01,
    abs_tol: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """Flow from frame ``a`` to frame ``b`` and its occlusion mask (see the module docstring for conventions).

    depth_a (H,W), depth_b (Hb,Wb): camera-space z, with 0, a negative value or a non-finite value where there is
    no geometry. ``mask_a`` (H,W) bool, optional: pixels of ``a`` to use (ANDed with ``depth_a > 0``).
    Returns ``flow`` (H,W,2) float32 ``(dx, dy)`` in pixels (0 where occluded) and ``occluded`` (H,W) bool.
    """
    da = np.asarray(depth_a, dtype=np.float64)
    db = np.asarray(depth_b, dtype=np.float64)
    if da.ndim != 2 or db.ndim != 2:
        raise ValueError(f"expected 2D depth maps, got shapes {da.shape} and {db.shape}")
    if rel_tol < 0 or abs_tol < 0:
        raise ValueError(f"tolerances must be >= 0, got rel_tol={rel_tol}, abs_tol={abs_tol}")
    K_a, c2w_a = _check_camera(K_a, c2w_a, "a")
    K_b, c2w_b = _check_camera(K_b, c2w_b, "b")
    h, w = da.shape
    hb, wb = db.shape

    valid = _valid_depth(da)
    if mask_a is not None:
        mask_a = np.asarray(mask_a)
        if mask_a.shape != da.shape:
            raise ValueError(f"mask_a has shape {mask_a.shape}, depth_a has {da.shape}: they must match")
        valid &= mask_a.astype(bool)

    pts = unproject_depth(np.where(valid, da, 1.0), K_a, c2w_a)  # (H,W,3); dummy depth 1 where invalid
    with np.errstate(divide="ignore", invalid="ignore"):
        uv_b, z = project(pts, K_b, c2w_b)  # (H,W,2), (H,W)
    in_front = z > 1e-12
    ub, vb = uv_b[..., 0], uv_b[..., 1]
    inside = in_front & (ub >= 0) & (ub < wb) & (vb >= 0) & (vb < hb)
    ub = np.where(inside, ub, 0.5)
    vb = np.where(inside, vb, 0.5)

    # Bilinear stencil: the four pixel centres around the projection, clamped at the image border. The min and max
    # of every 2x2 window of the edge-padded depth map are computed once, then read with one index per pixel.
    vb_ok = _valid_depth(db)
    pad_lo = np.pad(np.where(vb_ok, db, np.inf), 1, mode="edge")  # (Hb+2, Wb+2)
    pad_hi = np.pad(np.where(vb_ok, db, -np.inf), 1, mode="edge")
    win_lo = np.minimum(np.minimum(pad_lo[:-1, :-1], pad_lo[:-1, 1:]), np.minimum(pad_lo[1:, :-1], pad_lo[1:, 1:]))
    win_hi = np.maximum(np.maximum(pad_hi[:-1, :-1], pad_hi[:-1, 1:]), np.maximum(pad_hi[1:, :-1], pad_hi[1:, 1:]))
    # Window (i, j) of the (Hb+1, Wb+1) maps covers pixels i-1..i, j-1..j: the stencil whose top-left is floor(. - 0.5).
    win = np.floor(vb + 0.5).astype(np.intp) * (wb + 1) + np.floor(ub + 0.5).astype(np.intp)
    lo = win_lo.ravel()[win]
    hi = win_hi.ravel()[win]
    tol = rel_tol * np.abs(z) + abs_tol
    with np.errstate(invalid="ignore"):
        visible = (z >= lo - tol) & (z <= hi + tol)  # False when no neighbour has depth (lo = inf)

    ok = valid & inside & visible
    u_a = np.arange(w, dtype=np.float64) + 0.5
    v_a = np.arange(h, dtype=np.float64) + 0.5
    flow = np.stack([uv_b[..., 0] - u_a[None, :], uv_b[..., 1] - v_a[:, None]], axis=-1)
    flow = np.where(ok[..., None], flow, 0.0).astype(np.float32)
    return flow, ~ok


def sequence_flows(
    depth: np.ndarray,
    K: np.ndarray,
    c2w: np.ndarray,
    mask: np.ndarray | None = None,
    rel_tol: float = 0.01,
    abs_tol: float = 1e-3,
) -> dict[str, np.ndarray]:
    """Flows of a video: consecutive frames in both directions and from the last frame to the first.

    depth (T,H,W), K (T,3,3), c2w (T,4,4), mask (T,H,W) bool or None. Returns
    ``flow_fwd`` (T-1,H,W,2) float32: ``flow_fwd[t]`` maps frame t to frame t+1;
    ``flow_bwd`` (T-1,H,W,2) float32: ``flow_bwd[t]`` maps frame t+1 to frame t (indexed by the earlier frame);
    ``flow_last_to_first`` (H,W,2) float32: maps frame T-1 to frame 0;
    ``occlusion_fwd``, ``occlusion_bwd`` (T-1,H,W) bool and ``occlusion_last_to_first`` (H,W) bool: True where the
    pixel of the source frame of that flow has no visible correspondence in its target frame.
    """
    depth = np.asarray(depth)
    K = np.asarray(K)
    c2w = np.asarray(c2w)
    if depth.ndim != 3:
        raise ValueError(f"expected depth (T,H,W), got shape {depth.shape}")
    n, h, w = depth.shape
    if n < 1 or K.shape != (n, 3, 3) or c2w.shape != (n, 4, 4):
        raise ValueError(f"expected T >= 1 frames with K (T,3,3) and c2w (T,4,4) for depth {depth.shape}, "
                         f"got K {K.shape} and c2w {c2w.shape}")
    if mask is not None and np.shape(mask) != depth.shape:
        raise ValueError(f"mask has shape {np.shape(mask)}, depth has {depth.shape}: they must match")

    def pair(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        return flow_between(depth[a], K[a], c2w[a], depth[b], K[b], c2w[b],
                            None if mask is None else mask[a], rel_tol=rel_tol, abs_tol=abs_tol)

    out = {
        "flow_fwd": np.zeros((n - 1, h, w, 2), np.float32),
        "flow_bwd": np.zeros((n - 1, h, w, 2), np.float32),
        "occlusion_fwd": np.zeros((n - 1, h, w), bool),
        "occlusion_bwd": np.zeros((n - 1, h, w), bool),
    }
    for t in range(n - 1):
        out["flow_fwd"][t], out["occlusion_fwd"][t] = pair(t, t + 1)
        out["flow_bwd"][t], out["occlusion_bwd"][t] = pair(t + 1, t)
    out["flow_last_to_first"], out["occlusion_last_to_first"] = pair(n - 1, 0)
    return out


def warp_backward(image_b: np.ndarray, flow_a_to_b: np.ndarray) -> np.ndarray:
    """Reconstruct frame ``a`` from frame ``b``: ``out[v, u] = image_b`` sampled (bilinearly, between pixel
    centres) at ``(u + 0.5, v + 0.5) + flow_a_to_b[v, u]``.

    So ``warp_backward(frame[t+1], flow_fwd[t])`` reconstructs frame t on the pixels where ``occlusion_fwd[t]`` is
    False, and ``warp_backward(frame[t], flow_bwd[t])`` reconstructs frame t+1 where ``occlusion_bwd[t]`` is False.
    Elsewhere the result is meaningless. Samples beyond the image take the nearest border pixel.

    image_b (Hb,Wb) or (Hb,Wb,C); flow_a_to_b (H,W,2). Returns (H,W) or (H,W,C), float (at least float32).
    """
    img = np.asarray(image_b)
    flow = np.asarray(flow_a_to_b)
    if img.ndim not in (2, 3) or flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"expected image (H,W[,C]) and flow (H,W,2), got {img.shape} and {flow.shape}")
    squeeze = img.ndim == 2
    if squeeze:
        img = img[..., None]
    img = img.astype(np.result_type(img.dtype, np.float32), copy=False)
    hb, wb = img.shape[:2]
    h, w = flow.shape[:2]
    # Index coordinates (pixel centre of index i at i): x = u + dx.
    x = np.arange(w, dtype=np.float64)[None, :] + flow[..., 0]
    y = np.arange(h, dtype=np.float64)[:, None] + flow[..., 1]
    x = np.clip(x, 0, wb - 1)
    y = np.clip(y, 0, hb - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), wb - 1)
    y0 = np.minimum(np.floor(y).astype(np.int64), hb - 1)
    x1 = np.minimum(x0 + 1, wb - 1)
    y1 = np.minimum(y0 + 1, hb - 1)
    fx = (x - x0)[..., None].astype(img.dtype)
    fy = (y - y0)[..., None].astype(img.dtype)
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    out = top * (1 - fy) + bot * fy
    return out[..., 0] if squeeze else out
