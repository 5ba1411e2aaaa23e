"""Loom's torch rasteriser against closed forms: exact pixel counts and depths of known shapes, batch = one by
one, the soft silhouette's limit and its gradients against finite differences."""

import os

import numpy as np
import pytest
import torch

from loom.geometry import camera as cam
from loom.geometry import raster as R

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "src", "loom", "data", "assets")


def _bunny():
    trimesh = pytest.importorskip("trimesh")
    # bunny.glb is Draco-compressed (trimesh cannot decode it); bunny_colors.ply is the same mesh.
    m = trimesh.load(os.path.join(ASSETS, "bunny_colors.ply"), force="mesh", process=False)
    s = cam.similarity_to_unit_sphere(m.vertices)
    v = m.vertices @ s[:3, :3].T + s[:3, 3]
    return torch.tensor(v, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.long)


def _iou(a, b):
    a, b = a.float(), b.float()
    return float((a * b).sum() / (a + b - a * b).sum())


def test_single_triangle_has_the_exact_pixel_count_and_depth():
    f, z = 100.0, 2.0
    K = np.array([[f, 0, 32.0], [0, f, 32.0], [0, 0, 1]])
    px = np.array([[10.25, 10.25], [50.25, 10.25], [10.25, 50.25]])  # right triangle, legs of 40 px
    v = np.concatenate([(px - 32.0) * z / f, np.full((3, 1), z)], axis=1)
    r = R.rasterize(torch.tensor(v), torch.tensor([[0, 1, 2]]), K, np.eye(4), (64, 64))
    # Centres (u + .5, v + .5) inside: u, v >= 10 and u + v <= 59 -> 40 * 41 / 2 pixels.
    assert int(r.mask.sum()) == 820
    uu, vv = np.meshgrid(np.arange(64), np.arange(64))
    expected = (uu >= 10) & (vv >= 10) & (uu + vv <= 59)
    np.testing.assert_array_equal(r.mask[0].numpy(), expected)
    np.testing.assert_allclose(r.depth[0][r.mask[0]].numpy(), z, rtol=1e-12)
    assert torch.isinf(r.depth[0][~r.mask[0]]).all() and (r.face[0][~r.mask[0]] == -1).all()
    np.testing.assert_allclose(r.bary[0][r.mask[0]].sum(-1).numpy(), 1.0, rtol=1e-12)


def test_unit_cube_front_face_is_a_20px_square_at_its_depth():
    trimesh = pytest.importorskip("trimesh")
    box = trimesh.creation.box(extents=(1, 1, 1))
    c2w = cam.look_at((0.0, -4.0, 0.0))
    K = np.array([[70.0, 0, 32], [0, 70.0, 32], [0, 0, 1]])  # side 1 at depth 3.5 -> 20 px, edges on integers
    r = R.rasterize(torch.tensor(box.vertices), torch.tensor(box.faces), K, c2w, (64, 64))
    m = r.mask[0].numpy()
    assert m.sum() == 400
    assert m[22:42, 22:42].all()
    np.testing.assert_allclose(r.depth[0].numpy()[m], 3.5, rtol=1e-12)
    front = np.flatnonzero(np.isclose(box.vertices[box.faces][:, :, 1], -0.5).all(axis=1))
    assert set(np.unique(r.face[0].numpy()[m])) == set(front.tolist())


def test_interpolated_positions_lie_on_the_pixel_rays_at_the_depth():
    # A tilted triangle: perspective-correct barycentrics put the interpolated world point on the pixel's ray.
    v = torch.tensor([[-1.0, -1.0, 0.3], [1.2, -0.8, -0.4], [-0.2, 1.1, 0.9]], dtype=torch.float64)
    c2w = cam.look_at((0.5, -3.0, 1.0))
    K = cam.intrinsics(np.radians(60), 48, 40)
    r = R.rasterize(v, torch.tensor([[0, 1, 2]]), K, c2w, (40, 48))
    assert r.mask.sum() > 200
    pos = R.interpolate(r, v)[0].numpy()
    depth = np.where(r.mask[0].numpy(), r.depth[0].numpy(), 1.0)
    ray = cam.unproject_depth(depth, K, c2w)
    m = r.mask[0].numpy()
    np.testing.assert_allclose(pos[m], ray[m], atol=1e-9)
    assert (pos[~m] == 0).all()


def test_batch_equals_one_camera_at_a_time():
    v, f = _bunny()
    K = cam.intrinsics(np.radians(40), 64, 48)
    c2w = cam.orbit_c2w(4, 3.0, 1.0, phase=0.3)
    rb = R.rasterize(v, f, K, c2w, (48, 64))
    assert rb.mask.shape == (4, 48, 64) and rb.mask.sum() > 4 * 200
    for i in range(4):
        ri = R.rasterize(v, f, K, c2w[i], (48, 64))
        for name in ("mask", "depth", "face", "bary"):
            assert torch.equal(getattr(rb, name)[i], getattr(ri, name)[0]), name
    img = R.shade(rb, v, f, c2w)
    assert img.shape == (4, 48, 64, 3) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert (img[~rb.mask] == 1).all() and float(img[rb.mask].max()) < 1  # white background, grey clay
    assert float(img[rb.mask].std()) > 0.02  # shaded, not flat


def test_soft_silhouette_tends_to_the_hard_mask():
    v, f = _bunny()
    K = cam.intrinsics(np.radians(40), 96, 96)
    c2w = cam.orbit_c2w(2, 3.0, 1.0)
    hard = R.rasterize(v, f, K, c2w, (96, 96)).mask
    ious = [_iou(R.soft_silhouette(v, f, K, c2w, (96, 96), sigma=s), hard) for s in (1.0, 0.05)]
    assert ious[1] > 0.97 and ious[1] > ious[0]


def test_soft_silhouette_gradients_match_finite_differences():
    v = torch.tensor([[0.0, 0.0, 0.6], [0.5, -0.3, -0.2], [-0.5, -0.3, -0.2], [0.0, 0.5, -0.2]], dtype=torch.float64)
    f = torch.tensor([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]])
    K = cam.intrinsics(np.radians(50), 20, 16)
    c2w = torch.tensor(cam.look_at((0.3, -2.5, 0.8)), dtype=torch.float64)
    w = torch.linspace(0.5, 1.5, 16 * 20, dtype=torch.float64).reshape(16, 20)  # weights: no symmetric cancelling

    def fn(vv, cc):
        return (R.soft_silhouette(vv, f, K, cc, (16, 20), sigma=1.5)[0] * w).sum()

    vv = v.clone().requires_grad_(True)
    cc = c2w.clone().requires_grad_(True)
    out = fn(vv, cc)
    assert 20 < float(out.detach()) < 16 * 20  # a partial silhouette
    gv, gc = torch.autograd.grad(out, (vv, cc))
    assert gv.abs().max() > 1 and gc.abs().max() > 1
    eps = 1e-6
    for x, g, other in ((v, gv, "v"), (c2w, gc, "c")):
        fd = torch.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            xp, xm = x.clone(), x.clone()
            xp[idx] += eps
            xm[idx] -= eps
            fp = fn(xp, c2w) if other == "v" else fn(v, xp)
            fm = fn(xm, c2w) if other == "v" else fn(v, xm)
            fd[idx] = (fp - fm) / (2 * eps)
        np.testing.assert_allclose(g.numpy(), fd.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vertices=torch.zeros(3, 2)), "vertices"),
        (dict(faces=torch.tensor([[0, 1, 5]])), "face indices"),
        (dict(c2w=np.eye(3)), "c2w"),
        (dict(size=(0, 8)), "size"),
    ],
)
def test_bad_input_is_refused_with_the_reason(kwargs, match):
    args = dict(vertices=torch.zeros(3, 3), faces=torch.tensor([[0, 1, 2]]), K=np.eye(3), c2w=np.eye(4), size=(8, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        R.rasterize(**args)
