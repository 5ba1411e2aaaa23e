"""The scene job end to end with the fake ray-cast backend (real Ray, sandbox, flow, warped noise, tars, reader)."""

import subprocess
import sys

import numpy as np
import pytest
import yaml

from loom.datasets.scene import iter_samples
from loom.geometry.flow import warp_backward
from loom.corpora import scene
from loom.corpora.base import job_spec
from loom.corpora.assets import resolve_source
from loom.platform.jobs import run_job
from loom.platform import config as c
from loom.platform import shards

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    (root / "scene.obj").write_text("# the fake backend ray-casts a ground square and a box\n")
    cfg = c.resolve(scene.RenderSceneJob, "smoke", c.parse_set([
        "render.backend=fake", f"out={root / 'out'}", f"scene={root / 'scene.obj'}", "camera.frames=5",
        "render.width=96", "render.height=64", "camera.fov_deg=70"]))
    spec = job_spec(cfg, resolve_source(cfg.scene))
    return cfg, spec, run_job(spec, progress=False)


def test_scene_sample_contract(corpus):
    cfg, spec, s = corpus
    assert (s.samples_done, s.failed) == (1, 0)
    assert shards.verify(spec.out) == []
    [smp] = list(iter_samples(spec.out))
    T, H, W = 5, 64, 96
    assert smp["edges"].shape == (T, H, W, 4) and smp["edges"].dtype == bool
    assert smp["flow_fwd"].shape == smp["flow_bwd"].shape == (T - 1, H, W, 2)
    assert smp["flow_fwd"].dtype == np.float32 and smp["flow_last_to_first"].shape == (H, W, 2)
    assert smp["occlusion_fwd"].shape == (T - 1, H, W) and smp["occlusion_fwd"].dtype == bool
    assert smp["depth"].shape == (T, H, W) and smp["K"].shape == (T, 3, 3) and smp["c2w"].shape == (T, 4, 4)
    assert smp["noise"].shape == (T, cfg.noise.channels, H // 8, W // 8)
    assert smp["meta"]["edge_kinds"] == ["silhouette", "crease", "boundary", "intersection"]
    assert smp["edges"][..., 0].any()  # the box's outline


def test_warping_the_next_frame_by_the_flow_reproduces_this_frame(corpus):
    _, spec, _ = corpus
    [smp] = list(iter_samples(spec.out))
    rgb = smp["rgb"].astype(np.float32)
    for t in range(rgb.shape[0] - 1):
        rec = warp_backward(rgb[t + 1], smp["flow_fwd"][t])
        ok = ~smp["occlusion_fwd"][t] & smp["mask"][t]
        # Away from texture edges the reconstruction is close; overall the error is far below a mismatch's.
        err = np.abs(rec - rgb[t]).mean(-1)[ok]
        assert ok.sum() > 500 and np.median(err) < 4.0, np.median(err)
        moved = np.abs(rgb[t + 1] - rgb[t]).mean(-1)[ok]
        assert np.median(err) < 0.5 * max(np.mean(moved), 1e-3) or np.mean(moved) < 1


def test_trajectory_file_through_the_cli(tmp_path):
    traj = {"keyframes": [
        {"time": 0.0, "position": [6.0, 0.0, 3.0], "look_at": [0.0, 0.0, 0.5], "fov_deg": 60.0},
        {"time": 1.0, "position": [0.0, 6.0, 3.5], "look_at": [0.0, 0.0, 0.5], "fov_deg": 60.0},
        {"time": 2.0, "position": [-6.0, 0.0, 3.0], "look_at": [0.0, 0.0, 0.5], "fov_deg": 60.0},
    ]}
    (tmp_path / "traj.yaml").write_text(yaml.safe_dump(traj))
    (tmp_path / "scene.obj").write_text("# fake\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "loom.cli", "render", "scene", "--scene",
                        str(tmp_path / "scene.obj"), "--trajectory", str(tmp_path / "traj.yaml"), "--out", str(out),
                        "--recipe", "smoke", "--set", "render.backend=fake", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    [smp] = list(iter_samples(str(out), keys=("K", "c2w")))
    np.testing.assert_allclose(smp["c2w"][0][:3, 3], [6.0, 0.0, 3.0], atol=1e-5)  # keyframes are hit
    np.testing.assert_allclose(smp["c2w"][-1][:3, 3], [-6.0, 0.0, 3.0], atol=1e-5)
