"""What every Loom LightningModule shares, so each model only writes its data, step and optimizer:

- the data: a :class:`TrainBatches` over a ``LoomLoader`` (exact, rank-split), epoch after epoch;
- checkpoints: the data position, RNG states, the MLflow run id and the config beside Lightning's state
  (``checkpoint["loom"]``); loading is not strict because frozen weights are left out of checkpoints;
- MLflow: the resolved config at fit start: the fields that may change on resume (``loom.training.launch.
  RESUMABLE``) as tags, updated on every resume, the rest as params (equal to the config), the loss as the
  mean over all ranks' real samples (padding repeats excluded), artifacts from rank 0;
- ZeRO-3: :meth:`gathered` collects the trainable parameters on every rank before rank 0 saves them;
- validation (``trainer.val_every``, off by default): every N optimizer steps the mean of the subclass's
  ``val_loss(batch)`` over its ``make_val_loader()`` batches (fixed noise per sample, so comparable across steps and
  resumes), all ranks' real samples, logged to MLflow as ``val/loss`` at the global step; the best is kept in
  ``OUT/best`` (:meth:`save_best`, ``best.json``: step and loss), remembered in checkpoints, and
  ``trainer.early_stop_patience`` validations without a new best stop the run;
- ``LOOM_FAIL_AT_STEP`` (with ``LOOM_FAIL_RANK``, ``LOOM_FAIL_ONCE``): a crash injection the resume tests use.

Subclasses implement ``make_loader()``, ``training_step`` (calling :meth:`take_data_state` first and
:meth:`log_loss`), ``configure_optimizers`` and optionally ``context_params()``, ``on_train_end`` and, for
validation, ``make_val_loader()``, ``val_loss(batch)`` and ``save_best(folder)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from typing import Any

import lightning as L
import numpy as np
import torch

from loom.platform.config import to_dict
from loom.platform.tracking import flatten
from loom.training.launch import resumable

log = logging.getLogger(__name__)

BEST = "best"  # OUT/best: the weights of the lowest val/loss, and best.json
BEST_INFO = "best.json"


class TrainBatches:
    """The rank's batches, epoch after epoch (training is counted in steps), each carrying the loader state
    *after* it under ``__loader_state__``: Lightning fetches one batch ahead, so the loader's own state at
    checkpoint time would be one batch too far. No ``state_dict`` here on purpose: the module saves and restores
    the data position itself."""

    def __init__(self, loader):
        self.loader = loader
        self.resume: dict | None = None

    def __iter__(self):
        if self.resume is not None:
            self.loader.load_state_dict(self.resume)
            self.resume = None
        while True:
            for batch in self.loader:
                batch["__loader_state__"] = self.loader.state_dict()
                yield batch


class LoomModule(L.LightningModule):
    """Base of Loom's LightningModules; ``cfg`` is the job's root config (with ``out``, ``trainer``)."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg
        # Checkpoints leave the frozen base out (it comes back from its own weights), so loading is not strict.
        self.strict_loading = False
        self.batches: TrainBatches | None = None
        self._data_state: dict | None = None
        self.losses: list[tuple[int, float]] = []
        self.val_losses: list[tuple[int, float]] = []
        # best val/loss so far, its step, validations since it (saved in checkpoints: a resume continues them)
        self.val_state: dict = {"best_loss": None, "best_step": None, "bad": 0}
        self._val_loader = None
        self._val_step = -1  # the step last validated (hooks run per micro-batch with trainer.accumulate > 1)
        # the run's URL when its folder is on object storage (cfg.out is then the local staging folder): what MLflow
        # and checkpoints record as ``out`` (set by loom.training.launch.fit)
        self.run_out: str | None = None

    def run_config(self) -> Any:
        """The config as the run's config.yaml says it: ``out`` is where the run lives."""
        import dataclasses

        run_out = getattr(self, "run_out", None)
        return dataclasses.replace(self.cfg, out=run_out) if run_out else self.cfg

    # ------------------------------------------------------------------ data

    def make_loader(self):
        raise NotImplementedError

    def train_dataloader(self):
        if self.batches is None:
            self.batches = TrainBatches(self.make_loader())
        return self.batches

    def take_data_state(self, batch: dict) -> None:
        """Call first in ``training_step``: remembers the data position after this batch, and crashes on purpose
        at ``LOOM_FAIL_AT_STEP`` (tests)."""
        self._data_state = batch.pop("__loader_state__", None)
        fail = os.environ.get("LOOM_FAIL_AT_STEP")
        if fail and self.global_step == int(fail) and str(self.global_rank) == os.environ.get("LOOM_FAIL_RANK",
                                                                                             str(self.global_rank)):
            once = os.environ.get("LOOM_FAIL_ONCE")  # a marker file: crash the first time only (Ray restarts)
            if once:
                if os.path.exists(once):
                    return
                open(once, "w").close()
            os._exit(17)

    # ------------------------------------------------------------------ validation

    def make_val_loader(self):
        """An iterable of held-out batches (same shape as training batches, ``__key__`` and ``__pad__`` included),
        iterated from its start at every validation; None: this run has no held-out data."""
        return None

    def val_loss(self, batch: dict) -> torch.Tensor:
        """Per-sample (B,) loss of a held-out batch under fixed noise and timesteps (seeded by the sample key, not
        the step): the same weights give the same number at any step, in any resume."""
        raise NotImplementedError(f"{type(self).__name__} has no val_loss(batch): leave trainer.val_every at 0")

    def save_best(self, folder: str) -> None:
        """Keep the current weights as the best (called on every rank; ``folder`` is ``OUT/best``). Default: a
        Lightning checkpoint ``best.ckpt``. Models whose published result is a smaller file override this."""
        self.trainer.save_checkpoint(os.path.join(folder, "best.ckpt"))

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean ``val_loss`` over the first ``trainer.val_batches`` held-out batches of every rank (all of them for
        0), real samples only; None without held-out data."""
        if self._val_loader is None:
            self._val_loader = self.make_val_loader() or ()
        cap = self.cfg.trainer.val_batches
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        was_training = self.training
        self.eval()
        try:
            with self.trainer.precision_plugin.forward_context():
                for i, batch in enumerate(self._val_loader):
                    if cap and i >= cap:
                        break
                    per = self.val_loss(batch).detach().double()
                    pad = batch.get("__pad__")
                    keep = (~torch.as_tensor(pad) if pad is not None else torch.ones(per.shape[0], dtype=torch.bool))
                    keep = keep.to(per.device)
                    total += torch.stack([(per * keep).sum(), keep.sum().double()]).to(total.device)
        finally:
            self.train(was_training)
        if self.trainer.world_size > 1:
            total = self.all_gather(total.float()).reshape(-1, 2).sum(0).double()
        if total[1] == 0:
            return None
        return float(total[0] / total[1])

    def run_validation(self) -> None:
        """After an optimizer step (launch's validation callback): every ``trainer.val_every`` steps, validate,
        log ``val/loss`` (and ``val/best_loss``) at the global step, keep a new best in ``OUT/best``, and stop the
        run after ``trainer.early_stop_patience`` validations without one."""
        t, step = self.cfg.trainer, self.global_step
        if not t.val_every or step == 0 or step % t.val_every or step == self._val_step:
            return
        self._val_step = step
        loss = self.validate()
        if loss is None:
            if not self.val_losses:
                log.warning("trainer.val_every=%d but this run has no held-out data: no validation", t.val_every)
                self.val_losses.append((step, math.nan))
            return
        self.val_losses.append((step, loss))
        v = self.val_state
        better = math.isfinite(loss) and (v["best_loss"] is None or loss < v["best_loss"])
        if better:
            v.update(best_loss=loss, best_step=step, bad=0)
            folder = os.path.join(self.cfg.out, BEST)
            if self.global_rank == 0:
                os.makedirs(folder, exist_ok=True)
            self.save_best(folder)
            if self.global_rank == 0:
                tmp = os.path.join(folder, BEST_INFO + ".tmp")
                with open(tmp, "w") as f:
                    json.dump({"step": step, "val_loss": loss, "run_id": self.run_id()}, f, indent=2)
                os.replace(tmp, os.path.join(folder, BEST_INFO))
        else:
            v["bad"] += 1
        run_id = self.run_id()
        if self.global_rank == 0 and run_id is not None:
            client = self.logger.experiment
            client.log_metric(run_id, "val/loss", loss, step=step)
            client.log_metric(run_id, "val/best_loss", v["best_loss"] if v["best_loss"] is not None else loss,
                              step=step)
        if self.global_rank == 0:
            log.info("step %d: val/loss %.6g (best %.6g at step %s)", step, loss, v["best_loss"] or loss,
                     v["best_step"])
        if t.early_stop_patience and v["bad"] >= t.early_stop_patience:
            if self.global_rank == 0:
                log.warning("early stop at step %d: %d validations without a better val/loss than %.6g (step %s)",
                            step, v["bad"], v["best_loss"], v["best_step"])
            self.trainer.should_stop = True

    # ------------------------------------------------------------------ logging

    def log_loss(self, per_sample: torch.Tensor, batch: dict, name: str = "train/loss") -> torch.Tensor:
        """The mean of ``per_sample`` (B,) over real samples (``__pad__`` repeats weigh nothing), logged as the mean
        over all ranks' real samples: N ranks with batch b log what 1 rank with batch N*b logs."""
        pad = batch.get("__pad__")
        keep = (~torch.as_tensor(pad) if pad is not None else torch.ones(per_sample.shape[0], dtype=torch.bool))
        keep = keep.to(per_sample.device)
        loss = (per_sample * keep).sum() / keep.sum().clamp_min(1)
        stats = torch.stack([(per_sample * keep).sum().detach().float(), keep.sum().float()])
        if self.trainer.world_size > 1:
            stats = self.all_gather(stats).reshape(-1, 2).sum(0)
        self.log(name, stats[0] / stats[1].clamp_min(1), prog_bar=True, on_step=True, on_epoch=False,
                 rank_zero_only=True)
        for i, group in enumerate(self.optimizers().param_groups):
            gname = str(group.get("name", i)).replace("+", "_")  # MLflow metric names allow _ / . and space
            self.log(f"lr/{gname}", float(group["lr"]), on_step=True, on_epoch=False, rank_zero_only=True)
        self.losses.append((self.global_step, float(loss.detach())))
        return loss

    def run_id(self) -> str | None:
        return getattr(self.logger, "run_id", None) if self.logger else None

    def context_params(self) -> dict[str, str]:
        """Extra MLflow params describing the run (e.g. where conditioning comes from)."""
        return {}

    def on_fit_start(self) -> None:
        run_id = self.run_id()
        if self.global_rank != 0 or run_id is None:
            return
        client = self.logger.experiment
        existing = client.get_run(run_id).data.params
        flat = flatten(to_dict(LoomModule.run_config(self)))
        # Fields that may change on --resume (max_steps, ...) are tags, set again on every (re)start; the rest are
        # params, logged once: `loom train --resume` refuses a change to them, so they stay what the config says.
        for k, v in flat.items():
            if resumable(k):
                client.set_tag(run_id, k, v)
        params = {**{k: v for k, v in flat.items() if not resumable(k)}, **self.context_params()}
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:  # only a resume that bypassed the command's check (train() called directly) gets here
            log.warning("MLflow run %s keeps its first values of %s; this resume's config differs there", run_id,
                        ", ".join(changed))
        for k, v in params.items():
            if k not in existing:
                client.log_param(run_id, k, v)
        cfg_path = os.path.join(self.cfg.out, "config.yaml")
        if os.path.isfile(cfg_path):
            client.log_artifact(run_id, cfg_path)

    def log_artifacts(self, path: str, artifact_path: str | None = None) -> None:
        """Rank 0: a file or folder into the run's artifacts."""
        run_id = self.run_id()
        if self.global_rank != 0 or run_id is None:
            return
        client = self.logger.experiment
        if os.path.isdir(path):
            client.log_artifacts(run_id, path, artifact_path)
        else:
            client.log_artifact(run_id, path, artifact_path)

    # ------------------------------------------------------------------ ZeRO-3

    def gathered(self, params):
        """ZeRO-3 keeps each rank's slice of the parameters: gather them (on every rank) to save."""
        t = self.cfg.trainer
        if t.strategy == "deepspeed" and t.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["loom"] = {
            "data": self._data_state,
            "mlflow_run_id": self.run_id(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
            "config": to_dict(self.run_config()),
            "val": dict(self.val_state),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("loom") or {}
        if extra.get("rng"):
            torch.set_rng_state(extra["rng"]["torch"])
            np.random.set_state(extra["rng"]["numpy"])
        if extra.get("data") is not None:
            self.train_dataloader().resume = extra["data"]
        if extra.get("val"):
            self.val_state = dict(extra["val"])
