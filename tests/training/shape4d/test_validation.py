"""Validation of ``loom train shape4d`` (``trainer.val_every``, ``data.val_fraction``): a split by sample key, val/loss
with fixed draws per key, the best weights in OUT/best, and a resume that keeps the best so far."""

import glob
import json
import math
import os

import pytest
import torch

from loom.platform import config as cfgmod
from loom.training import shape4d
from loom.training.shape4d.data import is_val_key, key_unit, make_shape4d_loader
from tests.training.corpus4d import loom_train, mlflow_runs, shared_corpus

pytest.importorskip("lightning")
pytest.importorskip("deepspeed")
pytest.importorskip("mlflow")
pytest.importorskip("point_cloud_utils")

FRACTION = 0.65  # key_unit: arm000 0.706 (train), arm001 0.589 (validation)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return shared_corpus(tmp_path_factory)


def tiny(*sets):
    return cfgmod.resolve(shape4d.TrainShape4DJob, "tiny", cfgmod.parse_set(sets))


def test_split_by_key_is_disjoint_and_fixed(corpus):
    assert key_unit("arm000") == key_unit("arm000") and key_unit("arm000") != key_unit("arm001")
    assert not is_val_key("arm000", FRACTION) and is_val_key("arm001", FRACTION)
    cfg = tiny(f"data.source={corpus}", f"data.val_fraction={FRACTION}")
    train = make_shape4d_loader(cfg.data, 0, split="train")
    val = make_shape4d_loader(cfg.data, 0, split="val")
    t_keys = [k for _, b in zip(range(4), train) for k in b["__key__"]]  # two epochs of 1 sequence
    v_keys = [k for b in val for k in b["__key__"]]
    assert set(t_keys) == {"arm000"} and v_keys == ["arm001"] and [k for b in val for k in b["__key__"]] == v_keys
    assert set(make_shape4d_loader(tiny(f"data.source={corpus}").data, 0).loader.dataset.index[0].keys) == {"arm000",
                                                                                                     "arm001"}
    with pytest.raises(ValueError, match="val_fraction leaves no val"):
        make_shape4d_loader(tiny(f"data.source={corpus}", "data.val_fraction=0.1").data, 0, split="val")
    with pytest.raises(cfgmod.ConfigError, match="not both"):
        tiny("data.val_source=/x", "data.val_fraction=0.5")
    with pytest.raises(cfgmod.ConfigError, match="val_every"):
        tiny("trainer.early_stop_patience=2")


@pytest.mark.integration
def test_val_loss_logged_best_kept_and_resume_keeps_the_best(corpus, tmp_path):
    """A run killed at step 5 (checkpoint and validation at 4) and resumed to 6: val/loss at 2, 4, 6, finite, one
    MLflow run; the checkpoint carries the best so far; best.json is the step of the lowest logged val/loss; the
    saved best layers give that loss again, twice alike (fixed draws)."""
    from loom.models.shape4d import load_spatiotemporal
    from loom.platform.checkpoints import safe_load
    from loom.training.shape4d.module import Shape4DModule

    out = str(tmp_path / "val")
    sets = (f"data.val_fraction={FRACTION}", "trainer.val_every=2", "trainer.max_steps=6",
            "trainer.checkpoint_every=2", "optim.lr=0.05")
    p = loom_train("shape4d", out, corpus, *sets, env={"LOOM_FAIL_AT_STEP": "5"}, check=False)
    assert p.returncode == 17, p.stderr[-2000:]
    states, = glob.glob(os.path.join(out, "checkpoints", "last.ckpt", "checkpoint", "*model_states.pt"))
    saved = safe_load(states)["loom"]["val"]  # DeepSpeed: the client state is in the rank-0 model states
    assert saved["best_step"] in (2, 4) and saved["best_loss"] > 0
    loom_train("shape4d", out, corpus, *sets, resume=True)

    res, _ = mlflow_runs(out, "val/loss")
    (_, hist, _), = res["val"]  # one run, continued
    val = dict(hist)
    assert sorted(val) == [2, 4, 6] and all(math.isfinite(v) and v > 0 for v in val.values())
    assert val[saved["best_step"]] == pytest.approx(saved["best_loss"], rel=1e-6)
    (_, best_hist, _), = mlflow_runs(out, "val/best_loss")[0]["val"]
    assert dict(best_hist)[6] == pytest.approx(min(val.values()), rel=1e-6)  # the best over both processes
    best = json.load(open(os.path.join(out, "best", "best.json")))
    assert best["step"] == min(val, key=val.get) and best["val_loss"] == pytest.approx(min(val.values()), rel=1e-6)

    cfg = cfgmod.load_yaml(shape4d.TrainShape4DJob, os.path.join(out, "config.yaml"))
    m = Shape4DModule(cfg)
    info = load_spatiotemporal(m.dit, os.path.join(out, "best", "spatiotemporal"))
    assert info["step"] == best["step"]
    m.eval()
    batch = next(iter(m.make_val_loader()))
    a, b = m.val_loss(batch), m.val_loss(next(iter(m.make_val_loader())))
    assert torch.equal(a, b)  # same weights, same draws: same number
    assert float(a.mean()) == pytest.approx(best["val_loss"], rel=1e-4)


def test_early_stop_after_patience_validations_without_a_new_best(tmp_path):
    """`trainer.early_stop_patience=2`: the run stops at the second validation in a row without a better val/loss,
    not before; a new best resets the count and is saved."""
    import types

    from loom.training.module import LoomModule

    losses = iter([1.0, 0.9, 0.95, 0.85, 0.86, 0.87, 0.5])
    saved = []
    m = types.SimpleNamespace(
        cfg=types.SimpleNamespace(trainer=types.SimpleNamespace(val_every=1, early_stop_patience=2), out=str(tmp_path)),
        global_step=0, _val_step=None, val_losses=[], val_state={"best_loss": None, "best_step": None, "bad": 0},
        global_rank=0, validate=lambda: next(losses), save_best=saved.append, run_id=lambda: None,
        trainer=types.SimpleNamespace(should_stop=False))
    stopped_at = None
    for step in range(1, 8):
        m.global_step = step
        LoomModule.run_validation(m)
        if m.trainer.should_stop:
            stopped_at = step
            break
    assert stopped_at == 6  # 0.85 at step 4 was the last best; 0.86 and 0.87 are the two without one
    assert m.val_state["best_step"] == 4 and m.val_state["best_loss"] == 0.85 and len(saved) == 3
    assert json.load(open(os.path.join(tmp_path, "best", "best.json")))["step"] == 4
