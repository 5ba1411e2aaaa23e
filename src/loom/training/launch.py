"""Launching Loom's Lightning training: one place that turns a job's ``TrainerSettings`` into a Lightning ``Trainer``
(strategy, precision, checkpoints, MLflow logger), and runs ``fit`` either in this process (Lightning starts the
other local ranks itself) or on a Ray cluster through Ray Train's ``TorchTrainer`` (``ray.address`` set).

Every model (the video DiT, the 4D shape model, the shape VAE) trains through :func:`run` with its own
LightningModule and data: one mechanism, many models.

Why a DeepSpeed subclass: Lightning's ``DeepSpeedStrategy`` refuses anything but CUDA, and hands DeepSpeed
``device_rank=None`` on CPU. :class:`LoomDeepSpeedStrategy` lets ZeRO-2/3 run on CPU with gloo (tests, and the same
code path as the GPUs with NCCL), and gives DeepSpeed the local rank as the CPU device index. On CUDA it is
Lightning's strategy unchanged.

Checkpoints (``<out>/checkpoints``): Lightning's (model, optimizer, LR scheduler, step) plus, from the module's
``on_save_checkpoint``, the data position, the RNG states and the MLflow run id; ``resume=True`` continues from
``last``. With DeepSpeed a checkpoint is a folder; frozen parameters are left out of it (the base model comes back
from its own weights), so a LoRA checkpoint of the 1.3B DiT holds only the LoRA and fusion weights and their
optimizer state.

Run folders on object storage (``--out s3://bucket/runs/x``, any fsspec URL): DeepSpeed and torch write and read
local files, so the run trains in a local staging folder (``$LOOM_CACHE/stage/<name>-<hash of the URL>``) and
every checkpoint Lightning saves is copied to ``<out>/checkpoints`` before training goes on, each file atomically;
a DeepSpeed checkpoint folder's ``latest`` marker goes last (and is removed first when ``last.ckpt`` is replaced),
so a checkpoint on the bucket is complete only once its marker is there. The rest of the run folder (config,
``mlflow_run.json``, samples, final weights, best) follows at each checkpoint and when training ends. ``--resume``
downloads the last complete checkpoint into a fresh staging folder: a killed run continues on another machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal


if TYPE_CHECKING:  # torch is imported where it is used: `loom --help` builds every job's parser
    import torch

from loom.platform import storage
from loom.platform.checkpoints import DEEPSPEED_MARKER as MARKER
from loom.platform.checkpoints import checkpoint_complete, checkpoint_safe_globals, safe_load
from loom.platform.config import config, field, require
from loom.platform.ray import RaySettings, forwarded_env, init_ray
from loom.platform.tracking import TrackingSettings, ensure_experiment, resolve_uri, write_run_record

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"


@config
class TrainerSettings:
    max_steps: int = field(1000, help="optimizer steps to train (the run stops there; resume continues to it)")
    seed: int = field(0, help="seed of the data order, initialisation and the per-step noise")
    accelerator: Literal["auto", "cpu", "gpu"] = field("auto", help="cpu, gpu, or auto (gpu when CUDA is there)")
    devices: int = field(1, help="processes (GPUs or CPU ranks) per node")
    num_nodes: int = field(1, help="nodes (outside Ray Train; with ray.address set use ray.workers)")
    strategy: Literal["auto", "ddp", "deepspeed"] = field(
        "deepspeed", help="deepspeed = ZeRO (stage from zero_stage; CPU with gloo, GPUs with NCCL); ddp; auto")
    zero_stage: int = field(2, help="DeepSpeed ZeRO stage: 2 shards optimizer state and gradients, 3 also params")
    offload: bool = field(False, help="DeepSpeed: keep optimizer state (and with ZeRO-3 the parameters) in CPU memory")
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = field(
        "32-true", help="Lightning precision; bf16-mixed on GPUs")
    gradient_checkpointing: bool = field(False, help="recompute block activations in the backward pass")
    grad_clip: float = field(1.0, help="gradient norm clip (0 = off)")
    accumulate: int = field(1, help="batches per optimizer step")
    log_every: int = field(1, help="log losses and learning rates every N steps")
    checkpoint_every: int = field(100, help="save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = field(2, help="periodic checkpoints kept besides 'last' (-1 = all)")
    progress: bool = field(True, help="progress bar")
    val_every: int = field(0, help="validation loss (fixed noise and timesteps per held-out sample) every N steps, "
                           "logged as val/loss; the best weights are kept in OUT/best (0 = off)")
    val_batches: int = field(0, help="validation batches per rank at each validation (0 = the whole held-out set)")
    early_stop_patience: int = field(0, help="stop after this many validations in a row without a new best "
                                     "val/loss (0 = off; needs val_every)")
    max_failures: int = field(3, help="Ray Train: restarts of the worker group after a worker or node is lost "
                              "(each continues from the last checkpoint)")

    def __post_init__(self):
        require(self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")
        require(self.devices >= 1, "devices", self.devices, "must be >= 1")
        require(self.num_nodes >= 1, "num_nodes", self.num_nodes, "must be >= 1")
        require(self.zero_stage in (2, 3), "zero_stage", self.zero_stage, "must be 2 or 3")
        require(self.accumulate >= 1, "accumulate", self.accumulate, "must be >= 1")
        require(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "must be >= 1")
        require(self.log_every >= 1, "log_every", self.log_every, "must be >= 1")
        require(self.val_every >= 0, "val_every", self.val_every, "must be >= 0 (0 = off)")
        require(self.val_batches >= 0, "val_batches", self.val_batches, "must be >= 0 (0 = all)")
        require(self.early_stop_patience >= 0, "early_stop_patience", self.early_stop_patience, "must be >= 0")
        require(not self.early_stop_patience or self.val_every, "early_stop_patience", self.early_stop_patience,
                "needs trainer.val_every > 0 (early stopping watches the validation loss)")


# The one list of config fields that may differ between a run's own config (<out>/config.yaml) and the config it is
# resumed with (`loom train ... --resume`): how long it trains, how it reports and checkpoints, and where Ray runs it;
# never what it learns from or how. The world size (trainer.devices, trainer.num_nodes, ray.workers,
# ray.gpus_per_worker) stays: DeepSpeed's ZeRO checkpoints are partitioned per rank. ``out`` may change because a
# run folder may be moved. MLflow records these fields as tags, updated on every resume; every other field is a
# param, logged once, equal to the config (LoomModule.on_fit_start). A ``section.*`` entry allows a whole section.
RESUMABLE = ("out", "trainer.max_steps", "trainer.progress", "trainer.log_every", "trainer.checkpoint_every",
             "trainer.keep_checkpoints", "trainer.max_failures", "trainer.val_every", "trainer.early_stop_patience",
             "ray.address", "ray.cpus_per_worker")


def resumable(name: str) -> bool:
    """Whether the dotted config field ``name`` may change on resume (see :data:`RESUMABLE`)."""
    return any(name == f or (f.endswith(".*") and name.startswith(f[:-1])) for f in RESUMABLE)


def train_ray() -> RaySettings:
    """A training job's default ``ray`` section: unset address (train in this process); 2 Ray Train ranks once an
    address is given."""
    return RaySettings(workers=2)


def ray_field() -> Any:
    """The ``ray`` section of every training job (one declaration, one help text)."""
    return field(default_factory=train_ray, help="Ray Train (multi-node): ray.address set = ray.workers ranks with "
                 "ray.cpus_per_worker / ray.gpus_per_worker each")


def uses_ray_train(r: RaySettings) -> bool:
    """Training runs on Ray Train when ``ray.address`` names a Ray ('local', 'auto', 'ray://...')."""
    return bool(r.address)


def _deepspeed_strategy_class():
    import torch

    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.accelerators import CUDAAccelerator
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class LoomDeepSpeedStrategy(DeepSpeedStrategy):
        """Lightning's DeepSpeed strategy, allowed on CPU (gloo)."""

        in_ray = False  # set when running inside a Ray Train worker: one device per worker, from Ray

        @property
        def root_device(self) -> torch.device:
            if self.in_ray:
                import ray.train.torch

                d = ray.train.torch.get_device()
            else:
                d = super().root_device
            # DeepSpeed compares device_rank >= 0; a CPU device carries the local rank as its index
            return torch.device("cpu", self.local_rank) if d.type == "cpu" else d

        def setup_environment(self) -> None:
            if isinstance(self.accelerator, CUDAAccelerator):
                return super().setup_environment()
            DDPStrategy.setup_environment(self)  # skips the CUDA-only check of DeepSpeedStrategy

        def setup_distributed(self) -> None:
            if isinstance(self.accelerator, CUDAAccelerator):
                return super().setup_distributed()
            reset_seed()  # what DeepSpeedStrategy does, without its GPU index validation
            self.set_world_ranks()
            self._init_deepspeed_distributed()

    return LoomDeepSpeedStrategy


def make_strategy(t: TrainerSettings, on_gpu: bool, ray: bool = False):
    if t.strategy == "deepspeed":
        cfg: dict[str, Any] = {
            "zero_optimization": {"stage": t.zero_stage, "contiguous_gradients": True, "overlap_comm": on_gpu},
            "zero_allow_untested_optimizer": True,
            # the module's own torch optimizer (LoRA+ groups) also when offloading: DeepSpeedCPUAdam needs a
            # compiled extension that a CPU-only install does not have
            "zero_force_ds_cpu_optimizer": False,
            "train_micro_batch_size_per_gpu": 1,
        }
        if t.offload:
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
            if t.zero_stage == 3:
                cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
        if t.precision.startswith("bf16"):
            cfg["bf16"] = {"enabled": True}
        if t.grad_clip > 0:
            cfg["gradient_clipping"] = t.grad_clip
        strategy = _deepspeed_strategy_class()(config=cfg, process_group_backend="nccl" if on_gpu else "gloo",
                                               exclude_frozen_parameters=True)
        strategy.in_ray = ray
        return strategy
    if t.strategy == "ddp" or ray:
        if ray:
            from ray.train.lightning import RayDDPStrategy as DDPStrategy
        else:
            from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="nccl" if on_gpu else "gloo", find_unused_parameters=False)
    return "auto"


def sharded_networks(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The networks inside ``module`` that declare their blocks in ``_no_split_modules``, by name; the outermost
    only (the diffusers transformer inside the video DiT declares its own, which the DiT's declaration covers).
    Networks kept outside the module tree (the frozen VAEs and encoders) are not trained and not sharded."""
    import torch

    found: dict[str, torch.nn.Module] = {}
    for name, m in module.named_modules():
        if not getattr(type(m), "_no_split_modules", None):
            continue
        if any(name.startswith(f"{outer}.") or not outer for outer in found):
            continue
        found[name] = m
    return found


def apply_sharding_intent(module: torch.nn.Module, t: TrainerSettings) -> dict[str, list[str]]:
    """The one place where the networks' sharding intent becomes training behaviour: for every network in
    ``module`` that declares ``_no_split_modules``, its blocks (those classes) are

    - checkpointed when ``trainer.gradient_checkpointing`` is on (recomputed in backward;
      `loom.models.checkpointing`), and
    - registered as ZeRO-3 leaf modules under ``trainer.strategy=deepspeed`` with ``trainer.zero_stage=3``, so that
      DeepSpeed gathers a block's parameters as one unit when the block starts instead of module by module inside
      it (fewer, larger all-gathers; the prefetcher sees whole blocks).

    Called by :func:`fit` on the built module before DeepSpeed wraps it. Returns {network name: block classes}."""
    from loom.models.checkpointing import block_class_name, checkpoint_blocks, declared_blocks

    networks = sharded_networks(module)
    if t.gradient_checkpointing and not networks:
        raise ValueError(f"trainer.gradient_checkpointing=true, but no network in {type(module).__name__} declares "
                         "_no_split_modules, so there are no blocks to recompute: leave it off for this model")
    zero3 = t.strategy == "deepspeed" and t.zero_stage == 3
    applied: dict[str, list[str]] = {}
    for name, network in networks.items():
        blocks = checkpoint_blocks(network) if t.gradient_checkpointing else declared_blocks(network)
        # by exact class name, as declared: isinstance would also take undeclared subclasses of a block class
        names = sorted({block_class_name(b) for b in blocks})
        if zero3:
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(network, names)
        applied[name or type(network).__name__] = names
    return applied


STAGE = "stage"  # $LOOM_CACHE/stage/...: the local folders of runs whose --out is on object storage


def checkpoint_dir(out: str) -> str:
    return storage.join(out, CHECKPOINTS) if storage.is_remote(out) else os.path.join(out, CHECKPOINTS)


def staging_dir(out: str) -> str:
    """The local folder a run with ``out`` on object storage trains in (the same in every process of the run)."""
    return storage.local_folder(out, STAGE)


def last_checkpoint(out: str) -> str | None:
    """The checkpoint ``resume`` continues from: ``last.ckpt`` (a file, or a folder with DeepSpeed), if complete.
    On object storage (a URL): ``last.ckpt`` if complete, else the newest complete ``step-*.ckpt`` (a kill while
    ``last.ckpt`` was being replaced leaves it without its marker, the step checkpoint saved just before complete)."""
    if storage.is_remote(out):
        folder = checkpoint_dir(out)
        last = storage.join(folder, LAST)
        if checkpoint_complete(last):
            return last
        steps = sorted((n for n in storage.listdir(folder) if n.startswith("step-") and n.endswith(".ckpt")),
                       reverse=True)
        return next((storage.join(folder, n) for n in steps if checkpoint_complete(storage.join(folder, n))), None)
    p = os.path.join(checkpoint_dir(out), LAST)
    return p if checkpoint_complete(p) else None


def _main_process() -> bool:
    """The process the user started (Lightning's extra local ranks rerun the command with LOCAL_RANK set)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def fetch_checkpoint(ckpt: str, stage: str) -> str:
    """The remote checkpoint ``ckpt`` as a local path in ``stage``'s checkpoints folder, downloaded by the main
    process (into a clean place: nothing of an earlier attempt mixes in); the other local ranks find it there."""
    local = os.path.join(stage, CHECKPOINTS, ckpt.rstrip("/").rsplit("/", 1)[-1])
    if _main_process():
        import shutil

        if os.path.isdir(local):
            shutil.rmtree(local)
        elif os.path.exists(local):
            os.remove(local)
        fs, path = storage.filesystem(ckpt)
        if fs.isfile(path):
            storage.download_file(ckpt, local)
        else:
            storage.download_tree(ckpt, local)
            os.remove(os.path.join(local, storage.SOURCES))
        print(f"resume:   downloaded {ckpt} to {local}", file=sys.stderr, flush=True)
    return local


def sync_run_files(stage: str, out: str, done: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """Copy the run folder's files other than checkpoints (config, run record, samples, final weights, best) from
    the staging folder to ``out``, each atomically; ``done`` ({relative path: (size, mtime)} of earlier copies) is
    updated and skips files that have not changed since."""
    done = {} if done is None else done

    def skip(rel: str) -> bool:
        if rel.split("/", 1)[0] in (CHECKPOINTS, "ray"):
            return True
        st = os.stat(os.path.join(stage, rel))
        return done.get(rel) == (st.st_size, st.st_mtime_ns)

    if not os.path.isdir(stage):
        return []
    sent = storage.upload_tree(stage, out, skip=skip)
    for rel in sent:
        st = os.stat(os.path.join(stage, rel))
        done[rel] = (st.st_size, st.st_mtime_ns)
    return sent


def _remote_checkpoint_class():
    from lightning.pytorch.callbacks import ModelCheckpoint

    class RemoteCheckpoint(ModelCheckpoint):
        """Lightning's checkpointing into the local staging folder, each saved checkpoint then copied to the run's
        URL (before training goes on: a kill after it loses nothing on the bucket), each removed one removed there.
        Every node's local rank 0 copies what its ranks wrote; global rank 0 writes the marker last."""

        def __init__(self, *args, remote: str, stage: str, **kw):
            super().__init__(*args, **kw)
            self.remote, self.stage = remote, stage
            self.synced: dict[str, tuple[int, int]] = {}

        def remote_path(self, filepath: str) -> str:
            return storage.join(checkpoint_dir(self.remote), os.path.basename(filepath.rstrip("/")))

        def _save_checkpoint(self, trainer, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            url = self.remote_path(filepath)
            if os.path.isdir(filepath):
                if trainer.is_global_zero:  # replacing last.ckpt: incomplete until its new marker is there
                    storage.remove(storage.join(url, MARKER))
                trainer.strategy.barrier("loom.remote_checkpoint.unmark")
                if trainer.local_rank == 0:
                    storage.upload_tree(filepath, url, skip=lambda rel: rel == MARKER)
                trainer.strategy.barrier("loom.remote_checkpoint.upload")
                if trainer.is_global_zero and os.path.isfile(os.path.join(filepath, MARKER)):
                    storage.upload_file(os.path.join(filepath, MARKER), storage.join(url, MARKER))
            elif trainer.is_global_zero:
                storage.upload_file(filepath, url)
            if trainer.is_global_zero:
                sync_run_files(self.stage, self.remote, self.synced)
            trainer.strategy.barrier("loom.remote_checkpoint.done")

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            # The checkpoint names the staging folder it was saved in; a resume on another machine (or with another
            # $LOOM_CACHE) stages elsewhere: the same run, so its checkpoints are tracked (and rotated) here.
            old = state_dict.get("dirpath")
            if old and old != self.dirpath:
                def move(p):
                    return os.path.join(self.dirpath, os.path.basename(p)) if isinstance(p, str) and p.startswith(
                        old) else p
                state_dict = {**state_dict, "dirpath": self.dirpath,
                              "best_k_models": {move(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
                              **{k: move(state_dict.get(k, "")) for k in ("best_model_path", "kth_best_model_path",
                                                                          "last_model_path")}}
            super().load_state_dict(state_dict)

        def _remove_checkpoint(self, trainer, filepath: str) -> None:
            super()._remove_checkpoint(trainer, filepath)
            if trainer.is_global_zero:
                url = self.remote_path(filepath)
                storage.remove(storage.join(url, MARKER))  # incomplete first, then gone
                storage.remove(url, recursive=True)

    return RemoteCheckpoint


def build_trainer(t: TrainerSettings, tracking: TrackingSettings, out: str, *, run_id: str | None = None,
                  ray: bool = False, callbacks: list | None = None, remote: str | None = None):
    """A Lightning ``Trainer`` from the settings. ``ray``: running inside a Ray Train worker (Ray's cluster
    environment, one device per worker). ``remote``: the run's URL on object storage, ``out`` then being its local
    staging folder (checkpoints are copied there as they are saved)."""
    import logging

    import torch

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    for name in ("lightning.pytorch", "lightning.fabric"):  # they print through their own handler; not twice
        logging.getLogger(name).propagate = False

    on_gpu = t.accelerator == "gpu" or (t.accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError("trainer.accelerator=gpu but CUDA is not available here: use trainer.accelerator=cpu")
    require(not t.precision.startswith("16") or on_gpu, "trainer.precision", t.precision, "float16 needs a GPU")
    ckpt_kw: dict[str, Any] = dict(
        dirpath=checkpoint_dir(out), filename="step-{step:07d}", every_n_train_steps=t.checkpoint_every,
        save_top_k=t.keep_checkpoints, monitor="step", mode="max", save_last=True, auto_insert_metric_name=False)
    ckpt = (_remote_checkpoint_class()(remote=remote, stage=out, **ckpt_kw) if remote else ModelCheckpoint(**ckpt_kw))
    logger: Any = False
    if tracking.enabled:
        from lightning.pytorch.loggers import MLFlowLogger

        uri = resolve_uri(tracking)
        # Only the launching process creates the database and experiment (SQLite migrations from several
        # processes at once collide); Lightning's extra local ranks have LOCAL_RANK set, Ray workers `ray`.
        if not ray and _main_process():
            ensure_experiment(uri, tracking.experiment)
        name = remote.rstrip("/").rsplit("/", 1)[-1] if remote else os.path.basename(os.path.abspath(out))
        logger = MLFlowLogger(experiment_name=tracking.experiment, tracking_uri=uri, run_id=run_id,
                              run_name=tracking.run_name or name, log_model=False)
        callbacks = [*(callbacks or []), _run_record_callback(remote or out, uri, tracking.experiment)]
    if t.val_every:
        callbacks = [*(callbacks or []), _validation_callback()]
    kw: dict[str, Any] = {}
    if ray:
        from ray.train.lightning import RayLightningEnvironment

        kw["plugins"] = [RayLightningEnvironment()]
        devices, num_nodes = "auto", 1
    else:
        devices, num_nodes = t.devices, t.num_nodes
    return L.Trainer(
        accelerator="gpu" if on_gpu else "cpu", devices=devices, num_nodes=num_nodes,
        strategy=make_strategy(t, on_gpu, ray), precision=t.precision, max_steps=t.max_steps, max_epochs=-1,
        logger=logger, callbacks=[ckpt, *(callbacks or [])],
        log_every_n_steps=t.log_every, enable_progress_bar=t.progress, enable_model_summary=False,
        gradient_clip_val=(t.grad_clip or None) if t.strategy != "deepspeed" else None,
        accumulate_grad_batches=t.accumulate, use_distributed_sampler=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=out, deterministic=False, **kw)


def _validation_callback():
    """Runs the module's ``run_validation()`` after each optimizer step. A callback, not the module's own hook:
    Lightning calls callbacks before the module's ``on_train_batch_end`` and moves ``ModelCheckpoint`` after the
    other callbacks, so the checkpoint of step N already holds the best-so-far of step N's validation (a resume from
    it neither forgets nor repeats it)."""
    from lightning.pytorch.callbacks import Callback

    class Validation(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            pl_module.run_validation()

    return Validation()


def _run_record_callback(out: str, uri: str, experiment: str):
    """On rank 0, once the MLflow run exists: say where it is, and record it in ``<out>/mlflow_run.json`` so that an
    evaluation of this run folder can name the training run (lineage in the MLflow UI)."""
    from lightning.pytorch.callbacks import Callback

    class RunRecord(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            if not trainer.is_global_zero or not trainer.logger:
                return
            run_id, experiment_id = trainer.logger.run_id, trainer.logger.experiment_id
            write_run_record(out, uri, experiment, experiment_id, run_id)
            print(f"mlflow:   logging to run {run_id} in experiment {experiment!r} ({uri})", file=sys.stderr,
                  flush=True)

    return RunRecord()


def check_resume(out: str, resume: bool) -> str | None:
    """The checkpoint to start from (None: a new run); refuses --resume without a checkpoint, and a new run over
    an old one's checkpoints. ``out`` on object storage: the checkpoint's URL."""
    if storage.is_remote(out):
        return _check_remote_resume(out, resume)
    ckpt = last_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {checkpoint_dir(out)}: train without --resume "
                                "to start a new run, or point --out at the run to continue")
    if not resume and glob.glob(os.path.join(checkpoint_dir(out), "*")):
        raise FileExistsError(f"{checkpoint_dir(out)} already holds checkpoints: pass --resume to continue that run, "
                              "or choose another --out")
    return ckpt


def _check_remote_resume(out: str, resume: bool) -> str | None:
    where = checkpoint_dir(out)
    if resume:
        ckpt = last_checkpoint(out)
        if ckpt is None:
            if not storage.exists(out):
                raise storage.missing_error(out, "run folder", "train without --resume to start a new run there, or "
                                            "point --out at the run to continue")
            raise FileNotFoundError(f"--resume: no complete checkpoint in {where}: train without --resume to start a "
                                    "new run, or point --out at the run to continue")
        return ckpt
    if storage.listdir(where):
        raise FileExistsError(f"{where} already holds checkpoints: pass --resume to continue that run, or choose "
                              "another --out")
    storage.check_bucket(out)
    storage.check_writable(out)
    return None


def fit(make: Callable[[], tuple[Any, Any]], t: TrainerSettings, tracking: TrackingSettings, out: str, *,
        resume: bool = False, ray: bool = False, restart: bool = False):
    """Build (module, train iterable) with ``make`` in this process and fit; from ``last`` when ``resume``.
    ``restart``: a Ray Train worker group restarted after a failure continues from the last checkpoint, if any
    (the driver checked ``resume`` once, before the first start). ``out`` on object storage: ``make`` builds the
    module for the staging folder (:func:`train_run`), checkpoints are downloaded from and copied to ``out``."""
    module, data = make()
    apply_sharding_intent(module, t)
    remote = out if storage.is_remote(out) else None
    ckpt = last_checkpoint(out) if restart else check_resume(out, resume)
    work = out
    if remote:
        work = staging_dir(remote)
        if hasattr(module, "run_out"):
            module.run_out = remote  # MLflow and checkpoints record where the run lives, not the staging folder
        if ckpt:
            ckpt = fetch_checkpoint(ckpt, work)
    run_id = read_run_id(ckpt) if ckpt else None
    # Under Ray Train the cluster environment is Ray's (ranks from the Train context); Ray's prepare_trainer() is
    # not called because it only admits Ray's own strategy classes, whose DeepSpeed one refuses CPUs.
    trainer = build_trainer(t, tracking, work, run_id=run_id, ray=ray, remote=remote)
    with safe_checkpoint_loading():
        trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt, weights_only=True)
    if remote and trainer.is_global_zero:
        sent = sync_run_files(work, remote)
        print(f"run:      {remote} ({len(sent)} files copied from the staging folder {work})", file=sys.stderr,
              flush=True)
    return trainer, module


def read_run_id(ckpt: str) -> str | None:
    """The MLflow run id a checkpoint recorded (``loom`` entry of its client state)."""
    path = ckpt
    if os.path.isdir(ckpt):  # DeepSpeed: client state is in the rank-0 model states file
        found = sorted(glob.glob(os.path.join(ckpt, "checkpoint", "*model_states.pt")))
        if not found:
            return None
        path = found[0]
    state = safe_load(path)
    return (state.get("loom") or {}).get("mlflow_run_id")


@contextlib.contextmanager
def safe_checkpoint_loading():
    """Within it, DeepSpeed reads checkpoint files through :func:`safe_load` (Lightning's own files are read with
    ``weights_only=True`` by ``Trainer.fit(weights_only=True)`` under the same allowed classes)."""
    import torch

    try:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    except ImportError:
        TorchCheckpointEngine = None
    original = TorchCheckpointEngine.load if TorchCheckpointEngine is not None else None

    def load(self, path, map_location=None):
        return safe_load(path, map_location)

    if TorchCheckpointEngine is not None:
        TorchCheckpointEngine.load = load
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            yield
    finally:
        if TorchCheckpointEngine is not None:
            TorchCheckpointEngine.load = original



def train_run(cfg, make, *, resume: bool = False) -> None:
    """What every ``loom train`` job does: the resolved config (local paths already absolute) written to
    ``cfg.out/config.yaml`` (what ``--resume`` and generation read), then :func:`run` of ``make(cfg)``, here or on
    Ray Train. ``make`` is module-level, so Ray can pickle it."""
    import functools

    from loom.platform import config as cfgmod

    if storage.is_remote(cfg.out):
        return _train_remote_run(cfg, make, resume=resume)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.yaml"), "w") as f:
        f.write(cfgmod.dump_yaml(cfg))
    run(functools.partial(make, cfg), cfg.trainer, cfg.tracking, cfg.ray, cfg.out, resume=resume)


def _train_remote_run(cfg, make, *, resume: bool) -> None:
    """:func:`train_run` for ``out`` on object storage: the module is built for a clean local staging folder (its
    config.yaml says where the run lives), the config goes to the bucket first, and :func:`fit` does the rest."""
    import dataclasses
    import functools
    import shutil

    from loom.platform import config as cfgmod

    if uses_ray_train(cfg.ray):
        raise ValueError(f"--out {cfg.out}: Ray Train (ray.address={cfg.ray.address!r}) needs a run folder every "
                         "worker shares (a local or shared-volume path); object-storage run folders train in this "
                         "process: leave ray.address empty, or give a shared path as --out")
    stage = staging_dir(cfg.out)
    if _main_process():
        check_resume(cfg.out, resume)  # before anything is written: a missing bucket, a new run over an old one
        shutil.rmtree(stage, ignore_errors=True)  # what an earlier attempt left here is not this run's state
        os.makedirs(stage, exist_ok=True)
        text = cfgmod.dump_yaml(cfg)
        with open(os.path.join(stage, "config.yaml"), "w") as f:
            f.write(text)
        storage.write_bytes(storage.join(cfg.out, "config.yaml"), text.encode())
        print(f"run:      {cfg.out} (staged in {stage})", file=sys.stderr, flush=True)
    local = dataclasses.replace(cfg, out=stage)
    run(functools.partial(make, local), cfg.trainer, cfg.tracking, cfg.ray, cfg.out, resume=resume)


def run(make: Callable[[], tuple[Any, Any]], t: TrainerSettings, tracking: TrackingSettings, launch: RaySettings,
        out: str, *, resume: bool = False) -> None:
    """Train in this process, or on Ray Train workers when ``ray.address`` is set. ``make`` must be
    picklable (a module-level function or ``functools.partial``) for Ray."""
    if not uses_ray_train(launch):
        fit(make, t, tracking, out, resume=resume)
        return
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(launch)
    out = os.path.abspath(out)
    check_resume(out, resume)
    if tracking.enabled:
        # Resolved here, once: the default store follows the working directory, which Ray workers do not share.
        tracking = dataclasses.replace(tracking, uri=resolve_uri(tracking))
        ensure_experiment(tracking.uri, tracking.experiment)

    # Workers of an existing cluster do not inherit the driver's environment: pass on what Loom and its storage
    # read (credentials, tracking server, thread counts, test hooks).
    env = forwarded_env()

    def loop(config: dict) -> None:
        os.environ.update(config["env"])
        fit(make, t, tracking, out, ray=True, restart=True)

    trainer = TorchTrainer(
        loop, train_loop_config={"env": env},
        scaling_config=ScalingConfig(num_workers=launch.workers, use_gpu=launch.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": launch.cpus_per_worker,
                                                           **({"GPU": launch.gpus_per_worker}
                                                              if launch.gpus_per_worker > 0 else {})}),
        torch_config=TorchConfig(backend="nccl" if launch.gpus_per_worker > 0 else "gloo"),
        run_config=RunConfig(storage_path=os.path.join(out, "ray"), name="train",
                             failure_config=FailureConfig(max_failures=t.max_failures)))
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"Ray Train run failed: {result.error}")
    ray.shutdown()
    # The workers' own lines stay in the Ray logs: say here where the run went.
    ckpt = last_checkpoint(out)
    run_id = read_run_id(ckpt) if ckpt else None
    print(f"trained on {launch.workers} Ray Train worker(s): checkpoints {checkpoint_dir(out)}"
          + (f", MLflow run {run_id} ({resolve_uri(tracking)})" if run_id else ""), file=sys.stderr)
