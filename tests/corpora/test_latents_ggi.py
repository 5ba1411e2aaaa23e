"""``loom cache ggi`` (VideoFrom3D's GGI encoders run once): real Ray and sandboxed workers over a scene corpus made
without Blender; the cached latents are what training computes from pixels, training reads them, and a cache made
with other networks is refused."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from loom.corpora import latents_ggi as lg
from loom.datasets.codecs import iter_decoded
from loom.datasets.io import generic_decode
from loom.platform import config as c
from loom.platform import shards
from tests.training.corpus_ggi import make_scene_corpus

pytest.importorskip("diffusers")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cached(ray_local, tmp_path_factory):
    from loom.platform.jobs import run_job

    root = tmp_path_factory.mktemp("ggi-cache")
    src = str(root / "scene")
    make_scene_corpus(src, samples=3, frames=9, size=32)
    cfg = c.resolve(lg.CacheGGIJob, "tiny", [("source", src), ("out", str(root / "lat"))])
    summary = run_job(lg.job_spec(cfg), progress=False)
    return cfg, src, summary


def test_cached_latents_are_the_training_inputs(cached):
    from loom.datasets.scene import iter_samples as scenes
    from loom.models import ggi

    cfg, src, summary = cached
    assert (summary.samples_done, summary.failed) == (3, 0) and shards.verify(cfg.out) == []
    assert shards.read_manifest(cfg.out)["kind"] == "latents-ggi"
    vae = ggi.build_vae(ggi.GGIModelSettings(vae=ggi.TINY), 0)
    source = {s["__key__"]: s for s in scenes(src)}
    for smp in iter_decoded(cfg.out, generic_decode):
        view = ggi.GGIView()(source[smp["__key__"]])
        video = torch.from_numpy(view["video"]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        edges = (torch.from_numpy(view["edges"]) * 2 - 1)[None, None].expand(-1, 3, -1, -1, -1)
        np.testing.assert_allclose(smp["video_latent"], ggi.encode(vae, video)[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(smp["edge_latent"], ggi.encode(vae, edges)[0].numpy(), atol=1e-5)
        v = ggi.anchor_layout(torch.from_numpy(smp["anchor_latent"])[None], 3)
        want = ggi.anchor_latents(vae, video[:, :, 0], video[:, :, -1], 3)
        np.testing.assert_allclose(v.numpy(), want.numpy(), atol=1e-5)
        np.testing.assert_array_equal(smp["noise"], view["noise"])
        assert smp["meta"]["latents_ggi"]["encoders"] == {"vae": {"tiny_seed": 0}}


def test_training_reads_the_cache_and_refuses_another_vaes(cached, tmp_path):
    cfg = cached[0]
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOOM_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)

    def train(out, *sets):
        cmd = [loom, "train", "ggi", "--recipe", "tiny", "--data", cfg.out, "--out", str(tmp_path / out), "--set",
               "trainer.max_steps=2", "--set", "trainer.progress=false", *sum((["--set", s] for s in sets), [])]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    ok = train("run")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert os.path.isfile(str(tmp_path / "run" / "transformer" / "config.json"))
    other = train("other", "trainer.seed=1")  # the tiny VAE of another seed: other networks than the cache's
    assert other.returncode != 0 and "other encoders" in other.stderr
