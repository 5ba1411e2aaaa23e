"""Running ``loom train <model> --recipe tiny`` as a user does (a subprocess, the default MLflow store beside the run)
and reading back what it logged: shared by the training tests of every model."""

from __future__ import annotations

import os
import subprocess
import sys

LOOM = os.path.join(os.path.dirname(sys.executable), "loom")


def loom_train(model: str, out: str, data: str, *sets: str, env=None, resume=False, check=True):
    cmd = [LOOM, "train", model, "--recipe", "tiny", "--data", data, "--out", out, "--set", "trainer.progress=false"]
    for s in sets:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    # the default MLflow store, in $LOOM_HOME: beside the run, where runs() reads it
    e = {**os.environ, "OMP_NUM_THREADS": "1", "LOOM_HOME": os.path.dirname(out), **(env or {})}
    e.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def runs(out: str):
    """({run name: [(run id, [(step, loss)], run)]}, the client) of the MLflow database beside ``out``."""
    import mlflow

    uri = f"sqlite:///{os.path.join(os.path.dirname(out), 'mlflow.db')}"
    c = mlflow.MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("loom")
    res: dict = {}
    for r in c.search_runs([exp.experiment_id]):
        hist = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, "train/loss"))
        res.setdefault(r.info.run_name, []).append((r.info.run_id, hist, r))
    return res, c
