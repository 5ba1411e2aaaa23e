"""``loom generate 4d`` (and ``loom eval 4d --run``, which generates the same way) from ``loom train shape4d`` runs:
a run folder is loaded without Lightning, from its config.yaml and safetensors only. The trained runs are the
4D training tests' (tests/training/corpus4d.py, made once per session)."""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml

from tests.training.corpus4d import (FRAMES, base_folder, loom, shared_corpus, trained_shape4d, trained_vae)

pytest.importorskip("point_cloud_utils")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return shared_corpus(tmp_path_factory)


# ------------------------------------------------------------------------------------------ fast tests


def test_read_conditioning_video_from_shards_a_video_file_and_a_frame_folder(corpus, tmp_path):
    from PIL import Image

    from loom.datasets.codecs import encode_video
    from loom.inference.shape4d import read_conditioning_video

    video, key = read_conditioning_video(corpus, "arm001")
    assert key == "arm001" and video.shape == (FRAMES, 32, 32, 4) and video.dtype == np.uint8
    ext, data = encode_video(video, "ffv1", name="v")
    (tmp_path / ext).write_bytes(data)
    assert np.array_equal(read_conditioning_video(str(tmp_path / ext))[0], video)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, f in enumerate(video):
        Image.fromarray(f).save(frames / f"{i:02d}.png")
    assert np.array_equal(read_conditioning_video(str(frames))[0], video)
    with pytest.raises(KeyError, match="nope"):
        read_conditioning_video(corpus, "nope")
    with pytest.raises(ValueError, match="neither 4D shards"):
        read_conditioning_video(str(tmp_path / "missing"))


def tiny_run(path: str, **sets) -> dict:
    """A run folder as `loom train shape4d --recipe tiny` leaves it, without training: config.yaml and random
    (non-zero) spatiotemporal layers on the tiny base. Returns the saved layers."""
    from loom.models.shape4d import base_digest, build_base_dit, save_spatiotemporal
    from loom.platform import config as cfgmod
    from loom.training.shape4d import TrainShape4DJob

    cfg = cfgmod.resolve(TrainShape4DJob, "tiny", list(sets.items()))
    os.makedirs(path)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write(cfgmod.dump_yaml(cfg))
    dit = build_base_dit(cfg.model, cfg.trainer.seed)
    with torch.no_grad():
        for p in dit.spatiotemporal_layers.parameters():
            p.normal_(0, 0.02)
    digest = base_digest(dit)
    save_spatiotemporal(dit, os.path.join(path, "spatiotemporal"), {
        "base": "tiny", "digest_dtype": "float32", "base_digest_start": digest, "base_digest_end": digest,
        "latents_per_frame": 32, "step": 0})
    return {k: v.clone() for k, v in dit.spatiotemporal_state_dict().items()}


def test_a_run_loads_and_generates_without_lightning_or_training_code(corpus, tmp_path):
    """The layers come back bit for bit, one mesh per frame is written, and neither Lightning nor loom.training is
    imported: inference reads a run folder through loom.models.shape4d alone."""
    run, out = str(tmp_path / "run"), str(tmp_path / "gen")
    saved = tiny_run(run)
    torch.save(saved, str(tmp_path / "saved.pt"))
    script = textwrap.dedent(f"""
        import sys, torch
        from loom.inference.shape4d import generate_4d, load_run
        model, info = load_run({run!r})
        saved = torch.load({str(tmp_path / "saved.pt")!r}, weights_only=True)
        got = model.dit.spatiotemporal_state_dict()
        assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
        assert info["latents_per_frame"] == 32 and not model.dit.training
        paths = generate_4d({run!r}, {corpus!r}, {out!r}, key="arm000", steps=1, resolution=12)
        assert len(paths) == {FRAMES}, paths
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "deepspeed")
                       or m.startswith("loom.training"))
        assert not heavy, heavy
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.listdir(out)) == [f"frame_{i:03d}.obj" for i in range(FRAMES)]


def test_load_run_refuses_a_missing_run_and_other_layers(tmp_path):
    from loom.inference.shape4d import load_run

    with pytest.raises(FileNotFoundError, match="finished `loom train shape4d` run"):
        load_run(str(tmp_path / "nothing"))
    run = str(tmp_path / "run")
    tiny_run(run)
    cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    cfg["model"]["temporal"] = "1d"  # the saved layers are of the full variant
    with open(os.path.join(run, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with pytest.raises(ValueError, match="another model"):
        load_run(run)
    cfg["model"]["temporal"], cfg["model"]["colour"] = "full", "red"
    with open(os.path.join(run, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with pytest.raises(ValueError, match=r"model\.colour"):
        load_run(run)


# ------------------------------------------------------------------------------------------ trained runs


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return base_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def shape4d_run(corpus, base_dir, tmp_path_factory):
    pytest.importorskip("lightning")
    pytest.importorskip("deepspeed")
    pytest.importorskip("mlflow")
    return trained_shape4d(tmp_path_factory, corpus, trained_vae(tmp_path_factory, corpus), base_dir)


@pytest.mark.integration
def test_generate_4d_writes_one_mesh_per_frame_and_refuses_a_changed_base(corpus, shape4d_run, base_dir, tmp_path):
    import trimesh

    from loom.inference.shape4d import load_run
    from loom.models.shape4d_dit import Shape4DDiT

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


def test_baselines_drop_the_spatiotemporal_layers_and_choose_the_noise(tmp_path, monkeypatch):
    """Tab. 1's baselines from a run's base: on a video whose frames are all the same, the base with one shared
    noise gives every frame the same latents, with independent noise it does not, and the trained layers change
    the result."""
    from PIL import Image

    from loom.inference import shape4d

    run = str(tmp_path / "run")
    tiny_run(run)
    frames = tmp_path / "frames"
    frames.mkdir()
    img = np.zeros((32, 32, 4), np.uint8)
    img[8:24, 10:22] = (200, 120, 40, 255)
    for i in range(FRAMES):
        Image.fromarray(img).save(frames / f"{i:02d}.png")
    got = {}

    def keep(self, latents, out_dir, resolution=None):
        got[os.path.basename(out_dir)] = latents.clone()
        return []

    monkeypatch.setattr(shape4d.Shape4DRun, "meshes", keep)
    for name in ("full", "step1x3d", "step1x3d-shared"):
        shape4d.generate_4d(run, str(frames), str(tmp_path / name), steps=2, frames=FRAMES,
                            baseline=None if name == "full" else name)
    shared, own, full = got["step1x3d-shared"], got["step1x3d"], got["full"]
    assert torch.allclose(shared[0], shared[-1], atol=1e-5)
    assert not torch.allclose(own[0], own[-1], atol=1e-3)
    assert not torch.allclose(full, shared, atol=1e-4)
    with pytest.raises(ValueError, match="baseline"):
        shape4d.generate_4d(run, str(frames), str(tmp_path / "x"), steps=1, baseline="nope")
