"""Root rotation removal (loom.geometry.sequence.remove_root_transform): closed forms on rigid bodies carried by a
root with a known world pose per frame."""

import numpy as np
import pytest

from loom.geometry import sequence as seq

T, N = 7, 40


def _rx(a):
    return seq.axis_rotation((1, 0, 0), np.atleast_1d(a))


def _rz(a):
    return seq.axis_rotation((0, 0, 1), np.atleast_1d(a))


def _heading(r):
    """Heading of each rotation's local +X about +Z (for Rz(psi) @ Rx(theta): psi)."""
    return np.arctan2(r[:, 1, 0], r[:, 0, 0])


def _pitch(r):
    """theta of Rz(psi) @ Rx(theta)."""
    return np.arctan2(r[:, 2, 1], r[:, 2, 2])


@pytest.fixture
def walker():
    """A body (N points in the root's frame) carried by a root that turns (yaw 0.3 -> 2.6 rad), wobbles in pitch
    (+-0.4 rad) and wanders; vertices = R_t b + r_t."""
    rng = np.random.default_rng(0)
    body = rng.normal(size=(N, 3))
    t = np.linspace(0, 1, T)
    yaw = 0.3 + 2.3 * t
    pitch = 0.4 * np.sin(2 * np.pi * t)
    rot = _rz(yaw) @ _rx(pitch)  # (T,3,3)
    pos = np.cumsum(rng.normal(size=(T, 3)), axis=0)
    verts = np.einsum("tij,nj->tni", rot, body) + pos[:, None, :]
    return body, yaw, pitch, rot, pos, verts


def test_full_gives_back_frame_0_pose_and_records_what_it_removed(walker):
    body, yaw, pitch, rot, pos, verts = walker
    out, off, q = seq.remove_root_transform(verts, pos, rot, "full")
    np.testing.assert_allclose(out, np.broadcast_to(verts[0], out.shape), atol=1e-6)  # every frame is frame 0
    np.testing.assert_allclose(off, pos - pos[0], atol=1e-12)
    np.testing.assert_allclose(q, rot @ rot[0].T, atol=1e-9)  # the rotation since frame 0, world frame
    np.testing.assert_allclose(q[0], np.eye(3), atol=1e-12)
    # The recorded removal undoes exactly, and root_transforms is the map that was applied.
    back = seq.restore_root_transform(out, off, q, pos[0])
    np.testing.assert_allclose(back, verts, atol=1e-9)
    m = seq.root_transforms(off, q, pos[0])
    np.testing.assert_allclose(np.einsum("tij,tnj->tni", m[:, :3, :3], verts) + m[:, None, :3, 3], out, atol=1e-9)


def test_yaw_removes_the_heading_and_keeps_the_pitch_wobble(walker):
    body, yaw, pitch, rot, pos, verts = walker
    out, off, q = seq.remove_root_transform(verts, pos, rot, "yaw")
    np.testing.assert_allclose(q, _rz(yaw - yaw[0]), atol=1e-9)  # only a rotation about +Z, by the heading change
    root_after = np.swapaxes(q, -1, -2) @ rot  # the root's orientation after removal
    np.testing.assert_allclose(_heading(root_after), yaw[0], atol=1e-9)  # faces one way
    np.testing.assert_allclose(_pitch(root_after), pitch, atol=1e-9)  # still wobbles
    assert np.ptp(pitch) > 0.5
    # Closed form: the body at frame t is R_z(yaw_0) R_x(pitch_t) b, carried to the frame-0 root position.
    expect = np.einsum("tij,nj->tni", _rz(np.full(T, yaw[0])) @ _rx(pitch), body) + pos[0]
    np.testing.assert_allclose(out, expect, atol=1e-6)
    np.testing.assert_allclose(seq.restore_root_transform(out, off, q, pos[0]), verts, atol=1e-9)


def test_none_leaves_the_rotation_and_matches_translation_only_removal(walker):
    body, yaw, pitch, rot, pos, verts = walker
    out, off, q = seq.remove_root_transform(verts, pos, rot, "none")
    np.testing.assert_array_equal(q, np.broadcast_to(np.eye(3), (T, 3, 3)))
    old, old_off = seq.remove_root_motion(verts, pos)
    np.testing.assert_array_equal(out, old)  # bit for bit: corpora made before the option are unchanged
    np.testing.assert_array_equal(off, old_off)
    np.testing.assert_allclose(out, np.einsum("tij,nj->tni", rot, body) + pos[0], atol=1e-9)  # still turning
    # Without rotations at all, "none" is still fine.
    np.testing.assert_array_equal(seq.remove_root_transform(verts, pos)[0], old)


def test_independent_of_the_roots_local_axes_and_of_its_scale(walker):
    """A bone's rest frame (a constant local rotation) or a (mirrored) scale on the root's world matrix changes
    nothing: only the rotation relative to frame 0 counts."""
    body, yaw, pitch, rot, pos, verts = walker
    c = seq.axis_rotation((0.3, -0.5, 0.8), [1.1])[0]
    scaled = rot @ c @ np.diag([-2.0, 0.5, 3.0])  # what a world matrix with a mirror and scale holds
    for mode in ("yaw", "full"):
        ref = seq.remove_root_transform(verts, pos, rot, mode)
        got = seq.remove_root_transform(verts, pos, seq.nearest_rotation(scaled), mode)
        np.testing.assert_allclose(got[0], ref[0], atol=1e-9)
        np.testing.assert_allclose(got[2], ref[2], atol=1e-9)


def test_twist_of_a_half_turn_and_an_undefined_heading():
    np.testing.assert_allclose(abs(seq.twist_angles(_rz(np.pi))[0]), np.pi, atol=1e-9)
    np.testing.assert_allclose(seq.twist_angles(_rz([-3.0, -0.2, 0.0, 1.0, 3.1])), [-3.0, -0.2, 0.0, 1.0, 3.1],
                               atol=1e-9)
    upside_down = np.stack([np.eye(3), _rx(np.pi)[0]])  # a half turn about a level axis: no heading
    with pytest.raises(ValueError, match="heading is undefined at frame 1.*'full' or 'none'"):
        seq.root_rotations_removed(upside_down, "yaw")
    np.testing.assert_allclose(seq.root_rotations_removed(upside_down, "full")[1], _rx(np.pi)[0], atol=1e-12)


def test_bad_shapes_and_values_refused(walker):
    _, _, _, rot, pos, verts = walker
    with pytest.raises(ValueError, match=r"root rotations \(T,3,3\) with T=7 frames, got shape \(6, 3, 3\)"):
        seq.remove_root_transform(verts, pos, rot[:6], "yaw")
    with pytest.raises(ValueError, match=r"root rotations \(T,3,3\).*got shape \(7, 9\)"):
        seq.remove_root_transform(verts, pos, rot.reshape(T, 9), "full")
    with pytest.raises(ValueError, match=r"vertices \(T,N,3\) and root positions \(T,3\)"):
        seq.remove_root_transform(verts, pos[:3], rot, "yaw")
    with pytest.raises(ValueError, match="must be one of .*'spin'"):
        seq.remove_root_transform(verts, pos, rot, "spin")
    with pytest.raises(ValueError, match="'yaw' needs the root's rotations"):
        seq.remove_root_transform(verts, pos, None, "yaw")
    scaled = rot * 2.0
    with pytest.raises(ValueError, match="frame 0 is not a rotation.*nearest_rotation"):
        seq.remove_root_transform(verts, pos, scaled, "full")
    mirrored = rot @ np.diag([1.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="not a rotation"):
        seq.remove_root_transform(verts, pos, mirrored, "yaw")
    nan = rot.copy()
    nan[3, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        seq.remove_root_transform(verts, pos, nan, "full")
    with pytest.raises(ValueError, match="singular"):
        seq.nearest_rotation(np.diag([1.0, 1.0, 0.0]))
