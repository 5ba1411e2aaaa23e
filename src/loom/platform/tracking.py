"""Experiment tracking: one MLflow run per Loom job (training, evaluation), logged from rank 0 only.

One store for every job and every reader: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite file
``mlflow.db`` in ``$LOOM_HOME`` or, without it, in the working directory, with artifacts in ``mlartifacts/`` beside
it. The store does not depend on ``--out``: a run written anywhere is listed by ``loom runs`` and ``loom
leaderboard`` started from the same place. ``./mlflow.db`` is also MLflow's own default, so ``mlflow server`` (or
``mlflow ui``) started in the same folder without arguments shows the same runs. On a cluster ``tracking.uri`` (or
``MLFLOW_TRACKING_URI``) points at an MLflow server, and the same code runs. ``mlflow`` is imported inside the
functions, so ``import loom`` works without it.

Loom's experiments are tagged as model-training experiments (:data:`EXPERIMENT_KIND`): MLflow 3's UI otherwise
guesses, and opens an experiment without traces on its GenAI overview (traces, latency) instead of the runs.

A training run records its MLflow run in ``<out>/mlflow_run.json`` (:func:`write_run_record`), so that an
evaluation of that run folder can name the training run it evaluated (:func:`read_run_record`).

The UI for the local default::

    .venv/bin/loom runs                                   # the runs, their last loss and artifacts
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server --backend-store-uri sqlite:///mlflow.db \
        --workers 1                                       # the UI at http://127.0.0.1:5000
"""

from __future__ import annotations

import json
import os
from typing import Any

from loom.platform.config import config, field

MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
HOME_ENV = "LOOM_HOME"  # folder of the default store (else the working directory)
DEFAULT_DB = "mlflow.db"  # MLflow's own default file name: `mlflow server` in that folder finds it unasked
RUN_RECORD = "mlflow_run.json"  # in a training run's folder: which MLflow run it logged to
# The experiment tag the MLflow 3 UI reads to choose an experiment's pages (mlflow/server/js: experimentKind);
# "custom_model_development" is its "Machine learning" kind: runs, metrics, charts.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # a run's or an experiment's description, rendered as markdown by the UI


@config
class TrackingSettings:
    uri: str = field("", help="MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else sqlite:///$LOOM_HOME/"
                     "mlflow.db, else ./mlflow.db in the working directory (e.g. http://mlflow:5000 for a server)")
    experiment: str = field("loom", help="MLflow experiment name")
    run_name: str = field("", help="MLflow run name (empty: the job's output folder name)")
    enabled: bool = field(True, help="log to MLflow at all")


def default_uri() -> str:
    """The store used when none is named: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<$LOOM_HOME or the working
    directory>/mlflow.db`` (an absolute path, so that processes started elsewhere, e.g. Ray workers, agree)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = os.environ.get(HOME_ENV) or os.getcwd()
    return sqlite_uri(os.path.join(os.path.expanduser(home), DEFAULT_DB))


def sqlite_uri(path: str | os.PathLike) -> str:
    return f"sqlite:///{os.path.abspath(path)}"


def resolve_uri(settings: TrackingSettings) -> str:
    """The tracking URI a job uses: ``tracking.uri``, else :func:`default_uri`."""
    return settings.uri or default_uri()


def reader_uri(uri: str | None, db: str | None) -> str:
    """The store of a command that reads runs (``loom runs``, ``loom leaderboard``): ``--uri``, else ``--db``, else
    the jobs' default (:func:`default_uri`)."""
    if uri:
        return uri
    if db:
        return sqlite_uri(db)
    return default_uri()


def where_from() -> str:
    """Why the default store is where it is, for messages."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "$MLFLOW_TRACKING_URI"
    return f"${HOME_ENV}" if os.environ.get(HOME_ENV) else f"the working directory (set ${HOME_ENV} to choose)"


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
    """The experiment's id, created (with Loom's artifact location) if it does not exist, and tagged as a
    model-training experiment (:data:`EXPERIMENT_KIND`) unless someone chose another kind for it."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older Loom, or by hand
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def write_run_record(out: str, uri: str, experiment: str, experiment_id: str, run_id: str) -> str:
    """``<out>/mlflow_run.json``: the MLflow run a training job logs to, for whoever evaluates the run folder
    (written atomically; a resumed run writes the same run again)."""
    from loom.platform import storage

    path = storage.join(out, RUN_RECORD)
    storage.write_json(path, {"run_id": run_id, "experiment_id": experiment_id, "experiment": experiment,
                              "tracking_uri": uri})
    return path



def log_output_run(out: str, tracking: TrackingSettings, *, name: str, tags: dict[str, str], params: dict[str, str],
                   metrics: list[tuple[str, float, int]], files: list[str] = (),
                   folders: dict[str, str] | None = None) -> tuple[str, str, str]:
    """One finished MLflow run for what a command wrote into ``out`` (generation, texturing): ``params``,
    ``metrics`` as (key, value, step), ``files`` and ``folders`` ({local folder: artifact path}) as artifacts; a
    failure marks the run FAILED. ``out/mlflow_run.json`` names it. Returns (uri, experiment id, run id)."""
    import mlflow
    from mlflow.entities import Metric, Param

    uri = resolve_uri(tracking)
    exp_id = ensure_experiment(uri, tracking.experiment)
    client = mlflow.MlflowClient(tracking_uri=uri)
    rid = client.create_run(exp_id, run_name=tracking.run_name or name, tags=tags).info.run_id
    try:
        now = client.get_run(rid).info.start_time
        client.log_batch(rid, metrics=[Metric(k, float(v), now, step) for k, v, step in metrics],
                         params=[Param(k, v) for k, v in params.items()])
        for f in files:
            client.log_artifact(rid, f)
        for folder, path in (folders or {}).items():
            client.log_artifacts(rid, folder, path)
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    write_run_record(out, uri, tracking.experiment, exp_id, rid)
    return uri, exp_id, rid

def read_run_record(folder: str) -> dict[str, str] | None:
    """What :func:`write_run_record` wrote into a run folder, or None (no record: trained without tracking, or by
    a Loom that did not write one). A record that is not Loom's JSON is refused, naming the file."""
    from loom.platform import storage

    path = storage.join(folder, RUN_RECORD)
    if not storage.exists(path):
        return None
    try:
        rec = json.loads(storage.read_bytes(path))
    except ValueError as e:
        raise ValueError(f"{path} is not the JSON that training writes ({e}): delete it or restore it from the "
                         "training run") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("run_id"), str):
        raise ValueError(f"{path} names no MLflow run (expected {{\"run_id\": ...}}): delete it or restore it")
    return rec


# MLflow 3.17's UI picks an experiment's pages (GenAI overview and traces, or runs and metrics) from a switch kept in
# the browser, "GenAI" unless the address says otherwise: every address Loom hands out says "model training".
UI_VIEW = "workflowType=machine_learning"


def run_link(run_id: str, experiment_id: str) -> str:
    """The run's page, relative to the MLflow UI (its router lives in the URL fragment), for markdown notes."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW}"


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment's runs (or of one run), opened as model training: at the tracking server
    itself for an http(s) URI, else at ``mlflow server``'s default address."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base}/{page}?{UI_VIEW}"


def ui_hint(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """How to look at it: the page, and for a local database the command that serves the UI."""
    url = ui_url(uri, experiment_id, run_id)
    if uri.startswith("sqlite:///"):
        return (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server --backend-store-uri {uri} "
                f"--workers 1, then {url}")
    return url


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
    import mlflow

    uri = reader_uri(args.uri, args.db)
    try:
        rows = list_runs(uri, args.experiment, args.metric)
    except ValueError as e:
        hint = "" if (args.uri or args.db) else f" (the default store, from {where_from()})"
        raise ValueError(f"{e}{hint}: run a job first, or name the store with --uri or --db") from None
    print(f"MLflow {uri}, experiment {args.experiment!r}: {len(rows)} run(s)")
    for r in rows:
        val = "-" if r[args.metric] is None else f"{r[args.metric]:.4f} @ step {r['step']}"
        print(f"  {r['name']:24s} {r['run_id']}  {r['status']:9s} {args.metric} {val}")
        print(f"  {'':24s} artifacts: {r['artifacts']}")
    exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(args.experiment)
    print(f"UI: {ui_hint(uri, exp.experiment_id)}")
    return 0


STORE_HELP = "default: $MLFLOW_TRACKING_URI, else $LOOM_HOME/mlflow.db, else ./mlflow.db: where the jobs log"


def register(sub) -> None:
    p = sub.add_parser("runs", help="list the MLflow runs of an experiment (training and evaluation jobs)")
    p.add_argument("--uri", help=f"tracking URI ({STORE_HELP})")
    p.add_argument("--db", help="a local SQLite database file instead (e.g. one copied from elsewhere)")
    p.add_argument("--experiment", default="loom", help="experiment name (default loom)")
    p.add_argument("--metric", default="train/loss", help="metric to show (default train/loss)")
    p.set_defaults(func=_cmd_runs)
