"""Camera trajectories for scene videos (SPEC section 2): keyframes in, one camera per frame out. Pure numpy.

A trajectory file (YAML or JSON) is either a list of keyframes or a mapping::

    interpolation: centripetal      # optional: centripetal (default) | uniform | chordal
    up: [0, 0, 1]                   # optional: world up for look-at keyframes (default +Z)
    time_unit: seconds              # optional, informative only: seconds | frames
    keyframes:
      - {time: 0.0, position: [4, -4, 2], look_at: [0, 0, 0.5], fov_deg: 50}
      - {time: 2.0, position: [4,  4, 2], rotation: [w, x, y, z], fov_deg: 40}   # quaternion, or a 3x3 matrix

or a preset: ``{preset: orbit, radius: 3, height: 1, fov_deg: 45, phase: 0}`` or
``{preset: dolly, start: [...], end: [...], look_at: [...], fov_deg: 45, duration: 1}``.

Conventions are those of :mod:`loom.geometry.camera`: world +Z up; rotations are OpenCV camera-to-world (columns =
camera x right, y down, z forward in world coordinates); ``fov_deg`` is the *horizontal* field of view; ``K`` has a
centred principal point and square pixels.

Interpolation (why):

- **Positions**: Catmull-Rom through the keyframe positions, Barry-Goldman form with knot spacing ``|P_i+1 - P_i|^a``:
  ``a = 0.5`` *centripetal* (default: never forms cusps or self-intersections within a segment and overshoots
  least, which matters for a camera flying between objects), ``0`` uniform, ``1`` chordal. The end tangents come from
  reflected phantom points (``P_-1 = 2 P_0 - P_1``), so two keyframes give a straight line at constant speed. Within
  a segment, time maps onto the knot interval by a monotone cubic (PCHIP through the (time, knot) pairs), so
  keyframe ``i`` is hit exactly at ``time_i`` and the position is C1 *in time*: the velocity has no jumps at
  keyframes even when their times are not spaced like the knots (a linear time-to-knot map makes the speed jump
  there: a 70x spike in the second difference on the test path).
- **Orientations**: look-at keyframes are turned into rotations first (:func:`loom.geometry.camera.look_at`), then
  consecutive keyframe rotations are slerped (shortest arc) with the same linear time mapping.
- **Field of view**: linear in time.
- Frames are evenly spaced over ``[t_first, t_last]`` (both included).

Bad input raises :class:`TrajectoryError` (a ``ValueError``) naming the keyframe index and the field, e.g.
``keyframes[2].position: expected 3 finite numbers, got [1, 2]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loom.geometry.camera import intrinsics, look_at, orbit_c2w

INTERPOLATIONS = {"centripetal": 0.5, "uniform": 0.0, "chordal": 1.0}
_KEYFRAME_FIELDS = {"time", "position", "look_at", "rotation", "fov_deg"}


class TrajectoryError(ValueError):
    """A trajectory file or dict that cannot be used; the message names the keyframe and field."""


@dataclass(frozen=True)
class Keyframe:
    time: float
    position: np.ndarray  # (3,) world
    rotation: np.ndarray  # (3,3) OpenCV camera-to-world
    fov_deg: float  # horizontal


class Trajectory:
    """Base class: ``sample(frames, width, height) -> (K (T,3,3), c2w (T,4,4), times (T,))``, all float64."""

    def sample(self, frames: int, width: int, height: int):  # pragma: no cover - abstract
        raise NotImplementedError


def _check_frames(frames: int, width: int, height: int) -> None:
    if int(frames) < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if int(width) < 1 or int(height) < 1:
        raise ValueError(f"width and height must be >= 1, got {width}x{height}")


def _intrinsics_seq(fov_deg: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.stack([intrinsics(math.radians(float(f)), width, height) for f in fov_deg])


class KeyframeTrajectory(Trajectory):
    def __init__(self, keyframes: list[Keyframe], interpolation: str = "centripetal"):
        if not keyframes:
            raise TrajectoryError("keyframes: at least one keyframe is needed")
        if interpolation not in INTERPOLATIONS:
            raise TrajectoryError(f"interpolation: expected one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        times = np.array([k.time for k in keyframes], dtype=np.float64)
        for i in range(1, len(times)):
            if not times[i] > times[i - 1]:
                raise TrajectoryError(
                    f"keyframes[{i}].time: times must increase strictly, got {times[i]} after {times[i - 1]}")
        self.keyframes = list(keyframes)
        self.interpolation = interpolation
        self.times = times
        self.positions = np.stack([k.position for k in keyframes]).astype(np.float64)
        self.quats = np.stack([_mat_to_quat(k.rotation) for k in keyframes])
        # Consecutive quaternions in the same hemisphere: slerp then takes the shortest arc.
        for i in range(1, len(self.quats)):
            if np.dot(self.quats[i], self.quats[i - 1]) < 0:
                self.quats[i] = -self.quats[i]
        self.fovs = np.array([k.fov_deg for k in keyframes], dtype=np.float64)
        self.knots = _knots(self.positions, INTERPOLATIONS[interpolation])
        if len(times) > 1:
            sl = np.diff(self.knots[1:-1]) / np.diff(times)  # knots per second, per segment (all > 0)
            m = np.empty(len(times))
            m[0], m[-1] = sl[0], sl[-1]
            m[1:-1] = 2 * sl[:-1] * sl[1:] / (sl[:-1] + sl[1:])  # harmonic mean: monotone (Fritsch-Carlson)
            self._knot_slopes = m

    def _knot_at(self, s: int, u: float) -> float:
        """Curve parameter at fraction ``u`` of segment ``s``'s time interval: a monotone cubic Hermite map (PCHIP:
        harmonic-mean slopes) from time onto knots, so the camera's velocity in time is continuous at keyframes even
        when their times are not spaced like the knots (a linear map would make the speed jump there)."""
        k1, k2 = self.knots[s + 1], self.knots[s + 2]
        h = self.times[s + 1] - self.times[s]
        m1, m2 = self._knot_slopes[s], self._knot_slopes[s + 1]
        u2, u3 = u * u, u * u * u
        return ((2 * u3 - 3 * u2 + 1) * k1 + (u3 - 2 * u2 + u) * h * m1 + (-2 * u3 + 3 * u2) * k2
                + (u3 - u2) * h * m2)

    @property
    def duration(self) -> float:
        return float(self.times[-1] - self.times[0])

    def evaluate(self, t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions (N,3), rotations (N,3,3) and fov_deg (N,) at times ``t`` (clamped to the keyframe range)."""
        t = np.clip(np.atleast_1d(np.asarray(t, dtype=np.float64)), self.times[0], self.times[-1])
        n = len(self.times)
        if n == 1:
            m = len(t)
            return (np.repeat(self.positions[:1], m, 0), np.repeat(self.keyframes[0].rotation[None], m, 0),
                    np.full(m, self.fovs[0]))
        seg = np.clip(np.searchsorted(self.times, t, side="right") - 1, 0, n - 2)
        u = (t - self.times[seg]) / (self.times[seg + 1] - self.times[seg])  # 0..1 within the segment
        pos = np.empty((len(t), 3))
        rot = np.empty((len(t), 3, 3))
        p = np.concatenate([[2 * self.positions[0] - self.positions[1]], self.positions,
                            [2 * self.positions[-1] - self.positions[-2]]])
        k = self.knots  # (n + 2,) including the phantom points' knots
        for j, (s, uj) in enumerate(zip(seg, u)):
            # Segment s runs from keyframe s (= p[s+1]) to keyframe s+1 (= p[s+2]).
            k0, k1, k2, k3 = k[s], k[s + 1], k[s + 2], k[s + 3]
            pos[j] = _barry_goldman(p[s], p[s + 1], p[s + 2], p[s + 3], k0, k1, k2, k3, self._knot_at(s, uj))
            if uj <= 0.0:
                pos[j] = self.positions[s]  # exact at keyframes (no rounding from the recursion)
            rot[j] = _quat_to_mat(_slerp(self.quats[s], self.quats[s + 1], uj))
        exact = np.isin(t, self.times)
        for j in np.flatnonzero(exact):
            i = int(np.searchsorted(self.times, t[j]))
            pos[j] = self.positions[i]
            rot[j] = self.keyframes[i].rotation
        fov = np.interp(t, self.times, self.fovs)
        return pos, rot, fov

    def sample(self, frames: int, width: int, height: int):
        _check_frames(frames, width, height)
        times = np.linspace(self.times[0], self.times[-1], int(frames)) if frames > 1 else self.times[:1].copy()
        pos, rot, fov = self.evaluate(times)
        c2w = np.tile(np.eye(4), (len(times), 1, 1))
        c2w[:, :3, :3] = rot
        c2w[:, :3, 3] = pos
        return _intrinsics_seq(fov, width, height), c2w, times


class OrbitTrajectory(Trajectory):
    """TAPESTRY's circular orbit about world Z looking at the origin: exactly :func:`orbit_c2w` (a closed loop: frame
    ``t`` at angle ``2 pi t / frames + phase``, so the last frame is one step short of the first)."""

    def __init__(self, radius: float, height: float, fov_deg: float, phase: float = 0.0, duration: float = 1.0):
        if not radius > 0:
            raise TrajectoryError(f"radius: must be > 0, got {radius}")
        _check_fov(fov_deg, "fov_deg")
        self.radius, self.height, self.fov_deg, self.phase = float(radius), float(height), float(fov_deg), float(phase)
        self.duration = float(duration)

    def sample(self, frames: int, width: int, height: int):
        _check_frames(frames, width, height)
        c2w = orbit_c2w(int(frames), self.radius, self.height, self.phase)
        K = _intrinsics_seq(np.full(int(frames), self.fov_deg), width, height)
        return K, c2w, np.arange(int(frames)) * (self.duration / int(frames))


def orbit(radius: float, height: float, fov_deg: float, phase: float = 0.0) -> OrbitTrajectory:
    """Preset: a circular orbit (see :class:`OrbitTrajectory`); ``sample(frames, ...)`` equals ``orbit_c2w``."""
    return OrbitTrajectory(radius, height, fov_deg, phase)


def dolly(start, end, look_at_point, fov_deg: float, duration: float = 1.0) -> KeyframeTrajectory:
    """Preset: the camera moves on a straight line from ``start`` to ``end`` at constant speed, always looking at
    ``look_at_point`` (the orientation is slerped between the two end views)."""
    return trajectory_from_dict({"keyframes": [
        {"time": 0.0, "position": list(start), "look_at": list(look_at_point), "fov_deg": fov_deg},
        {"time": float(duration), "position": list(end), "look_at": list(look_at_point), "fov_deg": fov_deg},
    ]})


# ---------------------------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------------------------


def load_trajectory(source) -> Trajectory:
    """A trajectory from a .yaml/.yml/.json file path or an already-parsed dict/list."""
    if isinstance(source, (dict, list)):
        return trajectory_from_dict(source)
    path = Path(source)
    if not path.is_file():
        raise TrajectoryError(f"{path}: trajectory file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001  (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError)
        raise TrajectoryError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {e}") from None
    try:
        return trajectory_from_dict(data)
    except TrajectoryError as e:
        raise TrajectoryError(f"{path}: {e}") from None


def trajectory_from_dict(data) -> Trajectory:
    if isinstance(data, list):
        data = {"keyframes": data}
    if not isinstance(data, dict):
        raise TrajectoryError(f"expected a mapping with 'keyframes' (or 'preset') or a list of keyframes, "
                              f"got {type(data).__name__}")
    preset = data.get("preset")
    if preset is not None:
        return _preset_from_dict(data)
    known = {"keyframes", "interpolation", "up", "time_unit"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TrajectoryError(f"unknown top-level field(s) {unknown}; expected some of {sorted(known)} or 'preset'")
    if data.get("time_unit", "seconds") not in ("seconds", "s", "frames"):
        raise TrajectoryError(f"time_unit: expected 'seconds' or 'frames', got {data.get('time_unit')!r}")
    up = _vec3(data.get("up", [0.0, 0.0, 1.0]), "up")
    if np.linalg.norm(up) == 0:
        raise TrajectoryError("up: must not be the zero vector")
    kfs = data.get("keyframes")
    if not isinstance(kfs, list) or not kfs:
        raise TrajectoryError("keyframes: expected a non-empty list of keyframes")
    keyframes = [_keyframe(kf, i, up) for i, kf in enumerate(kfs)]
    return KeyframeTrajectory(keyframes, str(data.get("interpolation", "centripetal")))


def _preset_from_dict(data: dict) -> Trajectory:
    name = data["preset"]
    args = {k: v for k, v in data.items() if k != "preset"}
    try:
        if name == "orbit":
            need = {"radius", "height", "fov_deg"}
            _require(args, need, {"phase"}, "orbit")
            return OrbitTrajectory(_num(args["radius"], "radius"), _num(args["height"], "height"),
                                   _num(args["fov_deg"], "fov_deg"), _num(args.get("phase", 0.0), "phase"))
        if name == "dolly":
            _require(args, {"start", "end", "look_at", "fov_deg"}, {"duration"}, "dolly")
            return dolly(_vec3(args["start"], "start"), _vec3(args["end"], "end"), _vec3(args["look_at"], "look_at"),
                         _num(args["fov_deg"], "fov_deg"), _num(args.get("duration", 1.0), "duration"))
    except TrajectoryError as e:
        raise TrajectoryError(f"preset {name}: {e}") from None
    raise TrajectoryError(f"preset: unknown preset {name!r}; expected 'orbit' or 'dolly'")


def _require(args: dict, need: set, optional: set, what: str) -> None:
    missing = sorted(need - set(args))
    if missing:
        raise TrajectoryError(f"missing field(s) {missing}")
    unknown = sorted(set(args) - need - optional)
    if unknown:
        raise TrajectoryError(f"unknown field(s) {unknown} for {what}")


def _keyframe(kf, i: int, up: np.ndarray) -> Keyframe:
    where = f"keyframes[{i}]"
    if not isinstance(kf, dict):
        raise TrajectoryError(f"{where}: expected a mapping, got {type(kf).__name__}")
    unknown = sorted(set(kf) - _KEYFRAME_FIELDS)
    if unknown:
        raise TrajectoryError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(_KEYFRAME_FIELDS)}")
    for field in ("time", "position", "fov_deg"):
        if field not in kf:
            raise TrajectoryError(f"{where}.{field}: missing")
    time = _num(kf["time"], f"{where}.time")
    position = _vec3(kf["position"], f"{where}.position")
    fov = _num(kf["fov_deg"], f"{where}.fov_deg")
    _check_fov(fov, f"{where}.fov_deg")
    has_look, has_rot = "look_at" in kf, "rotation" in kf
    if has_look == has_rot:
        raise TrajectoryError(f"{where}.look_at/rotation: give exactly one of 'look_at' or 'rotation'")
    if has_look:
        target = _vec3(kf["look_at"], f"{where}.look_at")
        try:
            rotation = look_at(position, target, up)[:3, :3]
        except ValueError as e:
            raise TrajectoryError(f"{where}.look_at: {e}") from None
    else:
        rotation = _rotation(kf["rotation"], f"{where}.rotation")
    return Keyframe(time, position, rotation, fov)


def _num(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise TrajectoryError(f"{where}: expected a finite number, got {x!r}")
    return float(x)


def _vec3(x, where: str) -> np.ndarray:
    if (not isinstance(x, (list, tuple, np.ndarray)) or len(x) != 3
            or any(isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) for v in x)
            or not np.isfinite(np.asarray(x, dtype=np.float64)).all()):
        raise TrajectoryError(f"{where}: expected 3 finite numbers, got {x!r}")
    return np.asarray(x, dtype=np.float64)


def _check_fov(fov: float, where: str) -> None:
    if not 0.0 < fov < 180.0:
        raise TrajectoryError(f"{where}: horizontal field of view must be in (0, 180) degrees, got {fov}")


def _rotation(x, where: str) -> np.ndarray:
    arr = None
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        pass
    if arr is None or not np.isfinite(arr).all() or arr.shape not in ((4,), (3, 3)):
        raise TrajectoryError(f"{where}: expected a quaternion [w, x, y, z] or a 3x3 matrix of finite numbers, "
                              f"got {x!r}")
    if arr.shape == (4,):
        n = np.linalg.norm(arr)
        if abs(n - 1.0) > 1e-3:
            raise TrajectoryError(f"{where}: quaternion must have unit norm (within 1e-3), got norm {n:.6g}")
        return _quat_to_mat(arr / n)
    if not np.allclose(arr @ arr.T, np.eye(3), atol=1e-4) or np.linalg.det(arr) < 0:
        raise TrajectoryError(f"{where}: matrix is not a rotation (orthonormal with determinant +1)")
    u, _, vt = np.linalg.svd(arr)
    return u @ vt


# ---------------------------------------------------------------------------------------------------------------------
# Maths
# ---------------------------------------------------------------------------------------------------------------------


def _knots(positions: np.ndarray, alpha: float) -> np.ndarray:
    """Knots of the points with phantom ends: (n + 2,). Spacing |dP|^alpha; zero-length steps get a tiny spacing."""
    n = len(positions)
    if n == 1:
        return np.arange(3, dtype=np.float64)
    p = np.concatenate([[2 * positions[0] - positions[1]], positions, [2 * positions[-1] - positions[-2]]])
    d = np.linalg.norm(np.diff(p, axis=0), axis=1) ** alpha
    positive = d[d > 0]
    floor = 1e-6 * (positive.mean() if len(positive) else 1.0)
    d = np.maximum(d, floor) if len(positive) else np.ones_like(d)
    return np.concatenate([[0.0], np.cumsum(d)])


def _barry_goldman(p0, p1, p2, p3, t0, t1, t2, t3, t):
    a1 = ((t1 - t) * p0 + (t - t0) * p1) / (t1 - t0)
    a2 = ((t2 - t) * p1 + (t - t1) * p2) / (t2 - t1)
    a3 = ((t3 - t) * p2 + (t - t2) * p3) / (t3 - t2)
    b1 = ((t2 - t) * a1 + (t - t0) * a2) / (t2 - t0)
    b2 = ((t3 - t) * a2 + (t - t1) * a3) / (t3 - t1)
    return ((t2 - t) * b1 + (t - t1) * b2) / (t2 - t1)


def _slerp(q0: np.ndarray, q1: np.ndarray, u: float) -> np.ndarray:
    d = float(np.clip(np.dot(q0, q1), -1.0, 1.0))
    if d > 0.9995:
        q = q0 + u * (q1 - q0)
    else:
        theta = math.acos(d)
        q = (math.sin((1 - u) * theta) * q0 + math.sin(u * theta) * q1) / math.sin(theta)
    return q / np.linalg.norm(q)


def _quat_to_mat(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _mat_to_quat(m: np.ndarray) -> np.ndarray:
    """Rotation matrix -> unit quaternion [w, x, y, z] (Shepperd's method, numerically stable)."""
    tr = np.trace(m)
    if tr > 0:
        s = 2.0 * math.sqrt(tr + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    return q / np.linalg.norm(q)
