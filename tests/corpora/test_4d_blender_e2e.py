"""The 4D job for real at smoke size: Loom's animated assets -> Ray -> sandboxed Blender -> mesh processing ->
tars -> reader; a static asset becomes a failure row."""

import shutil

import numpy as np
import pytest

from loom.datasets.shape4d import iter_samples
from loom.corpora import shape4d
from loom.corpora.base import job_spec
from loom.corpora.assets import bundled_animated_assets, resolve_source
from loom.platform.jobs import run_job
from loom.platform import config as c
from loom.platform import shards

pytestmark = pytest.mark.integration

STATIC_OBJ = "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 0 0 1\nf 1 2 3 4\nf 1 2 5\nf 2 3 5\nf 3 4 5\nf 4 1 5\n"


def test_real_4d_job(ray_local, tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    for r in bundled_animated_assets():
        if r.uid in ("arm_walk", "blob"):
            shutil.copy(r.path, assets / f"{r.uid}.glb")
    (assets / "zstatic.obj").write_text(STATIC_OBJ)
    cfg = c.resolve(shape4d.Render4DJob, "smoke", c.parse_set([f"out={tmp_path / 'out'}", "sequence.frames=4"]))
    s = run_job(job_spec(cfg, resolve_source(str(assets))), progress=False)
    assert s.samples_done == 2, s.failures
    [fail] = s.failures
    assert fail["uid"].startswith("zstatic") and "no animation" in fail["reason"]
    assert shards.verify(cfg.out) == []
    by_uid = {smp["meta"]["uid"]: smp for smp in iter_samples(cfg.out)}
    walk, blob = by_uid["arm_walk"], by_uid["blob"]
    h = cfg.sequence.half_extent
    for smp in (walk, blob):
        assert smp["meta"]["blender_version"].startswith("5.")
        assert np.abs(smp["queries"]).max() <= h + 1e-4
        assert smp["video"][..., 3].max() == 255 and smp["video"][:, 0, :, 3].max() == 0  # object, clear border
        assert np.abs(np.linalg.norm(smp["surface"][..., 3:], axis=-1) - 1).max() < 1e-4
    # Root motion of the walking arm was removed: recorded offsets grow along +x, and the upper arm (attached to
    # the root) does not travel with it.
    off = np.asarray(walk["meta"]["root_offsets"])
    assert off[-1, 0] > 1.5 and np.abs(off[0]).max() == 0
    travel = np.linalg.norm(walk["queries"][-1] - walk["queries"][0], axis=-1)
    assert np.median(travel) < 0.25  # most queries sit on the still upper arm or near the elbow
    assert set(walk["meta"]["animation"]["kinds"]) >= {"armature"}
    assert "shape_key" in blob["meta"]["animation"]["kinds"]
