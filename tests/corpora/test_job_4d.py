"""The 4D job end to end with the fake arm backend (real Ray, sandbox, mesh processing, tars, reader): the
contract of loom.datasets.shape4d, aligned queries, the unit box, SDF signs, failure rows and resume.
The Blender side is exercised in test_render_anim.py and test_4d_blender_e2e.py."""

import numpy as np
import pytest

from loom.datasets.shape4d import iter_samples
from loom.corpora import shape4d
from loom.corpora.base import job_spec
from loom.corpora.assets import resolve_source
from loom.platform.jobs import run_job
from loom.platform import config as c
from loom.platform import shards

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("4d")
    assets = root / "assets"
    assets.mkdir()
    (assets / "arm.obj").write_text("# the fake backend makes a swinging two-part arm\n")
    (assets / "still.obj").write_text("STATIC mesh\n")
    cfg = c.resolve(shape4d.Render4DJob, "smoke", c.parse_set(["render.backend=fake", f"out={root / 'out'}",
                                                               "sequence.frames=5"]))
    spec = job_spec(cfg, resolve_source(str(assets)))
    return cfg, spec, run_job(spec, progress=False)


def test_static_asset_is_a_failure_row_and_the_rest_is_written(corpus):
    cfg, spec, s = corpus
    assert (s.samples_done, s.failed) == (1, 1)
    assert "no animation" in s.failures[0]["reason"]
    assert shards.verify(spec.out) == []
    again = run_job(spec, progress=False)
    assert again.shards_done == 0 and again.samples_skipped == 1


def test_sample_contract_and_unit_box(corpus):
    cfg, spec, _ = corpus
    [smp] = list(iter_samples(spec.out))
    T, p = cfg.sequence.frames, cfg.points
    assert smp["surface"].shape == (T, p.surface, 6) and smp["surface"].dtype == np.float32
    assert smp["queries"].shape == (T, p.queries, 3)
    assert smp["sdf_points"].shape == smp["sdf"].shape + (3,) == (T, p.sdf_near + p.sdf_volume, 3)
    assert smp["video"].shape == (T, cfg.render.height, cfg.render.width, 4) and smp["video"].dtype == np.uint8
    assert smp["K"].shape == (T, 3, 3) and smp["c2w"].shape == (T, 4, 4)
    meta = smp["meta"]
    assert len(meta["frame_times"]) == T and meta["seed"] and meta["asset_sha256"]
    h = cfg.sequence.half_extent
    assert np.abs(smp["queries"]).max() <= h + 1e-5  # the animated mesh of every frame fits the unit box
    assert h == 1.0 and meta["half_extent"] == h  # Step1X-3D's [-1, 1] box
    # The watertight surface lies slightly outside the original (about 0.044 at the smoke resolution of 5,000).
    assert np.abs(smp["surface"][..., :3]).max() <= h + 0.06
    n = smp["surface"][..., 3:]
    assert np.abs(np.linalg.norm(n, axis=-1) - 1).max() < 1e-4
    assert np.abs(smp["sdf"]).max() <= p.sdf_truncation + 1e-6
    assert meta["sdf_truncation"] == p.sdf_truncation
    # sharp-edge points: the fake arm is two boxes, so every frame has sharp edges and no fallback
    sharp = smp["sharp_surface"]
    assert sharp.shape == (T, p.sharp_points, 6) and sharp.dtype == np.float32
    assert len(meta["sharp_edges"]) == T and min(meta["sharp_edges"]) > 0
    assert np.abs(np.linalg.norm(sharp[..., 3:], axis=-1) - 1).max() < 1e-4
    assert np.abs(sharp[..., :3]).max() <= h + 0.06


def test_sharp_points_are_on_sharp_edges_of_the_watertight_surface(corpus):
    """Sharp points lie on the surface sampled in the same frame (within the surface sampling spacing), and their
    normals are not those of a flat face: on an edge of the boxy arm they are the mean of two face normals."""
    cfg, spec, _ = corpus
    [smp] = list(iter_samples(spec.out))
    surf, sharp = smp["surface"][0], smp["sharp_surface"][0]
    d = np.linalg.norm(sharp[:, None, :3] - surf[None, :, :3], axis=-1).min(1)
    assert np.median(d) < 0.1
    # a normal on an edge differs from the face normals of nearby surface points
    near = np.linalg.norm(sharp[:, None, :3] - surf[None, :, :3], axis=-1).argmin(1)
    cos = np.einsum("ij,ij->i", sharp[:, 3:], surf[near, 3:])
    assert np.median(cos) < 0.999


def test_no_sharp_points_when_off(ray_local, tmp_path):
    """points.sharp_points=0 writes no sharp.npz (and no meta.sharp_edges); the reader refuses to hand out
    'sharp_surface' from such samples, naming the setting."""
    from loom.datasets import shape4d as schema

    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "arm.obj").write_text("# arm\n")
    cfg = c.resolve(shape4d.Render4DJob, "smoke", c.parse_set(["render.backend=fake", f"out={tmp_path / 'out'}",
                                                               "sequence.frames=2", "points.sharp_points=0"]))
    spec = job_spec(cfg, resolve_source(str(assets)))
    assert run_job(spec, progress=False).samples_done == 1
    [smp] = list(iter_samples(spec.out))
    assert "sharp_surface" not in smp and "sharp_edges" not in smp["meta"]
    with pytest.raises(Exception, match="points.sharp_points"):
        list(iter_samples(spec.out, keys=("surface", "sharp_surface")))
    assert schema.SHARP not in schema.EXTS


def test_queries_are_the_same_physical_points_in_every_frame(corpus):
    _, spec, _ = corpus
    [smp] = list(iter_samples(spec.out))
    q, faces = smp["queries"].astype(np.float64), smp["query_faces"]
    upper, fore = faces < 12, faces >= 12  # the fake arm: 12 triangles per box, the upper arm first
    assert upper.sum() > 5 and fore.sum() > 5
    for part in (upper, fore):
        d = np.linalg.norm(q[:, part, None] - q[:, None, part], axis=-1)  # (T, n, n)
        assert np.abs(d - d[0]).max() < 1e-4  # rigid part: pairwise distances constant across frames
    assert np.linalg.norm(q[-1, fore] - q[0, fore], axis=-1).mean() > 0.05  # the forearm really moves
    assert np.linalg.norm(q[-1, upper] - q[0, upper], axis=-1).max() < 1e-5  # the upper arm does not


def test_sdf_sign_matches_inside_test(corpus):
    _, spec, _ = corpus
    [smp] = list(iter_samples(spec.out))
    norm = np.asarray(smp["meta"]["normalization"])
    inv = np.linalg.inv(norm)
    T = smp["sdf"].shape[0]
    for t in range(T):
        pts = smp["sdf_points"][t].astype(np.float64) @ inv[:3, :3].T + inv[:3, 3]  # the fake's own frame
        a = 0.5 * np.pi * t / (T - 1)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        local = pts @ rot  # undo the forearm's swing
        in_upper = (pts[:, 0] > -1) & (pts[:, 0] < 0) & (np.abs(pts[:, 1]) < 0.2) & (np.abs(pts[:, 2]) < 0.2)
        in_fore = (local[:, 0] > -0.1) & (local[:, 0] < 1) & (np.abs(local[:, 1]) < 0.15) & \
                  (np.abs(local[:, 2]) < 0.15)
        inside = in_upper | in_fore
        sdf = smp["sdf"][t]
        # clipped values only: farther than tau from the watertight surface, where its offset does not matter
        clear = np.abs(sdf) >= smp["meta"]["sdf_truncation"] - 1e-6
        assert clear.sum() > 100
        assert ((sdf[clear] < 0) == inside[clear]).mean() > 0.99
