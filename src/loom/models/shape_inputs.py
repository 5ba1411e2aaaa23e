"""What the shape VAE reads from a sample of Loom's 4D corpora (``loom.datasets.shape4d``), shared by the VAE's and the
4D DiT's training (:mod:`loom.training.vae.data`, :mod:`loom.training.shape4d.data`) and the 4D latent cache
(:mod:`loom.corpora.latents4d`), so all three feed the frozen VAE the same point sets: per-frame point subsets,
the encoder's keyword inputs, the [-1, 1] box check of Step1X-3D's frame, and the frames-to-latents call."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# The reader's message for shards without sharp-edge points (loom.datasets.shape4d.SHARP_MISSING says the same; the
# model layer does not import the datasets layer).
SHARP_MISSING = ("batch has no 'sharp_surface' (sharp-edge points, the input of the Step1X-3D VAE's sharp branch): "
                 "its corpus was written with points.sharp_points=0 or before they existed. Re-render it with "
                 "`loom render 4d --set points.sharp_points=32768` (the default recipe writes them)")


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


def as_tensor(x) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)


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


def encode_frames(vae, batch: dict, chunk: int, device=None) -> torch.Tensor:
    """A batch of 4D samples (``surface`` (B,T,S,6), ``queries`` (B,T,Q,3) [, ``sharp_surface``]) -> the frozen
    VAE's posterior means (B,T,Q,C) float32 on ``device`` (default: the VAE's), ``chunk`` frames per encoder call.
    4D: the aligned queries are all the latents (uniform branch); the sharp-edge points only feed the sharp
    cross-attention (ShapeGen4D 3.2)."""
    import torch

    sharp = vae.config.sharp_edges
    check_box(sharp, batch.get("meta"))
    inputs = encoder_inputs(batch, sharp)  # surface (B*T,S,6), queries (B*T,Q,3)[, sharp_surface (B*T,S',6)]
    b, t = batch["queries"].shape[:2]
    dev = vae.device if device is None else device
    with torch.no_grad():
        lat = [vae.encode(sample=False, **{k: v[i: i + chunk] for k, v in inputs.items()})[0].to(dev)
               for i in range(0, b * t, chunk)]
    return torch.cat(lat).view(b, t, *lat[0].shape[1:])
