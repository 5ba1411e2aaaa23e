"""The shape VAE's data (``loom train vae``): the loader, and the checks that the corpus suits the model (its
``tau`` is the shards' SDF truncation, sharp-edge points where the VAE has the branch). What the VAE reads from a
sample (point subsets, encoder inputs, the box check) is :mod:`loom.models.shape_inputs`, shared with the 4D DiT
(:mod:`loom.training.shape4d.data`) and the 4D latent cache. :class:`FloatsAsNumpy` also feeds the 4D DiT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.models.shape_inputs import PointSubset
from loom.training.vae.config import VAEDataSettings

if TYPE_CHECKING:
    import torch


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
