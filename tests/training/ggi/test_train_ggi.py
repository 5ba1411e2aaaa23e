"""``loom train ggi`` end to end on tiny random CogVideoX parts: the loader's GGI view of clips and scenes, a real
Lightning run through the CLI (loss falls on a fixed batch, MLflow run, the transformer saved in diffusers' layout
and loadable as a released GGI checkpoint), and resume after a kill gives the uninterrupted losses."""

import functools
import os

import numpy as np
import pytest

from loom.platform import config as cfgmod
from loom.training import ggi as ggi_train
from loom.training.ggi.data import GGIView
from tests.training import runs as runs_mod
from tests.training.corpus_ggi import make_scene_corpus, scene_sample

pytest.importorskip("diffusers")
pytest.importorskip("deepspeed")
mlflow = pytest.importorskip("mlflow")

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("scene") / "scene")
    make_scene_corpus(out, samples=3, frames=9, size=32)
    return out


loom_train = functools.partial(runs_mod.loom_train, "ggi")


def losses(out):
    return runs_mod.runs(out)[0]


def test_the_ggi_view_pads_to_cogvideox_frames_and_compresses_scene_noise():
    s = scene_sample(0, frames=7, size=32)
    s["meta"] = {"kind": "scene"}
    v = GGIView()(s)
    assert v["video"].shape == (9, 32, 32, 3) and v["edges"].shape == (9, 32, 32)
    np.testing.assert_array_equal(v["video"][7], s["rgb"][6])  # padded with the last frame
    assert v["noise"].shape == (3, 4, 4, 4)  # 9 frames -> 3 latent frames
    np.testing.assert_array_equal(v["noise"][1], s["noise"][4])  # one frame per group of 4 (exactly N(0,1))
    assert set(np.unique(v["edges"])) == {0.0, 1.0}
    blank = GGIView(structure="none")(s)
    assert blank["edges"].shape == v["edges"].shape and not blank["edges"].any()  # Tab. 3's no-structure row
    np.testing.assert_array_equal(blank["noise"], v["noise"])
    five = GGIView(frames=5)(s)
    assert five["video"].shape[0] == 5 and five["noise"].shape[0] == 2
    with pytest.raises(ValueError, match="kind 'ttv'"):
        GGIView()({**s, "meta": {"kind": "ttv"}})
    with pytest.raises(ValueError, match="multiples of 16"):
        GGIView()({**s, "rgb": s["rgb"][:, :24]})


def test_recipes_resolve():
    for name in cfgmod.recipes(ggi_train.TrainGGIJob):
        cfgmod.resolve(ggi_train.TrainGGIJob, name)
    with pytest.raises(cfgmod.ConfigError, match="data.frames"):
        cfgmod.resolve(ggi_train.TrainGGIJob, "tiny", [("data.frames", "3")])


@pytest.mark.integration
def test_tiny_run_trains_logs_and_saves_a_loadable_transformer(corpus, tmp_path):
    out = str(tmp_path / "run")
    loom_train(out, corpus, "trainer.max_steps=3")
    (_, hist, run), = losses(out)["run"]
    assert [s for s, _ in hist] == [0, 1, 2] and all(np.isfinite(v) for _, v in hist)
    assert run.data.params["model.objective"] == "v"
    folder = os.path.join(out, "transformer")
    assert os.path.isfile(os.path.join(folder, "config.json"))
    from loom.models import ggi

    tr = ggi.build_transformer(ggi.GGIModelSettings(transformer=folder, vae=ggi.TINY, text_len=8))
    assert tr.config.in_channels == 12  # loads as a released GGI transformer: as it is
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{os.path.join(str(tmp_path), 'mlflow.db')}")
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples", "transformer"} <= arts


@pytest.mark.slow  # 34 s; LoomModule's exact resume stays in the default tier through ttv, shape4d and style
@pytest.mark.integration
def test_resume_after_a_kill_gives_the_losses_of_an_uninterrupted_run(corpus, tmp_path):
    sets = ("trainer.max_steps=4", "trainer.checkpoint_every=2")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    loom_train(full, corpus, *sets)
    p = loom_train(killed, corpus, *sets, env={"LOOM_FAIL_AT_STEP": "3"}, check=False)
    assert p.returncode == 17, p.stderr[-2000:]
    loom_train(killed, corpus, *sets, resume=True)
    res = losses(full)
    (_, want, _), = res["full"]
    (_, got, _), = res["killed"]
    got_last = dict(got)
    assert sorted(got_last) == list(range(4))
    for step, loss in want:
        assert got_last[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, got, want)


@pytest.mark.integration
def test_a_run_with_a_t5_encoder_conditions_on_captions(corpus, tmp_path):
    from tests.models.test_ggi import save_tiny_t5

    t5 = save_tiny_t5(tmp_path / "cog")
    out = str(tmp_path / "text")
    loom_train(out, corpus, "trainer.max_steps=1", f"model.text_encoder={t5}", "model.text_len=8",
               "model.prompt=a city street")
    (_, hist, run), = losses(out)["text"]
    assert len(hist) == 1 and "T5" in run.data.params["context"]


@pytest.mark.integration
def test_gradient_checkpointing_recomputes_the_transformer_blocks(corpus, tmp_path):
    """`trainer.gradient_checkpointing=true` finds CogVideoX's declared blocks (`apply_sharding_intent`) and trains."""
    out = str(tmp_path / "ckpt")
    loom_train(out, corpus, "trainer.max_steps=2", "trainer.gradient_checkpointing=true")
    (_, hist, _), = losses(out)["ckpt"]
    assert [s for s, _ in hist] == [0, 1] and all(np.isfinite(v) for _, v in hist)


@pytest.mark.slow
def test_two_worker_ray_train_run(corpus, tmp_path):
    """Ray Train with two workers (ZeRO-2 over gloo), as `loom train ttv`'s test of the same launcher (75 s here)."""
    out = str(tmp_path / "ray")
    loom_train(out, corpus, "trainer.max_steps=2", "ray.address=local", "ray.workers=2")
    (_, hist, _), = losses(out)["ray"]
    assert [s for s, _ in hist] == [0, 1] and all(np.isfinite(v) for _, v in hist)
    assert os.path.isfile(os.path.join(out, "transformer", "config.json"))
