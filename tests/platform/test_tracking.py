"""The one MLflow store that every job and every reader agrees on, Loom's experiment kind, and the run record a
training run leaves in its folder."""

import json

import pytest

from loom.cli import main
from loom.platform import tracking
from loom.platform.tracking import TrackingSettings

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def no_store_env(monkeypatch, tmp_path):
    """Neither $MLFLOW_TRACKING_URI nor $LOOM_HOME; the working directory is a fresh folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LOOM_HOME", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_the_default_store_is_in_the_working_directory_or_loom_home_never_beside_out(no_store_env, monkeypatch,
                                                                                     tmp_path):
    work = no_store_env
    assert tracking.resolve_uri(TrackingSettings()) == f"sqlite:///{work / 'mlflow.db'}"
    assert tracking.default_uri() == tracking.reader_uri(None, None)  # jobs and `loom runs`/`leaderboard` agree
    monkeypatch.setenv("LOOM_HOME", str(tmp_path / "home"))
    assert tracking.resolve_uri(TrackingSettings()) == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert tracking.reader_uri(None, None) == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_uri(TrackingSettings()) == "http://mlflow:5000"
    assert tracking.resolve_uri(TrackingSettings(uri="http://other:5000")) == "http://other:5000"
    # the readers' own flags come first: --uri, then --db (relative to where the command runs)
    assert tracking.reader_uri("http://x:1", "a.db") == "http://x:1"
    assert tracking.reader_uri(None, "a.db") == f"sqlite:///{work / 'a.db'}"


def test_experiments_open_as_model_training_unless_someone_chose_otherwise(tmp_path):
    uri = tracking.sqlite_uri(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(tracking_uri=uri)
    eid = tracking.ensure_experiment(uri, "bench/ttv")
    exp = client.get_experiment(eid)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert exp.artifact_location == f"file://{tmp_path / 'mlartifacts' / 'bench/ttv'}"
    old = client.create_experiment("made-by-hand")  # e.g. by an older Loom: tagged on first use
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert tracking.ensure_experiment(uri, "made-by-hand") == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = client.create_experiment("genai", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.ensure_experiment(uri, "genai")
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_run_record_round_trip_and_a_broken_one_is_refused(tmp_path):
    run = tmp_path / "run"
    assert tracking.read_run_record(str(run)) is None  # nothing recorded: no lineage, no error
    path = tracking.write_run_record(str(run), "sqlite:///x.db", "loom", "1", "abc123")
    assert path == str(run / "mlflow_run.json")
    assert tracking.read_run_record(str(run)) == {"run_id": "abc123", "experiment_id": "1", "experiment": "loom",
                                                  "tracking_uri": "sqlite:///x.db"}
    (run / "mlflow_run.json").write_text("{not json")
    with pytest.raises(ValueError, match="mlflow_run.json is not the JSON that training writes"):
        tracking.read_run_record(str(run))
    (run / "mlflow_run.json").write_text(json.dumps({"experiment": "loom"}))
    with pytest.raises(ValueError, match="names no MLflow run"):
        tracking.read_run_record(str(run))


def test_ui_addresses_open_the_model_training_view():
    assert tracking.ui_url("http://mlflow:5000/", "3", "r1") == \
        "http://mlflow:5000/#/experiments/3/runs/r1?workflowType=machine_learning"
    assert tracking.ui_url("sqlite:////x/mlflow.db", "3") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert "mlflow server --backend-store-uri sqlite:////x/mlflow.db" in tracking.ui_hint("sqlite:////x/mlflow.db", "3")
    assert tracking.run_link("r1", "3") == "#/experiments/3/runs/r1?workflowType=machine_learning"


def test_loom_runs_finds_a_run_logged_with_out_anywhere(no_store_env, tmp_path, capsys):
    """A job whose output folder is far from the working directory logs to the default store; `loom runs` started
    in the working directory lists it without being told where."""
    uri = tracking.resolve_uri(TrackingSettings())  # what a job with --out /elsewhere/deep/run uses
    eid = tracking.ensure_experiment(uri, "loom")
    client = mlflow.MlflowClient(tracking_uri=uri)
    rid = client.create_run(eid, run_name="deep-run").info.run_id
    client.log_metric(rid, "train/loss", 0.25, step=3)
    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    assert f"MLflow sqlite:///{no_store_env / 'mlflow.db'}" in out and "deep-run" in out and "0.2500 @ step 3" in out
    assert f"#/experiments/{eid}/runs?workflowType=machine_learning" in out
    assert main(["runs", "--experiment", "bench/none"]) == 2  # not there: said, with where the default came from
    err = capsys.readouterr().err
    assert "no MLflow experiment 'bench/none'" in err and "the working directory (set $LOOM_HOME to choose)" in err
