"""``loom train ... --resume`` continues with the run's own config (``<out>/config.yaml``): a change is refused by
name unless the field may change on resume (``loom.training.launch.RESUMABLE``), and MLflow params never
disagree with the config (the fields that may change are tags, updated on resume)."""

import os
import subprocess
import sys
import types

import pytest
import yaml

from loom import cli
from loom.platform import config as cfgmod
from loom.training import commands, launch, ttv


def run_folder(tmp_path, *sets):
    """A run folder as ``loom train ttv`` leaves it, config.yaml only (absolute paths, as train() writes them);
    ``optim.lr`` differs from the tiny recipe so that the run's own config is told apart from the recipe's."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    cfg = cfgmod.resolve(ttv.TrainTTVJob, "tiny", [("out", out), ("data.source", str(tmp_path / "data")),
                                                   ("optim.lr", 0.0005), *cfgmod.parse_set(sets)])
    cfg = ttv.absolute_paths(cfg)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(cfgmod.dump_yaml(cfg))
    return out, cfg


def printed(capsys) -> ttv.TrainTTVJob:
    return cfgmod.from_dict(ttv.TrainTTVJob, yaml.safe_load(capsys.readouterr().out))


def test_resume_starts_from_the_runs_own_config(tmp_path, capsys):
    out, saved = run_folder(tmp_path)
    assert cli.main(["train", "ttv", "--out", out, "--resume", "--print-config"]) == 0
    assert printed(capsys) == saved  # not the default recipe: optim.lr, model and data as the run had them


def test_fields_that_may_change_on_resume_do(tmp_path, capsys):
    out, saved = run_folder(tmp_path)
    assert cli.main(["train", "ttv", "--out", out, "--resume", "--set", "trainer.max_steps=77",
                     "--set", "trainer.checkpoint_every=5", "--print-config"]) == 0
    got = printed(capsys)
    assert got.trainer.max_steps == 77 and got.trainer.checkpoint_every == 5 and got.optim.lr == 0.0005
    assert {k for k, _, _ in cfgmod.diff(saved, got)} == {"trainer.max_steps", "trainer.checkpoint_every"}


@pytest.mark.parametrize("item,old,new", [
    ("model.lora_rank=8", "4", "8"),
    ("optim.lr=0.003", "0.0005", "0.003"),
    ("trainer.devices=2", "1", "2"),  # the world size: ZeRO checkpoints are partitioned per rank
])
def test_a_change_to_any_other_field_is_refused_by_name(item, old, new, tmp_path, capsys):
    out, _ = run_folder(tmp_path)
    assert cli.main(["train", "ttv", "--out", out, "--resume", "--set", item, "--print-config"]) == 2
    err = capsys.readouterr().err
    field = item.split("=")[0]
    assert f"{field}: {old} -> {new}" in err and "config.yaml" in err and "trainer.max_steps" in err


def test_a_recipe_given_with_resume_must_match_the_run(tmp_path, capsys, monkeypatch):
    out, saved = run_folder(tmp_path)
    # The tiny recipe's optim.lr is not the run's: refused, naming it
    assert cli.main(["train", "ttv", "--recipe", "tiny", "--out", out, "--resume", "--print-config"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    # The same recipe and settings, paths given relative (train() wrote them absolute): accepted
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "ttv", "--recipe", "tiny", "--out", "run", "--data", "data", "--set", "optim.lr=0.0005",
                     "--resume", "--print-config"]) == 0
    assert cfgmod.diff(saved, printed(capsys)) == [("out", saved.out, "run"), ("data.source", saved.data.source,
                                                                               "data")]


def test_a_run_config_with_a_renamed_key_says_so(tmp_path, capsys):
    out, _ = run_folder(tmp_path)
    path = os.path.join(out, "config.yaml")
    with open(path, "a") as f:
        f.write("launch:\n  num_workers: 2\n")
    assert cli.main(["train", "ttv", "--out", out, "--resume", "--print-config"]) == 2
    assert "'launch.num_workers' was renamed 'ray.workers'" in capsys.readouterr().err


@pytest.mark.parametrize("name,ok", [("trainer.max_steps", True), ("ray.address", True), ("out", True),
                                     ("trainer.devices", False), ("ray.workers", False), ("model.lora_rank", False),
                                     ("trainer.max_steps_extra", False)])
def test_resumable_fields(name, ok):
    assert launch.resumable(name) is ok


def test_every_resumable_field_exists_in_every_training_job():
    for _, job_cls in commands.jobs().values():
        names = set(cfgmod.dotted_names(job_cls))
        assert all(f[:-2] in names if f.endswith(".*") else f in names for f in launch.RESUMABLE), job_cls


def test_mlflow_params_are_the_config_and_resumable_fields_are_tags_updated_on_resume(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("lightning")
    from loom.platform.tracking import flatten
    from loom.training.module import LoomModule

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("loom")).info.run_id
    _, cfg = run_folder(tmp_path)

    def fit_start(cfg):  # what Lightning's rank 0 calls, with the logger's client
        fake = types.SimpleNamespace(cfg=cfg, global_rank=0, run_id=lambda: run_id, context_params=lambda: {},
                                     logger=types.SimpleNamespace(experiment=client))
        LoomModule.on_fit_start(fake)

    fit_start(cfg)
    fit_start(cfgmod.override(cfg, "trainer.max_steps", 99))  # a resume that trains longer
    data = client.get_run(run_id).data
    flat = flatten(cfgmod.to_dict(cfg))
    assert data.tags["trainer.max_steps"] == "99"  # updated on resume
    assert "trainer.max_steps" not in data.params and "out" not in data.params
    assert data.params == {k: v for k, v in flat.items() if not launch.resumable(k)}  # the config, nothing else


@pytest.mark.integration
@pytest.mark.slow  # 34 s; exact resume stays in the default tier through ttv, shape4d and S3
def test_a_real_resume_trains_longer_with_the_runs_own_config(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("deepspeed")
    mlflow = pytest.importorskip("mlflow")
    from tests.training.corpus import make_ttv_corpus

    data, out = str(tmp_path / "ttv"), str(tmp_path / "run")
    make_ttv_corpus(data, samples=2, frames=5, size=32)
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def train(*args):
        p = subprocess.run([loom, "train", "ttv", "--out", out, *args], capture_output=True, text=True, env=env,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]

    train("--recipe", "tiny", "--data", data, "--set", "trainer.max_steps=1", "--set", "trainer.progress=false",
          "--set", "data.batch_size=1")
    train("--resume", "--set", "trainer.max_steps=2")  # no recipe, no --data: the run's own config
    with open(os.path.join(out, "config.yaml")) as f:
        saved = cfgmod.from_dict(ttv.TrainTTVJob, yaml.safe_load(f))
    assert saved.trainer.max_steps == 2 and saved.data.batch_size == 1 and saved.data.source == data
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("loom").experiment_id])
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == [0, 1] and run.data.tags["trainer.max_steps"] == "2"
    assert run.data.params["data.batch_size"] == "1" and "trainer.max_steps" not in run.data.params
