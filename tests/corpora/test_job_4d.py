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
    # The watertight surface lies slightly outside the original (about 0.02 at the smoke resolution of 5,000).
    assert np.abs(smp["surface"][..., :3]).max() <= h + 0.03
    n = smp["surface"][..., 3:]
    assert np.abs(np.linalg.norm(n, axis=-1) - 1).max() < 1e-4
    assert np.abs(smp["sdf"]).max() <= p.sdf_truncation + 1e-6


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
        clear = np.abs(sdf) > 0.02  # away from the surface, where the watertight offset does not matter
        assert clear.sum() > 100
        assert ((sdf[clear] < 0) == inside[clear]).mean() > 0.99
