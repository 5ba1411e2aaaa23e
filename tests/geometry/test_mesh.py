import numpy as np
import pytest

from loom.geometry import mesh as M

# The mesh libraries come with the `render` extra.
pcu = pytest.importorskip("point_cloud_utils")
pytest.importorskip("fpsample")
trimesh = pytest.importorskip("trimesh")


def _box(extents, center=(0.0, 0.0, 0.0)):
    b = trimesh.creation.box(extents=extents)
    b.apply_translation(center)
    return np.asarray(b.vertices, dtype=np.float64), np.asarray(b.faces, dtype=np.int64)


def _concat(*meshes):
    vs, fs, off = [], [], 0
    for v, f in meshes:
        vs.append(v)
        fs.append(f + off)
        off += len(v)
    return np.concatenate(vs), np.concatenate(fs)


def _sphere(radius=0.4, subdivisions=4):
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return np.asarray(s.vertices, dtype=np.float64), np.asarray(s.faces, dtype=np.int64)


def _volume(v, f):
    tri = v[f]
    return float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0)


def _distance_to_mesh(points, v, f):
    return pcu.closest_points_on_mesh(np.ascontiguousarray(points, dtype=np.float64), v, f)[0]


def _rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q * np.linalg.det(q)  # a proper rotation


def _min_pairwise(p):
    d = np.linalg.norm(p[:, None] - p[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return d.min()


# --- is_watertight ---------------------------------------------------------------------------------------------


def test_is_watertight_on_closed_open_and_misoriented_meshes():
    v, f = _box([1, 1, 1])
    assert M.is_watertight(v, f)
    assert M.is_watertight(*_sphere())
    assert not M.is_watertight(v, f[1:])  # a hole
    flipped = f.copy()
    flipped[0] = flipped[0, ::-1]
    assert not M.is_watertight(v, flipped)  # every edge shared by two faces, but one face turned over
    assert not M.is_watertight(v, np.concatenate([f, f[:1]]))  # an edge shared by three faces


# --- make_watertight -------------------------------------------------------------------------------------------


def test_watertight_closes_an_open_box():
    v, f = _box([0.5, 0.5, 0.5])
    assert not M.is_watertight(v, f[2:])
    vw, fw = M.make_watertight(v, f[2:], resolution=2000)
    assert vw.dtype == np.float64 and fw.dtype == np.int64
    assert M.is_watertight(vw, fw)
    assert _volume(vw, fw) > 0  # outward oriented


def test_watertight_removes_internal_surfaces_of_overlapping_cubes():
    # Two side-0.5 cubes overlapping by 3/4 along x: union 0.15625, sum 0.25.
    a, b = _box([0.5] * 3), _box([0.5] * 3, center=(0.125, 0.0, 0.0))
    v, f = _concat(a, b)
    union = 0.5 * 0.5 * 0.625
    vw, fw = M.make_watertight(v, f, resolution=5000)
    assert M.is_watertight(vw, fw)
    vol = _volume(vw, fw)
    # Manifold dilates by about half an octree cell: a little above the union, far below the sum of the two.
    assert union < vol < 1.2 * union
    # The faces of each cube that lie inside the other are gone: no surface within 0.1 of their centres, and
    # the points are inside.
    internal = np.array([[0.25, 0.0, 0.0], [-0.125, 0.0, 0.0]])
    assert (_distance_to_mesh(internal, vw, fw) > 0.1).all()
    assert (M.signed_distance(internal, vw, fw) < -0.1).all()


def test_watertight_refuses_empty_and_bad_input():
    with pytest.raises(ValueError, match="empty"):
        M.make_watertight(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    v, f = _box([1, 1, 1])
    with pytest.raises(ValueError, match="face indices"):
        M.make_watertight(v, f + 100)


# --- sample_surface --------------------------------------------------------------------------------------------


def test_surface_samples_lie_on_sphere_with_outward_unit_normals():
    v, f = _sphere(radius=0.4)
    p, n = M.sample_surface(v, f, 4000, np.random.default_rng(0))
    assert p.shape == n.shape == (4000, 3) and p.dtype == n.dtype == np.float32
    assert _distance_to_mesh(p, v, f).max() < 1e-6
    assert np.abs(np.linalg.norm(n, axis=1) - 1).max() < 1e-5
    assert (np.einsum("ij,ij->i", n, p) > 0).all()


def test_surface_samples_are_area_weighted_and_skip_degenerate_faces():
    # Triangle A (area 0.5) and triangle B (area 1.5), and a zero-area face far away.
    v = np.array(
        [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 1], [0, 1, 1], [5, 5, 5], [6, 6, 6], [7, 7, 7]], float
    )
    f = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    p, n = M.sample_surface(v, f, 20000, np.random.default_rng(1))
    assert np.isfinite(n).all() and (p[:, 0] < 3 + 1e-6).all()  # nothing on the degenerate face
    share_b = (p[:, 2] > 0.5).mean()
    assert share_b == pytest.approx(0.75, abs=0.015)  # 5 sigma of a binomial with n=20000
    # Uniform inside a triangle: the mean is the centroid.
    np.testing.assert_allclose(p[p[:, 2] < 0.5].mean(axis=0), [1 / 3, 1 / 3, 0], atol=0.01)


def test_surface_samples_deterministic_for_a_seed():
    v, f = _sphere()
    a = M.sample_surface(v, f, 100, np.random.default_rng(5))
    b = M.sample_surface(v, f, 100, np.random.default_rng(5))
    c = M.sample_surface(v, f, 100, np.random.default_rng(6))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_surface_samples_refuse_a_mesh_without_area():
    v = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2]], float)
    with pytest.raises(ValueError, match="degenerate"):
        M.sample_surface(v, np.array([[0, 1, 2]]), 10, np.random.default_rng(0))


# --- signed distance -------------------------------------------------------------------------------------------


def test_signed_distance_of_a_cube_matches_closed_forms():
    v, f = _box([0.5, 0.5, 0.5])
    p = np.array([[0, 0, 0], [0.1, 0, 0], [0.4, 0, 0], [0.4, 0.4, 0], [0.4, 0.4, 0.4], [0.25, 0.1, 0.1]])
    expected = [-0.25, -0.15, 0.15, np.sqrt(2) * 0.15, np.sqrt(3) * 0.15, 0.0]
    np.testing.assert_allclose(M.signed_distance(p, v, f), expected, atol=1e-12)


def test_sdf_samples_on_a_sphere_match_closed_forms():
    radius, trunc = 0.4, 0.05
    v, f = _sphere(radius=radius, subdivisions=4)
    pts, sdf = M.sdf_samples(v, f, 2000, 2000, np.random.default_rng(0), truncation=trunc)
    assert pts.shape == (4000, 3) and sdf.shape == (4000,) and pts.dtype == sdf.dtype == np.float32
    r = np.linalg.norm(pts.astype(np.float64), axis=1)
    # The icosphere lies within 1e-3 of the true sphere (its faces cut inside by ~3e-4 at this subdivision).
    np.testing.assert_allclose(sdf, np.clip(r - radius, -trunc, trunc), atol=1e-3)
    assert np.abs(sdf).max() <= np.float32(trunc)  # clipped, up to float32 rounding of the bound
    clear = np.abs(r - radius) > 1e-3
    np.testing.assert_array_equal(sdf[clear] < 0, r[clear] < radius)  # negative inside
    assert (sdf == np.float32(-trunc)).any() and (
        sdf == np.float32(trunc)
    ).any()  # the volume samples reach the clipped range
    # Near points first: the sigma=0.005 half hugs the surface more tightly than the sigma=0.02 half.
    near_tight, near_wide, volume = np.abs(sdf[:1000]), np.abs(sdf[1000:2000]), pts[2000:]
    assert np.median(near_tight) < 0.5 * np.median(near_wide)
    assert np.abs(volume).max() <= 0.5 * 1.05 and np.abs(volume).max() > 0.5


def _l_shape():
    """A watertight L (two overlapping boxes, made watertight): convex and concave edges and corners."""
    v, f = _concat(_box([0.8, 0.2, 0.2], (0.0, 0.0, 0.0)), _box([0.2, 0.6, 0.2], (0.3, 0.2, 0.0)))
    return M.make_watertight(v, f, resolution=2000)


def _probe_points(v, f, rng):
    """Points that reach every feature of a mesh: on and very near its faces, edges and vertices, a band around
    it, and the box around it."""
    on, _ = M.sample_surface(v, f, 1500, rng)
    edges = (v[f[:, 0]] + v[f[:, 1]]) / 2
    return np.concatenate([
        on, on + rng.normal(size=on.shape) * 1e-3, on + rng.normal(size=on.shape) * 0.02,
        v + rng.normal(size=v.shape) * 2e-3, edges + rng.normal(size=edges.shape) * 2e-3, v, edges,
        rng.uniform(-0.6, 0.6, size=(2000, 3)),
    ])


@pytest.mark.parametrize("clip", [0.005, 0.05])
def test_clipped_signed_distance_equals_clipping_the_exact_one(clip):
    rng = np.random.default_rng(3)
    for v, f in (_box([0.5, 0.5, 0.5]), _sphere(0.4, 3), _l_shape()):
        p = _probe_points(v, f, rng)
        exact = M.signed_distance(p, v, f)
        fast = M.signed_distance(p, v, f, clip=clip)
        np.testing.assert_array_equal(fast, np.clip(exact, -clip, clip))  # to the bit, signs of zeros included


def test_clipped_signed_distance_skips_far_points(monkeypatch):
    calls = {"closest": 0}
    closest = pcu.closest_points_on_mesh

    def count_closest(p, v, f):
        calls["closest"] += len(p)
        return closest(p, v, f)

    monkeypatch.setattr(pcu, "closest_points_on_mesh", count_closest)
    v, f = _l_shape()
    rng = np.random.default_rng(0)
    near, _ = M.sample_surface(v, f, 1000, rng)
    near = near + rng.normal(size=near.shape) * 0.002
    far = rng.uniform(-0.6, 0.6, size=(1000, 3))
    far = far[np.abs(M.signed_distance(far, v, f)) > 0.1]
    calls.update(closest=0)
    sdf = M.signed_distance(np.concatenate([near, far]), v, f, clip=0.01)
    assert len(far) > 300 and calls["closest"] <= len(near) + 0.05 * len(far)  # the far points skipped the query
    assert (np.abs(sdf[len(near):]) == 0.01).all()
    # An open mesh: the bound needs no closed surface, so its clipped distances are exact too.
    vb, fb = _box([1, 1, 1])
    p = rng.uniform(-0.8, 0.8, size=(500, 3))
    np.testing.assert_array_equal(M.signed_distance(p, vb, fb[1:], clip=0.2),
                                  np.clip(M.signed_distance(p, vb, fb[1:]), -0.2, 0.2))


def test_signed_distance_refuses_a_bad_clip():
    v, f = _box([1, 1, 1])
    with pytest.raises(ValueError, match="clip"):
        M.signed_distance(np.zeros((1, 3)), v, f, clip=0.0)


def test_sdf_samples_skip_far_changes_no_value():
    v, f = _l_shape()
    a = M.sdf_samples(v, f, 3000, 3000, np.random.default_rng(5), sigma=(0.001, 0.005), truncation=0.01)
    b = M.sdf_samples(v, f, 3000, 3000, np.random.default_rng(5), sigma=(0.001, 0.005), truncation=0.01,
                      skip_far=False)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def _arm(frame, frames=4):
    """The fake renderer's arm (two overlapping boxes, the forearm bent up to 90 degrees), in the [-1, 1] box."""
    from loom.render.fake import _box as box

    v1, f1 = box((-1.0, -0.2, -0.2), (0.0, 0.2, 0.2))
    v2, f2 = box((-0.1, -0.15, -0.15), (1.0, 0.15, 0.15))
    a = 0.5 * np.pi * frame / (frames - 1)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    v = np.concatenate([v1, v2 @ rot.T])
    v = (v - (v.max(0) + v.min(0)) / 2) / (np.abs(v - (v.max(0) + v.min(0)) / 2).max())
    return v, np.concatenate([f1, f2 + len(v1)])


def test_default_4d_mesh_path_matches_the_old_one_within_tolerance():
    """The 4D job's mesh path since 2026-12 (watertight resolution 10,000, far SDF points skipped) against the
    one before (20,000, exact distance for every point), with the tolerances of benchmarks/render_4d.py --paths
    (tau = the default recipe's SDF truncation 0.01, inner_threshold 0.04), on the fake renderer's arm: frames
    whose watertight mesh is unchanged give the same SDF; a frame the new path changes drops one octree level at
    most (offset <= 2.83x the old one, <= 0.75 inner_threshold) and its surface stays within 1 tau (mean) of the
    old watertight surface."""
    tau, frames = 0.01, 4
    old_offsets, new_offsets, changed = [], [], 0
    for frame in (1, 2):  # of 4: frame 1 keeps its mesh, frame 2 drops a level (frame 3 too, but costs 4 s more)
        v, f = _arm(frame, frames)
        old = M.make_watertight(v, f, resolution=20000)
        new = M.make_watertight(v, f, resolution=10000)
        assert M.is_watertight(*new)
        old_offsets.append(np.median(_distance_to_mesh(old[0], v, f)))
        new_offsets.append(np.median(_distance_to_mesh(new[0], v, f)))
        if old[0].shape == new[0].shape and np.array_equal(old[0], new[0]):
            pts, sdf = M.sdf_samples(*new, 2000, 1000, np.random.default_rng(frame), sigma=(0.001, 0.005),
                                     truncation=tau, half_extent=1.0)
            np.testing.assert_allclose(sdf, np.clip(M.signed_distance(pts, *old), -tau, tau), rtol=0, atol=1e-6)
            continue
        changed += 1
        surface, _ = M.sample_surface(*new, 4000, np.random.default_rng(frame))
        assert _distance_to_mesh(surface, *old).mean() <= tau
        assert new_offsets[-1] <= 2.83 * old_offsets[-1] and new_offsets[-1] <= 0.75 * 0.04
    assert changed == 1  # both kinds of frame were checked


def test_sdf_samples_deterministic_for_a_seed():
    v, f = _sphere(subdivisions=2)
    a = M.sdf_samples(v, f, 64, 64, np.random.default_rng(3))
    b = M.sdf_samples(v, f, 64, 64, np.random.default_rng(3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# --- aligned_queries -------------------------------------------------------------------------------------------


def _lumpy_mesh():
    """A sphere with a box on it: not symmetric, so rigid motions are not hidden by symmetry."""
    return _concat(_sphere(radius=0.3, subdivisions=3), _box([0.2, 0.2, 0.2], center=(0.3, 0.1, 0.0)))


def test_aligned_queries_follow_a_rigid_motion():
    rng = np.random.default_rng(0)
    v0, f = _sphere(radius=0.35, subdivisions=3)
    frames = [v0] + [v0 @ _rotation(rng).T + rng.normal(scale=0.2, size=3) for _ in range(3)]
    seq = np.stack(frames)
    q, fid, bary = M.aligned_queries(seq, f, v0, f, 128, np.random.default_rng(1), candidates=4000)
    assert q.shape == (4, 128, 3) and q.dtype == np.float32 and fid.dtype == np.int64 and bary.dtype == np.float32
    d0 = np.linalg.norm(q[0][:, None] - q[0][None], axis=-1)
    for t in range(4):
        dt = np.linalg.norm(q[t][:, None] - q[t][None], axis=-1)
        np.testing.assert_allclose(dt, d0, atol=2e-6)
        assert _distance_to_mesh(q[t], seq[t], f).max() < 1e-6


def test_aligned_queries_follow_a_deformation_by_the_barycentric_rule():
    rng = np.random.default_rng(2)
    v0, f = _lumpy_mesh()
    seq = v0[None] + rng.normal(scale=0.05, size=(3, len(v0), 3))
    seq[0] = v0
    q, fid, bary = M.aligned_queries(seq, f, v0, f, 64, np.random.default_rng(3), inner_threshold=0.05, candidates=2000)
    np.testing.assert_allclose(bary.sum(axis=1), 1, atol=1e-6)
    assert (bary >= 0).all()
    expected = np.einsum("nk,tnkd->tnd", bary.astype(np.float64), seq[:, f[fid]]).astype(np.float32)
    np.testing.assert_array_equal(q, expected)
    assert _distance_to_mesh(q[2], seq[2], f).max() < 1e-6


def test_aligned_queries_drop_an_internal_surface():
    outer, inner = _box([0.8] * 3), _box([0.3] * 3)
    v, f = _concat(outer, inner)
    vw, fw = M.make_watertight(v, f, resolution=3000)
    seq = v[None]

    def on_inner_cube(q):
        return (np.abs(q[0]).max(axis=1) < 0.2).sum()

    q, _, _ = M.aligned_queries(seq, f, vw, fw, 128, np.random.default_rng(0), inner_threshold=0.05, candidates=3000)
    assert on_inner_cube(q) == 0
    assert np.abs(np.abs(q[0]).max(axis=1) - 0.4).max() < 1e-6  # every query is on the outer cube
    # Without the filter the inner cube (12% of the area) gets queries: the assertion above can fail.
    q_all, _, _ = M.aligned_queries(seq, f, vw, fw, 128, np.random.default_rng(0), inner_threshold=10, candidates=3000)
    assert on_inner_cube(q_all) > 0
    with pytest.raises(ValueError, match=r"only \d+ of 3000 candidate points"):
        M.aligned_queries(seq, f, vw, fw, 3000, np.random.default_rng(0), inner_threshold=0.05, candidates=3000)


def test_aligned_queries_deterministic_for_a_seed():
    v0, f = _lumpy_mesh()
    seq = np.stack([v0, v0 * 1.1])
    a = M.aligned_queries(seq, f, v0, f, 32, np.random.default_rng(7), inner_threshold=0.05, candidates=1000)
    b = M.aligned_queries(seq, f, v0, f, 32, np.random.default_rng(7), inner_threshold=0.05, candidates=1000)
    c = M.aligned_queries(seq, f, v0, f, 32, np.random.default_rng(8), inner_threshold=0.05, candidates=1000)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_aligned_queries_are_farthest_point_samples():
    v0, f = _sphere(radius=0.4, subdivisions=3)
    n = 256
    q, _, _ = M.aligned_queries(v0[None], f, v0, f, n, np.random.default_rng(0), candidates=8000)
    p = q[0].astype(np.float64)
    # Greedy FPS: the distance of the k-th pick to the earlier picks never increases.
    gaps = [np.linalg.norm(p[:k] - p[k], axis=1).min() for k in range(1, n)]
    assert (np.diff(gaps) <= 1e-6).all()
    # And the set is far more spread than a random choice of as many surface points.
    rand, _ = M.sample_surface(v0, f, n, np.random.default_rng(1))
    assert _min_pairwise(p) > 3 * _min_pairwise(rand.astype(np.float64))


def test_aligned_queries_refuse_bad_shapes():
    v0, f = _sphere(subdivisions=1)
    with pytest.raises(ValueError, match="V_seq"):
        M.aligned_queries(v0, f, v0, f, 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_queries"):
        M.aligned_queries(v0[None], f, v0, f, 100, np.random.default_rng(0), candidates=50)


def test_aligned_queries_with_fewer_candidates_than_a_bucket():
    v0, f = _sphere(subdivisions=1)
    q, fid, _ = M.aligned_queries(v0[None], f, v0, f, 4, np.random.default_rng(0), candidates=16)
    assert q.shape == (1, 4, 3) and len(np.unique(fid)) <= 4
    assert _min_pairwise(q[0].astype(np.float64)) > 0


def test_importing_the_module_does_not_import_the_mesh_libraries():
    import subprocess
    import sys

    code = "import sys, loom.geometry.mesh; assert not {'point_cloud_utils', 'fpsample', 'trimesh'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
