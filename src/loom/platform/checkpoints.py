"""Reading Loom training checkpoints without unpickling code: shared by training (resume) and inference (export).

A run folder may sit on a shared volume; whoever resumes from it or exports it must not run code that someone put in
a pickle. :func:`safe_load` is ``torch.load(weights_only=True)`` admitting only what a Loom training checkpoint holds
besides tensors and plain containers (:func:`checkpoint_safe_globals`). DeepSpeed's own readers call
``torch.load(weights_only=False)``; :func:`safe_torch_load` routes them through the same check for the duration of a
call. torch, numpy and DeepSpeed are imported inside the functions (DeepSpeed is optional).
"""

from __future__ import annotations

import contextlib
import pickle
from typing import Any


DEEPSPEED_MARKER = "latest"  # a DeepSpeed checkpoint folder is complete once this file (naming its tag) is there


def checkpoint_complete(url: str) -> bool:
    """A checkpoint (path or URL) that is there whole: a file (Lightning's, written atomically), or a DeepSpeed
    folder with its marker (written last). Shared by resume (training) and export (inference)."""
    from loom.platform import storage

    return storage.isfile(url) or storage.isfile(storage.join(url, DEEPSPEED_MARKER))


def checkpoint_safe_globals() -> list:
    """What a Loom training checkpoint holds besides tensors and plain containers: the numpy RNG state Loom saves,
    and DeepSpeed's ZeRO optimizer state (its loss scaler, stage enum and fragment addresses). Plain data classes:
    unpickling them sets attributes and calls nothing else."""
    import numpy as np

    allowed: list = [np.ndarray, np.dtype]
    try:  # where numpy's array reconstructor lives: numpy.core (1.x) or numpy._core (2.x)
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    allowed.append(_reconstruct)
    allowed += [type(np.dtype(t)) for t in ("uint32", "uint8", "int64", "float32", "float64", "bool")]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # DeepSpeed is optional for strategy=ddp, and for inference
        pass
    return allowed


def _refuse(path: Any, e: Exception) -> RuntimeError:
    return RuntimeError(
        f"checkpoint {path} holds objects other than tensors and the training state Loom writes, so it is not "
        f"loaded (unpickling it could run code). It was not written by this Loom's training, or was changed; "
        f"use a checkpoint you made. Details: {str(e).splitlines()[-1][:300]}")


def safe_load(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` admitting only :func:`checkpoint_safe_globals`: a run folder on a shared
    volume cannot run code on whoever resumes from it or exports it (DeepSpeed's own loader would unpickle
    anything)."""
    import torch

    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refuse(path, e) from None


@contextlib.contextmanager
def safe_torch_load():
    """Within it, every ``torch.load`` (including DeepSpeed's ``zero_to_fp32``, which asks for
    ``weights_only=False``) is :func:`safe_load`'s: weights only, Loom's allowed classes. Process-wide while it
    lasts: for a command's single thread, around one library call."""
    import torch

    original = torch.load
    allowed = checkpoint_safe_globals()

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        with torch.serialization.safe_globals(allowed):
            try:
                return original(f, map_location=map_location, weights_only=True, mmap=mmap)
            except pickle.UnpicklingError as e:
                raise _refuse(f, e) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
