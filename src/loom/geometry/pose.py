"""Global pose registration of a generated mesh to a video frame (ShapeGen4D appendix A.1, after V2M4).

The mesh's pose is found as a *camera* pose: the camera under which a render of the untextured mesh looks like the
frame; inverting that camera's motion relative to the video's reference camera and applying it to the mesh
registers the mesh (:func:`registration_transform`). The camera has A.1's six parameters
``{yaw, pitch, radius, lookat_xyz}`` (:class:`CameraPose`) and is found in three stages by
:func:`register_pose`:

1. **Candidates**: a yaw x pitch x radius grid around the mesh's bounding-box centre, every camera rendered and
   scored against the frame; the best ``top_n`` *distinct* views (directions more than a yaw step apart) are kept.
2. **Particle swarms** (Loom's own PSO, seeded numpy Generator, deterministic) over the six parameters: one swarm
   per distinct candidate, each pulled toward its own best, so a wrong view that scores well early cannot capture
   the whole search; in the last 40% of the iterations every particle follows the best of all, to converge it.
   The paper also seeds the swarm with a VGGT point-cloud estimate; Loom leaves that out (no VGGT in the core
   dependencies): the candidate grid is dense enough for the swarms to start near the optimum.
3. **Gradient refinement**: Adam on the six parameters from the best ``refine_starts`` distinct swarm results,
   on a bias-corrected soft IoU between the differentiable silhouette
   (:func:`loom.geometry.raster.soft_silhouette`, sigma annealed) and the frame's foreground mask (see
   :func:`_refine`); the iterate with the best hard IoU over all starts wins.

Design choices:

- **Pluggable score**: stages 1 and 2 rank renders with ``score(renders, masks) -> (B,)`` (always these two
  arguments), higher is better; the caller passes a perceptual feature similarity (the paper uses DreamSim) that
  holds the frame in its closure. Without one, the documented fallback is the silhouette IoU against the mask,
  which needs no network and is what the tests use. Stage 3 always fits the silhouette.
- **No scale bias**: plain soft IoU against a hard mask prefers a camera slightly too far (the soft silhouette of
  a closed mesh is wider than its hard mask), which made the recovered scale 3-5% small; the corrected loss
  removes that (bunny: scale within ~1%, rotation within ~1.5 degrees at 96 px).
- **Angles in degrees** (yaw about world +Z from +X, pitch above the XY plane): the settings and logs read in the
  units people think in. The camera has no roll (world +Z is always up in the image), as in A.1.
- **Radius from the mask**: the grid's radii are factors of the distance at which the mesh's bounding sphere would
  appear as large as the frame's mask, and the candidates' look-at point is shifted so the mesh's centre projects
  onto the mask's centroid; both make the grid's cameras start framed like the frame at any resolution.
- **Render resolution**: the mask (and K) are resampled so the longer side is ``settings.resolution`` pixels: a
  128 px silhouette fixes the pose to about a degree and keeps every stage on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from loom.geometry import camera as cam
from loom.geometry import raster


@dataclass(frozen=True)
class CameraPose:
    """A.1's camera: at ``radius`` from ``lookat``, in the direction (``yaw``, ``pitch``) in degrees (yaw about world
    +Z measured from +X, pitch above the XY plane), looking at ``lookat`` with world +Z up in the image."""

    yaw: float
    pitch: float
    radius: float
    lookat: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self):
        if not self.radius > 0:
            raise ValueError(f"radius must be > 0, got {self.radius}")
        if not abs(self.pitch) < 90:
            raise ValueError(f"pitch must lie in (-90, 90) degrees (the camera has world +Z up), got {self.pitch}")

    def eye(self) -> np.ndarray:
        y, p = math.radians(self.yaw), math.radians(self.pitch)
        d = np.array([math.cos(p) * math.cos(y), math.cos(p) * math.sin(y), math.sin(p)])
        return np.asarray(self.lookat, dtype=np.float64) + self.radius * d

    def c2w(self) -> np.ndarray:
        """4x4 OpenCV camera-to-world matrix (:func:`loom.geometry.camera.look_at`)."""
        return cam.look_at(self.eye(), self.lookat)

    def as_array(self) -> np.ndarray:
        """(6,) ``[yaw, pitch, radius, lookat_x, lookat_y, lookat_z]``."""
        return np.array([self.yaw, self.pitch, self.radius, *self.lookat], dtype=np.float64)

    @classmethod
    def from_array(cls, a) -> CameraPose:
        a = np.asarray(a, dtype=np.float64).reshape(6)
        yaw = (float(a[0]) + 180.0) % 360.0 - 180.0
        return cls(yaw, float(a[1]), float(a[2]), (float(a[3]), float(a[4]), float(a[5])))


def pose_c2w_torch(params: torch.Tensor) -> torch.Tensor:
    """Differentiable :meth:`CameraPose.c2w`: params (...,6) ``[yaw, pitch (degrees), radius, lookat xyz]`` ->
    c2w (...,4,4)."""
    y, p = torch.deg2rad(params[..., 0]), torch.deg2rad(params[..., 1])
    out_dir = torch.stack([torch.cos(p) * torch.cos(y), torch.cos(p) * torch.sin(y), torch.sin(p)], dim=-1)
    lookat = params[..., 3:6]
    eye = lookat + params[..., 2:3] * out_dir
    forward = -out_dir
    # forward x up with up = +Z, normalised (|forward x z| = cos(pitch) > 0 for |pitch| < 90).
    right = torch.stack([forward[..., 1], -forward[..., 0], torch.zeros_like(forward[..., 0])], dim=-1)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right)
    top = torch.stack([right, down, forward, eye], dim=-1)  # (...,3,4): columns are the axes and the centre
    bottom = torch.zeros(*params.shape[:-1], 1, 4, dtype=params.dtype)
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


@dataclass(frozen=True, kw_only=True)
class PoseSettings:
    """Search sizes of :func:`register_pose`; the defaults are sized for one CPU core (a few seconds per frame
    with the IoU score)."""

    resolution: int = 128  # longer side of the renders, pixels (the mask and K are resampled to it)
    yaws: int = 24  # candidate yaws, evenly spaced over 360 degrees
    pitches: tuple[float, ...] = (-10.0, 15.0, 40.0)  # candidate pitches, degrees
    radius_factors: tuple[float, ...] = (1.0, 1.25)  # candidate radii, x the distance that matches the mask's size
    top_n: int = 4  # distinct candidates (view directions a yaw step apart), each seeding its own swarm
    particles: int = 48  # PSO particles in all, shared out among the top_n swarms
    pso_iterations: int = 30
    inertia: float = 0.6  # PSO velocity memory
    cognitive: float = 1.4  # pull toward each particle's own best
    social: float = 1.4  # pull toward its swarm's best
    refine_starts: int = 2  # best distinct swarm results refined by stage 3; the best hard IoU wins
    adam_steps: int = 40  # per refined start
    adam_lr: float = 0.5  # in units of :data:`_REFINE_UNITS` (0.5 degree, 0.5% of the radius, ...)
    sigma: tuple[float, float] = (0.3, 0.1)  # soft silhouette edge width, pixels: first and last Adam step
    batch: int = 32  # cameras rendered at once
    seed: int = 0

    def __post_init__(self):
        for name in ("resolution", "yaws", "top_n", "particles", "refine_starts", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"PoseSettings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pso_iterations", "adam_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"PoseSettings.{name} must be >= 0, got {getattr(self, name)}")
        if not self.pitches or any(abs(p) >= 90 for p in self.pitches):
            raise ValueError(f"PoseSettings.pitches must be non-empty and within (-90, 90), got {self.pitches}")
        if not self.radius_factors or any(r <= 0 for r in self.radius_factors):
            raise ValueError(f"PoseSettings.radius_factors must be non-empty and > 0, got {self.radius_factors}")
        if len(self.sigma) != 2 or not min(self.sigma) > 0:
            raise ValueError(f"PoseSettings.sigma must be (first, last) > 0 pixels, got {self.sigma}")

    @classmethod
    def fast(cls, **overrides) -> PoseSettings:
        """A small search for tests and previews: 96 px, 16 x 3 x 2 candidates, 32 particles x 25 iterations,
        2 x 25 Adam steps."""
        base = cls(resolution=96, yaws=16, particles=32, pso_iterations=25, adam_steps=25)
        return replace(base, **overrides)


@dataclass
class PoseResult:
    """What :func:`register_pose` found. Scores are the score function's (IoU by default), higher is better."""

    pose: CameraPose
    c2w: np.ndarray  # (4,4) OpenCV camera-to-world of ``pose``
    candidate_score: float  # best score of stage 1 (the grid)
    pso_score: float  # best score of stage 2 (the swarm)
    refine_iou: float  # best soft IoU of stage 3 (Adam)
    iou: float  # hard silhouette IoU of the final pose against the mask, at the render resolution
    size: tuple[int, int] = field(default=(0, 0))  # (H, W) of the renders
    K: np.ndarray | None = None  # (3,3) intrinsics at that size
    # every stage-3 result, best hard IoU first: (pose, hard IoU). A symmetric object has several poses that fit
    # one silhouette equally; a caller with more frames can choose among the near-ties (loom generate 4d does)
    alternatives: tuple[tuple[CameraPose, float], ...] = ()


# Stage 3 moves each parameter in these units (degrees for angles; fractions of the start radius and of the
# mesh's bounding radius), so one learning rate suits all six.
_REFINE_UNITS = (1.0, 1.0, 0.01, 0.01, 0.01, 0.01)
# PSO velocity limits, same scaling: 30 degrees of yaw, 15 of pitch, 15% of the radius, 15% of the mesh size.
_PSO_STEP = (30.0, 15.0, 0.15, 0.15, 0.15, 0.15)
_PITCH_LIMIT = 80.0
# Fraction of the PSO iterations run as separate swarms; in the rest all particles follow the best of all.
_PSO_MERGE = 0.6


def _resample(mask: np.ndarray, K: np.ndarray, image, resolution: int):
    import cv2

    h, w = mask.shape
    s = min(1.0, resolution / max(h, w))
    hh, ww = max(1, round(h * s)), max(1, round(w * s))
    sx, sy = ww / w, hh / h
    k = np.array(K, dtype=np.float64) * np.array([[sx], [sy], [1.0]])
    if (hh, ww) == (h, w):
        m = mask.copy()
    else:
        m = cv2.resize(mask.astype(np.float32), (ww, hh), interpolation=cv2.INTER_AREA) >= 0.5
    img = None
    if image is not None:
        img = np.asarray(image)
        if img.shape[:2] != (h, w) or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image must be (H,W,3) matching the mask's {(h, w)}, got {img.shape}")
        img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
        if (hh, ww) != (h, w):
            img = cv2.resize(img, (ww, hh), interpolation=cv2.INTER_AREA)
        img = torch.from_numpy(np.ascontiguousarray(img))
    return m, k, (hh, ww), img


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of (B,H,W) masks (bool or soft) against b (H,W) or (B,H,W)."""
    a, b = a.float(), b.float()
    inter = (a * b).flatten(1).sum(1)
    union = (a + b - a * b).flatten(1).sum(1)
    return inter / union.clamp_min(1e-9)


def _view_dirs(params: np.ndarray) -> np.ndarray:
    """(N,6) poses -> (N,3) unit directions from the look-at point to the camera."""
    y, p = np.radians(params[:, 0]), np.radians(params[:, 1])
    return np.stack([np.cos(p) * np.cos(y), np.cos(p) * np.sin(y), np.sin(p)], axis=-1)


def _distinct(params: np.ndarray, order: np.ndarray, n: int, min_deg: float) -> list[int]:
    """The first ``n`` indices of ``order`` whose view directions are more than ``min_deg`` apart (greedy, so the
    best of each neighbourhood); fewer if fewer are that far apart."""
    d = _view_dirs(params)
    keep: list[int] = []
    cos_min = math.cos(math.radians(min_deg))
    for i in order:
        if all(d[i] @ d[j] < cos_min for j in keep):
            keep.append(int(i))
            if len(keep) == n:
                break
    return keep


def register_pose(vertices, faces, mask, K, *, image=None, score=None, settings: PoseSettings = PoseSettings()):
    """Find the camera under which the mesh (vertices (V,3), faces (F,3)) looks like a frame whose foreground is
    ``mask`` (H,W) bool, seen through intrinsics ``K`` (3,3) at the mask's size. Returns a :class:`PoseResult`.

    ``score`` ranks clay renders (white background, :func:`loom.geometry.raster.shade`) in stages 1 and 2 and is
    always called with two arguments, ``score(renders (B,h,w,3) float in [0,1], masks (B,h,w) bool) -> (B,)``,
    higher is better; the frame it compares with is the caller's (hold it in a closure, resized to the render size
    ``PoseResult.size``, which is the mask's size scaled so its longer side is ``settings.resolution``). Without
    ``score``, the silhouette IoU against ``mask`` is used. ``image`` (H,W,3, uint8 or float in [0,1]) is only
    checked against the mask's size. Stage 3 always fits the silhouette to ``mask``. Deterministic for
    ``settings.seed``."""
    st = settings
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0 or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"expected a non-empty mesh, vertices (V,3) and faces (F,3), got {v.shape} and {f.shape}")
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"mask must be an (H,W) bool array, got shape {mask.shape} dtype {mask.dtype}")
    if mask.sum() < 4:
        raise ValueError(f"the mask has {int(mask.sum())} foreground pixels: no object to register against")
    m_np, k, size, _ = _resample(mask, K, image, st.resolution)
    if m_np.sum() < 4:
        raise ValueError(f"the mask vanishes at {st.resolution} px: raise PoseSettings.resolution")
    m_t = torch.from_numpy(m_np)
    vt = torch.tensor(v, dtype=torch.float32)
    ft = torch.tensor(f, dtype=torch.long)
    kt = torch.tensor(k, dtype=torch.float32)

    centre = 0.5 * (v.min(0) + v.max(0))
    bound = float(np.linalg.norm(v - centre, axis=1).max())
    # Distance at which the bounding sphere looks as large as the mask (its farthest pixel from the centroid).
    ys, xs = np.nonzero(m_np)
    cu, cv = xs.mean() + 0.5, ys.mean() + 0.5
    r_px = max(float(np.sqrt((xs + 0.5 - cu) ** 2 + (ys + 0.5 - cv) ** 2).max()), 1.0)
    focal = 0.5 * (k[0, 0] + k[1, 1])
    d0 = focal * bound / r_px
    du, dv = (cu - k[0, 2]) / k[0, 0], (cv - k[1, 2]) / k[1, 1]  # mask centroid off the optical axis, tan units

    def evaluate(params: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(params), st.batch):
            c2w = pose_c2w_torch(torch.tensor(params[i : i + st.batch], dtype=torch.float32))
            r = raster.rasterize(vt, ft, kt, c2w, size)
            if score is None:
                s = _iou(r.mask, m_t)
            else:
                s = torch.as_tensor(score(raster.shade(r, vt, ft, c2w), r.mask), dtype=torch.float32).reshape(-1)
                if len(s) != len(c2w):
                    raise ValueError(f"score returned {len(s)} values for {len(c2w)} renders: expected one each")
            out.append(s.detach().cpu().numpy().astype(np.float64))
        return np.concatenate(out)

    # Stage 1: the grid. The look-at point is shifted so the centre projects onto the mask's centroid.
    grid = []
    for rf in st.radius_factors:
        for pitch in st.pitches:
            for yaw in np.arange(st.yaws) * (360.0 / st.yaws):
                pose = CameraPose(float(yaw), float(pitch), rf * d0, tuple(centre))
                c2w = pose.c2w()
                shift = -(du * c2w[:3, 0] + dv * c2w[:3, 1]) * rf * d0
                grid.append([yaw, pitch, rf * d0, *(centre + shift)])
    grid = np.array(grid)
    s1 = evaluate(grid)
    ranked = np.argsort(-s1, kind="stable")
    candidate_score = float(s1[ranked[0]])
    # One swarm per distinct view: neighbours of the best candidate on the grid would only repeat its basin.
    order = np.array(_distinct(grid, ranked, st.top_n, 1.01 * 360.0 / st.yaws))
    n_swarms = len(order)

    # Stage 2: particle swarms, one seeded by each distinct candidate, each pulled toward its own best (so a swarm
    # that starts in the wrong basin cannot drag the others into it).
    unit = np.array(_PSO_STEP) * np.array([1, 1, d0, bound, bound, bound])
    lo = np.array([-np.inf, -_PITCH_LIMIT, 0.5 * d0, 0, 0, 0])
    lo[3:] = np.minimum(grid[order, 3:].min(0), centre) - 0.5 * bound
    hi = np.array([np.inf, _PITCH_LIMIT, 2.0 * d0, 0, 0, 0])
    hi[3:] = np.maximum(grid[order, 3:].max(0), centre) + 0.5 * bound
    rng = np.random.default_rng(st.seed)
    n_particles = max(st.particles, n_swarms)
    swarm = np.arange(n_particles) % n_swarms
    x = grid[order][swarm].copy()
    jitter = rng.normal(size=x.shape) * unit * 0.25
    jitter[:n_swarms] = 0.0  # the candidates themselves are particles
    x = np.clip(x + jitter, lo, hi)
    vel = rng.uniform(-1, 1, size=x.shape) * unit * 0.1
    px, ps = x.copy(), evaluate(x) if st.pso_iterations else s1[order][swarm]

    def swarm_bests() -> np.ndarray:  # (n_swarms,) particle index of each swarm's best
        return np.array([np.flatnonzero(swarm == j)[np.argmax(ps[swarm == j])] for j in range(n_swarms)])

    for it in range(st.pso_iterations):
        g = swarm_bests()[swarm]
        if it >= _PSO_MERGE * st.pso_iterations:  # the last iterations: every particle refines the overall best
            g = np.full(n_particles, int(np.argmax(ps)))
        r1, r2 = rng.uniform(size=x.shape), rng.uniform(size=x.shape)
        vel = st.inertia * vel + st.cognitive * r1 * (px - x) + st.social * r2 * (px[g] - x)
        vel = np.clip(vel, -unit, unit)
        x = np.clip(x + vel, lo, hi)
        s = evaluate(x)
        better = s > ps
        px[better], ps[better] = x[better], s[better]
    bests = swarm_bests()
    bests = bests[np.argsort(-ps[bests], kind="stable")]
    pso_score = float(max(ps[bests[0]], candidate_score))
    starts = [px[i] if ps[i] >= s1[order[j]] else grid[order[j]] for j, i in zip(swarm[bests], bests)]
    starts = np.array(starts)[_distinct(np.array(starts), np.arange(len(starts)), st.refine_starts, 5.0)]

    # Stage 3: Adam on a bias-corrected soft IoU from each start; the pose kept is the best hard IoU of all iterates.
    best_params, best_iou, best_hard = torch.tensor(starts[0], dtype=torch.float32), -1.0, -1.0
    found = []
    for s0 in starts:
        params, hard, refine_iou = _refine(vt, ft, kt, size, m_t, s0, bound, st)
        found.append((CameraPose.from_array(params.double().numpy()), float(hard)))
        best_iou = max(best_iou, refine_iou)
        if hard > best_hard:
            best_hard, best_params = hard, params

    pose = CameraPose.from_array(best_params.double().numpy())
    c2w = pose.c2w()
    final = raster.rasterize(vt, ft, kt, torch.tensor(c2w, dtype=torch.float32), size).mask
    return PoseResult(
        pose=pose,
        c2w=c2w,
        candidate_score=candidate_score,
        pso_score=pso_score,
        refine_iou=best_iou,
        iou=float(_iou(final, m_t)[0]),
        size=size,
        K=k,
        alternatives=tuple(sorted(found, key=lambda x: -x[1])),
    )


def _refine(vt, ft, kt, size, m_t, start, bound: float, st: PoseSettings):
    """Stage 3 from one start: Adam on ``1 - soft IoU``, bias-corrected, with sigma annealed geometrically.

    The soft silhouette of a closed mesh is wider than its hard mask (front and back faces both blur the outline,
    and ``1 - prod(1 - p)`` adds them up), so plain soft IoU is best for a camera a little too far: the scale came
    out 3-5% low. The loss is ``IoU(soft, hard) - IoU(soft, mask)`` with ``hard`` the (constant) hard render at the
    current pose: its gradient is soft IoU's minus the part the halo alone causes, which vanishes where the hard
    render equals the mask. Returns (best params by hard IoU, that hard IoU, best plain soft IoU)."""
    start = torch.tensor(start, dtype=torch.float32)
    unit = torch.tensor(_REFINE_UNITS, dtype=torch.float32) * torch.tensor([1, 1, float(start[2]), bound, bound, bound])
    z = torch.zeros(6, requires_grad=True)
    opt = torch.optim.Adam([z], lr=st.adam_lr)
    n = max(st.adam_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.9 * i / n)
    best_params, best_hard, best_soft = start.clone(), -1.0, -1.0
    for step in range(st.adam_steps + 1):
        params = start + unit * z
        params = torch.cat([params[:1], params[1:2].clamp(-_PITCH_LIMIT, _PITCH_LIMIT), params[2:]])
        c2w = pose_c2w_torch(params)
        with torch.no_grad():
            hard_mask = raster.rasterize(vt, ft, kt, c2w.detach(), size).mask
        hard = float(_iou(hard_mask, m_t)[0])
        if hard > best_hard:
            best_hard, best_params = hard, params.detach().clone()
        if step == st.adam_steps:
            break
        sigma = st.sigma[0] * (st.sigma[1] / st.sigma[0]) ** (step / n)
        sil = raster.soft_silhouette(vt, ft, kt, c2w, size, sigma=sigma)
        soft = _iou(sil, m_t)[0]
        best_soft = max(best_soft, float(soft.detach()))
        opt.zero_grad()
        (_iou(sil, hard_mask[0])[0] - soft).backward()
        opt.step()
        sched.step()
    return best_params, best_hard, best_soft


def registration_transform(c2w_found, c2w_ref, lookat, ref_distance: float) -> np.ndarray:
    """4x4 similarity to apply to the mesh (``v' = T[:3,:3] v + T[:3,3]``) so that the reference camera
    ``c2w_ref`` sees it as the found camera ``c2w_found`` saw the original: the rigid motion
    ``c2w_ref @ inv(c2w_found)``, then a uniform scale about the reference camera's centre that puts the point
    ``lookat`` (a point of the mesh, e.g. its centre or the found pose's look-at) at distance ``ref_distance`` from
    it. A single view cannot tell an object's size from its distance (scaling about the camera centre leaves the
    image unchanged), so the caller fixes that one degree of freedom, e.g. the video's camera distance."""
    cf = np.asarray(c2w_found, dtype=np.float64)
    cr = np.asarray(c2w_ref, dtype=np.float64)
    if cf.shape != (4, 4) or cr.shape != (4, 4):
        raise ValueError(f"c2w_found and c2w_ref must be (4,4), got {cf.shape} and {cr.shape}")
    if not ref_distance > 0:
        raise ValueError(f"ref_distance must be > 0, got {ref_distance}")
    d = float(np.linalg.norm(np.asarray(lookat, dtype=np.float64) - cf[:3, 3]))
    if d <= 0:
        raise ValueError("lookat coincides with the found camera's centre: pass a point of the mesh")
    k = ref_distance / d
    scale = np.eye(4)
    scale[:3, :3] *= k
    scale[:3, 3] = (1.0 - k) * cr[:3, 3]
    return scale @ cr @ np.linalg.inv(cf)
