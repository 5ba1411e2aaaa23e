"""Chamfer, F-score and volume IoU against brute force; the ground-truth occupancy from oriented samples against
the exact one; registration recovers a known similarity; a sequence's scores (ShapeGen4D Tab. 1) undo a similarity
and say why IoU is missing."""

import numpy as np
import pytest
import trimesh

from loom.eval.metrics import (chamfer_distance, f_score, mesh_samples_iou, occupancy_from_oriented_points,
                               occupancy_grid, register_sequence, score_sequence, volume_iou)
from loom.eval.metrics.registration import Similarity, _rot_about


def _brute(a, b):
    d = np.linalg.norm(a[:, None] - b[None], axis=-1)
    return d.min(1), d.min(0)


def test_chamfer_and_f_score_match_brute_force():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(700, 3)) * 0.3
    b = a[:500] + rng.normal(size=(500, 3)) * 0.02
    d_ab, d_ba = _brute(a, b)
    assert chamfer_distance(a, b) == pytest.approx(d_ab.mean() + d_ba.mean(), rel=1e-12)
    assert chamfer_distance(a, b, squared=True) == pytest.approx((d_ab**2).mean() + (d_ba**2).mean(), rel=1e-12)
    for th in (0.01, 0.02, 0.05):
        p, r = (d_ab < th).mean(), (d_ba < th).mean()
        assert f_score(a, b, threshold=th) == pytest.approx(2 * p * r / (p + r), rel=1e-12)
    assert 0 < f_score(a, b) < 1
    assert chamfer_distance(a, a) == 0.0 and f_score(a, a) == 1.0
    assert f_score(a, a + 10.0) == 0.0


def test_point_cloud_inputs_are_checked():
    with pytest.raises(ValueError, match=r"\(P,3\)"):
        chamfer_distance(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="empty"):
        f_score(np.zeros((0, 3)), np.zeros((5, 3)))


def _mesh(m):
    return np.asarray(m.vertices), np.asarray(m.faces)


def _centres(r, lo=-1.0, hi=1.0):
    c = lo + (np.arange(r) + 0.5) * (hi - lo) / r
    return np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)


def test_occupancy_matches_closed_forms_and_winding_number():
    box = trimesh.creation.box(extents=(1.0, 0.5, 0.75))
    occ = occupancy_grid(*_mesh(box), resolution=64)
    np.testing.assert_array_equal(occ.reshape(-1), (np.abs(_centres(64)) <= [0.5, 0.25, 0.375]).all(1))
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.7)
    occ = occupancy_grid(*_mesh(sphere), resolution=64).reshape(-1)
    # the polyhedron lies inside the sphere: compare with the exact inside test of pcu's winding number
    import point_cloud_utils as pcu

    v, f = _mesh(sphere)
    inside = pcu.triangle_soup_fast_winding_number(v, f, _centres(64)) > 0.5
    assert np.count_nonzero(occ != inside) <= 2
    assert occ.sum() == pytest.approx((np.linalg.norm(_centres(64), axis=1) < 0.7).sum(), rel=0.01)


def test_volume_iou_of_boxes_is_the_closed_form():
    a = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    b = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    b.apply_translation((0.5, 0.0, 0.0))
    # 128 cells of 1/64 along x: the overlap is exactly half a box, IoU = 0.5 / 1.5
    assert volume_iou(_mesh(a), _mesh(b)) == pytest.approx(1 / 3, abs=1e-12)
    assert volume_iou(_mesh(a), _mesh(a)) == 1.0
    assert volume_iou(_mesh(a), _mesh(b), bounds="joint") == pytest.approx(1 / 3, abs=0.02)


def test_volume_iou_refuses_open_or_out_of_bounds_meshes():
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    v, f = _mesh(box)
    with pytest.raises(ValueError, match="watertight"):
        volume_iou((v, f[:-1]), (v, f))
    with pytest.raises(ValueError, match="outside the IoU cube"):
        volume_iou((v * 3, f), (v, f))


@pytest.mark.parametrize("shape", ["box", "sphere", "plate"])
def test_ground_truth_occupancy_from_oriented_samples_matches_the_exact_one(shape):
    from scipy import ndimage

    from loom.geometry.mesh import sample_surface

    m = {"box": lambda: trimesh.creation.box(extents=(1.2, 0.8, 0.6)),
         "plate": lambda: trimesh.creation.box(extents=(1.2, 0.8, 0.06)),  # 4 cells thick
         "sphere": lambda: trimesh.creation.icosphere(4, radius=0.8)}[shape]()
    v, f = _mesh(m)
    p, n = sample_surface(v, f, 32768, np.random.default_rng(0))
    exact = occupancy_grid(v, f, resolution=128, bounds=(-1, 1))
    approx = occupancy_from_oriented_points(p, n, resolution=128, bounds=(-1, 1))
    iou = (exact & approx).sum() / (exact | approx).sum()
    assert 0.99 < iou < 1.0  # the bound the module docstring states
    # the cells that differ all lie within 2 cells of the exact boundary
    boundary = exact & ~ndimage.binary_erosion(exact)
    assert not ((exact ^ approx) & ~ndimage.binary_dilation(boundary, iterations=2)).any()


def test_mesh_against_its_own_samples_is_near_1_and_a_shifted_box_is_the_closed_form():
    from loom.geometry.mesh import sample_surface

    box = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    v, f = _mesh(box)
    p, n = sample_surface(v, f, 32768, np.random.default_rng(0))
    assert 0.98 < mesh_samples_iou(v, f, p, n, resolution=64) <= 1.0
    # the mesh shifted by half its length along x: overlap 1/2 of each box, IoU (1/2) / (3/2), up to boundary cells
    assert mesh_samples_iou(v + [0.5, 0, 0], f, p, n, resolution=64) == pytest.approx(1 / 3, abs=0.03)
    with pytest.raises(ValueError, match="watertight"):
        mesh_samples_iou(v, f[:-1], p, n, resolution=16)


def _shape():
    # an asymmetric body: a stretched, bumped sphere with a box attached, as surface samples
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.4)
    m.vertices *= [1.0, 0.6, 0.8]
    m.vertices[:, 0] += 0.15 * np.maximum(m.vertices[:, 1], 0)
    b = trimesh.creation.box(extents=(0.2, 0.3, 0.5))
    b.apply_translation((0.35, 0.1, 0.3))
    return trimesh.util.concatenate([m, b]).sample(6000, seed=0)


def test_registration_recovers_a_similarity_and_frame_translations():
    gt0 = np.asarray(_shape())
    frames_gt = [gt0 + np.array([0.05 * k, 0.0, 0.02 * k]) for k in range(3)]
    true = Similarity(1.15, _rot_about(2, np.deg2rad(100.0)), np.array([0.1, -0.05, 0.2]))
    drift = [np.zeros(3), np.array([0.03, 0.0, 0.0]), np.array([0.0, -0.04, 0.01])]
    # predictions: the inverse similarity of the truth, plus a per-frame drift
    inv = Similarity(1 / true.scale, true.rotation.T, -true.rotation.T @ true.translation / true.scale)
    frames_pred = [inv.apply(g) + d for g, d in zip(frames_gt, drift, strict=True)]
    reg = register_sequence(frames_pred, frames_gt)
    assert reg.similarity.scale == pytest.approx(1.15, rel=0.01)
    np.testing.assert_allclose(reg.similarity.rotation, true.rotation, atol=0.01)
    for k, (p, g) in enumerate(zip(reg.apply(frames_pred), frames_gt, strict=True)):
        assert chamfer_distance(p, g) < 0.02 * 2, k  # sampling noise level
        assert np.abs(p - g).max() < 0.01, k  # same points: registered exactly
    # the azimuth of the rotation about Z, as items.csv reports it
    assert reg.similarity.azimuth_deg == pytest.approx(100.0, abs=1.0)


def _box_sequence(frames=3):
    box = trimesh.creation.box(extents=(0.6, 0.4, 0.3))
    return [(np.asarray(box.vertices) + [0.05 * k, 0.02 * k, 0.0], np.asarray(box.faces)) for k in range(frames)]


def _gt_samples(seq):
    from loom.geometry.mesh import sample_surface

    rng = np.random.default_rng(0)
    out = [sample_surface(v, f, 8192, rng) for v, f in seq]
    return [p.astype(np.float64) for p, _ in out], [n.astype(np.float64) for _, n in out]


def test_sequence_scores_undo_a_similarity_and_match_the_exact_prediction():
    seq = _box_sequence()
    gt_p, gt_n = _gt_samples(seq)
    rot = Similarity(1.0, _rot_about(2, np.pi / 2), np.zeros(3)).rotation
    moved = [(1.3 * v @ rot.T + [0.1, -0.05, 0.02], f) for v, f in seq]
    kw = dict(points=10_000, iou_resolution=64, seed=0)
    exact = score_sequence(seq, gt_p, gt_n, registration=None, **kw)
    registered = score_sequence(moved, gt_p, gt_n, registration={}, **kw)
    unregistered = score_sequence(moved, gt_p, gt_n, registration=None, **kw)
    assert [fr["frame"] for fr in exact.frames] == [0, 1, 2] and exact.note == "" and exact.registration is None
    e, r, u = exact.means(), registered.means(), unregistered.means()
    assert list(e) == ["chamfer", "iou", "f_score"]
    assert e["chamfer"] < 0.03 and e["f_score"] > 0.9 and e["iou"] > 0.97
    for m in e:
        assert r[m] == pytest.approx(e[m], rel=0.02, abs=2e-3), m
    assert u["iou"] < 0.5 and u["chamfer"] > 5 * r["chamfer"]
    assert registered.registration.similarity.scale == pytest.approx(1 / 1.3, rel=0.02)
    # the registered vertices land on the ground truth's corners (a box: up to its symmetry), as renders need
    d_ab, d_ba = _brute(registered.vertices[1], seq[1][0])
    assert d_ab.max() < 0.02 and d_ba.max() < 0.02
    # the same seed gives the same samples and values
    again = score_sequence(moved, gt_p, gt_n, registration={}, **kw)
    assert again.frames == registered.frames


def test_sequence_without_closed_meshes_has_no_iou_and_says_which_frame():
    seq = _box_sequence()
    gt_p, gt_n = _gt_samples(seq)
    points = score_sequence([(p, None) for p in gt_p], gt_p, gt_n, registration=None, points=4000, iou_resolution=32)
    assert points.note == "no IoU: frame 0 is a point cloud (3 such frames)"
    assert all("iou" not in fr and "chamfer" in fr for fr in points.frames)
    assert all(len(s) == 4000 for s in points.samples)  # a point cloud is subsampled to `points`
    opened = [seq[0], (seq[1][0], seq[1][1][:-1]), seq[2]]
    res = score_sequence(opened, gt_p, gt_n, registration=None, points=4000, iou_resolution=32, metrics=("iou",))
    assert res.note == "no IoU: frame 1 is not watertight" and res.frames == [{"frame": k} for k in range(3)]
    with pytest.raises(ValueError, match="unknown metrics"):
        score_sequence(seq, gt_p, gt_n, registration=None, metrics=("psnr",))
