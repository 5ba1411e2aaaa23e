"""Texture back-projection (TAPESTRY 3.2, "Multi-view Texture Projection" and "Multi-Stage Texture Fusion"): the
frames of a turntable video -> a partial UV texture map and its confidence map, fused across stages by confidence.

Data flow::

    mesh (V,3) + faces (F,3) + UVs (Vt,2) + UV faces (F,3)
        --rasterise_uv--> TexelSurface: for each texel of an R x R atlas with a triangle under its centre: the
                          face, its barycentric coordinates, the 3D point and the unit normal there
    per frame: image (H,W,3) uint8, camera-space depth (H,W) and mask of the SAME geometry (the render's passes),
               K (3,3), c2w (4,4) OpenCV
        --project_frame--> per texel: visible?  colour (bilinear), weight = angle incentive x depth-gradient penalty
    sum over frames: texture = sum(w colour) / sum(w), confidence = sum(w)     (back_project)
    stages: fuse(master, partial) by confidence; coverage(); dilate() fills the seams; the rest is inpainted

Design choices (the paper names the terms, its formulas did not survive in our copy; these are Loom's):

- Visibility is a depth test against the frame's depth pass (the exact geometry's, rendered by Blender along the
  same cameras): a texel is seen when it projects inside the image and the mask, in front of the camera, and its
  depth is within ``depth_tolerance`` (relative) of the depth at that pixel (bilinear would blend across
  silhouettes, so the nearest pixel's depth is used). The depth compared is that of the point's tangent plane where
  the pixel centre's ray meets it (the point's own depth when the ray grazes the plane): the pass holds the surface's
  depth at the pixel centre, up to half a pixel away from the point, and on a slanted surface that offset alone
  would fail the test. This is the visibility ray tracing gives, with the renderer as the ray tracer.
- Angle incentive: ``max(0, n . v) ** angle_power`` with ``v`` the unit vector from the point to the camera centre:
  1 for a surface facing the camera, 0 at grazing angles, where a pixel smears over many texels.
- Depth-gradient penalty: ``exp(-|grad z| / (depth_sigma z))`` from central differences of the depth pass at the
  pixel (relative to the depth there; the background counts as a jump): near depth edges the colour of a pixel may
  belong to the other side of the edge, so those pixels count little. The paper's similarity mask is their product.
- UV convention: trimesh's and OBJ's, ``v`` up; texel row 0 is the top of the image (``v = 1``), texel centres at
  ``((col + 0.5) / R, 1 - (row + 0.5) / R)``. Overlapping UV charts keep the face drawn last.
- Numpy only (the geometry layer): one frame of a 1024^2 atlas is a few 1e6-element array operations.
  Loom writes its own rasteriser because the UV-space one is ~40 lines and the GPU rasterisers (nvdiffrast) do not
  run on CPU workers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from loom.geometry.camera import world_to_camera


@dataclasses.dataclass
class TexelSurface:
    """What lies under each texel of an R x R atlas: ``face`` (R,R) int64, -1 where no triangle covers the texel
    centre; ``bary`` (R,R,3), ``point`` (R,R,3) and ``normal`` (R,R,3) (unit) valid where ``face >= 0``."""

    face: np.ndarray
    bary: np.ndarray
    point: np.ndarray
    normal: np.ndarray

    @property
    def resolution(self) -> int:
        return int(self.face.shape[0])

    @property
    def covered(self) -> np.ndarray:
        """(R,R) bool: texels on the surface."""
        return self.face >= 0


def _check(vertices, faces, uv, uv_faces):
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    t = np.asarray(uv, np.float64)
    tf = np.asarray(uv_faces if uv_faces is not None else faces, np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"mesh must be vertices (V,3) and faces (F,3) with F > 0, got {v.shape} and {f.shape}")
    if t.ndim != 2 or t.shape[1] != 2 or tf.shape != f.shape:
        raise ValueError(f"UVs must be (Vt,2) with UV faces shaped like the faces {f.shape}, got {t.shape} and "
                         f"{tf.shape}")
    if f.min() < 0 or f.max() >= len(v) or tf.min() < 0 or tf.max() >= len(t):
        raise ValueError("a face or UV face indexes past its vertex array")
    if not (np.isfinite(v).all() and np.isfinite(t).all()):
        raise ValueError("the mesh or its UVs hold NaN or inf")
    return v, f, t, tf


def rasterise_uv(vertices, faces, uv, resolution: int, uv_faces=None, normals=None) -> TexelSurface:
    """The :class:`TexelSurface` of a mesh's UV atlas at ``resolution`` x ``resolution``. ``uv_faces`` index ``uv``
    per face corner (default: ``faces``, one UV per vertex, trimesh's layout); ``normals`` (V,3) are interpolated
    where given, else each texel takes its face's normal."""
    if resolution < 1:
        raise ValueError(f"resolution={resolution} must be >= 1")
    v, f, t, tf = _check(vertices, faces, uv, uv_faces)
    r = resolution
    face = np.full((r, r), -1, np.int64)
    bary = np.zeros((r, r, 3))
    # texel-centre coordinates of the UV corners: x = u R - 1/2 (column), y = (1 - v) R - 1/2 (row)
    corners = np.stack([t[tf][..., 0] * r - 0.5, (1.0 - t[tf][..., 1]) * r - 0.5], axis=-1)  # (F,3,2)
    lo = np.clip(np.ceil(corners.min(1)), 0, r - 1).astype(np.int64)  # (F,2) x, y
    hi = np.clip(np.floor(corners.max(1)), 0, r - 1).astype(np.int64)
    (x0, y0), (x1, y1), (x2, y2) = (corners[:, i].T for i in range(3))
    det = (y1 - y2) * (x0 - x2) + (x2 - x1) * (y0 - y2)  # (F,) twice the signed UV area
    for i in np.flatnonzero((np.abs(det) > 1e-12) & (hi >= lo).all(1)):
        ys, xs = np.mgrid[lo[i, 1]: hi[i, 1] + 1, lo[i, 0]: hi[i, 0] + 1]
        b0 = ((y1[i] - y2[i]) * (xs - x2[i]) + (x2[i] - x1[i]) * (ys - y2[i])) / det[i]
        b1 = ((y2[i] - y0[i]) * (xs - x2[i]) + (x0[i] - x2[i]) * (ys - y2[i])) / det[i]
        b2 = 1.0 - b0 - b1
        inside = (b0 >= -1e-9) & (b1 >= -1e-9) & (b2 >= -1e-9)
        face[ys[inside], xs[inside]] = i
        bary[ys[inside], xs[inside]] = np.stack([b0[inside], b1[inside], b2[inside]], -1)
    on = face >= 0
    point = np.zeros((r, r, 3))
    normal = np.zeros((r, r, 3))
    fv = f[face[on]]  # (N,3) vertex ids of each covered texel's face
    point[on] = np.einsum("nk,nkd->nd", bary[on], v[fv])
    if normals is not None:
        nv = np.asarray(normals, np.float64)
        if nv.shape != v.shape:
            raise ValueError(f"normals must be (V,3) like the vertices {v.shape}, got {nv.shape}")
        n = np.einsum("nk,nkd->nd", bary[on], nv[fv])
    else:
        e1, e2 = v[fv[:, 1]] - v[fv[:, 0]], v[fv[:, 2]] - v[fv[:, 0]]
        n = np.cross(e1, e2)
    normal[on] = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    return TexelSurface(face=face, bary=bary, point=point, normal=normal)


@dataclasses.dataclass
class Projection:
    """Settings of :func:`project_frame` (see the module docstring)."""

    angle_power: float = 2.0
    depth_sigma: float = 0.02
    depth_tolerance: float = 0.01
    mask_threshold: float = 0.5

    def __post_init__(self):
        for name in ("angle_power", "depth_sigma", "depth_tolerance"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(H,W,C) image sampled at continuous pixel-index coordinates (x = u - 1/2), edges clamped."""
    h, w = img.shape[:2]
    x = np.clip(x, 0.0, w - 1.0)
    y = np.clip(y, 0.0, h - 1.0)
    xi = np.clip(np.floor(x).astype(np.int64), 0, max(w - 2, 0))
    yi = np.clip(np.floor(y).astype(np.int64), 0, max(h - 2, 0))
    fx, fy = (x - xi)[:, None], (y - yi)[:, None]
    xj, yj = np.minimum(xi + 1, w - 1), np.minimum(yi + 1, h - 1)
    a = img[yi, xi] * (1 - fx) + img[yi, xj] * fx
    b = img[yj, xi] * (1 - fx) + img[yj, xj] * fx
    return a * (1 - fy) + b * fy


def depth_gradient(depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H,W) magnitude of the central-difference gradient of the depth pass relative to the depth (|grad z| / z),
    with the background (mask false) counted as an infinite jump."""
    z = np.where(mask, depth, np.inf).astype(np.float64)
    pad = np.pad(z, 1, mode="edge")
    with np.errstate(invalid="ignore"):
        gx = (pad[1:-1, 2:] - pad[1:-1, :-2]) / 2.0
        gy = (pad[2:, 1:-1] - pad[:-2, 1:-1]) / 2.0
        g = np.sqrt(gx ** 2 + gy ** 2) / np.maximum(np.abs(z), 1e-12)
    return np.where(np.isfinite(g), g, np.inf)


def _seen_pixels(p: np.ndarray, depth: np.ndarray, mask: np.ndarray, K: np.ndarray, c2w: np.ndarray,
                 tolerance: float, normal: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points (N,3) world -> (indices of the points the frame sees, their continuous pixel coordinates u and v):
    in front of the camera, inside the image and the mask (bool), and passing the depth test at the nearest pixel
    (the module docstring). With unit ``normal`` (N,3) the depth compared is that of the point's tangent plane along
    the pixel centre's ray, not the point's own: exact for flat faces, and a point half a pixel from the centre on a
    slanted surface is not lost to the slope (at 48 px a sphere lost points facing the camera at 60 degrees)."""
    h, w = depth.shape
    pc = world_to_camera(p, np.asarray(c2w, np.float64))  # (N,3)
    z = pc[:, 2]
    front = z > 1e-9
    u = np.where(front, pc[:, 0] / np.where(front, z, 1.0) * K[0, 0] + K[0, 2], -1.0)
    v = np.where(front, pc[:, 1] / np.where(front, z, 1.0) * K[1, 1] + K[1, 2], -1.0)
    px, py = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    idx = np.flatnonzero(front & (px >= 0) & (px < w) & (py >= 0) & (py < h))
    pxi, pyi = px[idx], py[idx]
    zi = z[idx]
    if normal is not None:
        nc = np.asarray(normal, np.float64)[idx] @ np.asarray(c2w, np.float64)[:3, :3]  # camera-space normals
        ray = np.stack([(pxi + 0.5 - K[0, 2]) / K[0, 0], (pyi + 0.5 - K[1, 2]) / K[1, 1], np.ones(len(idx))], -1)
        den = np.einsum("nd,nd->n", nc, ray)
        ok = np.abs(den) > 0.05 * np.linalg.norm(ray, axis=-1)  # not grazing: the plane's depth is well defined
        zi = np.where(ok, np.einsum("nd,nd->n", nc, pc[idx]) / np.where(ok, den, 1.0), zi)
    idx = idx[mask[pyi, pxi] & (np.abs(zi - depth[pyi, pxi]) <= tolerance * z[idx])]
    return idx, u[idx], v[idx]


def _facing(normal: np.ndarray, p: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """(N,) cosine between unit normals and the unit vectors from the points to the camera centre."""
    to_cam = np.asarray(c2w, np.float64)[:3, 3] - p
    to_cam /= np.maximum(np.linalg.norm(to_cam, axis=-1, keepdims=True), 1e-12)
    return np.einsum("nd,nd->n", normal, to_cam)


def project_frame(surface: TexelSurface, image: np.ndarray, depth: np.ndarray, mask: np.ndarray, K: np.ndarray,
                  c2w: np.ndarray, settings: Projection | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One frame -> (colour (R,R,C) float64 in the image's units, weight (R,R) >= 0; 0 where the texel is not seen).
    ``image`` (H,W,C), ``depth`` (H,W) camera-space z and ``mask`` (H,W) (bool, or coverage in [0,1]) of the same
    frame; OpenCV ``K`` (3,3) and ``c2w`` (4,4), pixel centres at u + 1/2."""
    s = settings or Projection()
    h, w = depth.shape
    if image.shape[:2] != (h, w) or mask.shape != (h, w):
        raise ValueError(f"image {image.shape[:2]}, depth {depth.shape} and mask {mask.shape} must be one frame's")
    m = mask >= s.mask_threshold if mask.dtype != bool else mask
    r = surface.resolution
    on = np.flatnonzero(surface.covered.ravel())
    colour = np.zeros((r * r, image.shape[2]))
    weight = np.zeros(r * r)
    p = surface.point.reshape(-1, 3)[on]
    nrm = surface.normal.reshape(-1, 3)[on]
    idx, u, v = _seen_pixels(p, depth, m, K, c2w, s.depth_tolerance, nrm)
    cos = _facing(nrm[idx], p[idx], c2w)
    grad = depth_gradient(depth, m)[np.floor(v).astype(np.int64), np.floor(u).astype(np.int64)]
    wt = np.maximum(cos, 0.0) ** s.angle_power * np.exp(-grad / s.depth_sigma)
    colour[on[idx]] = _bilinear(image.astype(np.float64), u - 0.5, v - 0.5)
    weight[on[idx]] = wt
    return colour.reshape(r, r, -1), weight.reshape(r, r)


# Base rotations (Blender's world frame, +Z up) of texturing's inpainting stages and of the partial-texture training
# renders: tilts that show the bottom and the sides an orbit about +Z keeps at a grazing angle. (axis, degrees)
BASE_TILTS = {"x+90": ("x", 90), "x-90": ("x", -90), "y+90": ("y", 90), "y-90": ("y", -90), "x180": ("x", 180),
              "x+45": ("x", 45), "x-45": ("x", -45)}


def base_rotations() -> dict[str, np.ndarray]:
    """``BASE_TILTS`` as 3x3 rotation matrices (right-handed, counter-clockwise about the axis for positive
    degrees), exact in the matrix entries that are 0 or +-1."""
    out = {}
    for name, (axis, deg) in BASE_TILTS.items():
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        c, s = (0.0 if abs(c) < 1e-12 else c), (0.0 if abs(s) < 1e-12 else s)
        i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out[name] = r
    return out


def seen_from(points: np.ndarray, normals: np.ndarray, depths: np.ndarray, masks: np.ndarray, K: np.ndarray,
              c2w: np.ndarray, depth_tolerance: float = Projection.depth_tolerance) -> np.ndarray:
    """(N,) bool: the points (N,3) with unit ``normals`` (N,3) that at least one of the views (depth (E,H,W)
    camera-space z, mask (E,H,W) bool, K (E,3,3), c2w (E,4,4)) sees facing it: the texels back-projection would give
    a confidence above 0 (:func:`project_frame`'s test, per point instead of per texel). The partial-texture
    training renders' known pixels (``render ttv --set passes.partial=true``)."""
    p = np.asarray(points, np.float64).reshape(-1, 3)
    n = np.asarray(normals, np.float64).reshape(-1, 3)
    seen = np.zeros(len(p), bool)
    for e in range(len(depths)):
        idx, _, _ = _seen_pixels(p, np.asarray(depths[e]), np.asarray(masks[e], bool), np.asarray(K[e], np.float64),
                                 c2w[e], depth_tolerance, n)
        seen[idx[_facing(n[idx], p[idx], c2w[e]) > 0]] = True
    return seen


def back_project(surface: TexelSurface, images, depths, masks, K, c2w,
                 settings: Projection | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T,H,W,C), depths (T,H,W), masks (T,H,W), K (T,3,3), c2w (T,4,4) -> (texture (R,R,C) float64,
    confidence (R,R)): the confidence-weighted mean of every frame's colours per texel and the summed weights
    (texture 0 where the confidence is 0)."""
    acc, total = None, None
    for t in range(len(images)):
        c, wt = project_frame(surface, images[t], depths[t], masks[t], K[t], c2w[t], settings)
        acc = c * wt[..., None] if acc is None else acc + c * wt[..., None]
        total = wt if total is None else total + wt
    if acc is None:
        raise ValueError("no frames to back-project")
    tex = np.where(total[..., None] > 0, acc / np.maximum(total, 1e-12)[..., None], 0.0)
    return tex, total


def fuse(texture: np.ndarray, confidence: np.ndarray, partial: np.ndarray,
         partial_confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multi-stage fusion: the confidence-weighted mean of two texture maps, and the summed confidence."""
    total = confidence + partial_confidence
    w = np.where(total > 0, partial_confidence / np.maximum(total, 1e-12), 0.0)[..., None]
    return texture * (1 - w) + partial * w, total


def coverage(surface: TexelSurface, confidence: np.ndarray, threshold: float = 0.0) -> float:
    """Fraction of the surface's texels whose confidence exceeds ``threshold``."""
    n = int(surface.covered.sum())
    return float(((confidence > threshold) & surface.covered).sum()) / n if n else 0.0


def dilate(texture: np.ndarray, known: np.ndarray, iterations: int = 4) -> np.ndarray:
    """Push known texels' colours into their unknown 4-neighbours, ``iterations`` times (mean of the known
    neighbours), so bilinear lookups at chart borders and seams do not blend in the empty atlas."""
    tex, k = texture.astype(np.float64).copy(), known.astype(bool).copy()
    for _ in range(iterations):
        # sums over the 4-neighbours, the atlas padded with nothing known around it
        kp = np.pad(k, 1).astype(np.float64)
        tp = np.pad(tex * k[..., None], ((1, 1), (1, 1), (0, 0)))
        cnt = kp[:-2, 1:-1] + kp[2:, 1:-1] + kp[1:-1, :-2] + kp[1:-1, 2:]
        acc = tp[:-2, 1:-1] + tp[2:, 1:-1] + tp[1:-1, :-2] + tp[1:-1, 2:]
        grow = ~k & (cnt > 0)
        if not grow.any():
            break
        tex[grow] = acc[grow] / cnt[grow][..., None]
        k |= grow
    return tex


def push_pull(texture: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Every unknown texel filled from the known ones by push-pull (Gortler et al. 1996, the fill texture bakers
    use): the known colours are averaged down a pyramid of 2x2 cells (weights = known counts) until every cell
    has some, then each level's holes take the bilinearly upsampled colour of the level below. Smooth across a
    hole, exact on the known texels; colours only spread within the atlas (charts are not told apart: use it after
    a seam dilation, as `loom texture` does). Numpy, O(R^2)."""
    tex = np.asarray(texture, np.float64)
    k = np.asarray(known, bool)
    if not k.any():
        return tex.copy()
    if k.all() or min(k.shape) == 1:
        out = tex.copy()
        out[~k] = tex[k].mean(0)
        return out
    h, w = k.shape
    hp, wp = h + h % 2, w + w % 2
    wt = np.zeros((hp, wp))
    wt[:h, :w] = k
    col = np.zeros((hp, wp, tex.shape[2]))
    col[:h, :w] = tex * k[..., None]
    wsum = wt.reshape(hp // 2, 2, wp // 2, 2).sum((1, 3))
    csum = col.reshape(hp // 2, 2, wp // 2, 2, -1).sum((1, 3))
    low = push_pull(csum / np.maximum(wsum, 1e-12)[..., None], wsum > 0)  # (hp/2, wp/2, C), filled
    # pull: bilinear upsampling of the coarse level (cell centres at (2i + 1/2)), then keep what was known here
    yy = np.clip((np.arange(h) + 0.5) / 2 - 0.5, 0, low.shape[0] - 1)
    xx = np.clip((np.arange(w) + 0.5) / 2 - 0.5, 0, low.shape[1] - 1)
    y0, x0 = np.floor(yy).astype(int), np.floor(xx).astype(int)
    y1, x1 = np.minimum(y0 + 1, low.shape[0] - 1), np.minimum(x0 + 1, low.shape[1] - 1)
    fy, fx = (yy - y0)[:, None, None], (xx - x0)[None, :, None]
    up = ((low[y0][:, x0] * (1 - fx) + low[y0][:, x1] * fx) * (1 - fy)
          + (low[y1][:, x0] * (1 - fx) + low[y1][:, x1] * fx) * fy)
    return np.where(k[..., None], tex, up)


def earlier_orbit(c2w_orbit: np.ndarray, tilt: str) -> np.ndarray:
    """Cameras (E,4,4) that see the object as the orbit ``c2w_orbit`` (E,4,4) saw it before the base rotation
    ``tilt`` (a ``BASE_TILTS`` name) turned it: viewing points ``T^-1 x`` from ``c2w`` is viewing ``x`` from
    ``T c2w``, so an inpainting stage's known texels (seen in the stage before the tilt) are the points these see."""
    t4 = np.eye(4)
    t4[:3, :3] = base_rotations()[tilt]
    return np.einsum("ij,ejk->eik", t4, np.asarray(c2w_orbit, np.float64))


def known_pixels(position: np.ndarray, normal: np.ndarray, mask: np.ndarray, depths: np.ndarray, masks: np.ndarray,
                 K: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """(T,H,W) bool: the object's pixels of a turntable video (world ``position`` and ``normal`` (T,H,W,3), ``mask``
    (T,H,W)) whose surface point the views (``depths``, ``masks``, ``K``, ``c2w``: :func:`seen_from`) see."""
    known = np.zeros(mask.shape, bool)
    for t in range(len(mask)):
        m = np.asarray(mask[t], bool)
        known[t][m] = seen_from(position[t][m], normal[t][m], depths, masks, K, c2w)
    return known

