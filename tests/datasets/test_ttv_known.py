"""The turntable schema's optional ``known`` member (``passes.partial=true``): the partial-texture training target of
TAPESTRY's 3D-aware inpainting. Stored as ``known.npz``, checked against the mask, absent when not rendered; the fake
backend computes it by ray-casting the earlier orbit, so it can be checked against the sphere's analytic visibility."""

import os

import numpy as np
import pytest

from loom.datasets import ttv
from loom.geometry import camera as cam
from loom.geometry.texture import BASE_TILTS, base_rotations, earlier_orbit
from loom.render.fake import SPHERE_RADIUS, render_sphere

T, H, W = 3, 16, 16


def arrays(known: np.ndarray | None = None) -> dict:
    rng = np.random.default_rng(0)
    mask = rng.random((T, H, W)) < 0.6
    a = {"rgb": rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8),
         "normal": np.zeros((T, H, W, 3), np.float32), "position": np.zeros((T, H, W, 3), np.float32),
         "depth": np.zeros((T, H, W), np.float32), "mask": mask,
         "K": np.eye(3, dtype=np.float32)[None].repeat(T, 0), "c2w": np.eye(4, dtype=np.float32)[None].repeat(T, 0)}
    if known is not None:
        a["known"] = known
    return a


def test_known_member_round_trips_and_is_optional():
    plain = arrays()
    known = plain["mask"] & (np.random.default_rng(1).random((T, H, W)) < 0.5)
    files = ttv.encode_sample({**plain, "known": known}, {"kind": "ttv"})
    np.testing.assert_array_equal(ttv.decode_sample(files)["known"], known)
    assert set(ttv.decode_sample(files, keys=("known",))) == {"known", "meta"}
    without = ttv.encode_sample(plain, {"kind": "ttv"})
    assert {k: v for k, v in files.items() if k != "known.npz"} == without  # nothing else changes
    with pytest.raises(ValueError, match="passes.partial=true"):
        ttv.decode_sample(without, keys=("known",))
    with pytest.raises(ValueError, match="outside the mask"):
        ttv.encode_sample({**plain, "known": ~plain["mask"]}, {"kind": "ttv"})
    with pytest.raises(ValueError, match="'known' has shape"):
        ttv.encode_sample({**plain, "known": known[:1]}, {"kind": "ttv"})


def test_base_rotations_are_the_named_tilts():
    scipy = pytest.importorskip("scipy.spatial.transform")
    for name, (axis, deg) in BASE_TILTS.items():
        np.testing.assert_allclose(base_rotations()[name], scipy.Rotation.from_euler(axis, deg, degrees=True)
                                   .as_matrix(), atol=1e-12)


@pytest.mark.parametrize("tilt", ["x+90", "y-90", "x180"])
def test_fake_known_is_the_analytic_visibility_of_the_earlier_orbit(tmp_path, tilt):
    """On a sphere (convex) a point is seen by a camera that frames the whole sphere iff it faces it: known must be
    true wherever an earlier camera faces the point clearly (cos > 0.25: at 48 px the sphere's curvature within a
    pixel fails the depth test below that), false wherever none does, and the grazing band between
    is thin."""
    asset = tmp_path / "a.obj"
    asset.write_text("v 0 0 0\n")
    orbit = {"radius": 2.5, "height": 0.6, "fov_margin": 0.05}
    views = 8
    r = render_sphere({"asset_path": os.fspath(asset), "frames": 4, "width": 48, "height": 48, "orbit": orbit,
                       "partial": {"tilt": tilt, "views": views}})
    known, mask = r["known"], r["mask"]
    assert not (known & ~mask).any()
    centres = earlier_orbit(cam.orbit_c2w(views, orbit["radius"], orbit["height"]), tilt)[:, :3, 3]  # (E,3)
    p = r["position"][mask].astype(np.float64)
    n = p / SPHERE_RADIUS
    to_cam = centres[None] - p[:, None]  # (N,E,3)
    cos = (n[:, None] * to_cam).sum(-1) / np.linalg.norm(to_cam, axis=-1)
    best = cos.max(1)
    k = known[mask]
    assert k[best > 0.25].all() and not k[best < -0.01].any()
    assert 0.3 < k.mean() < 0.98  # a real partial texture: some known, some not
    assert r["info"]["partial"]["known_fraction"] == pytest.approx(k.mean())
    # the tilt matters: another tilt's earlier orbit knows other pixels
    other = render_sphere({"asset_path": os.fspath(asset), "frames": 4, "width": 48, "height": 48, "orbit": orbit,
                           "partial": {"tilt": "x-45" if tilt != "x-45" else "x+45", "views": views}})
    assert (other["known"] != known).any()
