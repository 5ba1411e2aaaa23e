import math

import numpy as np
import pytest

from loom.geometry import sharp as S

pytest.importorskip("fpsample")
trimesh = pytest.importorskip("trimesh")

H = 0.5  # the test cube is [-H, H]^3


def _cube():
    b = trimesh.creation.box(extents=(2 * H, 2 * H, 2 * H))
    return np.asarray(b.vertices, dtype=np.float64), np.asarray(b.faces, dtype=np.int64)


def _sphere(subdivisions=3):
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.4)
    return np.asarray(s.vertices, dtype=np.float64), np.asarray(s.faces, dtype=np.int64)


def _on_cube_edges(p, tol=1e-5):
    """Points lying on one of the cube's 12 edges: two coordinates at +-H, the third within [-H, H]."""
    at_face = np.abs(np.abs(p) - H) < tol
    return (at_face.sum(1) >= 2) & (np.abs(p) <= H + tol).all(1)


def test_cube_has_its_12_edges_sharp_and_no_face_diagonal():
    v, f = _cube()
    edges, faces = S.sharp_edges(v, f)
    assert len(edges) == 12  # 18 mesh edges: 12 cube edges at 90 degrees, 6 diagonals at 0
    mid = v[edges].mean(1)
    assert _on_cube_edges(mid).all()
    assert (faces[:, 0] != faces[:, 1]).all()


def test_cube_points_lie_on_its_edges_with_the_mean_of_the_two_face_normals():
    v, f = _cube()
    p, n, found = S.sample_sharp_edges(v, f, 1000, np.random.default_rng(0))
    assert found == 12 and p.shape == (1000, 3) and n.shape == (1000, 3)
    assert p.dtype == np.float32 and n.dtype == np.float32
    assert _on_cube_edges(p).all()
    corner = (np.abs(np.abs(p) - H) < 1e-5).all(1)
    assert corner.sum() == 8  # every vertex of a sharp edge, once
    # a corner's vertex normal: the angle-weighted mean of its three faces, (+-1, +-1, +-1) / sqrt 3
    np.testing.assert_allclose(n[corner], np.sign(p[corner]) / math.sqrt(3), atol=1e-6)
    # along an edge: the two faces' normals are the axes of the two coordinates at +-H; their mean, normalised
    inner = ~corner
    expect = np.where(np.abs(np.abs(p[inner]) - H) < 1e-5, np.sign(p[inner]), 0.0) / math.sqrt(2)
    np.testing.assert_allclose(n[inner], expect, atol=1e-6)
    # (1000 - 8) // 12 = 82 evenly spaced points per edge at t = j / 83, then 8 more at random
    on_edge = inner & (np.abs(p[:, 1] - H) < 1e-5) & (np.abs(p[:, 2] - H) < 1e-5)  # the edge y = z = H
    xs = p[on_edge, 0].astype(np.float64)
    even = -H + 2 * H * np.arange(1, 83) / 83
    assert np.abs(xs[:, None] - even[None]).min(0).max() < 1e-6  # every evenly spaced point is there
    assert 82 <= len(xs) <= 83  # plus at most one of the 8 random extras (on 8 distinct edges)


def test_more_vertices_than_points_takes_farthest_point_samples_of_the_vertices():
    v, f = _cube()
    p, n, found = S.sample_sharp_edges(v, f, 4, np.random.default_rng(1))
    assert found == 12 and p.shape == (4, 3)
    assert (np.abs(np.abs(p) - H) < 1e-6).all()  # corners only
    assert len(np.unique(p, axis=0)) == 4


def test_sphere_has_no_sharp_edge_and_falls_back_to_surface_points():
    v, f = _sphere()
    assert len(S.sharp_edges(v, f)[0]) == 0
    p, n, found = S.sample_sharp_edges(v, f, 500, np.random.default_rng(0))
    assert found == 0 and p.shape == (500, 3)
    r = np.linalg.norm(p, axis=1)
    assert np.all(r < 0.4 + 1e-6) and np.all(r > 0.39)  # on the (inscribed) polyhedron
    assert (np.einsum("ij,ij->i", n, p) > 0).all()  # outward
    with pytest.raises(ValueError, match="no sharp edge"):
        S.sample_sharp_edges(v, f, 10, np.random.default_rng(0), fallback="error")


def test_threshold_is_the_angle_between_face_normals():
    # regular octahedron: neighbouring face normals differ by arccos(1/3) = 70.5 degrees
    v = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)
    f = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    assert len(S.sharp_edges(v, f, 70.0)[0]) == 12
    assert len(S.sharp_edges(v, f, 71.0)[0]) == 0


def test_sampling_is_deterministic_for_a_seed():
    v, f = _cube()
    a = S.sample_sharp_edges(v, f, 101, np.random.default_rng(5))
    b = S.sample_sharp_edges(v, f, 101, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_refuses_bad_arguments():
    v, f = _cube()
    with pytest.raises(ValueError, match="fallback"):
        S.sample_sharp_edges(v, f, 10, np.random.default_rng(0), fallback="drop")
    with pytest.raises(ValueError, match="angle_degrees"):
        S.sharp_edges(v, f, 180.0)
    with pytest.raises(ValueError, match="n must be"):
        S.sample_sharp_edges(v, f, -1, np.random.default_rng(0))
