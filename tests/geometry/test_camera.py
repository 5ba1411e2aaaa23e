"""Camera math against closed forms and round trips."""

import math

import numpy as np
import pytest

from loom.geometry import camera as cam


def test_similarity_maps_points_into_unit_sphere_centred():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-3, 7, size=(500, 3)) * np.array([1.0, 0.2, 5.0])
    m = cam.similarity_to_unit_sphere(pts)
    out = pts @ m[:3, :3].T + m[:3, 3]
    assert np.linalg.norm(out, axis=1).max() == pytest.approx(1.0)
    np.testing.assert_allclose(0.5 * (out.min(0) + out.max(0)), 0.0, atol=1e-12)


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.array([[0, 0, np.nan]]), np.ones((4, 3))])
def test_similarity_refuses_degenerate_input(bad):
    with pytest.raises(ValueError):
        cam.similarity_to_unit_sphere(bad)


def test_random_rotation_is_orthonormal_and_uniformish():
    rng = np.random.default_rng(1)
    rs = np.stack([cam.random_rotation(rng) for _ in range(2000)])
    np.testing.assert_allclose(rs @ rs.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rs.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rs), 1.0, atol=1e-12)
    # Uniform on SO(3): the image of a fixed axis is uniform on the sphere, so its mean is ~0.
    assert np.abs((rs @ np.array([0, 0, 1.0])).mean(0)).max() < 0.06


def test_orbit_positions_follow_tapestry_eq1():
    n, r, z = 61, 2.5, 0.7
    c2w = cam.orbit_c2w(n, r, z)
    t = np.arange(n)
    expect = np.stack([r * np.cos(2 * np.pi * t / n), r * np.sin(2 * np.pi * t / n), np.full(n, z)], 1)
    np.testing.assert_allclose(c2w[:, :3, 3], expect, atol=1e-12)
    # Each camera looks at the origin (OpenCV +z axis) and keeps world up at the image top (-y points up-ish).
    fwd = c2w[:, :3, 2]
    np.testing.assert_allclose(fwd, -expect / np.linalg.norm(expect, axis=1, keepdims=True), atol=1e-12)
    assert (c2w[:, 2, 1] < 0).all()
    np.testing.assert_allclose(np.linalg.det(c2w[:, :3, :3]), 1.0, atol=1e-12)


def test_project_unproject_round_trip():
    rng = np.random.default_rng(2)
    K = cam.intrinsics(math.radians(50), 64, 48)
    c2w = cam.look_at((2.0, -1.0, 0.5))
    depth = rng.uniform(0.5, 3.0, size=(48, 64))
    pts = cam.unproject_depth(depth, K, c2w)
    uv, z = cam.project(pts, K, c2w)
    np.testing.assert_allclose(z, depth, atol=1e-12)
    u, v = np.meshgrid(np.arange(64) + 0.5, np.arange(48) + 0.5)
    np.testing.assert_allclose(uv[..., 0], u, atol=1e-9)
    np.testing.assert_allclose(uv[..., 1], v, atol=1e-9)


def test_intrinsics_known_fov():
    K = cam.intrinsics(math.radians(90), 200, 100)
    assert K[0, 0] == pytest.approx(100.0)  # tan(45 deg) = 1 -> f = W/2
    assert (K[0, 2], K[1, 2]) == (100.0, 50.0)
    with pytest.raises(ValueError):
        cam.intrinsics(0.0, 10, 10)


def test_fit_fov_unit_sphere_closed_form():
    # A unit sphere seen from distance d subtends half-angle asin(1/d): the fitted FOV (margin 0) matches it.
    d = 3.0
    rng = np.random.default_rng(3)
    p = rng.standard_normal((20000, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    c2w = cam.orbit_c2w(8, d, 0.0)
    fov = cam.fit_fov(p, c2w, 64, 64, margin=0.0)
    assert fov == pytest.approx(2 * math.atan(1 / math.sqrt(d * d - 1)), rel=2e-3)
    # With a margin every point lands inside the image on every frame.
    fov = cam.fit_fov(p, c2w, 64, 32, margin=0.1)
    K = cam.intrinsics(fov, 64, 32)
    for m in c2w:
        uv, _ = cam.project(p, K, m)
        assert (uv[:, 0] > 0).all() and (uv[:, 0] < 64).all() and (uv[:, 1] > 0).all() and (uv[:, 1] < 32).all()


def test_fit_fov_refuses_camera_inside_object():
    with pytest.raises(ValueError, match="radius"):
        cam.fit_fov(np.array([[0, 0, 0], [5.0, 0, 0]]), cam.orbit_c2w(4, 2.0, 0.0), 8, 8)


def test_blender_conversion_round_trip_and_axes():
    c2w = cam.look_at((1.0, 2.0, 3.0))
    bl = cam.opencv_to_blender(c2w)
    np.testing.assert_allclose(cam.blender_to_opencv(bl), c2w)
    np.testing.assert_allclose(-bl[:3, 2], c2w[:3, 2])  # Blender looks down local -Z
    np.testing.assert_allclose(bl[:3, 1], -c2w[:3, 1])  # Blender +Y is image up
