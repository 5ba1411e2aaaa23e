"""``loom export ttv``: a trained turntable-video run (TAPESTRY) as a self-describing model folder, logged to MLflow as
the run's model. Used by the CLI; no Lightning, no training package.

What ``DIR`` holds:

- ``pytorch_lora_weights.safetensors``: the LoRA in diffusers' Wan format (``TTVDiT.save_lora``'s file, with its
  LoraConfig as metadata), and ``fusion/``: the geometry fusion module (``config.json`` + ``model.safetensors``);
  ``TTVDiT.load_lora(DIR)`` reads both, as it reads a run's ``lora/``;
- ``README.md``: a Hugging Face model card: YAML front matter (``base_model`` when the base is a Hugging Face repo,
  ``library_name``, ``tags``), then the base model, the training data (its paths and manifest), the run's resolved
  config, and its metrics read from MLflow (training metrics at the exported step, and the benchmark evaluations
  that name this training run).

From the final weights (``RUN/lora``, written when training ended; copied as they are) or from a saved step
(``--step N``: ``RUN/checkpoints/step-000000N.ckpt``). A step is read without unpickling code
(`loom.platform.checkpoints`): a Lightning file (``state_dict``), a DeepSpeed ZeRO-2 folder (rank 0's ``module``
holds every trainable weight) or a ZeRO-3 folder (partitions gathered by DeepSpeed's ``zero_to_fp32`` under the same
check; DeepSpeed must be installed). The DiT is built from the run's config exactly as ``loom generate`` builds it
(the base transformer is loaded once), the checkpoint's trainable weights are loaded into it by name, with every
LoRA and fusion weight required, and ``save_lora`` writes the same files training writes at the end.

MLflow: the run named by ``RUN/mlflow_run.json`` gets a LoggedModel (MLflow 3: the run page's "Logged models", the
experiment's "Models" tab), with the folder as its artifacts, ``source_run_id`` the training run, linked as the run's
output at the exported step, and the run's metrics at that step attached to it. A run trained with tracking off
exports without metrics and without logging, and says so.

The folder is written beside ``DIR`` and moved into place when complete; an existing non-empty ``DIR`` is replaced
only with ``overwrite``.

Object storage: ``RUN`` may be a URL (``s3://bucket/runs/x``): what the export reads (config, run record, the final
weights or the one checkpoint of ``--step``) is downloaded into the local run cache (`loom.inference.run.local_run`;
a rerun downloads nothing again). ``DIR`` may be a URL: the folder is made locally, then copied file by file
(each atomically), the model card last: an export on the bucket is complete once its ``README.md`` is there.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
from typing import Any

CARD = "README.md"
FINAL = "lora"
CHECKPOINTS = "checkpoints"
# The Lightning module of `loom train ttv` holds the DiT as ``self.dit``: its checkpoint keys are ``dit.<name>``.
MODULE_PREFIX = "dit."
_STEP_FILE = re.compile(r"^step-(\d+)(?:-v(\d+))?\.ckpt$")
LIBRARY = "diffusers"
TAGS = ("loom", "tapestry", "lora", "wan2.1", "video-generation", "geometry-conditioned", "turntable")
MODEL_TYPE = "loom-ttv-lora"


@dataclasses.dataclass
class Exported:
    """What :func:`export_ttv` wrote and logged."""

    out: str
    step: int | None  # None: the final weights
    files: list[str]
    run_id: str | None = None
    model_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None


# ------------------------------------------------------------------------------------------------ run folder


def saved_steps(run: str) -> dict[int, str]:
    """The run's saved checkpoints by step (``checkpoints/step-NNNNNNN.ckpt``; of Lightning's ``-vK`` copies the
    newest); ``last.ckpt`` is one of them under another name and is not listed."""
    found: dict[int, tuple[int, str]] = {}
    for path in glob.glob(os.path.join(run, CHECKPOINTS, "step-*.ckpt")):
        m = _STEP_FILE.match(os.path.basename(path))
        if m:
            step, version = int(m.group(1)), int(m.group(2) or 0)
            if step not in found or version > found[step][0]:
                found[step] = (version, path)
    return {s: p for s, (_, p) in sorted(found.items())}


def _read_run(run: str) -> tuple[dict[str, Any], str]:
    import yaml

    if not os.path.isdir(run):
        raise FileNotFoundError(f"run folder {run!r} does not exist: pass the --out of a `loom train ttv` run")
    path = os.path.join(run, "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is {run!r} a `loom train ttv` run folder?")
    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict) or "transformer" not in doc["model"]:
        raise ValueError(f"{path} is not the config of a `loom train ttv` run (no model.transformer)")
    return doc, path


def _where(path: str) -> str:
    from loom.platform import storage

    return path.rstrip("/") if storage.is_remote(path) else os.path.abspath(path)


def _fetch_run(run: str, step: int | None) -> str:
    """The local copy of a remote run folder with what exporting ``step`` (None: the final weights) reads."""
    from loom.inference.run import local_run
    from loom.platform import storage

    if not storage.exists(storage.join(run, "config.yaml")):
        raise storage.missing_error(storage.join(run, "config.yaml"), "run config",
                                    "pass the --out of a `loom train ttv` run")
    parts = ["config.yaml"] + (["mlflow_run.json"] if storage.exists(storage.join(run, "mlflow_run.json")) else [])
    if step is None:
        return local_run(run, [*parts, FINAL] if storage.exists(storage.join(run, FINAL)) else parts)
    found: dict[int, tuple[int, str]] = {}
    for name in storage.listdir(storage.join(run, CHECKPOINTS)):
        m = _STEP_FILE.match(name)
        if m:
            s, version = int(m.group(1)), int(m.group(2) or 0)
            if s not in found or version > found[s][0]:
                found[s] = (version, name)
    if step not in found:
        raise FileNotFoundError(f"{storage.join(run, CHECKPOINTS)} has no checkpoint of step {step}; saved steps: "
                                f"{_steps_text(dict(sorted(found.items())))} (training keeps trainer.keep_checkpoints "
                                "of them, every trainer.checkpoint_every steps), or omit --step for the final weights")
    name = found[step][1]
    from loom.platform.checkpoints import checkpoint_complete

    if not checkpoint_complete(storage.join(run, CHECKPOINTS, name)):
        raise FileNotFoundError(f"{storage.join(run, CHECKPOINTS, name)} is incomplete (no 'latest' marker: its "
                                "upload was interrupted); export another step or the final weights")
    return local_run(run, [*parts, f"{CHECKPOINTS}/{name}"])


def _steps_text(steps: dict[int, str]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


def _check_remote_out(run: str, out: str, overwrite: bool) -> None:
    from loom.platform import storage

    r, o = run.rstrip("/"), out.rstrip("/")
    inside = (f"{r}/{FINAL}", f"{r}/{CHECKPOINTS}")
    if o == r or r.startswith(o + "/") or any(o == x or o.startswith(x + "/") for x in inside):
        raise ValueError(f"--out {out!r} would overwrite the run {run!r} it exports: choose a folder outside it "
                         f"(or a new one inside it, e.g. {r}/export)")
    if storage.files_under(out) and not overwrite:
        raise FileExistsError(f"--out {out!r} exists and is not empty: pass --overwrite to replace it, or choose "
                              "another folder")
    storage.check_bucket(out)
    storage.check_writable(out)


def _check_out(run: str, out: str, overwrite: bool) -> None:
    from loom.platform import storage

    if storage.is_remote(out):
        return _check_remote_out(run, out, overwrite)
    if storage.is_remote(run):
        run = "/nonexistent-remote-run"  # a local --out cannot be inside a remote run
    r, o = os.path.realpath(run), os.path.realpath(out)

    def within(a: str, b: str) -> bool:
        return a == b or a.startswith(b + os.sep)

    # --overwrite replaces the folder: it must not be (or hold) the run, its final weights or its checkpoints
    if o == r or within(r, o) or within(o, os.path.join(r, FINAL)) or within(o, os.path.join(r, CHECKPOINTS)):
        raise ValueError(f"--out {out!r} would overwrite the run {run!r} it exports: choose a folder outside it "
                         f"(or a new one inside it, e.g. {os.path.join(run, 'export')})")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"--out {out!r} exists and is not empty: pass --overwrite to replace it, or choose "
                              "another folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out!r} is a file: choose a folder")


# ------------------------------------------------------------------------------------------------ checkpoints


def _deepspeed_state(ckpt: str) -> tuple[dict[str, Any], int | None]:
    """(trainable state dict under the module's keys, global step) of a DeepSpeed checkpoint folder."""
    from loom.platform.checkpoints import safe_load, safe_torch_load

    tag_file = os.path.join(ckpt, "latest")
    tag = open(tag_file).read().strip() if os.path.isfile(tag_file) else "checkpoint"
    files = sorted(glob.glob(os.path.join(ckpt, tag, "*model_states.pt")))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model states ({tag}/*model_states.pt): the checkpoint "
                                "is incomplete; export another step or the final weights")
    rank0 = next((f for f in files if os.path.basename(f).startswith(("mp_rank_00", "zero_pp_rank_0_"))), files[0])
    state = safe_load(rank0)
    stage = int(((state.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    module = state.get("module") or {}
    step = state.get("global_step")
    if stage < 3:
        return module, step
    # ZeRO-3: rank 0's module holds empty placeholders; the weights are partitioned across the optimizer states
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise RuntimeError(f"{ckpt} is a ZeRO-3 checkpoint: gathering its partitioned weights needs DeepSpeed "
                           "(pip install 'loom[train]'), or export the final weights (no --step)") from None
    import contextlib

    with safe_torch_load(), contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its progress
        full = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=tag, exclude_frozen_parameters=True)
    return dict(full), step


def read_checkpoint(ckpt: str) -> tuple[dict[str, Any], int | None]:
    """(the DiT's weights in a training checkpoint, by DiT parameter name; the checkpoint's global step). Reads
    Lightning files and DeepSpeed folders (ZeRO-2 and ZeRO-3) without unpickling code."""
    from loom.platform.checkpoints import safe_load

    if os.path.isdir(ckpt):
        module, step = _deepspeed_state(ckpt)
    else:
        state = safe_load(ckpt)
        if not isinstance(state, dict) or "state_dict" not in state:
            raise ValueError(f"{ckpt} is not a Lightning checkpoint (no state_dict)")
        module, step = state["state_dict"], state.get("global_step")
    return {k[len(MODULE_PREFIX):]: v for k, v in module.items() if k.startswith(MODULE_PREFIX)}, step


def load_trainable(dit, state: dict[str, Any], source: str) -> int:
    """Copy every trainable weight of ``dit`` (LoRA, fusion) from ``state``; refuse a checkpoint that lacks one or
    has one of another shape. Returns how many were loaded."""
    import torch

    trainable = {n: p for n, p in dit.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(state))
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} of the {len(trainable)} trainable weights the run's config "
                         f"builds (e.g. {missing[:3]}): was it written by this run's `loom train ttv`?")
    with torch.no_grad():
        for name, p in trainable.items():
            v = state[name]
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(v.shape)}, the run's model has {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))
    return len(trainable)


def _write_weights(run: str, raw: dict, cfg_path: str, step: int | None, dest: str) -> tuple[str, int | None]:
    """Write the LoRA file and ``fusion/`` into ``dest``; (where they came from, the checkpoint's step)."""
    from loom.models.ttv_dit import FUSION_SUBDIR, LORA_WEIGHT_NAME

    steps = saved_steps(run)
    if step is None:
        final = os.path.join(run, FINAL)
        if not os.path.isfile(os.path.join(final, LORA_WEIGHT_NAME)) or not os.path.isdir(
                os.path.join(final, FUSION_SUBDIR)):
            raise FileNotFoundError(f"{final} holds no final weights ({LORA_WEIGHT_NAME} + {FUSION_SUBDIR}/): the run "
                                    f"has not finished; export a saved step with --step N (saved steps: "
                                    f"{_steps_text(steps)})")
        shutil.copy2(os.path.join(final, LORA_WEIGHT_NAME), os.path.join(dest, LORA_WEIGHT_NAME))
        shutil.copytree(os.path.join(final, FUSION_SUBDIR), os.path.join(dest, FUSION_SUBDIR))
        return os.path.abspath(final), None
    if step not in steps:
        raise FileNotFoundError(f"{os.path.join(run, CHECKPOINTS)} has no checkpoint of step {step}; saved steps: "
                                f"{_steps_text(steps)} (training keeps trainer.keep_checkpoints of them, every "
                                "trainer.checkpoint_every steps), or omit --step for the final weights")
    from loom.inference.run import config_section
    from loom.models.ttv import ModelSettings, build_dit

    ckpt = steps[step]
    state, ckpt_step = read_checkpoint(ckpt)
    model = config_section(raw, "model", ModelSettings, cfg_path, required=True)
    seed = int((raw.get("trainer") or {}).get("seed", 0))
    dit = build_dit(model, seed)
    load_trainable(dit, state, ckpt)
    dit.save_lora(dest)
    return os.path.abspath(ckpt), ckpt_step


# ------------------------------------------------------------------------------------------------ MLflow


@dataclasses.dataclass
class RunMetrics:
    """What MLflow knows of the training run: metrics at the exported step and the evaluations naming the run."""

    run_id: str
    experiment_id: str
    uri: str
    name: str
    status: str
    metrics: dict[str, tuple[float, int]]  # key -> (value, step): the last logged at or before the step
    evaluations: list[dict[str, Any]]  # {benchmark, model, run_id, experiment, metrics}


def read_metrics(rec: dict[str, str], uri: str, step: int | None) -> RunMetrics:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(rec["run_id"])
    except Exception as e:  # MlflowException for a missing run; anything else means the store is unreachable
        raise RuntimeError(f"MLflow run {rec['run_id']} (from the run's mlflow_run.json) is not in the tracking store "
                           f"{uri}: {str(e).splitlines()[0][:300]}. Pass --uri with the store it was logged to, or "
                           "--no-mlflow to export without metrics and without logging") from e
    limit = math.inf if step is None else step
    metrics = {}
    for key in sorted(run.data.metrics):
        # the run's own points: not the copies linked to an earlier export's LoggedModel
        hist = [m for m in client.get_metric_history(run.info.run_id, key)
                if m.step <= limit and getattr(m, "model_id", None) is None]
        if hist:
            last = max(hist, key=lambda m: (m.step, m.timestamp))
            metrics[key] = (last.value, last.step)
    evaluations = []
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    found = client.search_runs(list(experiments), filter_string=f"tags.`loom.training_run_id` = '{run.info.run_id}'",
                               order_by=["attributes.start_time DESC"])
    for r in found:
        evaluations.append({"benchmark": r.data.tags.get("loom.benchmark", "?"), "model": r.data.tags.get(
            "loom.model", r.info.run_name), "run_id": r.info.run_id, "experiment": experiments.get(
            r.info.experiment_id, r.info.experiment_id), "metrics": dict(sorted(r.data.metrics.items()))})
    return RunMetrics(run.info.run_id, run.info.experiment_id, uri, run.info.run_name or "", run.info.status,
                      metrics, evaluations)


def log_export(info: RunMetrics, out: str, step: int | None, base: str | None, where: str | None = None) -> str:
    """The export as a LoggedModel of the training run (artifacts: the folder ``out``), its output at the step, with
    the run's metrics at that step; returns the model id. ``where``: the export's URL when ``out`` is its local
    copy."""
    import time

    import mlflow
    from mlflow.entities import LoggedModelOutput, Metric

    client = mlflow.MlflowClient(tracking_uri=info.uri)
    name = "ttv-lora" + (f"-step-{step}" if step is not None else "")
    tags = {"loom.kind": "export", "loom.export.step": "final" if step is None else str(step),
            "loom.export.out": where or os.path.abspath(out)}
    if base:
        tags["loom.base_model"] = base
    model = client.create_logged_model(info.experiment_id, name=name, source_run_id=info.run_id, tags=tags,
                                       model_type=MODEL_TYPE)
    try:
        client.log_model_artifacts(model.model_id, out)
    except Exception:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    at = step if step is not None else max((s for _, s in info.metrics.values()), default=0)
    client.log_outputs(info.run_id, [LoggedModelOutput(model.model_id, at)])
    now = int(time.time() * 1000)
    linked = [Metric(k, v, now, s, run_id=info.run_id, model_id=model.model_id) for k, (v, s) in info.metrics.items()
              if math.isfinite(v)]
    if linked:
        client.log_batch(info.run_id, metrics=linked)
    return model.model_id


# ------------------------------------------------------------------------------------------------ model card


def _data_section(raw: dict) -> list[str]:
    from loom.platform import shards

    data = raw.get("data") or {}
    source = str(data.get("source", ""))
    lines = [f"- Shards: `{source or '(not recorded)'}`"]
    settings = {k: data[k] for k in ("frames", "size", "batch_size", "known_prob", "prompt") if k in data}
    if settings:
        lines.append("- Sampling: " + ", ".join(f"{k}={v!r}" for k, v in settings.items()))
    try:
        man = shards.read_manifest(source)
    except Exception as e:  # a moved corpus, an unreachable bucket: the card says so instead of failing the export
        lines.append(f"- Manifest: not readable at export time ({str(e).splitlines()[0][:200]})")
        return lines
    tot = man.get("totals", {})
    digest = hashlib.sha256(json.dumps(man, sort_keys=True).encode()).hexdigest()
    lines.append(f"- Manifest: kind `{man.get('kind', '?')}`, {tot.get('samples', '?')} samples in "
                 f"{tot.get('shards', '?')} shards ({tot.get('bytes', 0) / 2**20:.1f} MiB), "
                 f"{tot.get('failures', 0)} failed assets, complete: {man.get('complete', '?')}; "
                 f"manifest sha256 `{digest[:16]}`")
    for k in ("config_hash", "code_version", "blender_version"):
        if k in man:
            lines.append(f"- {k}: `{man[k]}`")
    return lines


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def model_card(raw: dict, cfg_text: str, *, run: str, step: int | None, source: str, files: list[str],
               info: RunMetrics | None, note: str | None) -> str:
    from loom import __version__
    from loom.platform.hub import model_source

    model = raw.get("model") or {}
    base = model_source(str(model.get("transformer", "")))
    front = ["---"]
    if base is not None:
        front += [f"base_model: {base.repo_id}", "base_model_relation: adapter"]
    front += [f"library_name: {LIBRARY}", "tags:"] + [f"- {t}" for t in TAGS] + ["---", ""]
    name = os.path.basename(_where(run))
    what = "the final weights" if step is None else f"the checkpoint of step {step}"
    rank, alpha = model.get("lora_rank"), model.get("lora_alpha") or model.get("lora_rank")
    body = [
        f"# {name}: TAPESTRY turntable-video LoRA (Loom export)", "",
        f"LoRA (rank {rank}, alpha {alpha}) on every linear layer of the Wan2.1-Fun-Control DiT blocks, and the "
        f"geometry fusion module, trained by `loom train ttv`; exported from {what} (`{source}`).", "",
        "## Files", "",
        *[f"- `{f}`" for f in files], "",
        "## How to load", "",
        "```python",
        "from loom.models.ttv_dit import TTVDiT",
        "dit = TTVDiT.from_pretrained(BASE_TRANSFORMER)  # the base model below, a local folder",
        "dit.load_lora(EXPORT_DIR)  # LoRA + fusion/",
        "```", "",
        "The LoRA file is diffusers' Wan LoRA format (`WanTransformer3DModel.load_lora_adapter(EXPORT_DIR, "
        "prefix=\"transformer\", weight_name=\"pytorch_lora_weights.safetensors\")`); the fusion module has no slot "
        "in a plain diffusers pipeline, so generation with geometry needs Loom (`loom generate ttv`).", "",
        "## Base model", "",
    ]
    for key in ("transformer", "vae", "text_encoder", "image_encoder", "fusion"):
        value = str(model.get(key, "") or "")
        if not value:
            continue
        src = model_source(value)
        extra = f" (Hugging Face `{src}`)" if src is not None and str(src) != value else ""
        body.append(f"- {key}: `{value}`{extra}")
    body += ["", "## Training data", "", *_data_section(raw), "", "## Metrics", ""]
    if info is None:
        body.append(note or "The run was trained without MLflow tracking: no metrics recorded.")
    else:
        at = "the end of training" if step is None else f"step {step}"
        body += [f"MLflow run `{info.run_id}` ({info.name!r}, {info.status}) in experiment {info.experiment_id} of "
                 f"`{info.uri}`; training metrics, last logged value at or before {at}:", ""]
        if info.metrics:
            body += ["| metric | value | step |", "|---|---|---|"]
            body += [f"| {k} | {_fmt(v)} | {s} |" for k, (v, s) in info.metrics.items()]
        else:
            body.append("(no metrics logged)")
        body.append("")
        if info.evaluations:
            body.append("Benchmark evaluations of this training run" + (
                " (they evaluated its final weights)" if step is not None else "") + ":")
            body.append("")
            for e in info.evaluations:
                vals = ", ".join(f"{k} {_fmt(v)}" for k, v in e["metrics"].items()) or "no metrics"
                body.append(f"- `{e['benchmark']}` (experiment {e['experiment']!r}, model {e['model']!r}, run "
                            f"`{e['run_id']}`): {vals}")
        else:
            body.append("No benchmark evaluation names this training run yet (`loom eval ttv --run RUN`).")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body += ["", "## Config", "", "The run's resolved config (`config.yaml`):", "", "```yaml", cfg_text.rstrip(),
             "```", "", "## Provenance", "",
             f"- Run folder: `{_where(run)}`", f"- Weights: `{source}`",
             f"- Exported {now} by Loom {__version__} (`loom export ttv`)", ""]
    return "\n".join(front + body)


# ------------------------------------------------------------------------------------------------ export


def export_ttv(run: str, out: str, *, step: int | None = None, overwrite: bool = False, uri: str | None = None,
               mlflow: bool = True) -> Exported:
    """``loom export ttv``: write ``out`` (LoRA, fusion, model card) from the run's final weights or a saved
    ``step``, and log it to the run's MLflow run as its model (unless ``mlflow`` is False or the run was not
    tracked). ``uri`` overrides the store recorded in the run folder. ``run`` and ``out`` may be URLs."""
    import tempfile

    from loom.platform import storage
    from loom.platform.tracking import read_run_record

    url = run if storage.is_remote(run) else None
    _check_out(run, out, overwrite)  # before downloading anything
    if url:
        run = _fetch_run(url, step)
    raw, cfg_path = _read_run(run)
    rec = read_run_record(run) if mlflow else None
    info, note = None, None
    if rec is not None:
        info = read_metrics(rec, uri or rec.get("tracking_uri", ""), step)
    elif mlflow:
        note = f"No MLflow record in {url or run} (mlflow_run.json): the run was trained with tracking.enabled=false."
    else:
        note = "Exported with --no-mlflow: metrics not read."

    remote_out = storage.is_remote(out)
    if remote_out:  # made locally, then copied
        os.makedirs(storage.cache_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="export-", dir=storage.cache_root())
        local = os.path.join(tmp, "export")
    else:
        tmp, local = None, out
    try:
        files = _write_export(run, url, local, raw, cfg_path, step, info, note)
        if remote_out:
            if overwrite:
                storage.remove(storage.join(out, CARD))  # incomplete first, then replaced
                storage.remove(out, recursive=True)
            storage.upload_tree(local, out, last=(CARD,))  # the card last: complete once it is there
        done = Exported(out=out, step=step, files=files)
        if info is not None:
            from loom.platform.hub import model_source

            base = model_source(str((raw.get("model") or {}).get("transformer", "")))
            done.model_id = log_export(info, local, step, base.repo_id if base else None,
                                       where=out if remote_out else None)
            done.run_id, done.tracking_uri, done.experiment_id = info.run_id, info.uri, info.experiment_id
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return done


def _write_export(run: str, url: str | None, out: str, raw: dict, cfg_path: str, step: int | None,
                  info: RunMetrics | None, note: str | None) -> list[str]:
    """The export folder ``out`` (local), written beside it and moved into place when complete; its files.
    ``url``: the run's URL when ``run`` is its local copy."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    part = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.part-{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    os.makedirs(part)
    try:
        source, ckpt_step = _write_weights(run, raw, cfg_path, step, part)
        if url:  # the weights' place on the bucket, not in the local copy
            from loom.platform import storage

            source = storage.join(url, os.path.relpath(source, os.path.abspath(run)).replace(os.sep, "/"))
        if step is not None and ckpt_step is not None and int(ckpt_step) != step:
            raise ValueError(f"{source} says it was saved at step {ckpt_step}, its name says {step}: the checkpoints "
                             "folder was edited; export another step")
        files = sorted(os.path.relpath(os.path.join(d, f), part) for d, _, fs in os.walk(part) for f in fs)
        with open(cfg_path) as f:
            cfg_text = f.read()
        card = model_card(raw, cfg_text, run=url or run, step=step, source=source, files=[CARD, *files], info=info,
                          note=note)
        with open(os.path.join(part, CARD), "w") as f:
            f.write(card)
        old = None
        if os.path.exists(out):
            old = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(part, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    return [CARD, *files]
