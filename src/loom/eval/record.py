"""One evaluation = one folder of outputs and one MLflow run in the benchmark's experiment (``bench/<name>``).

The folder (the job's ``out``) holds ``config.yaml`` (the resolved config), ``metrics.json``, the per-item table as
``items.csv`` and ``items.json`` (plus any further tables, e.g. ``frames.csv``), and ``media/`` (side-by-side
pred | gt samples). The MLflow run, created when the evaluation has finished (no half-logged runs), carries:

- params: ``benchmark``, ``model``, ``checkpoint`` (the training run evaluated, or ``-``), ``predictions``,
  ``data`` (the ground truth), ``items``, ``code.loom_version``, ``code.git_sha``, ``features`` (``real`` or
  ``tiny-random``) and ``features.<network>`` (its files and their sha256, or ``tiny-random(seed=0)``), and the
  whole config flattened under ``config.``;
- tags: ``loom.kind=eval``, ``loom.benchmark``, ``loom.model``, ``loom.features``; for an evaluation of a training
  run folder (``--run``), the training's MLflow run as ``loom.training_run_id``, ``loom.training_experiment_id`` and
  ``loom.training_tracking_uri`` (read from the folder's ``mlflow_run.json``), and a link to it at the top of the
  run's description (the training run sits in another experiment, so MLflow's own parent-run tag, which nests runs
  of one experiment, does not fit);
- metrics: the benchmark's (:data:`loom.eval.benchmarks.BENCHMARKS`) and counts (``items``, ``failed``);
- artifacts: ``items.json`` through ``MlflowClient.log_table`` (shown as a table in the UI), ``items.csv`` and the
  other tables, ``metrics.json``, ``config.yaml``, ``media/``.

The tracking URI is resolved as for training (:func:`loom.platform.tracking.resolve_uri`): ``tracking.uri``, else
``$MLFLOW_TRACKING_URI``, else the SQLite file ``mlflow.db`` in ``$LOOM_HOME`` or the working directory, wherever
``out`` is.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from loom.platform import config as cfgmod
from loom.platform.tracking import (NOTE_TAG, RUN_RECORD, TrackingSettings, ensure_experiment, flatten,
                                   read_run_record, resolve_uri, run_link, ui_url)


@dataclass
class Evaluation:
    """What one evaluation produced, before it is written and logged."""

    benchmark: str
    model: str
    config: Any  # the job's root config
    out: str
    metrics: dict[str, float]
    items: list[dict[str, Any]]
    params: dict[str, str]  # checkpoint, predictions, data, ...
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # further CSV tables by file stem
    media: list[str] = field(default_factory=list)  # files under out/media
    notes: list[str] = field(default_factory=list)  # printed and logged as the run's description


def _write_csv(path: str, rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})
    return path


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_outputs(ev: Evaluation) -> list[str]:
    """config.yaml, metrics.json, items.csv/json and the further tables into ``ev.out``; returns their paths."""
    os.makedirs(ev.out, exist_ok=True)
    paths = []
    with open(os.path.join(ev.out, "config.yaml"), "w") as f:
        f.write(cfgmod.dump_yaml(ev.config))
    paths.append(os.path.join(ev.out, "config.yaml"))
    with open(os.path.join(ev.out, "metrics.json"), "w") as f:
        json.dump({"benchmark": ev.benchmark, "model": ev.model, "metrics": {k: _json_safe(v) for k, v in
                                                                            ev.metrics.items()},
                   "params": ev.params, "notes": ev.notes}, f, indent=2)  # fmt: skip
    paths.append(os.path.join(ev.out, "metrics.json"))
    with open(os.path.join(ev.out, "items.json"), "w") as f:
        json.dump([{k: _json_safe(v) for k, v in r.items()} for r in ev.items], f, indent=1)
    paths += [os.path.join(ev.out, "items.json"), _write_csv(os.path.join(ev.out, "items.csv"), ev.items)]
    for stem, rows in ev.tables.items():
        paths.append(_write_csv(os.path.join(ev.out, f"{stem}.csv"), rows))
    return paths


def run_params(ev: Evaluation, features_params: dict[str, str], code: dict[str, str]) -> dict[str, str]:
    params = {"benchmark": ev.benchmark, "model": ev.model, "items": str(len(ev.items))}
    params.update(ev.params)
    params.update({f"code.{k}": v for k, v in code.items()})
    params.update(features_params)
    params.update({f"config.{k}": v for k, v in flatten(cfgmod.to_dict(ev.config)).items()})
    return params


def training_lineage(run_folder: str, uri: str) -> tuple[dict[str, str], str | None]:
    """The tags and the description line that name the training run behind ``run_folder`` (its
    ``mlflow_run.json``): a link when it is in the same tracking store as the evaluation, else the store named.
    ``({}, None)`` when the folder records no run."""
    rec = read_run_record(run_folder) if run_folder else None
    if rec is None:
        return {}, None
    tags = {"loom.training_run_id": rec["run_id"], "loom.training_experiment_id": str(rec.get("experiment_id", "")),
            "loom.training_tracking_uri": str(rec.get("tracking_uri", ""))}
    name = f"`{rec.get('experiment', '?')}` / `{rec['run_id']}`"
    if rec.get("tracking_uri") == uri and rec.get("experiment_id"):
        line = f"Evaluates the model of training run [{name}]({run_link(rec['run_id'], rec['experiment_id'])})."
    else:
        line = f"Evaluates the model of training run {name} in the tracking store {rec.get('tracking_uri', '?')}."
    return tags, line


def log_evaluation(ev: Evaluation, tracking: TrackingSettings, params: dict[str, str]) -> tuple[str, str, str]:
    """The MLflow run of a finished evaluation: (tracking uri, experiment id, run id)."""
    import mlflow
    import pandas as pd
    from mlflow.entities import Metric, Param

    uri = resolve_uri(tracking)
    experiment = tracking.experiment
    exp_id = ensure_experiment(uri, experiment)
    client = mlflow.MlflowClient(tracking_uri=uri)
    tags = {"loom.kind": "eval", "loom.benchmark": ev.benchmark, "loom.model": ev.model,
            "loom.features": params.get("features", "-")}
    lineage, line = training_lineage(getattr(ev.config, "run", "") or "", uri)
    tags.update(lineage)
    note = ([line] if line else []) + ev.notes
    if note:
        tags[NOTE_TAG] = "\n\n".join(note)
    run = client.create_run(exp_id, run_name=tracking.run_name or ev.model, tags=tags)
    rid = run.info.run_id
    try:
        now = run.info.start_time
        metrics = [Metric(k, float(v), now, 0) for k, v in ev.metrics.items() if v is not None and math.isfinite(v)]
        plist = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, max(len(plist), len(metrics)), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(rid, metrics=metrics[i : i + 100], params=plist[i : i + 100])
        client.log_table(rid, data=pd.DataFrame([{k: _json_safe(v) for k, v in r.items()} for r in ev.items]),
                         artifact_file="items.json")  # fmt: skip
        client.log_artifact(rid, os.path.join(ev.out, "items.csv"))
        for stem in ev.tables:
            client.log_artifact(rid, os.path.join(ev.out, f"{stem}.csv"))
        client.log_artifact(rid, os.path.join(ev.out, "metrics.json"))
        client.log_artifact(rid, os.path.join(ev.out, "config.yaml"))
        for m in ev.media:
            client.log_artifact(rid, m, "media")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return uri, exp_id, rid


def finish(ev: Evaluation, tracking: TrackingSettings, features) -> dict[str, Any]:
    """Write the outputs, log the MLflow run (when ``tracking.enabled``), print the summary; returns
    ``{"metrics", "params", "uri", "experiment_id", "run_id"}``."""
    from loom.eval.benchmarks import BENCHMARKS, TINY_WARNING, code_version

    write_outputs(ev)
    params = run_params(ev, features.params(), code_version())
    res: dict[str, Any] = {"metrics": ev.metrics, "params": params, "uri": None, "experiment_id": None,
                           "run_id": None}
    if tracking.enabled:
        res["uri"], res["experiment_id"], res["run_id"] = log_evaluation(ev, tracking, params)
    bench = BENCHMARKS[ev.benchmark]
    print(f"{bench.experiment}: {ev.model} on {len(ev.items)} item(s) ({bench.title})")
    for c in bench.columns:
        if c.metric in ev.metrics:
            print(f"  {c.label:8s} {c.arrow} {ev.metrics[c.metric] * c.scale:.{c.digits + 2}f}")
    for note in ev.notes:
        print(f"  note: {note}")
    print(f"outputs:  {ev.out} (items.csv, metrics.json, media/)")
    if res["run_id"]:
        print(f"mlflow:   run {res['run_id']} in experiment {bench.experiment!r} ({res['uri']})")
        print(f"ui:       {ui_url(res['uri'], res['experiment_id'], res['run_id'])}")
        run = getattr(ev.config, "run", "") or ""
        if run:
            trained = training_lineage(run, res["uri"])[0].get("loom.training_run_id")
            print(f"trained:  MLflow run {trained} (tag loom.training_run_id)" if trained else
                  f"trained:  {run} records no MLflow run ({RUN_RECORD}): the evaluation names only the folder")
    if features.tiny and features.provenance:
        print(f"WARNING: {TINY_WARNING}")
    return res
