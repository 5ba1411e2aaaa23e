"""Back-projection (loom.geometry.texture) against an independent renderer: a unit cube whose six faces own six
cells of a UV atlas, coloured by a smooth function of (u, v), is ray-cast here (Moller-Trumbore per pixel: colour =
that function at the hit's UV, depth = the hit's camera z), then its frames are back-projected into the atlas and
compared with the function at each texel's centre."""

import math

import numpy as np
import pytest

from loom.geometry import texture as tx
from loom.geometry.camera import intrinsics, orbit_c2w, pixel_rays, world_to_camera

# cube corners and its 6 faces as quads (outward, counter-clockwise seen from outside)
CORNERS = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
QUADS = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
PAD = 0.06  # of a cell, on each side


def cube():
    """(vertices (24,3), faces (12,3), uv (24,2)): one UV chart per face, cell (i % 3, i // 3) of a 3 x 2 grid."""
    verts, faces, uv = [], [], []
    for i, quad in enumerate(QUADS):
        cx, cy = i % 3, i // 3
        cell = [(0, 0), (1, 0), (1, 1), (0, 1)]
        for j, c in enumerate(quad):
            verts.append(CORNERS[c])
            a, b = cell[j]
            uv.append(((cx + PAD + a * (1 - 2 * PAD)) / 3, (cy + PAD + b * (1 - 2 * PAD)) / 2))
        k = 4 * i
        faces += [(k, k + 1, k + 2), (k, k + 2, k + 3)]
    v, f = np.array(verts, float), np.array(faces)
    # orient every face outwards (the quads above are listed by hand)
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    flip = (n * v[f].mean(1)).sum(1) < 0
    f[flip] = f[flip][:, ::-1]
    return v, f, np.array(uv, float)


def albedo(uv: np.ndarray) -> np.ndarray:
    """A smooth RGB function of (u, v) in [0, 255]."""
    u, v = uv[..., 0], uv[..., 1]
    return 255 * np.stack([0.5 + 0.4 * np.sin(2 * math.pi * 4 * u), 0.5 + 0.4 * np.cos(2 * math.pi * 3 * v),
                           0.5 + 0.3 * np.sin(2 * math.pi * 2 * (u + v))], -1)


def raycast(v, f, uv, K, c2w, size, return_uv=False):
    """(image (H,W,3) uint8, depth (H,W), mask (H,W)[, the hit's UV (H,W,2)]) of the mesh seen by one OpenCV
    camera."""
    d = pixel_rays(K, c2w, size, size).reshape(-1, 3)
    o = c2w[:3, 3]
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]  # (F,3)
    e1, e2 = b - a, c - a
    p = np.cross(d[:, None], e2[None])  # (P,F,3)
    det = (e1[None] * p).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = o - a  # (F,3)
        b1 = (s[None] * p).sum(-1) / det
        q = np.cross(s, e1)  # (F,3)
        b2 = (d[:, None] * q[None]).sum(-1) / det
        t = (e2 * q).sum(-1)[None] / det  # (P,F): camera z, since the rays have unit camera z
    hit = (np.abs(det) > 1e-12) & (b1 >= 0) & (b2 >= 0) & (b1 + b2 <= 1) & (t > 0)
    t = np.where(hit, t, np.inf)
    first = t.argmin(1)
    depth = t[np.arange(len(d)), first]
    mask = np.isfinite(depth)
    bb1, bb2 = b1[np.arange(len(d)), first], b2[np.arange(len(d)), first]
    uvs = uv[f[first, 0]] * (1 - bb1 - bb2)[:, None] + uv[f[first, 1]] * bb1[:, None] + uv[f[first, 2]] * bb2[:, None]
    img = np.where(mask[:, None], albedo(uvs), 0.0)
    out = (np.round(img).astype(np.uint8).reshape(size, size, 3), np.where(mask, depth, 0.0).reshape(size, size),
           mask.reshape(size, size))
    return (*out, uvs.reshape(size, size, 2)) if return_uv else out


def orbit(frames=12, size=160, height=1.2):
    c2w = orbit_c2w(frames, 2.6, height, phase=0.3)
    K = intrinsics(math.radians(40), size, size)
    return np.repeat(K[None], frames, 0), c2w


def test_rasterised_texels_lie_on_their_faces_with_the_faces_normals():
    v, f, uv = cube()
    s = tx.rasterise_uv(v, f, uv, 96)
    on = s.covered
    # six cells, each (1 - 2 PAD)^2 of its 1/6 of the atlas
    assert abs(on.mean() - (1 - 2 * PAD) ** 2) < 0.03
    assert np.allclose(np.abs(s.point[on]).max(-1), 0.5, atol=1e-9)  # on the cube's surface
    expected = np.round(s.point[on] * 2)  # the axis the point sits on, signed: the outward normal
    expected[np.abs(s.point[on]).max(-1, keepdims=True) > np.abs(s.point[on]) + 1e-9] = 0
    assert np.allclose(s.normal[on], expected)
    assert np.allclose(s.bary[on].sum(-1), 1) and (s.bary[on] >= -1e-9).all()
    with pytest.raises(ValueError, match="UV faces"):
        tx.rasterise_uv(v, f, uv[:, :1], 8)
    with pytest.raises(ValueError, match="indexes past"):
        tx.rasterise_uv(v, f + 100, uv, 8, uv_faces=f)


def test_back_projection_recovers_the_texture_and_hides_what_no_frame_sees():
    v, f, uv = cube()
    r = 128
    s = tx.rasterise_uv(v, f, uv, r)
    K, c2w = orbit()
    frames = [raycast(v, f, uv, K[t], c2w[t], 160) for t in range(len(c2w))]
    img, depth, mask = (np.stack(x) for x in zip(*frames, strict=True))
    tex, conf = tx.back_project(s, img, depth, mask, K, c2w)
    seen = conf > 0
    # texel centres' (u, v): the function there is the ground truth
    cols, rows = np.meshgrid(np.arange(r), np.arange(r))
    truth = albedo(np.stack([(cols + 0.5) / r, 1 - (rows + 0.5) / r], -1))
    good = seen & (conf > 0.05 * conf.max())
    mse = ((tex[good] - truth[good]) ** 2).mean()
    psnr = 10 * np.log10(255 ** 2 / mse)
    assert psnr >= 30, psnr
    # the cameras orbit above the cube: the bottom face (z = -0.5) is never seen, every other face is
    bottom = s.covered & (s.point[..., 2] < -0.5 + 1e-9)
    assert bottom.any() and not seen[bottom].any()
    side = s.covered & ~bottom
    assert seen[side].mean() > 0.97
    assert abs(tx.coverage(s, conf) - seen[s.covered].mean()) < 1e-12
    # weights: a face seen head-on outweighs the same face seen at a grazing angle (angle incentive)
    c, w = tx.project_frame(s, img[0], depth[0], mask[0], K[0], c2w[0])
    cam = c2w[0][:3, 3]
    facing = s.covered & (w > 0)
    cosines = np.einsum("...d,d->...", s.normal, cam / np.linalg.norm(cam))
    assert np.corrcoef(cosines[facing], w[facing])[0, 1] > 0.5


def test_a_texel_behind_another_surface_is_not_coloured_by_it():
    """Two parallel squares; the camera sees the front one: the back one's texels stay unseen."""
    sq = np.array([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]])
    v = np.concatenate([sq + [0, 0, 0.3], sq - [0, 0, 0.3]])
    f = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    uv = np.concatenate([sq[:, :2] * 0.4 + [0.25, 0.75], sq[:, :2] * 0.4 + [0.75, 0.25]]).clip(0, 1)
    s = tx.rasterise_uv(v, f, uv, 64)
    K = intrinsics(math.radians(40), 64, 64)
    c2w = np.eye(4)
    c2w[:3, :3] = np.diag([1.0, -1.0, -1.0])  # looking down -z from above
    c2w[:3, 3] = [0, 0, 3]
    img, depth, mask = raycast(v, f, uv, K, c2w, 64)
    _, w = tx.project_frame(s, img, depth, mask, K, c2w)
    front = s.covered & (s.point[..., 2] > 0)
    back = s.covered & (s.point[..., 2] < 0)
    # the front square is seen except along its silhouette (the depth-gradient penalty zeroes pixels next to the
    # background: ~14% of its texels at this size); nothing of the back square is
    assert (w[front] > 0).mean() > 0.8 and not (w[back] > 0).any()


def test_fusion_follows_confidence_and_dilation_fills_only_the_border():
    a, b = np.zeros((4, 4, 3)), np.full((4, 4, 3), 100.0)
    ca, cb = np.full((4, 4), 3.0), np.full((4, 4), 1.0)
    cb[0, 0], ca[1, 1] = 0, 0
    t, c = tx.fuse(a, ca, b, cb)
    assert np.allclose(t[2, 2], 25) and np.allclose(t[0, 0], 0) and np.allclose(t[1, 1], 100)
    assert np.allclose(c, ca + cb)
    known = np.zeros((5, 5), bool)
    known[2, 2] = True
    tex = np.zeros((5, 5, 3))
    tex[2, 2] = 9
    d = tx.dilate(tex, known, iterations=1)
    assert np.allclose(d[1, 2], 9) and np.allclose(d[2, 1], 9) and np.allclose(d[1, 1], 0)
    assert np.allclose(tx.dilate(tex, known, iterations=10), 9)
    with pytest.raises(ValueError, match="depth_sigma"):
        tx.Projection(depth_sigma=0)


def test_depth_gradient_is_large_at_silhouettes_and_small_on_flat_surfaces():
    depth = np.full((8, 8), 2.0)
    mask = np.ones((8, 8), bool)
    mask[:, 6:] = False
    g = tx.depth_gradient(depth, mask)
    assert np.allclose(g[:, :5], 0) and np.isinf(g[:, 5]).all()
    # the world_to_camera import is the convention the module uses: a sanity check of the test's cameras
    assert world_to_camera(np.zeros(3), orbit()[1][0])[2] > 0


def test_push_pull_keeps_known_texels_and_fills_holes_smoothly():
    from loom.geometry.texture import push_pull

    h, w = 37, 50  # odd sizes: the pyramid pads
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ramp = np.stack([4 * xx, 5 * yy, xx + yy], -1)
    known = np.random.default_rng(0).random((h, w)) < 0.3
    known[10:25, 10:30] = False  # a large hole
    out = push_pull(np.where(known[..., None], ramp, -1e3), known)  # what is under the hole must not matter
    np.testing.assert_array_equal(out[known], ramp[known])
    err = np.abs(out - ramp)[~known]
    assert err.mean() < 3 and err.max() < 20  # a ramp of 0..250 is followed across the hole
    # a nearest-texel fill would leave steps: push-pull's neighbouring hole texels differ by about the ramp's slope
    assert np.abs(np.diff(out[12:23, 12:28, 0], axis=1)).max() < 8
    one = np.zeros((8, 8), bool)
    one[3, 4] = True
    np.testing.assert_allclose(push_pull(np.full((8, 8, 3), 7.0), one), 7.0)  # one known texel: constant
    np.testing.assert_array_equal(push_pull(ramp, np.zeros((h, w), bool)), ramp)  # nothing known: unchanged
