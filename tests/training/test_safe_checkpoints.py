"""Resuming reads checkpoints with ``weights_only=True``: a checkpoint that would run code when unpickled is refused
before anything runs; Loom's own training state (numpy RNG state, DeepSpeed's ZeRO state) loads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from loom.training.launch import read_run_id, safe_checkpoint_loading, safe_load


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["LOOM_TEST_MARK"],))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    mark = tmp_path / "ran"
    monkeypatch.setenv("LOOM_TEST_MARK", str(mark))
    path = tmp_path / "last.ckpt"
    torch.save({"loom": {"mlflow_run_id": "x"}, "evil": _Payload()}, path)
    with pytest.raises(RuntimeError, match="not loaded"):
        safe_load(str(path))
    with pytest.raises(RuntimeError, match=str(path.name)):
        read_run_id(str(path))
    assert not mark.exists()


def test_loom_training_state_loads(tmp_path):
    np.random.seed(3)
    state = {"loom": {"mlflow_run_id": "abc", "rng": {"torch": torch.get_rng_state(),
                                                      "numpy": np.random.get_state()}},
             "state_dict": {"w": torch.ones(2)}}
    path = tmp_path / "last.ckpt"
    torch.save(state, path)
    loaded = safe_load(str(path))
    assert read_run_id(str(path)) == "abc"
    np.testing.assert_array_equal(loaded["loom"]["rng"]["numpy"][1], state["loom"]["rng"]["numpy"][1])


def test_deepspeed_reads_through_the_safe_loader(tmp_path, monkeypatch):
    engine = pytest.importorskip("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine")
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"zero_stage": ZeroStageEnum.gradients, "w": torch.zeros(1)}, good)
    monkeypatch.setenv("LOOM_TEST_MARK", str(tmp_path / "ran"))
    torch.save({"evil": _Payload()}, bad)
    original = engine.TorchCheckpointEngine.load
    with safe_checkpoint_loading():
        ce = engine.TorchCheckpointEngine.__new__(engine.TorchCheckpointEngine)
        assert ce.load(str(good), map_location="cpu")["zero_stage"] == ZeroStageEnum.gradients
        with pytest.raises(RuntimeError, match="not loaded"):
            ce.load(str(bad), map_location="cpu")
    assert engine.TorchCheckpointEngine.load is original
    assert not (tmp_path / "ran").exists()
