"""The shape VAE's data (``loom train vae``): per-frame point subsets, the loader, and the checks that the model's
``tau`` is the shards' SDF truncation. :class:`PointSubset`, :class:`FloatsAsNumpy` and :func:`as_tensor` also feed
the 4D shape DiT (:mod:`loom.training.shape4d.data`), whose frozen VAE reads the same point sets."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.training.vae.config import VAEDataSettings

if TYPE_CHECKING:
    import torch


class PointSubset:
    """Per frame: random subsets of the surface points and of the SDF samples (the loader's per-sample generator,
    so the draw is the same for any number of workers and after a resume), and optionally the query points
    replaced by farthest point samples of the (subset) surface (static shapes)."""

    def __init__(self, surface: int = 0, sdf: int = 0, fps: int = 0):
        self.surface, self.sdf, self.fps = surface, sdf, fps

    @staticmethod
    def _take(a: np.ndarray, n: int, rng: np.random.Generator, key: str) -> np.ndarray:
        t, m = a.shape[:2]
        if n > m:
            raise ValueError(f"cannot take {n} of the {m} {key} per frame of this sample: lower the data setting "
                             "(0 = all)")
        return np.stack([rng.choice(m, n, replace=False) for _ in range(t)])  # (T, n)

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        out = dict(sample)
        rng = rng if rng is not None else np.random.default_rng(0)
        if self.surface:
            idx = self._take(sample["surface"], self.surface, rng, "surface points")
            out["surface"] = np.take_along_axis(sample["surface"], idx[..., None], 1)
        if self.sdf and "sdf" in sample:
            idx = self._take(sample["sdf"], self.sdf, rng, "SDF samples")
            out["sdf"] = np.take_along_axis(sample["sdf"], idx, 1)
            out["sdf_points"] = np.take_along_axis(sample["sdf_points"], idx[..., None], 1)
        if self.fps:
            import torch

            from loom.models.shape_vae import fps_queries

            surf = torch.from_numpy(np.ascontiguousarray(out["surface"]))
            if self.fps > surf.shape[1]:
                raise ValueError(f"data.num_queries={self.fps} exceeds the {surf.shape[1]} surface points per frame")
            out["queries"] = fps_queries(surf, self.fps).numpy()
        return out


class FloatsAsNumpy:
    """The loader's batches with their float arrays handed over as numpy. Lightning's precision plugin casts every
    floating *tensor* of a batch to bf16 under bf16 precision before the module sees it: coordinates would be
    rounded to an 8-bit mantissa (~2e-3 in the unit box, 4% of the SDF truncation) before the VAE's float32
    Fourier features. Resume state is the wrapped loader's."""

    def __init__(self, loader, keys: tuple[str, ...]):
        self.loader, self.keys = loader, keys

    def __iter__(self):
        import torch

        for batch in self.loader:
            for k in self.keys:
                if isinstance(batch.get(k), torch.Tensor) and batch[k].is_floating_point():
                    batch[k] = batch[k].numpy()
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def as_tensor(x) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)


def make_vae_loader(d: VAEDataSettings, seed: int):
    from loom.datasets.loader import LoomLoader
    from loom.datasets.transforms import Compose, SubsampleFrames

    keys = ("surface", "sdf") + (("queries",) if d.queries == "aligned" else ())
    ts = ([SubsampleFrames(d.frames, "random")] if d.frames else []) + [
        PointSubset(d.surface_points, d.sdf_points, d.num_queries if d.queries == "fps" else 0)]
    loader = LoomLoader(d.source, d.batch_size, seed=seed, num_workers=d.num_workers, prefetch=d.prefetch,
                        keys=keys, transform=Compose(*ts))
    return FloatsAsNumpy(loader, ("surface", "queries", "sdf_points", "sdf"))


# ============================================================================================== truncation


def corpus_truncation(url: str) -> float | None:
    """The SDF truncation of the 4D corpus at ``url`` from the 4D job's ``config.yaml`` beside its shards
    (``points.sdf_truncation``), or None when there is none (a bare shard, another writer)."""
    import yaml

    from loom.platform import storage

    path = storage.join(url, "config.yaml")
    try:
        if not storage.exists(path):
            return None
        doc = yaml.safe_load(storage.read_bytes(path)) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None
    value = (doc.get("points") or {}).get("sdf_truncation") if isinstance(doc, dict) else None
    return float(value) if value is not None else None


def check_truncation(tau: float, found: float | None, where: str) -> None:
    """Refuse a model whose ``tau`` is not the data's truncation ``found`` (None: unknown, nothing to check)."""
    if found is not None and not math.isclose(found, tau, rel_tol=1e-4):
        raise ValueError(f"model.tau={tau} but {where} truncates the signed distances at {found}: the VAE predicts "
                         f"sdf / tau, so the two must be equal. Pass --set model.tau={found} (or make the shards "
                         "with points.sdf_truncation equal to model.tau)")


def batch_truncation(sdf: torch.Tensor) -> float | None:
    """The truncation visible in truncated SDF samples: values clipped at +-t pile up at |sdf| = t (a fifth of the
    4D job's samples at the default settings). None when fewer than 1% sit at the maximum (no clipping seen)."""
    a = sdf.detach().abs().flatten().float()
    if a.numel() == 0:
        return None
    top = float(a.max())
    return top if top > 0 and float((a >= top * (1 - 1e-5)).float().mean()) >= 0.01 else None


def check_batch_truncation(tau: float, sdf: torch.Tensor, meta: list | None) -> None:
    for m in meta or []:
        if isinstance(m, dict) and m.get("sdf_truncation") is not None:
            check_truncation(tau, float(m["sdf_truncation"]), f"sample {m.get('uid', '?')} (meta sdf_truncation)")
    top = float(sdf.detach().abs().max()) if sdf.numel() else 0.0
    seen = batch_truncation(sdf)
    if seen is not None:
        check_truncation(tau, seen, "the batch (clipped |sdf| values)")
    elif top > tau * (1 + 1e-4):
        raise ValueError(f"model.tau={tau} but the batch holds |sdf| up to {top:.4g}: the shards are truncated "
                         f"farther out than the model's tau. Pass --set model.tau=<the shards' sdf_truncation>")
