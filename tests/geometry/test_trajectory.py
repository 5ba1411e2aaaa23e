"""Tests of camera trajectories (loom.geometry.trajectory): keyframes hit, smoothness, presets, validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loom.geometry.camera import intrinsics, look_at, orbit_c2w
from loom.geometry.trajectory import (
    TrajectoryError,
    _mat_to_quat,
    dolly,
    load_trajectory,
    orbit,
)

KEYS = {
    "keyframes": [
        {"time": 0.0, "position": [4.0, -4.0, 2.0], "look_at": [0, 0, 0.5], "fov_deg": 50},
        {"time": 1.0, "position": [5.0, 0.0, 1.5], "look_at": [0, 0, 0.5], "fov_deg": 45},
        {"time": 3.0, "position": [3.0, 4.0, 2.5], "look_at": [0.5, 0, 0.5], "fov_deg": 40},
        {"time": 4.0, "position": [-2.0, 4.0, 1.0], "look_at": [0, 0, 0.0], "fov_deg": 60},
    ]
}


@pytest.mark.parametrize("interp", ["centripetal", "uniform", "chordal"])
def test_keyframes_hit_exactly(interp):
    traj = load_trajectory({**KEYS, "interpolation": interp})
    # 41 frames over [0, 4]: frames 0, 10, 30, 40 fall on the keyframe times.
    K, c2w, times = traj.sample(41, 64, 48)
    assert K.shape == (41, 3, 3) and c2w.shape == (41, 4, 4) and times.shape == (41,)
    for frame, kf in zip([0, 10, 30, 40], KEYS["keyframes"]):
        assert times[frame] == pytest.approx(kf["time"])
        np.testing.assert_allclose(c2w[frame, :3, 3], kf["position"], atol=1e-12)
        np.testing.assert_allclose(c2w[frame], look_at(kf["position"], kf["look_at"])[:], atol=1e-9)
        np.testing.assert_allclose(K[frame], intrinsics(math.radians(kf["fov_deg"]), 64, 48), atol=1e-9)


def test_smooth_and_orthonormal():
    traj = load_trajectory(KEYS)
    _, c2w, _ = traj.sample(401, 64, 64)
    pos = c2w[:, :3, 3]
    step = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    second = np.linalg.norm(np.diff(pos, 2, axis=0), axis=1)
    # No jumps: speed changes little from one frame to the next (keyframe times set the speed per segment), and
    # second differences (acceleration) stay a small fraction of a step, also across keyframes.
    assert np.abs(step[1:] / step[:-1] - 1).max() < 0.05
    assert second.max() < 0.1 * np.median(step)
    rot = c2w[:, :3, :3]
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-9)
    # Orientation changes smoothly too: the angle between consecutive frames stays small.
    rel = np.einsum("tij,tik->tjk", rot[:-1], rot[1:])
    angles = np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert angles.max() < math.radians(3)
    assert np.all(np.diff(c2w[:, 3, 3]) == 0)


def test_two_keyframes_give_straight_line_and_rotation_keyframes():
    r0 = look_at([0, -5, 1], [0, 0, 1])[:3, :3]
    r1 = look_at([5, 0, 1], [0, 0, 1])[:3, :3]
    traj = load_trajectory({"keyframes": [
        {"time": 0, "position": [0, -5, 1], "rotation": _mat_to_quat(r0).tolist(), "fov_deg": 40},
        {"time": 2, "position": [5, 0, 1], "rotation": r1.tolist(), "fov_deg": 60},
    ]})
    K, c2w, _ = traj.sample(5, 100, 100)
    np.testing.assert_allclose(c2w[2, :3, 3], [2.5, -2.5, 1.0], atol=1e-12)  # constant speed on the chord
    np.testing.assert_allclose(c2w[0, :3, :3], r0, atol=1e-9)
    np.testing.assert_allclose(c2w[-1, :3, :3], r1, atol=1e-9)
    # Halfway between +Y and -X viewing directions (slerp).
    np.testing.assert_allclose(c2w[2, :3, 2], [-math.sqrt(0.5), math.sqrt(0.5), 0.0], atol=1e-9)
    assert K[2, 0, 0] == pytest.approx(intrinsics(math.radians(50), 100, 100)[0, 0])


def test_orbit_preset_equals_orbit_c2w(tmp_path):
    K, c2w, _ = orbit(2.5, 0.8, 45.0).sample(8, 64, 64)
    np.testing.assert_allclose(c2w, orbit_c2w(8, 2.5, 0.8), atol=0)
    np.testing.assert_allclose(K, np.broadcast_to(intrinsics(math.radians(45), 64, 64), K.shape))
    p = tmp_path / "orbit.yaml"
    p.write_text("preset: orbit\nradius: 2.5\nheight: 0.8\nfov_deg: 45\n")
    _, c2w2, _ = load_trajectory(p).sample(8, 64, 64)
    np.testing.assert_allclose(c2w2, c2w)


def test_dolly_preset_looks_at_target():
    _, c2w, _ = dolly([0, -6, 1], [0, -3, 1], [0, 0, 1], 50).sample(4, 64, 64)
    np.testing.assert_allclose(c2w[:, :3, 3], [[0, -6, 1], [0, -5, 1], [0, -4, 1], [0, -3, 1]], atol=1e-12)
    np.testing.assert_allclose(c2w[:, :3, 2], np.broadcast_to([0, 1, 0], (4, 3)), atol=1e-12)


def test_json_and_yaml_files(tmp_path):
    pj = tmp_path / "t.json"
    pj.write_text(json.dumps(KEYS))
    py = tmp_path / "t.yml"
    import yaml

    py.write_text(yaml.safe_dump(KEYS))
    a = load_trajectory(pj).sample(9, 32, 32)[1]
    b = load_trajectory(py).sample(9, 32, 32)[1]
    np.testing.assert_allclose(a, b)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda k: k[1].pop("position"), "keyframes[1].position: missing"),
        (lambda k: k[2].__setitem__("position", [1, 2]), "keyframes[2].position: expected 3 finite numbers"),
        (lambda k: k[0].__setitem__("fov_deg", 190), "keyframes[0].fov_deg"),
        (lambda k: k[3].__setitem__("time", 0.5), "keyframes[3].time: times must increase"),
        (lambda k: k[1].__setitem__("rotation", [1, 0, 0, 0]), "keyframes[1].look_at/rotation"),
        (lambda k: k[1].pop("look_at"), "keyframes[1].look_at/rotation"),
        (lambda k: (k[2].pop("look_at"), k[2].__setitem__("rotation", [2, 0, 0, 0])), "keyframes[2].rotation"),
        (lambda k: (k[2].pop("look_at"), k[2].__setitem__("rotation", [[1, 0, 0], [0, 1, 0], [0, 0, -1]])),
         "keyframes[2].rotation: matrix is not a rotation"),
        (lambda k: k[0].__setitem__("look_at", [4.0, -4.0, 0.0]), "keyframes[0].look_at"),  # straight down: || up
        (lambda k: k[0].__setitem__("speed", 1), "keyframes[0]: unknown field"),
        (lambda k: k[1].__setitem__("time", "soon"), "keyframes[1].time: expected a finite number"),
    ],
)
def test_bad_files_name_the_field(tmp_path, mutate, needle):
    data = json.loads(json.dumps(KEYS))
    mutate(data["keyframes"])
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    with pytest.raises(TrajectoryError) as e:
        load_trajectory(p)
    assert needle in str(e.value)
    assert str(p) in str(e.value)


def test_bad_presets_and_syntax(tmp_path):
    with pytest.raises(TrajectoryError, match="preset orbit: missing field"):
        load_trajectory({"preset": "orbit", "radius": 2})
    with pytest.raises(TrajectoryError, match="unknown preset"):
        load_trajectory({"preset": "spiral"})
    with pytest.raises(TrajectoryError, match="interpolation"):
        load_trajectory({**KEYS, "interpolation": "cubic"})
    p = tmp_path / "broken.yaml"
    p.write_text("keyframes: [ {time: 0,\n")
    with pytest.raises(TrajectoryError, match="not valid YAML"):
        load_trajectory(p)
    with pytest.raises(TrajectoryError, match="not found"):
        load_trajectory(tmp_path / "missing.yaml")
