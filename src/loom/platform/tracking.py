"""Experiment tracking: one MLflow run per Loom job (training, evaluation), logged from rank 0 only.

Defaults follow SPEC 7: on one machine MLflow writes to a SQLite file (``out/mlflow.db``) with artifacts under
``out/mlartifacts``; on a cluster ``tracking.uri`` (or ``MLFLOW_TRACKING_URI``) points at an MLflow server, and the
same code runs. ``mlflow`` is imported inside the functions, so ``import loom`` works without it.

The UI for the local default::

    .venv/bin/loom runs                                   # the runs, their last loss and artifacts
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server --backend-store-uri sqlite:///out/mlflow.db \
        --workers 1                                       # the UI at http://127.0.0.1:5000
"""

from __future__ import annotations

import json
import os
from typing import Any

from loom.platform.config import config, field

MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


@config
class TrackingSettings:
    uri: str = field("", help="MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else a SQLite file "
                     "<out root>/mlflow.db (e.g. http://mlflow:5000 for a server)")
    experiment: str = field("loom", help="MLflow experiment name")
    run_name: str = field("", help="MLflow run name (empty: the job's output folder name)")
    enabled: bool = field(True, help="log to MLflow at all")


def resolve_uri(settings: TrackingSettings, out: str) -> str:
    """The tracking URI a job uses: the setting, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<parent of out>/
    mlflow.db`` (one database for all jobs written beside each other, e.g. out/ttv-train and out/eval)."""
    if settings.uri:
        return settings.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = os.path.dirname(os.path.abspath(out.rstrip("/"))) or "."
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite database (MLflow's own default is relative to the
    working directory, which would scatter artifacts); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        root = os.path.dirname(uri.removeprefix("sqlite:///"))
        return "file://" + os.path.join(root, "mlartifacts", experiment)
    return None


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Nested config dict -> ``{"a.b": "value"}`` strings, as MLflow params (lists as JSON, long values cut)."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    text = d if isinstance(d, str) else json.dumps(d)
    out[prefix.rstrip(".")] = text[:MAX_PARAM_CHARS]
    return out


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, created (with Loom's artifact location) if it does not exist."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri, name))


def check_run(uri: str, run_id: str) -> None:
    """Refuse to resume into a run the tracking server does not know (a checkpoint moved to another server)."""
    import mlflow

    try:
        mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    except Exception as e:  # MlflowException for a missing run; anything else means the store is unreachable
        raise RuntimeError(f"MLflow run {run_id} (recorded in the checkpoint) is not in the tracking store {uri}: "
                           f"{e}. Point tracking.uri at the store the run was started in, or set "
                           "tracking.enabled=false") from e


def list_runs(uri: str, experiment: str, metric: str = "train/loss") -> list[dict]:
    """The experiment's runs, newest first: name, id, status, the last value of ``metric`` and its step, and where
    the artifacts are."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} in {uri}")
    rows = []
    for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]):
        hist = client.get_metric_history(r.info.run_id, metric) if metric in r.data.metrics else []
        last = max(hist, key=lambda m: (m.step, m.timestamp)) if hist else None
        rows.append({"name": r.info.run_name, "run_id": r.info.run_id, "status": r.info.status,
                     "step": last.step if last else None, metric: last.value if last else None,
                     "artifacts": r.info.artifact_uri})
    return rows


def _cmd_runs(args) -> int:
    uri = args.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(args.db)}"
    rows = list_runs(uri, args.experiment, args.metric)
    print(f"MLflow {uri}, experiment {args.experiment!r}: {len(rows)} run(s)")
    for r in rows:
        val = "-" if r[args.metric] is None else f"{r[args.metric]:.4f} @ step {r['step']}"
        print(f"  {r['name']:24s} {r['run_id']}  {r['status']:9s} {args.metric} {val}")
        print(f"  {'':24s} artifacts: {r['artifacts']}")
    if uri.startswith("sqlite:///"):
        print(f"UI: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server --backend-store-uri {uri} "
              "--workers 1   (then http://127.0.0.1:5000)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("runs", help="list the MLflow runs of an experiment (training and evaluation jobs)")
    p.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<--db>)")
    p.add_argument("--db", default="out/mlflow.db", help="the local SQLite database (default out/mlflow.db)")
    p.add_argument("--experiment", default="loom", help="experiment name (default loom)")
    p.add_argument("--metric", default="train/loss", help="metric to show (default train/loss)")
    p.set_defaults(func=_cmd_runs)
