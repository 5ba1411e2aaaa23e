"""The shape VAE's data (``loom train vae``): per-frame point subsets, the loader, and the checks that the model's
``tau`` is the shards' SDF truncation. :class:`PointSubset`, :class:`FloatsAsNumpy` and :func:`as_tensor` also feed
the 4D shape DiT (:mod:`loom.training.shape4d.data`), whose frozen VAE reads the same point sets."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.datasets.shape4d import SHARP_MISSING
from loom.training.vae.config import VAEDataSettings

if TYPE_CHECKING:
    import torch


class PointSubset:
    """Per frame: random subsets of the surface points, of the sharp-edge points and of the SDF samples (the
    loader's per-sample generator, so the draw is the same for any number of workers and after a resume), and
    optionally the query points replaced by farthest point samples (static shapes): ``fps`` of the (subset)
    surface, or with ``sharp_fps`` Step1X-3D's split, ``fps // 2`` of the surface as ``queries`` and
    ``fps // 2`` of the sharp-edge points as ``sharp_queries`` (its ``num_latents / 2`` each,
    ``michelangelo_autoencoder.py`` ``use_downsample``)."""

    def __init__(self, surface: int = 0, sdf: int = 0, fps: int = 0, sharp: int = 0, sharp_fps: bool = False):
        if sharp_fps and (fps < 2 or fps % 2):
            raise ValueError(f"data.num_queries={fps} must be even and >= 2 with a sharp-edge VAE: half the queries "
                             "come from the surface, half from the sharp-edge points")
        self.surface, self.sdf, self.fps, self.sharp, self.sharp_fps = surface, sdf, fps, sharp, sharp_fps

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
        if self.sharp and "sharp_surface" in sample:
            idx = self._take(sample["sharp_surface"], self.sharp, rng, "sharp-edge points")
            out["sharp_surface"] = np.take_along_axis(sample["sharp_surface"], idx[..., None], 1)
        if self.sdf and "sdf" in sample:
            idx = self._take(sample["sdf"], self.sdf, rng, "SDF samples")
            out["sdf"] = np.take_along_axis(sample["sdf"], idx, 1)
            out["sdf_points"] = np.take_along_axis(sample["sdf_points"], idx[..., None], 1)
        if self.fps:
            import torch

            from loom.models.shape_vae import fps_queries

            q = self.fps // 2 if self.sharp_fps else self.fps
            sets = [("queries", "surface")] + ([("sharp_queries", "sharp_surface")] if self.sharp_fps else [])
            for key, cloud in sets:
                pts = torch.from_numpy(np.ascontiguousarray(out[cloud]))
                if q > pts.shape[1]:
                    raise ValueError(f"data.num_queries={self.fps} asks for {q} farthest points of {cloud!r}, which "
                                     f"has {pts.shape[1]} per frame")
                out[key] = fps_queries(pts, q).numpy()
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


POINT_FLOATS = ("surface", "sharp_surface", "queries", "sharp_queries", "sdf_points", "sdf")


def make_vae_loader(d: VAEDataSettings, seed: int, sharp: bool = False):
    """The loader of ``loom train vae``; ``sharp``: the VAE has the sharp-edge branch, so batches carry
    ``sharp_surface`` (and, with ``data.queries=fps``, ``sharp_queries``)."""
    from loom.datasets.loader import LoomLoader
    from loom.datasets.transforms import Compose, SubsampleFrames

    keys = ("surface", "sdf") + (("queries",) if d.queries == "aligned" else ()) + (("sharp_surface",) if sharp else ())
    fps = d.num_queries if d.queries == "fps" else 0
    ts = ([SubsampleFrames(d.frames, "random")] if d.frames else []) + [
        PointSubset(d.surface_points, d.sdf_points, fps, sharp=d.sharp_points if sharp else 0,
                    sharp_fps=sharp and bool(fps))]
    loader = LoomLoader(d.source, d.batch_size, seed=seed, num_workers=d.num_workers, prefetch=d.prefetch,
                        keys=keys, transform=Compose(*ts))
    return FloatsAsNumpy(loader, POINT_FLOATS)


def encoder_inputs(batch: dict, sharp_edges: bool) -> dict[str, torch.Tensor]:
    """The shape VAE's encoder inputs of a batch, float32 with frames flattened into the batch: ``surface``
    (B*T,S,6), ``queries`` (B*T,Q,3) and, for a VAE with the sharp-edge branch, ``sharp_surface`` (B*T,S',6) and
    ``sharp_queries`` (B*T,Q',3) when the batch has them (static shapes: `PointSubset` ``sharp_fps``; 4D: none,
    the aligned queries are all the latents). Keyword names are `ShapeVAE.encode`'s."""
    if sharp_edges and "sharp_surface" not in batch:
        raise ValueError(SHARP_MISSING)
    out = {k: as_tensor(batch[k]).float().flatten(0, 1) for k in ("surface", "queries")}
    if sharp_edges:
        out["sharp_surface"] = as_tensor(batch["sharp_surface"]).float().flatten(0, 1)
        if "sharp_queries" in batch:
            out["sharp_queries"] = as_tensor(batch["sharp_queries"]).float().flatten(0, 1)
    return out


# ============================================================================================== truncation


def corpus_config(url: str) -> dict | None:
    """The 4D job's ``config.yaml`` beside the shards at ``url`` as a dict, or None when there is none (a bare
    shard, another writer)."""
    import yaml

    from loom.platform import storage

    path = storage.join(url, "config.yaml")
    try:
        if not storage.exists(path):
            return None
        doc = yaml.safe_load(storage.read_bytes(path)) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return doc if isinstance(doc, dict) else None


def corpus_truncation(url: str) -> float | None:
    """The SDF truncation of the 4D corpus at ``url`` from the 4D job's ``config.yaml`` beside its shards
    (``points.sdf_truncation``), or None when there is none (a bare shard, another writer)."""
    value = ((corpus_config(url) or {}).get("points") or {}).get("sdf_truncation")
    return float(value) if value is not None else None


def check_sharp_points(sharp_edges: bool, url: str, what: str) -> None:
    """Refuse, before the first step, a VAE with the sharp-edge branch on a corpus whose ``config.yaml`` says it
    was written without sharp-edge points (``points.sharp_points`` 0 or absent). Without a config.yaml the reader
    refuses the first sample that lacks them (`loom.datasets.shape4d.SHARP_MISSING`)."""
    cfg = corpus_config(url)
    if not sharp_edges or cfg is None:
        return
    n = (cfg.get("points") or {}).get("sharp_points")
    if not n:
        raise ValueError(f"{what} has Step1X-3D's sharp-edge branch (sharp_edges=True): it reads the shards' "
                         f"'sharp_surface' key, but {url} was written with points.sharp_points={n or 0}. Re-render "
                         "it with `loom render 4d --set points.sharp_points=32768` (the default recipe writes "
                         "them), or use a VAE without the branch")


# The released Step1X-3D VAE's frame: shapes normalised to [-1, 1]^3 (meshes extracted in +-1.05).
VAE_HALF_EXTENT = 1.0


def check_box(sharp_edges: bool, meta: list | None) -> None:
    """Refuse samples outside Step1X-3D's [-1, 1] box for a VAE with its sharp-edge branch (the released
    architecture, trained in that box): a shape at half the size would be a different distribution."""
    if not sharp_edges:
        return
    for m in meta or []:
        h = m.get("half_extent") if isinstance(m, dict) else None
        if h is not None and not math.isclose(float(h), VAE_HALF_EXTENT):
            raise ValueError(f"sample {m.get('uid', '?')} lies in the box [-{h}, {h}]^3 but a Step1X-3D VAE (sharp "
                             f"edges) reads shapes in [-{VAE_HALF_EXTENT}, {VAE_HALF_EXTENT}]^3: re-render the "
                             f"corpus with sequence.half_extent={VAE_HALF_EXTENT} (the default)")


def check_truncation(tau: float, found: float | None, where: str) -> None:
    """Refuse a model whose ``tau`` exceeds the data's truncation ``found`` (None: unknown, nothing to check).

    The VAE predicts ``clip(sdf, -tau, tau) / tau``. Shards truncated at ``found >= tau`` hold that target exactly
    (``clip(clip(x, found), tau) = clip(x, tau)``) and the step clips them to tau, as Step1X-3D clips its stored
    SDF at ``tsdf_threshold`` when it loads it (``step1x3d_geometry/data/base.py`` lines 189-195); shards
    truncated tighter than tau have lost the values between ``found`` and tau."""
    if found is not None and found < tau * (1 - 1e-4):
        raise ValueError(f"model.tau={tau} but {where} truncates the signed distances at {found}: the VAE predicts "
                         f"clip(sdf, -tau, tau) / tau, which the shards lost beyond {found}. Pass --set "
                         f"model.tau={found} (or make the shards with points.sdf_truncation >= model.tau)")


def batch_truncation(sdf: torch.Tensor) -> float | None:
    """The truncation visible in truncated SDF samples: values clipped at +-t pile up at |sdf| = t (a fifth of the
    4D job's samples at the default settings). None when fewer than 1% sit at the maximum (no clipping seen)."""
    a = sdf.detach().abs().flatten().float()
    if a.numel() == 0:
        return None
    top = float(a.max())
    return top if top > 0 and float((a >= top * (1 - 1e-5)).float().mean()) >= 0.01 else None


def check_batch_truncation(tau: float, sdf: torch.Tensor, meta: list | None) -> None:
    """`check_truncation` against the samples' meta ``sdf_truncation`` and the truncation visible in the batch
    (clipped values piling up below tau)."""
    for m in meta or []:
        if isinstance(m, dict) and m.get("sdf_truncation") is not None:
            check_truncation(tau, float(m["sdf_truncation"]), f"sample {m.get('uid', '?')} (meta sdf_truncation)")
    seen = batch_truncation(sdf)
    if seen is not None:
        check_truncation(tau, seen, "the batch (clipped |sdf| values)")
