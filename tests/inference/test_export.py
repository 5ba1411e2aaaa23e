"""``loom export ttv`` as a user runs it (the CLI's ``main``): a run folder as ``loom train ttv`` leaves it
(config.yaml, lora/, checkpoints/ in Lightning's and DeepSpeed's layouts, mlflow_run.json naming a run in a SQLite
store), exported from the final weights and from saved steps; the model card; the LoggedModel in MLflow; the
refusals. The run's checkpoints are written from the real Lightning module's state (its keys), with distinct random
weights per step, so a step that loaded the wrong weights fails. One slow test trains for real (ZeRO-3) and exports a
step."""

import os
import pickle

import numpy as np
import pytest
import torch
import yaml

from loom.cli import main
from loom.inference import export as E
from loom.models.ttv_dit import LORA_WEIGHT_NAME
from loom.platform import config as cfgmod
from loom.platform import tracking
from tests.training.corpus import make_ttv_corpus

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("lightning")
safetensors = pytest.importorskip("safetensors.torch")

STEPS = {"lightning": 2, "deepspeed": 4}


def loom(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.dit.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _trainable_state(module):
    names = {f"dit.{n}" for n, p in module.dit.named_parameters() if p.requires_grad}
    return {k: v.clone() for k, v in module.state_dict().items() if k in names}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A finished tiny run: final weights (seed 1), a Lightning checkpoint of step 2 (seed 2, the whole module's
    state as Lightning saves it), a DeepSpeed ZeRO-2 folder of step 4 (seed 3, trainable weights only, as
    ``exclude_frozen_parameters`` saves them); metrics in MLflow and one evaluation naming the run.
    ``ref/<what>``: ``save_lora`` of each, the expected exports."""
    from loom.training.ttv import TrainTTVJob
    from loom.training.ttv.module import TTVModule

    root = tmp_path_factory.mktemp("export")
    corpus = str(root / "corpus")
    make_ttv_corpus(corpus, samples=1)
    run = str(root / "run")
    cfg = cfgmod.resolve(TrainTTVJob, "tiny", [("out", run), ("data.source", corpus)])
    os.makedirs(os.path.join(run, "checkpoints"))
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(cfgmod.dump_yaml(cfg))
    module = TTVModule(cfg)

    _randomize(module, 1)
    module.dit.save_lora(os.path.join(run, "lora"))
    module.dit.save_lora(str(root / "ref" / "final"))

    _randomize(module, 2)
    torch.save({"state_dict": module.state_dict(), "global_step": STEPS["lightning"], "epoch": 0,
                "loom": {"rng": {"numpy": np.random.get_state()}}},
               os.path.join(run, "checkpoints", f"step-{STEPS['lightning']:07d}.ckpt"))
    module.dit.save_lora(str(root / "ref" / "lightning"))

    _randomize(module, 3)
    ds = os.path.join(run, "checkpoints", f"step-{STEPS['deepspeed']:07d}.ckpt")
    os.makedirs(os.path.join(ds, "checkpoint"))
    with open(os.path.join(ds, "latest"), "w") as f:
        f.write("checkpoint")
    torch.save({"module": _trainable_state(module), "ds_config": {"zero_optimization": {"stage": 2}},
                "global_step": STEPS["deepspeed"]}, os.path.join(ds, "checkpoint", "mp_rank_00_model_states.pt"))
    module.dit.save_lora(str(root / "ref" / "deepspeed"))

    uri = tracking.sqlite_uri(root / "mlflow.db")
    exp_id = tracking.ensure_experiment(uri, "loom")
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(exp_id, run_name="run").info.run_id
    for step in range(9):
        client.log_metric(run_id, "train/loss", float(step), step=step)
    client.set_terminated(run_id)
    tracking.write_run_record(run, uri, "loom", exp_id, run_id)
    bench = tracking.ensure_experiment(uri, "bench/ttv")
    ev = client.create_run(bench, run_name="mine", tags={"loom.training_run_id": run_id, "loom.benchmark": "ttv",
                                                         "loom.model": "mine"})
    client.log_metric(ev.info.run_id, "psnr", 23.5)
    return {"run": run, "root": root, "uri": uri, "run_id": run_id, "exp_id": exp_id, "corpus": corpus}


def _same_lora(a, b):
    x = safetensors.load_file(os.path.join(a, LORA_WEIGHT_NAME))
    y = safetensors.load_file(os.path.join(b, LORA_WEIGHT_NAME))
    fx = safetensors.load_file(os.path.join(a, "fusion", "model.safetensors"))
    fy = safetensors.load_file(os.path.join(b, "fusion", "model.safetensors"))
    return (set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
            and all(torch.equal(fx[k], fy[k]) for k in fx))


def _card(out):
    text = open(os.path.join(out, "README.md")).read()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_final_weights_export_with_a_model_card_and_a_logged_model(tracked_run, tmp_path, capsys):
    out = tmp_path / "final"
    rc, stdout, err = loom(capsys, "export", "ttv", "--run", tracked_run["run"], "--out", out)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["README.md", "fusion", LORA_WEIGHT_NAME]
    assert _same_lora(out, tracked_run["root"] / "ref" / "final")
    assert not _same_lora(out, tracked_run["root"] / "ref" / "deepspeed")
    front, body = _card(out)
    assert front["library_name"] == "diffusers" and "lora" in front["tags"] and "base_model" not in front  # tiny
    assert "| train/loss | 8 | 8 |" in body  # the last value, from MLflow
    assert "`ttv`" in body and "psnr 23.5" in body  # the evaluation naming this training run
    assert f"Shards: `{tracked_run['corpus']}`" in body and "1 samples in 1 shards" in body
    assert "lora_rank: 4" in body and "transformer: tiny" in body  # the resolved config
    assert "logged model m-" in stdout

    client = mlflow.MlflowClient(tracking_uri=tracked_run["uri"])
    (model,) = [m for m in client.search_logged_models([tracked_run["exp_id"]])
                if m.tags.get("loom.export.out") == str(out)]
    assert model.source_run_id == tracked_run["run_id"] and str(model.status) in ("READY", "LoggedModelStatus.READY")
    assert model.tags["loom.export.step"] == "final" and model.model_type == E.MODEL_TYPE
    assert {f.path for f in client.list_logged_model_artifacts(model.model_id)} == {"README.md", "fusion",
                                                                                    LORA_WEIGHT_NAME}
    outputs = client.get_run(tracked_run["run_id"]).outputs.model_outputs
    assert (model.model_id, 8) in {(o.model_id, o.step) for o in outputs}
    assert {(m.key, m.value) for m in model.metrics} == {("train/loss", 8.0)}


@pytest.mark.parametrize("layout", ["lightning", "deepspeed"])
def test_a_saved_step_exports_its_own_weights_and_metrics(tracked_run, tmp_path, capsys, layout):
    step = STEPS[layout]
    out = tmp_path / layout
    rc, _, err = loom(capsys, "export", "ttv", "--run", tracked_run["run"], "--out", out, "--step", step)
    assert rc == 0, err
    assert _same_lora(out, tracked_run["root"] / "ref" / layout)
    assert not _same_lora(out, tracked_run["root"] / "ref" / "final")
    _, body = _card(out)
    assert f"| train/loss | {step} | {step} |" in body and f"step {step}" in body
    assert "they evaluated its final weights" in body
    client = mlflow.MlflowClient(tracking_uri=tracked_run["uri"])
    (model,) = [m for m in client.search_logged_models([tracked_run["exp_id"]])
                if m.tags.get("loom.export.out") == str(out)]
    assert model.name == f"ttv-lora-step-{step}" and {(m.key, m.value) for m in model.metrics} == {
        ("train/loss", float(step))}


def test_refusals_name_the_problem_and_the_way_out(tracked_run, tmp_path, capsys):
    import shutil

    run = tracked_run["run"]
    rc, _, err = loom(capsys, "export", "ttv", "--run", tmp_path / "nope", "--out", tmp_path / "o")
    assert rc == 2 and "does not exist" in err
    rc, _, err = loom(capsys, "export", "ttv", "--run", run, "--out", tmp_path / "o", "--step", 3)
    assert rc == 2 and "no checkpoint of step 3; saved steps: 2, 4" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    rc, _, err = loom(capsys, "export", "ttv", "--run", run, "--out", taken, "--no-mlflow")
    assert rc == 2 and "--overwrite" in err and (taken / "keep.txt").exists()
    rc, _, err = loom(capsys, "export", "ttv", "--run", run, "--out", taken, "--no-mlflow", "--overwrite")
    assert rc == 0 and sorted(os.listdir(taken)) == ["README.md", "fusion", LORA_WEIGHT_NAME]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no part or old folder left behind
    rc, _, err = loom(capsys, "export", "ttv", "--run", run, "--out", os.path.join(run, "lora"), "--overwrite")
    assert rc == 2 and "would overwrite the run" in err
    moved = tmp_path / "moved"  # a run folder whose MLflow run is not in the store it names
    shutil.copytree(run, moved)
    tracking.write_run_record(str(moved), tracked_run["uri"], "loom", tracked_run["exp_id"], "0" * 32)
    rc, _, err = loom(capsys, "export", "ttv", "--run", moved, "--out", tmp_path / "o2")
    assert rc == 2 and "is not in the tracking store" in err and "--uri" in err and "--no-mlflow" in err
    assert not (tmp_path / "o2").exists()


def test_an_unfinished_untracked_run_and_unsafe_or_foreign_checkpoints(tracked_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "unfinished"
    shutil.copytree(tracked_run["run"], run, ignore=shutil.ignore_patterns("lora", "mlflow_run.json"))
    rc, _, err = loom(capsys, "export", "ttv", "--run", run, "--out", tmp_path / "o")
    assert rc == 2 and "has not finished" in err and "--step N (saved steps: 2, 4)" in err
    rc, stdout, err = loom(capsys, "export", "ttv", "--run", run, "--out", tmp_path / "o", "--step", 4)
    assert rc == 0 and "not logged" in stdout
    assert "tracking.enabled=false" in _card(tmp_path / "o")[1]

    ckpt = run / "checkpoints" / "step-0000006.ckpt"

    class Payload:  # anything a checkpoint may not hold: unpickling it would be code from the run folder
        def __reduce__(self):
            return (print, ("ran code",))

    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": {}, "evil": Payload()}, f)
    rc, _, err = loom(capsys, "export", "ttv", "--run", run, "--out", tmp_path / "o6", "--step", 6)
    assert rc == 2 and "not loaded (unpickling it could run code)" in err

    from loom.platform.checkpoints import safe_load

    state = safe_load(str(run / "checkpoints" / "step-0000002.ckpt"))
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if "fusion" not in k}
    torch.save(state, ckpt)
    rc, _, err = loom(capsys, "export", "ttv", "--run", run, "--out", tmp_path / "o6", "--step", 6)
    assert rc == 2 and "lacks" in err and "fusion" in err and not (tmp_path / "o6").exists()


def test_the_card_names_a_hugging_face_base_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = {"model": {"transformer": "alibaba-pai/Wan2.1-Fun-V1.1-1.3B-Control", "vae": "/local/vae", "lora_rank": 128,
                     "lora_alpha": 0.0}, "data": {"source": str(tmp_path / "missing")}}
    card = E.model_card(raw, "model: {}\n", run=str(tmp_path / "r"), step=None, source="r/lora", files=["README.md"],
                        info=None, note=None)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "alibaba-pai/Wan2.1-Fun-V1.1-1.3B-Control"
    assert front["base_model_relation"] == "adapter"
    assert "LoRA (rank 128, alpha 128)" in card and "Manifest: not readable" in card and "- vae: `/local/vae`" in card


@pytest.mark.slow
def test_a_real_zero3_run_exports_a_step_equal_to_its_final_weights(tmp_path):
    """`loom train ttv` for real (DeepSpeed ZeRO-3: partitioned weights, gathered on export); its last step's
    checkpoint exports to exactly what training wrote as its final LoRA."""
    import subprocess
    import sys

    corpus = str(tmp_path / "corpus")
    make_ttv_corpus(corpus, samples=2)
    run = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOOM_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    loom_bin = os.path.join(os.path.dirname(sys.executable), "loom")
    p = subprocess.run([loom_bin, "train", "ttv", "--recipe", "tiny", "--data", corpus, "--out", run, "--set",
                        "trainer.max_steps=2", "--set", "trainer.checkpoint_every=1", "--set", "trainer.zero_stage=3",
                        "--set", "trainer.progress=false"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    done = E.export_ttv(run, str(tmp_path / "out"), step=2)
    assert done.model_id and _same_lora(tmp_path / "out", os.path.join(run, "lora"))
