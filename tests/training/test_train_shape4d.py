"""``loom train vae``, ``loom train shape4d`` and ``loom generate 4d`` for real: Lightning + DeepSpeed ZeRO on CPU
(gloo), MLflow in SQLite, on tiny models over 4D shards made by the fake arm backend and the 4D job's own mesh
processing. The commands run in subprocesses, as a user runs them. (Two processes and Ray Train are the shared
machinery's, tested once with the video DiT in test_train_ttv.py.)"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from loom.platform import config as cfgmod
from loom.training import shape4d
from tests.training.corpus4d import make_4d_corpus

pytest.importorskip("lightning")
pytest.importorskip("deepspeed")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("point_cloud_utils")

LOOM = os.path.join(os.path.dirname(sys.executable), "loom")
FRAMES = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("c4d") / "4d")
    make_4d_corpus(out, samples=2, frames=FRAMES)
    return out


def loom(*args, env=None, check=True):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([LOOM, *args], capture_output=True, text=True, env=e, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"loom {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def loom_train(model, out, data, *sets, env=None, resume=False, check=True):
    args = ["train", model, "--recipe", "tiny", "--data", data, "--out", out, "--set", "trainer.progress=false"]
    for s in sets:
        args += ["--set", s]
    return loom(*args, *(["--resume"] if resume else []), env=env, check=check)


def runs(out, metric="train/loss"):
    """{run name: [(run id, [(step, value)], run)]} of the MLflow database beside ``out``."""
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{os.path.join(os.path.dirname(out), 'mlflow.db')}")
    res = {}
    for r in c.search_runs([c.get_experiment_by_name("loom").experiment_id]):
        hist = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, metric))
        res.setdefault(r.info.run_name, []).append((r.info.run_id, hist, r))
    return res, c


def tiny(job, *sets):
    return cfgmod.resolve(job, "tiny", cfgmod.parse_set(sets))


def first_batch(cfg, batch_size=2):
    import dataclasses

    make = shape4d.make_vae_loader if isinstance(cfg, shape4d.TrainVAEJob) else shape4d.make_shape4d_loader
    return next(iter(make(dataclasses.replace(cfg.data, batch_size=batch_size), 0)))


# ------------------------------------------------------------------------------------------ fast tests


def test_recipes_load_and_paths_become_absolute():
    for job in (shape4d.TrainVAEJob, shape4d.TrainShape4DJob):
        for name in cfgmod.recipes(job):
            cfg = cfgmod.resolve(job, name, [])
            assert cfgmod.from_dict(job, cfgmod.to_dict(cfg)) == cfg  # what load_run reads back from config.yaml
    cfg = tiny(shape4d.TrainShape4DJob, "out=rel/run", "model.vae=rel/vae")
    a = shape4d.absolute_paths(cfg)
    assert os.path.isabs(a.out) and os.path.isabs(a.model.vae) and a.model.base == "tiny"
    v = shape4d.absolute_paths(tiny(shape4d.TrainVAEJob, "data.source=s3://b/x"))
    assert v.data.source == "s3://b/x"
    with pytest.raises(cfgmod.ConfigError, match="queries"):
        tiny(shape4d.TrainVAEJob, "data.queries=random")
    with pytest.raises(cfgmod.ConfigError, match="temporal"):
        tiny(shape4d.TrainShape4DJob, "model.temporal=2d")


def test_truncation_is_checked_against_the_corpus_meta_and_batches(corpus):
    from loom.training.shape4d_module import VAEModule

    assert shape4d.corpus_truncation(corpus) == pytest.approx(0.05)
    cfg = tiny(shape4d.TrainVAEJob, f"data.source={corpus}", "model.tau=0.1")
    with pytest.raises(ValueError, match=r"model.tau=0.1 .* at 0.05"):
        VAEModule(cfg).make_loader()
    sdf = torch.from_numpy(first_batch(cfg)["sdf"])
    shape4d.check_batch_truncation(0.05, sdf, None)
    with pytest.raises(ValueError, match="model.tau=0.1"):  # clipped values pile up at 0.05
        shape4d.check_batch_truncation(0.1, sdf, None)
    with pytest.raises(ValueError, match="up to 0.05|at 0.05"):  # values beyond the model's tau
        shape4d.check_batch_truncation(0.02, sdf, None)
    with pytest.raises(ValueError, match="meta sdf_truncation"):
        shape4d.check_batch_truncation(0.05, sdf, [{"uid": "a", "sdf_truncation": 0.1}])
    assert shape4d.batch_truncation(torch.linspace(-0.04, 0.04, 1000)) is None  # nothing clipped


def test_vae_batches_flatten_frames_subset_points_and_fps_queries(corpus):
    cfg = tiny(shape4d.TrainVAEJob, f"data.source={corpus}", "data.sdf_points=100", "data.surface_points=300",
               "data.frames=3", "data.queries=fps", "data.num_queries=20")
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


def test_ablation_variants_build_and_change_the_step(corpus):
    """Each Table 3 variant by config: the DiT's spatiotemporal layers follow model.*, the noise follows
    flow.shared_noise; every variant equals the base at initialisation (zero-init layers)."""
    from loom.models.flow import sample_generator
    from loom.models.shape4d_flow import training_inputs
    from loom.training.shape4d_module import Shape4DModule

    batch = first_batch(tiny(shape4d.TrainShape4DJob, f"data.source={corpus}"))
    preds = {}
    for name, sets in {"full": [], "1d": ["model.temporal=1d"], "no_image": ["model.st_image_tokens=false"],
                       "indep": ["flow.shared_noise=false"]}.items():
        cfg = tiny(shape4d.TrainShape4DJob, f"data.source={corpus}", *sets)
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


def test_read_video_from_shards_a_video_file_and_a_frame_folder(corpus, tmp_path):
    from PIL import Image

    from loom.datasets.codecs import encode_video
    from loom.training.shape4d_module import read_video

    video, key = read_video(corpus, "arm001")
    assert key == "arm001" and video.shape == (FRAMES, 32, 32, 4) and video.dtype == np.uint8
    ext, data = encode_video(video, "ffv1", name="v")
    (tmp_path / ext).write_bytes(data)
    assert np.array_equal(read_video(str(tmp_path / ext))[0], video)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, f in enumerate(video):
        Image.fromarray(f).save(frames / f"{i:02d}.png")
    assert np.array_equal(read_video(str(frames))[0], video)
    with pytest.raises(KeyError, match="nope"):
        read_video(corpus, "nope")


# ------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def vae_run(corpus, tmp_path_factory):
    """A tiny VAE trained 30 steps with ZeRO-3 (parameters sharded: the save gathers them), sample meshes every 10."""
    out = str(tmp_path_factory.mktemp("vae") / "vae")
    loom_train("vae", out, corpus, "trainer.max_steps=30", "trainer.checkpoint_every=30", "trainer.zero_stage=3",
               "sample.every=10")
    return out


@pytest.mark.integration
def test_tiny_vae_run_loss_falls_and_the_saved_vae_reconstructs_better(corpus, vae_run):
    from loom.models.shape_vae import ShapeVAE, vae_loss

    res, c = runs(vae_run)
    (run_id, hist, r), = res["vae"]
    assert [s for s, _ in hist] == list(range(30))
    first, last = np.mean([v for _, v in hist[:3]]), np.mean([v for _, v in hist[-3:]])
    assert last < 0.5 * first, hist
    assert r.data.params["model.size"] == "tiny" and r.data.params["data.truncation"] == "0.05"
    assert {"samples", "vae", "config.yaml"} <= {a.path for a in c.list_artifacts(run_id)}
    assert sorted(os.listdir(os.path.join(vae_run, "samples"))) == [f"step-00000{s}.obj" for s in (10, 20, 30)]

    cfg = tiny(shape4d.TrainVAEJob, f"data.source={corpus}")
    b = first_batch(cfg)
    surface, queries, points, sdf = (torch.from_numpy(b[k]).flatten(0, 1) for k in ("surface", "queries",
                                                                                     "sdf_points", "sdf"))

    def error(vae):
        with torch.no_grad():
            z, post = vae.encode(surface, queries, sample=False)
            return vae_loss(vae.decode(z, points), sdf, post.kl(), tau=0.05)["sdf"].item()

    trained = ShapeVAE.from_pretrained(os.path.join(vae_run, "vae"))
    assert error(trained) < 0.5 * error(shape4d.build_vae(cfg.model, 0))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from loom.models.shape4d_dit import Shape4DDiT

    path = str(tmp_path_factory.mktemp("base") / "base")
    Shape4DDiT.tiny(seed=3, spatiotemporal=False).save_pretrained(path)
    return path


S4_SETS = ("trainer.max_steps=24", "trainer.checkpoint_every=2", "optim.lr=3e-3", "data.batch_size=2")


@pytest.fixture(scope="module")
def shape4d_run(corpus, vae_run, base_dir):
    out = os.path.join(os.path.dirname(vae_run), "full")
    loom_train("shape4d", out, corpus, *S4_SETS, f"model.base={base_dir}", f"model.vae={vae_run}/vae")
    return out


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
    from loom.models.shape4d_dit import Shape4DDiT
    from loom.training.shape4d_module import Shape4DModule, load_run

    trained, info = load_run(shape4d_run)
    batch = first_batch(trained.cfg)
    before, after = fixed_loss(Shape4DModule(trained.cfg), batch), fixed_loss(trained, batch)
    assert after < 0.6 * before, (before, after)
    # frozen base: its weights at the end of training (digest taken in the training process) are the saved base's
    saved = shape4d.base_digest(Shape4DDiT.from_pretrained(base_dir))
    assert info["base_digest_start"] == info["base_digest_end"] == saved
    assert info["latents_per_frame"] == 32 and info["base"] == base_dir
    st = trained.dit.spatiotemporal_layers
    assert all(layer.proj_out.weight.abs().max() > 0 for layer in st)  # they trained (zero at initialisation)
    res, c = runs(shape4d_run)
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
    res, _ = runs(shape4d_run)
    (_, want, _), = res["full"]
    (_, got, _), = res["killed"]  # one MLflow run, continued
    got_last = dict(got)  # the resumed run logs step 2 again: its value wins
    assert sorted(got_last) == list(range(24))
    for step, loss in want:
        assert got_last[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, got, want)
    a = json.load(open(os.path.join(killed, "spatiotemporal", "loom.json")))
    b = json.load(open(os.path.join(shape4d_run, "spatiotemporal", "loom.json")))
    assert a["base_digest_end"] == b["base_digest_end"]


@pytest.mark.integration
def test_generate_4d_writes_one_mesh_per_frame_and_refuses_a_changed_base(corpus, shape4d_run, base_dir, tmp_path):
    import trimesh

    from loom.models.shape4d_dit import Shape4DDiT
    from loom.training.shape4d_module import load_run

    out = str(tmp_path / "gen")
    p = loom("generate", "4d", "--run", shape4d_run, "--data", corpus, "--key", "arm001", "--out", out,
             "--steps", "3", "--resolution", "20")
    assert f"{FRAMES} frames" in p.stdout
    assert sorted(os.listdir(out)) == [f"frame_{i:03d}.obj" for i in range(FRAMES)]
    for name in os.listdir(out):
        trimesh.load(os.path.join(out, name), force="mesh")  # a readable mesh file (possibly empty)

    # the layers only make sense on the base they were trained on: a changed base folder is refused
    other_base, other_run = str(tmp_path / "base2"), str(tmp_path / "run2")
    dit = Shape4DDiT.from_pretrained(base_dir)
    with torch.no_grad():
        dit.proj_out.bias.add_(0.1)
    dit.save_pretrained(other_base)
    shutil.copytree(os.path.join(shape4d_run, "spatiotemporal"), os.path.join(other_run, "spatiotemporal"))
    cfg = yaml.safe_load(open(os.path.join(shape4d_run, "config.yaml")))
    cfg["model"]["base"] = other_base
    with open(os.path.join(other_run, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with pytest.raises(ValueError, match="not the one"):
        load_run(other_run)


@pytest.mark.integration
def test_eval_4d_from_the_trained_run_generates_registers_and_renders(corpus, shape4d_run, tmp_path):
    """ShapeGen4D Tab. 1 and Tab. 2 from a checkpoint: `loom eval 4d --run` generates each sequence's meshes as
    `loom generate 4d` does, registers them, renders them with Blender from the shards' cameras and logs one run."""
    pytest.importorskip("bpy")
    import mlflow

    out = tmp_path / "eval"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = loom("eval", "4d", "--recipe", "tiny", "--run", shape4d_run, "--gt", corpus, "--out", str(out),
             "--set", "steps=2", "--set", "render.enabled=true", "--set", "render_metrics=[lpips,clip]",
             env={"MLFLOW_TRACKING_URI": uri}, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    for key in ("arm000", "arm001"):
        assert sorted(os.listdir(out / "pred" / key)) == [f"frame_{i:03d}.obj" for i in range(FRAMES)]
    [run] = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("bench/4d").experiment_id])
    m = run.data.metrics
    assert m["items"] + m["failed"] == 2 and run.data.params["checkpoint"].endswith(os.path.basename(shape4d_run))
    if m["items"]:
        assert {"chamfer", "render/lpips", "render/clip", "render/mask_iou"} <= set(m)
        assert 0 <= m["render/mask_iou"] <= 1 and m["render_items"] >= 1
    # run again into the same folder: the meshes generated with the same run and settings are reused
    again = loom("eval", "4d", "--recipe", "tiny", "--run", shape4d_run, "--gt", corpus, "--out", str(out),
                 "--set", "steps=2", "--set", "render.enabled=true", "--set", "render_metrics=[lpips,clip]",
                 env={"MLFLOW_TRACKING_URI": uri})
    assert "reused 2 prediction(s)" in again.stdout
