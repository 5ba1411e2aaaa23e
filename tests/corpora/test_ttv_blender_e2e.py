"""The real thing at smoke size: bundled assets -> Ray Data -> sandboxed Blender (Cycles) -> tars -> reader.
Checks the reader contract on real renders, and that bad assets end as failure rows without losing good ones."""

import math
import os
import shutil

import numpy as np
import pytest

from loom.datasets.ttv import iter_samples
from loom.geometry.camera import unproject_depth
from loom.corpora import ttv
from loom.corpora.base import job_spec
from loom.corpora.assets import bundled_assets, resolve_source
from loom.platform.jobs import run_job
from loom.platform import config as c
from loom.platform import shards

pytestmark = pytest.mark.integration

BUNDLED = os.path.join(os.path.dirname(ttv.__file__), "..", "data", "assets")


@pytest.fixture(scope="module")
def corpus(ray_local, tmp_path_factory):
    """Two real bundled assets (one textured glTF, one OBJ with a texture side file) and three bad ones."""
    root = tmp_path_factory.mktemp("e2e")
    assets = root / "assets"
    assets.mkdir()
    by_uid = {r.uid: r for r in bundled_assets()}
    shutil.copy(by_uid["bunny"].path, assets / "bunny.glb")
    for ext in ("obj", "mtl", "png"):
        shutil.copy(os.path.join(BUNDLED, f"suzi_checker.{ext}"), assets / f"suzi_checker.{ext}")
    # The same OBJ whose texture is gone: renders without it, with a warning.
    (assets / "notex").mkdir()
    for ext in ("obj", "mtl"):
        shutil.copy(os.path.join(BUNDLED, f"suzi_checker.{ext}"), assets / "notex" / f"suzi_checker.{ext}")
    (assets / "zcorrupt.glb").write_bytes(b"glTF" + os.urandom(200))
    (assets / "znan.obj").write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n")
    (assets / "znofaces.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    cfg = c.resolve(ttv.RenderTTVJob, "smoke", c.parse_set([f"out={root / 'out'}", "shards.samples_per_shard=1"]))
    spec = job_spec(cfg, resolve_source(str(assets)))
    summary = run_job(spec, progress=False)
    return cfg, spec, summary


def test_good_assets_render_and_bad_ones_are_failure_rows(corpus):
    cfg, spec, s = corpus
    assert s.samples_done == 3, s.failures
    [warned] = s.warnings
    assert warned["key"].startswith("notex-suzi_checker") and "suzi_checker.png" in " ".join(warned["warnings"])
    reasons = {f["uid"].split("--")[0]: f["reason"] for f in s.failures}
    assert set(reasons) == {"zcorrupt", "znan", "znofaces"}
    assert "zcorrupt" in reasons["zcorrupt"]
    assert "finite" in reasons["znan"] or "NaN" in reasons["znan"]
    assert "face" in reasons["znofaces"]
    assert shards.verify(spec.out) == []


def test_real_render_meets_the_reader_contract(corpus):
    cfg, spec, _ = corpus
    samples = list(iter_samples(spec.out))
    assert len(samples) == 3
    for smp in samples:
        T, H, W = cfg.orbit.frames, cfg.render.height, cfg.render.width
        assert smp["rgb"].shape == (T, H, W, 3) and smp["rgb"].dtype == np.uint8
        assert smp["normal"].shape == smp["position"].shape == (T, H, W, 3)
        assert smp["depth"].shape == smp["mask"].shape == (T, H, W) and smp["mask"].dtype == bool
        meta = smp["meta"]
        assert meta["blender_version"].startswith("5.") and meta["seed"] and meta["asset_sha256"]
        assert meta["variant"] == 0 and meta["config_hash"]
        # The object is visible and fits the frame (FOV fitted with a margin: nothing touches the border).
        assert smp["mask"].mean() > 0.05
        border = np.concatenate([smp["mask"][:, 0], smp["mask"][:, -1], smp["mask"][:, :, 0], smp["mask"][:, :, -1]])
        assert not border.any()
        for t in range(T):
            m = smp["mask"][t]
            K, c2w = smp["K"][t].astype(np.float64), smp["c2w"][t].astype(np.float64)
            # Camera centres lie on the orbit recorded in meta.
            centre = c2w[:3, 3]
            assert math.hypot(centre[0], centre[1]) == pytest.approx(meta["orbit"]["radius"], abs=1e-4)
            assert centre[2] == pytest.approx(meta["orbit"]["height"], abs=1e-4)
            # Position == unprojected depth inside the mask (float16 storage of position: <= 4.9e-4).
            pts = unproject_depth(smp["depth"][t].astype(np.float64), K, c2w)
            err = np.abs(pts[m] - smp["position"][t][m])
            assert err.max() < 1.5e-3, err.max()
            assert np.linalg.norm(smp["position"][t][m], axis=-1).max() <= 1.0 + 1e-3  # inside the unit sphere
            # Unit normals, mostly facing the camera.
            n = smp["normal"][t][m]
            assert np.abs(np.linalg.norm(n, axis=-1) - 1).max() < 5e-3
            facing = ((centre - smp["position"][t][m]) * n).sum(-1) > 0
            assert facing.mean() > 0.9
        # The rgb pass shows the object over the white background.
        bg = ~smp["mask"]
        assert smp["rgb"][bg].mean() > 240 and smp["rgb"][smp["mask"]].mean() < 235


def test_a_task_past_its_timeout_is_a_failure_row(ray_local, tmp_path):
    by_uid = {r.uid: r for r in bundled_assets()}
    cfg = c.resolve(ttv.RenderTTVJob, "smoke", c.parse_set([f"out={tmp_path / 'out'}", "render.timeout_s=0.2"]))
    s = run_job(job_spec(cfg, [by_uid["marble_shaderball"]]), progress=False)
    assert (s.samples_done, s.failed) == (0, 1)
    assert "timed out" in s.failures[0]["reason"]
    assert shards.read_manifest(cfg.out)["complete"]
