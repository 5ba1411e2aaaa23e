"""``loom train vae`` for real: Lightning + DeepSpeed ZeRO-3 on CPU (gloo), MLflow in SQLite, a tiny VAE over 4D
shards made by the fake arm backend and the 4D job's own mesh processing; the command runs in a subprocess, as a
user runs it. (Two processes and Ray Train are the shared machinery's, tested once with the video DiT.)"""

import os

import numpy as np
import pytest
import torch

from loom.platform import config as cfgmod
from loom.training import vae as vae_line
from loom.training.vae import data as vae_data
from tests.training.corpus4d import mlflow_runs, shared_corpus, trained_vae

pytest.importorskip("lightning")
pytest.importorskip("deepspeed")
pytest.importorskip("mlflow")
pytest.importorskip("point_cloud_utils")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return shared_corpus(tmp_path_factory)


def tiny(*sets):
    return cfgmod.resolve(vae_line.TrainVAEJob, "tiny", cfgmod.parse_set(sets))


def first_batch(cfg, batch_size=2):
    import dataclasses

    return next(iter(vae_data.make_vae_loader(dataclasses.replace(cfg.data, batch_size=batch_size), 0)))


# ------------------------------------------------------------------------------------------ fast tests


def test_recipes_load_and_paths_become_absolute():
    for name in cfgmod.recipes(vae_line.TrainVAEJob):
        cfg = cfgmod.resolve(vae_line.TrainVAEJob, name, [])
        assert cfgmod.from_dict(vae_line.TrainVAEJob, cfgmod.to_dict(cfg)) == cfg  # config.yaml reads back
    a = vae_line.absolute_paths(tiny("out=rel/run", "model.init=./rel/vae"))
    assert os.path.isabs(a.out) and os.path.isabs(a.model.init) and os.path.isabs(a.data.source)
    v = vae_line.absolute_paths(tiny("data.source=s3://b/x"))
    assert v.data.source == "s3://b/x" and v.model.init == ""
    with pytest.raises(cfgmod.ConfigError, match="queries"):
        tiny("data.queries=random")
    with pytest.raises(TypeError, match="TrainVAEJob"):
        vae_line.train(object())


def test_truncation_is_checked_against_the_corpus_meta_and_batches(corpus):
    from loom.training.vae.module import VAEModule

    assert vae_data.corpus_truncation(corpus) == pytest.approx(0.05)
    cfg = tiny(f"data.source={corpus}", "model.tau=0.1")
    with pytest.raises(ValueError, match=r"model.tau=0.1 .* at 0.05"):  # shards truncated tighter than tau
        VAEModule(cfg).make_loader()
    VAEModule(tiny(f"data.source={corpus}", "model.tau=0.05")).make_loader()
    VAEModule(tiny(f"data.source={corpus}")).make_loader()  # tau 0.01 <= 0.05: the step clips the targets
    sdf = torch.from_numpy(first_batch(cfg)["sdf"])
    vae_data.check_batch_truncation(0.05, sdf, None)
    vae_data.check_batch_truncation(0.02, sdf, None)  # values beyond the model's tau are clipped to it
    with pytest.raises(ValueError, match="model.tau=0.1"):  # clipped values pile up at 0.05
        vae_data.check_batch_truncation(0.1, sdf, None)
    with pytest.raises(ValueError, match="meta sdf_truncation"):
        vae_data.check_batch_truncation(0.05, sdf, [{"uid": "a", "sdf_truncation": 0.02}])
    vae_data.check_batch_truncation(0.01, sdf, [{"uid": "a", "sdf_truncation": 0.05}])
    assert vae_data.batch_truncation(torch.linspace(-0.04, 0.04, 1000)) is None  # nothing clipped


def test_vae_batches_flatten_frames_subset_points_and_fps_queries(corpus):
    cfg = tiny(f"data.source={corpus}", "data.sdf_points=100", "data.surface_points=300", "data.frames=3",
               "data.queries=fps", "data.num_queries=20")
    b = first_batch(cfg)
    assert all(isinstance(b[k], np.ndarray) for k in ("surface", "queries", "sdf_points", "sdf"))  # not bf16-cast
    assert b["surface"].shape == (2, 3, 300, 6) and b["sdf"].shape == (2, 3, 100)
    assert b["sdf_points"].shape == (2, 3, 100, 3) and b["queries"].shape == (2, 3, 20, 3)
    for i in range(2):
        for t in range(3):  # FPS picks points of the (subset) surface the encoder sees
            d = np.linalg.norm(b["queries"][i, t][:, None] - b["surface"][i, t, :, :3][None], axis=-1)
            assert d.min(1).max() < 1e-6
    again = first_batch(cfg)
    assert np.array_equal(again["surface"], b["surface"]) and np.array_equal(again["sdf"], b["sdf"])


# ------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def vae_run(corpus, tmp_path_factory):
    return trained_vae(tmp_path_factory, corpus)


@pytest.mark.integration
def test_tiny_vae_run_loss_falls_and_the_saved_vae_reconstructs_better(corpus, vae_run):
    from loom.models.shape_vae import ShapeVAE, vae_loss
    from loom.training.vae.module import build_vae

    res, c = mlflow_runs(vae_run)
    (run_id, hist, r), = res["vae"]
    assert [s for s, _ in hist] == list(range(30))
    first, last = np.mean([v for _, v in hist[:3]]), np.mean([v for _, v in hist[-3:]])
    assert last < 0.5 * first, hist
    assert r.data.params["model.size"] == "tiny" and r.data.params["data.truncation"] == "0.05"
    assert r.data.params["model.tau"] == "0.01"  # the paper's tau, the targets clipped from the corpus' 0.05
    assert {"samples", "vae", "config.yaml"} <= {a.path for a in c.list_artifacts(run_id)}
    assert sorted(os.listdir(os.path.join(vae_run, "samples"))) == [f"step-00000{s}.obj" for s in (10, 20, 30)]

    cfg = tiny(f"data.source={corpus}")
    b = first_batch(cfg)
    surface, queries, points, sdf = (torch.from_numpy(b[k]).flatten(0, 1) for k in ("surface", "queries",
                                                                                     "sdf_points", "sdf"))

    def error(vae):
        with torch.no_grad():
            z, post = vae.encode(surface, queries, sample=False)
            tau = vae.config.tau
            return vae_loss(vae.decode(z, points), sdf.clamp(-tau, tau), post.kl(), tau=tau)["sdf"].item()

    trained = ShapeVAE.from_pretrained(os.path.join(vae_run, "vae"))
    assert error(trained) < 0.5 * error(build_vae(cfg.model, 0))
