"""A small triangle rasteriser in pure torch: hard z-buffer rendering and a differentiable soft silhouette, for
ShapeGen4D's global pose registration (appendix A.1; :mod:`loom.geometry.pose`).

Why Loom writes its own: the usual differentiable rasterisers (nvdiffrast, pytorch3d) ship CUDA/C++ extensions
that must be compiled against the local torch, and Loom's CPU machines and CI have neither a CUDA toolkit nor
prebuilt wheels for them. Registration renders small images (~128 px) of meshes with a few thousand faces, which
vectorised torch handles in well under a second per batch of cameras on one CPU core.

Conventions are those of :mod:`loom.geometry.camera`: OpenCV cameras (``c2w`` 4x4, +x right, +y down, +z forward),
pixel ``(v, u)`` has its centre at ``(u + 0.5, v + 0.5)``, depth is camera-space z.

Design choices:

- **Candidates, not tiles**: every face's screen bounding box is expanded into its candidate pixels (one flat list
  over the whole batch of cameras, processed in chunks to bound memory), each tested with edge functions; the
  z-buffer is one ``scatter_reduce(amin)``. Ties in depth go to the higher face index, so the result is
  deterministic.
- **Two-sided, inclusive edges**: faces are not back-face culled (generated meshes are not reliably oriented) and
  a pixel centre exactly on an edge belongs to both faces, so a closed mesh's silhouette has no cracks.
- **No near-plane clipping**: a face with a vertex closer than ``near`` to the camera plane is dropped. Registration
  cameras see the whole object in front of them; a camera inside the object is a caller error, not a case to
  render approximately.
- **Perspective-correct barycentrics** (as nvdiffrast returns them): screen-space weights divided by each vertex's
  depth and renormalised; depth is the perspective-correct camera z.
- **Soft silhouette** (SoftRas, Liu et al. 2019): each face covers a pixel with probability
  ``sigmoid(d / sigma)``, ``d`` the signed Euclidean distance in pixels from the pixel centre to the projected
  triangle (positive inside), so ``sigma`` is in pixels (SoftRas uses squared NDC distances; pixels read more
  plainly). A pixel's silhouette is ``1 - prod_f (1 - sigmoid(d_f / sigma))``, computed as
  ``1 - exp(-sum_f softplus(d_f / sigma))``, which is the same number without underflow. Only faces whose bounding
  box, inflated by the distance at which the sigmoid falls below ``1e-4``, covers the pixel are summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A face whose nearest vertex has camera z below this is dropped (no clipping; see the module docstring).
NEAR = 1e-4
# Candidate pixels processed at once: ~4M x a few tensors of 4-8 bytes stays under ~200 MB.
_CHUNK = 1 << 22
# Soft silhouette: beyond this many sigmas outside a face its coverage is below 1e-4 and is left out.
_SOFT_CUTOFF = math.log((1 - 1e-4) / 1e-4)
# Faces whose screen area (pixels^2) is below this cover no pixel centre reliably and would divide by ~0.
_MIN_AREA = 1e-10


@dataclass
class Raster:
    """Output of :func:`rasterize`; B cameras of H x W pixels. ``faces`` is kept for :func:`interpolate`."""

    mask: torch.Tensor  # (B,H,W) bool: a face covers the pixel centre
    depth: torch.Tensor  # (B,H,W) camera-space z of the nearest face, inf on background
    face: torch.Tensor  # (B,H,W) long index of the nearest face, -1 on background
    bary: torch.Tensor  # (B,H,W,3) perspective-correct barycentrics of that face's vertices, 0 on background
    faces: torch.Tensor  # (F,3) long: the faces that were rasterised


def _as_batch(c2w, dtype) -> torch.Tensor:
    c2w = torch.as_tensor(c2w).to(dtype)  # .to keeps the autograd graph when c2w requires grad
    if c2w.shape[-2:] != (4, 4) or c2w.ndim not in (2, 3):
        raise ValueError(f"c2w must be (4,4) or (B,4,4), got shape {tuple(c2w.shape)}")
    return c2w.reshape(-1, 4, 4)


def _check_inputs(vertices, faces, K, size):
    v = torch.as_tensor(vertices)
    if not v.is_floating_point():
        v = v.to(torch.float32)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must be (V,3), got shape {tuple(v.shape)}")
    f = torch.as_tensor(faces)
    if f.ndim != 2 or f.shape[1] != 3 or f.is_floating_point():
        raise ValueError(f"faces must be (F,3) integer indices, got shape {tuple(f.shape)} dtype {f.dtype}")
    f = f.long()
    if len(f) and (int(f.min()) < 0 or int(f.max()) >= len(v)):
        raise ValueError(f"face indices must lie in [0, {len(v)}), got [{int(f.min())}, {int(f.max())}]")
    k = torch.as_tensor(K, dtype=v.dtype)
    if k.shape != (3, 3):
        raise ValueError(f"K must be (3,3), got shape {tuple(k.shape)}")
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be (H, W) with positive sides, got {tuple(size)}")
    return v, f, k, (h, w)


def _project(v: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World vertices (V,3) -> pixel coordinates (B,V,2) and camera z (B,V). Differentiable in v and c2w."""
    r, t = c2w[:, :3, :3], c2w[:, :3, 3]
    pc = torch.einsum("bvi,bij->bvj", v[None] - t[:, None], r)  # (B,V,3) = (v - t) @ R
    z = pc[..., 2]
    zs = torch.where(z > NEAR, z, torch.ones_like(z))  # faces using these vertices are dropped anyway
    uv = torch.stack([K[0, 0] * pc[..., 0] / zs + K[0, 2], K[1, 1] * pc[..., 1] / zs + K[1, 2]], dim=-1)
    return uv, z


def _candidates(x0, x1, y0, y1):
    """Inclusive integer pixel boxes (N,) -> chunks of (item index, u, v) covering every box's pixels."""
    w = (x1 - x0 + 1).clamp(min=0)
    h = (y1 - y0 + 1).clamp(min=0)
    n = w * h
    items = torch.nonzero(n > 0).squeeze(1)
    if len(items) == 0:
        return
    counts = n[items]
    ends = torch.cumsum(counts, 0)
    # Chunk boundaries at whole items, each chunk ~_CHUNK candidates (a single huge item is a chunk of its own).
    cuts = torch.searchsorted(ends, torch.arange(_CHUNK, int(ends[-1]) + _CHUNK, _CHUNK), right=True)
    starts = torch.unique(torch.cat([torch.zeros(1, dtype=torch.long), cuts.clamp(max=len(items))]))
    bounds = starts.tolist()
    if bounds[-1] != len(items):
        bounds.append(len(items))
    for i0, i1 in zip(bounds[:-1], bounds[1:]):
        if i1 <= i0:
            continue
        c = counts[i0:i1]
        local = torch.repeat_interleave(torch.arange(i1 - i0), c)
        first = torch.cumsum(c, 0) - c
        off = torch.arange(int(c.sum())) - first[local]
        it = items[i0:i1][local]
        ww = w[it]
        yield it, x0[it] + off % ww, y0[it] + off // ww


def _face_boxes(tri: torch.Tensor, h: int, w: int, pad: float):
    """(N,3,2) triangles -> inclusive pixel index boxes of the pixel centres inside their bbox padded by ``pad``."""
    lo = tri.amin(dim=1) - pad
    hi = tri.amax(dim=1) + pad
    # Pixel u has its centre at u + 0.5: centres in [lo, hi] are u in [ceil(lo - 0.5), floor(hi - 0.5)].
    x0 = torch.ceil(lo[:, 0] - 0.5).clamp(min=0, max=w).long()
    x1 = torch.floor(hi[:, 0] - 0.5).clamp(min=-1, max=w - 1).long()
    y0 = torch.ceil(lo[:, 1] - 0.5).clamp(min=0, max=h).long()
    y1 = torch.floor(hi[:, 1] - 0.5).clamp(min=-1, max=h - 1).long()
    return x0, x1, y0, y1


def _screen_faces(v, f, K, c2w):
    """Projected faces of every camera, flattened over (B,F): triangles (N,3,2), camera z (N,3), and a validity
    mask (in front of the near plane, non-degenerate)."""
    uv, z = _project(v, K, c2w)
    tri = uv[:, f]  # (B,F,3,2)
    tz = z[:, f]  # (B,F,3)
    e1 = tri[..., 1, :] - tri[..., 0, :]
    e2 = tri[..., 2, :] - tri[..., 0, :]
    area = e1[..., 0] * e2[..., 1] - e1[..., 1] * e2[..., 0]  # (B,F) twice the signed screen area
    valid = (tz.amin(dim=-1) > NEAR) & (area.abs() > _MIN_AREA)
    b, nf = area.shape
    return tri.reshape(b * nf, 3, 2), tz.reshape(b * nf, 3), area.reshape(b * nf), valid.reshape(b * nf)


def _edge_weights(tri: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Edge functions (N,3) of points (px, py) against triangles (N,3,2): weight i is opposite vertex i."""
    out = []
    for i in range(3):
        a = tri[:, (i + 1) % 3]
        b = tri[:, (i + 2) % 3]
        out.append((b[:, 0] - a[:, 0]) * (py - a[:, 1]) - (b[:, 1] - a[:, 1]) * (px - a[:, 0]))
    return torch.stack(out, dim=-1)


@torch.no_grad()
def rasterize(vertices, faces, K, c2w, size) -> Raster:
    """Hard z-buffer rasterisation of a mesh (vertices (V,3), faces (F,3)) by pinhole cameras ``K`` (3,3) and
    ``c2w`` (4,4) or (B,4,4) into images of ``size = (H, W)``. Not differentiable (see :func:`soft_silhouette`)."""
    v, f, k, (h, w) = _check_inputs(vertices, faces, K, size)
    c2w = _as_batch(c2w, v.dtype)
    nb, nf = len(c2w), len(f)
    npix = nb * h * w
    zbuf = torch.full((npix,), math.inf, dtype=v.dtype)
    hits = []
    if nf:
        tri, tz, area, valid = _screen_faces(v, f, k, c2w)
        x0, x1, y0, y1 = _face_boxes(tri, h, w, 0.0)
        x1 = torch.where(valid, x1, x0 - 1)  # empty box: never a candidate
        for it, px, py in _candidates(x0, x1, y0, y1):
            t = tri[it]
            wts = _edge_weights(t, px.to(v.dtype) + 0.5, py.to(v.dtype) + 0.5) / area[it, None]
            inside = (wts >= 0).all(dim=-1)
            it, px, py, wts = it[inside], px[inside], py[inside], wts[inside]
            wz = wts / tz[it]  # perspective correction: screen weights over vertex depth
            s = wz.sum(dim=-1)
            depth = 1.0 / s
            pix = (it // nf) * (h * w) + py * w + px
            zbuf.scatter_reduce_(0, pix, depth, reduce="amin")
            hits.append((pix, depth, it % nf, wz / s[:, None]))
    fbuf = torch.full((npix,), -1, dtype=torch.long)
    bbuf = torch.zeros((npix, 3), dtype=v.dtype)
    if hits:
        pix, depth, face, bary = (torch.cat(x) for x in zip(*hits))
        win = depth <= zbuf[pix]
        fbuf.scatter_reduce_(0, pix[win], face[win], reduce="amax")  # depth ties: the higher face index
        sel = win & (face == fbuf[pix])
        bbuf[pix[sel]] = bary[sel]
    mask = fbuf >= 0
    return Raster(
        mask=mask.reshape(nb, h, w),
        depth=zbuf.reshape(nb, h, w),
        face=fbuf.reshape(nb, h, w),
        bary=bbuf.reshape(nb, h, w, 3),
        faces=f,
    )


def interpolate(raster: Raster, attr) -> torch.Tensor:
    """Per-vertex attributes (V,C) -> (B,H,W,C) at every pixel (perspective-correct), zeros on background."""
    a = torch.as_tensor(attr)
    if a.ndim != 2:
        raise ValueError(f"attr must be (V,C), got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        a = a.to(raster.bary.dtype)
    if len(raster.faces) and int(raster.faces.max()) >= len(a):
        raise ValueError(f"attr has {len(a)} rows but the faces index vertex {int(raster.faces.max())}")
    face = raster.face.clamp(min=0)
    corners = a[raster.faces[face]]  # (B,H,W,3,C)
    out = (raster.bary.to(a.dtype)[..., None] * corners).sum(dim=-2)
    return out * raster.mask[..., None].to(a.dtype)


def shade(raster: Raster, vertices, faces, c2w) -> torch.Tensor:
    """(B,H,W,3) float in [0, 1]: the mesh as grey clay (flat face normals, a headlight from slightly above the
    camera plus ambient) on a white background: what an untextured mesh looks like to a perceptual metric."""
    v = torch.as_tensor(vertices)
    v = v.to(torch.float32) if not v.is_floating_point() else v.detach()
    f = torch.as_tensor(faces).long()
    c2w = _as_batch(c2w, v.dtype).detach()
    tri = v[f]  # (F,3,3)
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (F,3)
    # Light in camera axes: toward the camera (-z), tilted up (-y) and a little from the right (+x).
    light_cam = torch.tensor([0.3, -0.5, -1.0], dtype=v.dtype)
    light = torch.einsum("bij,j->bi", c2w[:, :3, :3], light_cam / light_cam.norm())  # (B,3) world
    view = c2w[:, :3, 2]  # (B,3) camera forward in world
    face = raster.face.clamp(min=0)  # (B,H,W)
    nf = n[face]  # (B,H,W,3)
    # Two-sided: flip normals that face away from the camera.
    flip = torch.where((nf * view[:, None, None]).sum(-1, keepdim=True) > 0, -1.0, 1.0).to(v.dtype)
    nf = nf * flip
    lambert = (nf * light[:, None, None]).sum(-1).clamp(min=0.0)
    grey = 0.25 + 0.65 * lambert
    img = torch.where(raster.mask, grey, torch.ones_like(grey))
    return img[..., None].expand(*img.shape, 3).clamp(0.0, 1.0).contiguous()


def _point_segment_dist2(px, py, a, b):
    """Squared distance (N,) from points to segments a->b (N,2)."""
    dx, dy = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
    qx, qy = px - a[:, 0], py - a[:, 1]
    t = ((qx * dx + qy * dy) / (dx * dx + dy * dy).clamp_min(1e-20)).clamp(0.0, 1.0)
    ex, ey = qx - t * dx, qy - t * dy
    return ex * ex + ey * ey


def soft_silhouette(vertices, faces, K, c2w, size, sigma: float = 0.5) -> torch.Tensor:
    """(B,H,W) soft silhouette in [0, 1), differentiable with respect to ``vertices`` (V,3) and ``c2w`` (4,4) or
    (B,4,4). ``sigma`` is in pixels: the distance over which a face's edge blurs (as sigma -> 0 it tends to the
    hard mask of :func:`rasterize`); see the module docstring for the formula."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma}")
    v, f, k, (h, w) = _check_inputs(vertices, faces, K, size)
    c2w = _as_batch(c2w, v.dtype)
    nb, nf = len(c2w), len(f)
    acc = torch.zeros(nb * h * w, dtype=v.dtype)
    if nf == 0:
        return acc.reshape(nb, h, w)
    tri, _, area, valid = _screen_faces(v, f, k, c2w)
    with torch.no_grad():
        # Interior: pixels farther than the cutoff inside the hard silhouette are 1, and faces that reach no other
        # pixel are skipped, so the cost follows the outline's length instead of the object's area.
        pad = _SOFT_CUTOFF * sigma
        r = int(math.ceil(pad)) + 1
        hard = rasterize(v.detach(), f, k, c2w.detach(), (h, w)).mask  # (B,H,W)
        outer = torch.nn.functional.max_pool2d((~hard)[:, None].to(v.dtype), 2 * r + 1, 1, r, ceil_mode=False)
        outer = outer[:, 0] > 0  # (B,H,W): within r pixels of the background (or of the image border)
        outer[:, :r] = outer[:, -r:] = True
        outer[:, :, :r] = outer[:, :, -r:] = True
        core = ~outer
        sat = torch.zeros(nb, h + 1, w + 1, dtype=torch.long)
        sat[:, 1:, 1:] = outer.long().cumsum(1).cumsum(2)
        x0, x1, y0, y1 = _face_boxes(tri.detach(), h, w, pad)
        bi = torch.arange(nb).repeat_interleave(nf)
        xa, xb, ya, yb = x0.clamp(max=w - 1), (x1 + 1).clamp(min=0), y0.clamp(max=h - 1), (y1 + 1).clamp(min=0)
        n_outer = sat[bi, yb, xb] - sat[bi, ya, xb] - sat[bi, yb, xa] + sat[bi, ya, xa]
        x1 = torch.where(valid & (n_outer > 0), x1, x0 - 1)
        chunks = []
        for it, px, py in _candidates(x0, x1, y0, y1):
            pix = (it // nf) * (h * w) + py * w + px
            keep = outer.reshape(-1)[pix]
            chunks.append((it[keep], px[keep], py[keep], pix[keep]))
    for it, px, py, pix in chunks:
        t = tri[it]  # (N,3,2) with grad
        fx, fy = px.to(t.dtype) + 0.5, py.to(t.dtype) + 0.5
        inside = ((_edge_weights(t.detach(), fx, fy) * area[it, None].detach().sign()) >= 0).all(dim=-1)
        d2 = torch.stack([_point_segment_dist2(fx, fy, t[:, i], t[:, (i + 1) % 3]) for i in range(3)], -1)
        d = d2.amin(dim=-1).clamp_min(1e-12).sqrt()
        signed = torch.where(inside, d, -d)
        acc = acc.index_add(0, pix, torch.nn.functional.softplus(signed / sigma))
    sil = 1.0 - torch.exp(-acc.reshape(nb, h, w))
    return torch.where(core, torch.ones_like(sil), sil)
