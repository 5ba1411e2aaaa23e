"""Geometric flow against closed forms, an independent ray caster, and image warping of a textured scene."""

import math

import numpy as np
import pytest

from loom.geometry import camera as cam
from loom.geometry.flow import flow_between, sequence_flows, warp_backward

# --- a tiny numpy ray caster: planes and axis-aligned boxes, smooth procedural texture -------------------------


def _texture(p: np.ndarray) -> np.ndarray:
    """(...,3) world points -> (...,3) RGB in [0,1], smooth (periods of ~1.5 world units, ~10+ pixels here)."""
    r = 0.5 + 0.25 * np.sin(4.0 * p[..., 0] + 1.0) + 0.25 * np.sin(3.0 * p[..., 1] - 2.0 * p[..., 2])
    g = 0.5 + 0.25 * np.sin(3.5 * p[..., 1] + 0.3) + 0.25 * np.cos(2.5 * p[..., 0] + 3.0 * p[..., 2])
    b = 0.5 + 0.5 * np.sin(2.0 * (p[..., 0] + p[..., 1] + p[..., 2]))
    return np.stack([r, g, b], -1)


def raycast(K, c2w, h, w, planes=(), boxes=()):
    """Depth (H,W) (0 where nothing is hit) and RGB (H,W,3) of planes ``(normal, offset)`` (points with
    ``normal . x = offset``) and boxes ``(lo, hi)``. Rays from :func:`cam.pixel_rays` have camera-space z = 1, so
    the ray parameter of a hit is its depth."""
    d = cam.pixel_rays(K, c2w, w, h)
    o = c2w[:3, 3]
    t = np.full((h, w), np.inf)
    for n, off in planes:
        n = np.asarray(n, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            tp = (off - o @ n) / (d @ n)
        tp = np.where(tp > 1e-9, tp, np.inf)
        t = np.minimum(t, tp)
    for lo, hi in boxes:
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (np.asarray(lo) - o) / d
            t2 = (np.asarray(hi) - o) / d
        tn = np.nanmax(np.minimum(t1, t2), -1)
        tf = np.nanmin(np.maximum(t1, t2), -1)
        tb = np.where((tn <= tf) & (tn > 1e-9), tn, np.inf)
        t = np.minimum(t, tb)
    hit = np.isfinite(t)
    depth = np.where(hit, t, 0.0)
    rgb = np.where(hit[..., None], _texture(o + d * depth[..., None]), 0.0)
    return depth, rgb


def _ray_blocked(o, p, boxes) -> np.ndarray:
    """(H,W) True where the segment from ``o`` to the points ``p`` (H,W,3) passes through a box before ``p``."""
    d = p - o
    out = np.zeros(p.shape[:2], bool)
    for lo, hi in boxes:
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (np.asarray(lo) - o) / d
            t2 = (np.asarray(hi) - o) / d
        tn = np.nanmax(np.minimum(t1, t2), -1)
        tf = np.nanmin(np.maximum(t1, t2), -1)
        out |= (tn <= tf) & (tn > 1e-9) & (tn < 1 - 1e-6)
    return out


def _pose(R=None, t=(0.0, 0.0, 0.0)):
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = np.eye(3) if R is None else R, t
    return m


H = W = 64
K64 = cam.intrinsics(math.radians(60), W, H)


# --- closed forms -------------------------------------------------------------------------------------------------


def test_translation_over_fronto_parallel_plane_is_f_t_over_z():
    z, tx, ty = 4.0, 0.3, -0.1
    f = K64[0, 0]
    depth = np.full((H, W), z)
    flow, occ = flow_between(depth, K64, _pose(), depth, K64, _pose(t=(tx, ty, 0)))
    # The camera moves by t, so the image content moves by -f t / Z.
    dx, dy = -f * tx / z, -f * ty / z
    u = np.arange(W) + 0.5 + dx
    v = np.arange(H) + 0.5 + dy
    expect_occ = ~((v[:, None] >= 0) & (v[:, None] < H) & (u[None, :] >= 0) & (u[None, :] < W))
    np.testing.assert_array_equal(occ, expect_occ)
    assert expect_occ.any() and not expect_occ.all()
    np.testing.assert_allclose(flow[~occ], np.broadcast_to([dx, dy], flow[~occ].shape), atol=1e-4)
    np.testing.assert_array_equal(flow[occ], 0.0)


def test_rotation_about_optical_axis_rotates_pixels_about_the_principal_point():
    theta = math.radians(10)
    c, s = math.cos(theta), math.sin(theta)
    Rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    depth = np.full((H, W), 3.0)  # depth is unchanged by a roll, whatever the scene
    flow, occ = flow_between(depth, K64, _pose(), depth, K64, _pose(Rz))
    uu, vv = np.meshgrid(np.arange(W) + 0.5 - K64[0, 2], np.arange(H) + 0.5 - K64[1, 2])
    # Camera-b coordinates are R^T p: pixel offsets from the principal point turn by -theta.
    ub = c * uu + s * vv
    vb = -s * uu + c * vv
    expect = np.stack([ub - uu, vb - vv], -1)
    inside = (np.abs(ub) < W / 2) & (np.abs(vb) < H / 2)
    np.testing.assert_array_equal(~occ, inside)
    np.testing.assert_allclose(flow[inside], expect[inside], atol=1e-4)


def test_general_motion_over_a_tilted_plane_matches_the_plane_homography():
    rng = np.random.default_rng(3)
    n = np.array([0.2, -0.3, 1.0])
    n /= np.linalg.norm(n)
    dist = 5.0  # plane n . x = dist in camera-a (= world) coordinates
    Ka = K64
    Kb = cam.intrinsics(math.radians(55), W, H)
    R = _small_rotation(0.08 * rng.standard_normal(3))  # small, so the plane stays in view
    t = np.array([0.4, -0.2, 0.3])
    depth_a, _ = raycast(Ka, _pose(), H, W, planes=[(n, dist)])
    c2w_b = _pose(R, t)
    depth_b, _ = raycast(Kb, c2w_b, H, W, planes=[(n, dist)])
    flow, occ = flow_between(depth_a, Ka, _pose(), depth_b, Kb, c2w_b)
    # x_b ~ Kb (R^T - R^T t n^T / d) Ka^-1 x_a for a point on the plane n . X = d of camera a.
    Hmat = Kb @ (R.T - np.outer(R.T @ t, n) / dist) @ np.linalg.inv(Ka)
    uu, vv = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    xa = np.stack([uu, vv, np.ones_like(uu)], -1)
    xb = xa @ Hmat.T
    expect = xb[..., :2] / xb[..., 2:] - xa[..., :2]
    inside = (xb[..., 0] / xb[..., 2] >= 0) & (xb[..., 0] / xb[..., 2] < W)
    inside &= (xb[..., 1] / xb[..., 2] >= 0) & (xb[..., 1] / xb[..., 2] < H)
    assert inside.mean() > 0.5
    np.testing.assert_array_equal(~occ, inside)  # a single plane occludes nothing: only the image border counts
    np.testing.assert_allclose(flow[inside], expect[inside], atol=1e-3)


def _small_rotation(axis_angle):
    a = np.asarray(axis_angle, float)
    th = np.linalg.norm(a)
    k = a / th
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * Kx + (1 - math.cos(th)) * Kx @ Kx


# --- occlusion ----------------------------------------------------------------------------------------------------

WALL = ((0.0, 0.0, 1.0), 10.0)  # fronto-parallel wall at z = 10 in camera-a (= world) coordinates
BOX = ((-1.0, -1.0, 5.0), (1.0, 1.0, 6.0))


def test_box_in_front_of_a_wall_flags_the_hidden_wall_pixels():
    c2w_a, c2w_b = _pose(), _pose(t=(0.8, 0.0, 0.0))  # the camera moves sideways
    depth_a, _ = raycast(K64, c2w_a, H, W, planes=[WALL], boxes=[BOX])
    depth_b, _ = raycast(K64, c2w_b, H, W, planes=[WALL], boxes=[BOX])
    flow, occ = flow_between(depth_a, K64, c2w_a, depth_b, K64, c2w_b)

    # Independent truth: cast a ray from camera b's centre to every point of frame a.
    pts = cam.unproject_depth(depth_a, K64, c2w_a)
    uv, _ = cam.project(pts, K64, c2w_b)
    outside = ~((uv[..., 0] >= 0) & (uv[..., 0] < W) & (uv[..., 1] >= 0) & (uv[..., 1] < H))
    truth = outside | _ray_blocked(c2w_b[:3, 3], pts, [BOX])

    wall = np.isclose(depth_a, 10.0)
    hidden = wall & truth & ~outside
    # The band hidden beside the box is f * 0.8 * (1/5 - 1/10) ~ 4.4 pixels wide, 2*f/5 rows tall (~22).
    assert hidden.sum() > 60
    # Agreement everywhere except within a pixel of the edges of the true hidden region (sub-pixel boundary).
    edge = truth ^ _dilate(truth) | truth ^ _erode(truth)
    np.testing.assert_array_equal(occ[~edge], truth[~edge])
    assert (occ[hidden]).mean() > 0.7
    # The box's front face is seen by both cameras.
    front = np.isclose(depth_a, 5.0)
    assert not occ[front & ~edge].any()
    np.testing.assert_array_equal(flow[occ], 0.0)
    # Visible wall pixels move by -f t / 10, front-face pixels by -f t / 5.
    np.testing.assert_allclose(flow[wall & ~occ, 0], -K64[0, 0] * 0.8 / 10, atol=1e-4)
    np.testing.assert_allclose(flow[front & ~occ, 0], -K64[0, 0] * 0.8 / 5, atol=1e-4)


def _dilate(m):
    p = np.pad(m, 1)
    return p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def _erode(m):
    return ~_dilate(~m)


def test_background_and_mask_are_occluded_with_zero_flow():
    depth = np.full((H, W), 4.0)
    depth[:10] = 0.0
    depth[10:20] = np.inf
    mask = np.ones((H, W), bool)
    mask[:, :5] = False
    flow, occ = flow_between(depth, K64, _pose(), depth, K64, _pose(t=(0.01, 0, 0)), mask_a=mask)
    assert occ[:20].all() and occ[:, :5].all()
    assert not occ[25:, 10:].any()
    np.testing.assert_array_equal(flow[occ], 0.0)


# --- a textured scene: plane + box, general camera motion ---------------------------------------------------------

GROUND = ((-2.0, -2.0, -0.2), (2.0, 2.0, 0.0))  # a finite slab: an infinite plane aliases near the horizon
CUBE = ((-0.5, -0.5, 0.0), (0.5, 0.5, 1.0))


def _scene_video(eyes):
    K = cam.intrinsics(math.radians(60), W, H)
    c2w = np.stack([cam.look_at(e, (0.0, 0.0, 0.3)) for e in eyes])
    frames = [raycast(K, m, H, W, boxes=[GROUND, CUBE]) for m in c2w]
    depth = np.stack([d for d, _ in frames])
    rgb = np.stack([c for _, c in frames])
    return depth, rgb, np.broadcast_to(K, (len(eyes), 3, 3)).copy(), c2w


EYES = [(2.4, -1.8, 2.4), (2.6, -1.5, 2.45), (2.75, -1.1, 2.4)]


def test_sequence_flows_shapes_dtypes_and_pairs():
    depth, _, K, c2w = _scene_video(EYES)
    out = sequence_flows(depth, K, c2w)
    assert out["flow_fwd"].shape == out["flow_bwd"].shape == (2, H, W, 2)
    assert out["flow_last_to_first"].shape == (H, W, 2)
    assert out["occlusion_fwd"].shape == out["occlusion_bwd"].shape == (2, H, W)
    assert out["occlusion_last_to_first"].shape == (H, W)
    for k in ("flow_fwd", "flow_bwd", "flow_last_to_first"):
        assert out[k].dtype == np.float32
    for k in ("occlusion_fwd", "occlusion_bwd", "occlusion_last_to_first"):
        assert out[k].dtype == bool
    f, o = flow_between(depth[2], K[2], c2w[2], depth[1], K[1], c2w[1])
    np.testing.assert_array_equal(out["flow_bwd"][1], f)
    np.testing.assert_array_equal(out["occlusion_bwd"][1], o)
    f, o = flow_between(depth[2], K[2], c2w[2], depth[0], K[0], c2w[0])
    np.testing.assert_array_equal(out["flow_last_to_first"], f)
    np.testing.assert_array_equal(out["occlusion_last_to_first"], o)
    assert np.abs(out["flow_fwd"][0][~out["occlusion_fwd"][0]]).max() > 2.0  # the motion is not trivial


def test_forward_and_backward_flows_cancel_on_visible_pixels():
    depth, _, K, c2w = _scene_video(EYES[:2])
    out = sequence_flows(depth, K, c2w)
    fwd, bwd, occ = out["flow_fwd"][0], out["flow_bwd"][0], out["occlusion_fwd"][0]
    assert 0 < occ[depth[0] > 0].mean() < 0.3
    back = warp_backward(bwd, fwd)  # flow_bwd read (bilinearly) at the target of each pixel
    # Pixels whose bilinear stencil in frame 1 touches a pixel with no backward flow would read a zero flow.
    clean = warp_backward((~out["occlusion_bwd"][0]).astype(float), fwd) == 1.0
    err = np.linalg.norm(fwd + back, axis=-1)[~occ & clean]
    assert np.median(err) < 1e-3
    assert np.percentile(err, 90) < 2e-3  # the rest: stencils that straddle the edge between box and ground
    assert (err > 0.1).mean() < 0.02
    assert np.linalg.norm(fwd, axis=-1)[~occ].mean() > 2.0  # not trivially zero


@pytest.mark.parametrize("forward", [True, False])
def test_warping_a_textured_frame_by_the_flow_reproduces_its_neighbour(forward):
    depth, rgb, K, c2w = _scene_video(EYES[:2])
    out = sequence_flows(depth, K, c2w)
    if forward:  # frame 1 warped by flow_fwd[0] reconstructs frame 0
        rec, target, occ = warp_backward(rgb[1], out["flow_fwd"][0]), rgb[0], out["occlusion_fwd"][0]
    else:  # frame 0 warped by flow_bwd[0] reconstructs frame 1
        rec, target, occ = warp_backward(rgb[0], out["flow_bwd"][0]), rgb[1], out["occlusion_bwd"][0]
    err = np.abs(rec - target).max(-1)[~occ]
    baseline = np.abs(rgb[1] - rgb[0]).max(-1)[~occ]  # no warping at all
    assert np.median(err) < 0.01
    assert np.percentile(err, 90) < 0.03
    assert np.median(baseline) > 10 * np.median(err)


def test_refuses_mismatched_inputs():
    d = np.ones((8, 8))
    with pytest.raises(ValueError, match="mask_a"):
        flow_between(d, K64, _pose(), d, K64, _pose(), mask_a=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="K"):
        sequence_flows(np.ones((3, 8, 8)), np.ones((2, 3, 3)), np.ones((3, 4, 4)))


def test_warp_backward_integer_and_half_pixel_shift():
    img = np.arange(5 * 6, dtype=np.float64).reshape(5, 6)
    flow = np.zeros((5, 6, 2))
    flow[..., 0] = 1.0
    out = warp_backward(img, flow)
    np.testing.assert_array_equal(out[:, :-1], img[:, 1:])
    np.testing.assert_array_equal(out[:, -1], img[:, -1])  # border clamp
    flow[..., 0], flow[..., 1] = 0.5, 0.0
    np.testing.assert_allclose(warp_backward(img, flow)[:, :-1], 0.5 * (img[:, :-1] + img[:, 1:]))
