"""What a training run tells MLflow and its reviewers, through launch's one Trainer: the default store (whatever
--out is), the store printed, and the run recorded in the run folder (mlflow_run.json) for the evaluations."""

import pytest
import torch

from loom.platform import tracking
from loom.platform.tracking import TrackingSettings
from loom.training import launch

mlflow = pytest.importorskip("mlflow")
L = pytest.importorskip("lightning")


class Line(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, _):
        loss = self.w(batch).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_training_run_logs_to_the_default_store_and_records_its_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LOOM_HOME", str(tmp_path / "home"))
    out = str(tmp_path / "far" / "away" / "run")
    t = launch.TrainerSettings(max_steps=2, accelerator="cpu", strategy="auto", progress=False, checkpoint_every=2)
    trainer = launch.build_trainer(t, TrackingSettings(), out)
    trainer.fit(Line(), train_dataloaders=torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=4))
    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    rec = tracking.read_run_record(out)
    assert rec is not None and rec["tracking_uri"] == uri and rec["experiment"] == "loom"
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(rec["run_id"])  # the run that holds the losses
    assert run.info.experiment_id == rec["experiment_id"] and run.info.run_name == "run"
    assert "train/loss" in run.data.metrics
    assert f"logging to run {rec['run_id']} in experiment 'loom' ({uri})" in capsys.readouterr().err
    exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment(rec["experiment_id"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
