"""``loom train shape4d`` for real: Lightning + DeepSpeed ZeRO on CPU (gloo), MLflow in SQLite, tiny models over 4D
shards made by the fake arm backend and the 4D job's own mesh processing, on a VAE trained by ``loom train vae``.
The commands run in subprocesses, as a user runs them. (Two processes and Ray Train are the shared machinery's,
tested once with the video DiT; sampling a finished run is tests/inference/test_shape4d.py.)"""

import json
import os

import numpy as np
import pytest
import torch

from loom.platform import config as cfgmod
from loom.training import shape4d
from loom.training.shape4d.data import make_shape4d_loader
from tests.training.corpus4d import (FRAMES, S4_SETS, base_folder, loom_train, mlflow_runs, shared_corpus,
                                     trained_shape4d, trained_vae)

pytest.importorskip("lightning")
pytest.importorskip("deepspeed")
pytest.importorskip("mlflow")
pytest.importorskip("point_cloud_utils")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return shared_corpus(tmp_path_factory)


def tiny(*sets):
    return cfgmod.resolve(shape4d.TrainShape4DJob, "tiny", cfgmod.parse_set(sets))


def first_batch(cfg, batch_size=2):
    import dataclasses

    return next(iter(make_shape4d_loader(dataclasses.replace(cfg.data, batch_size=batch_size), 0)))


# ------------------------------------------------------------------------------------------ fast tests


def test_recipes_load_and_paths_become_absolute():
    for name in cfgmod.recipes(shape4d.TrainShape4DJob):
        cfg = cfgmod.resolve(shape4d.TrainShape4DJob, name, [])
        assert cfgmod.from_dict(shape4d.TrainShape4DJob, cfgmod.to_dict(cfg)) == cfg  # config.yaml reads back
    a = shape4d.absolute_paths(tiny("out=rel/run", "model.vae=./rel/vae"))
    assert os.path.isabs(a.out) and os.path.isabs(a.model.vae) and a.model.base == "tiny"
    # a model name that is no local path but a Hugging Face repo id stays one (found in the local cache later)
    assert shape4d.absolute_paths(tiny("model.vae=stepfun-ai/Step1X-3D")).model.vae == "stepfun-ai/Step1X-3D"
    assert shape4d.absolute_paths(tiny("data.source=s3://b/x")).data.source == "s3://b/x"
    with pytest.raises(cfgmod.ConfigError, match="temporal"):
        tiny("model.temporal=2d")
    with pytest.raises(TypeError, match="TrainShape4DJob"):
        shape4d.train(object())


def test_ablation_variants_build_and_change_the_step(corpus):
    """Each Table 3 variant by config: the DiT's spatiotemporal layers follow model.*, the noise follows
    flow.shared_noise; every variant equals the base at initialisation (zero-init layers)."""
    from loom.models.flow import sample_generator
    from loom.models.shape4d_flow import training_inputs
    from loom.training.shape4d.module import Shape4DModule

    batch = first_batch(tiny(f"data.source={corpus}"))
    preds = {}
    for name, sets in {"full": [], "1d": ["model.temporal=1d"], "no_image": ["model.st_image_tokens=false"],
                       "indep": ["flow.shared_noise=false"]}.items():
        cfg = tiny(f"data.source={corpus}", *sets)
        m = Shape4DModule(cfg)
        assert m.dit.config.temporal == cfg.model.temporal
        assert m.dit.config.st_image_tokens == cfg.model.st_image_tokens
        assert {n.split(".")[0] for n, p in m.dit.named_parameters() if p.requires_grad} == {"spatiotemporal_layers"}
        x0, image = m.condition(batch)
        assert x0.shape == (2, FRAMES, 32, 8) and image.shape[:2] == (2, FRAMES)
        g = [sample_generator(0, 0, k) for k in batch["__key__"]]
        x_t, t, target, _ = training_inputs(x0, g, m.flow, shared=cfg.flow.shared_noise)
        noise = target + x0
        assert torch.allclose(noise[:, 0], noise[:, 1]) == cfg.flow.shared_noise
        preds[name] = m.dit(x_t, t, image)
    assert torch.allclose(preds["full"], preds["1d"]) and torch.allclose(preds["full"], preds["no_image"])


# ------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def vae_run(corpus, tmp_path_factory):
    return trained_vae(tmp_path_factory, corpus)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return base_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def shape4d_run(corpus, vae_run, base_dir, tmp_path_factory):
    return trained_shape4d(tmp_path_factory, corpus, vae_run, base_dir)


def fixed_loss(module, batch, seeds=range(8)):
    """The flow-matching loss on fixed draws (not the training draws), for before/after comparisons."""
    from loom.models.flow import sample_generator
    from loom.models.shape4d_flow import training_inputs

    losses = []
    with torch.no_grad():
        x0, image = module.condition(batch)
        for s in seeds:
            g = [sample_generator(1000 + s, 0, k) for k in batch["__key__"]]
            x_t, t, target, _ = training_inputs(x0, g, module.flow, shared=True)
            losses.append(module.flow.loss(module.dit(x_t, t, image), target).item())
    return float(np.mean(losses))


@pytest.mark.integration
def test_tiny_4d_run_loss_falls_and_only_the_spatiotemporal_layers_change(shape4d_run, base_dir):
    from loom.inference.shape4d import load_run
    from loom.models.shape4d import base_digest, load_spatiotemporal
    from loom.models.shape4d_dit import Shape4DDiT
    from loom.training.shape4d.module import Shape4DModule

    cfg = cfgmod.load_yaml(shape4d.TrainShape4DJob, os.path.join(shape4d_run, "config.yaml"))
    trained = Shape4DModule(cfg)
    info = load_spatiotemporal(trained.dit, os.path.join(shape4d_run, "spatiotemporal"))
    trained.dit.eval()
    batch = first_batch(cfg)
    before, after = fixed_loss(Shape4DModule(cfg), batch), fixed_loss(trained, batch)
    assert after < 0.6 * before, (before, after)
    # frozen base: its weights at the end of training (digest taken in the training process) are the saved base's
    saved = base_digest(Shape4DDiT.from_pretrained(base_dir))
    assert info["base_digest_start"] == info["base_digest_end"] == saved
    assert info["latents_per_frame"] == 32 and info["base"] == base_dir
    st = trained.dit.spatiotemporal_layers
    assert all(layer.proj_out.weight.abs().max() > 0 for layer in st)  # they trained (zero at initialisation)
    # `loom generate 4d` (no Lightning) loads the very same layers
    run, info_gen = load_run(shape4d_run)
    assert info_gen == info
    mine, theirs = trained.dit.spatiotemporal_state_dict(), run.dit.spatiotemporal_state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    res, c = mlflow_runs(shape4d_run)
    (run_id, hist, r), = res["full"]
    assert [s for s, _ in hist] == list(range(24))
    assert r.data.metrics["lr/spatiotemporal"] == pytest.approx(3e-3)
    arts = {a.path for a in c.list_artifacts(run_id)}
    assert {"samples", "spatiotemporal", "config.yaml"} <= arts
    assert len(os.listdir(os.path.join(shape4d_run, "samples", "step-0000024"))) == FRAMES


@pytest.mark.integration
def test_shape4d_resume_after_a_kill_gives_the_losses_of_an_uninterrupted_run(corpus, vae_run, base_dir,
                                                                             shape4d_run):
    killed = os.path.join(os.path.dirname(shape4d_run), "killed")
    sets = (*S4_SETS, f"model.base={base_dir}", f"model.vae={vae_run}/vae")
    p = loom_train("shape4d", killed, corpus, *sets, env={"LOOM_FAIL_AT_STEP": "3"}, check=False)
    assert p.returncode == 17, p.stderr[-2000:]
    loom_train("shape4d", killed, corpus, *sets, resume=True)
    res, _ = mlflow_runs(shape4d_run)
    (_, want, _), = res["full"]
    (_, got, _), = res["killed"]  # one MLflow run, continued
    got_last = dict(got)  # the resumed run logs step 2 again: its value wins
    assert sorted(got_last) == list(range(24))
    for step, loss in want:
        assert got_last[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, got, want)
    a = json.load(open(os.path.join(killed, "spatiotemporal", "loom.json")))
    b = json.load(open(os.path.join(shape4d_run, "spatiotemporal", "loom.json")))
    assert a["base_digest_end"] == b["base_digest_end"]
