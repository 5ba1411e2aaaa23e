"""The frozen Step1X-3D VAE's sharp-edge input in 4D training: batches carry ``sharp_surface``, the aligned queries
stay all the latents (no sharp queries), and shards without sharp points or outside the [-1, 1] box are refused."""

import dataclasses

import pytest

from loom.models.shape_vae import ShapeVAE
from loom.platform import config as cfgmod
from loom.training import shape4d
from loom.training.shape4d.data import make_shape4d_loader
from tests.training.vae.test_sharp_inputs import SHARP, plain_corpus, sharp_corpus  # noqa: F401 (fixtures)

pytest.importorskip("point_cloud_utils")
pytest.importorskip("lightning")


def tiny(*sets):
    return cfgmod.resolve(shape4d.TrainShape4DJob, "tiny", cfgmod.parse_set(sets))


def test_frozen_sharp_vae_encodes_aligned_queries_with_the_frames_sharp_points(sharp_corpus, plain_corpus):
    from loom.training.shape4d.module import Shape4DModule

    cfg = tiny(f"data.source={sharp_corpus}", "data.sharp_points=32")
    b = next(iter(make_shape4d_loader(dataclasses.replace(cfg.data, batch_size=2), 0, sharp=True)))
    assert b["sharp_surface"].shape == (2, 3, 32, 6) and "sharp_queries" not in b
    m = Shape4DModule(cfg)
    m._vae[0] = ShapeVAE.tiny(sharp_edges=True).eval().requires_grad_(False)
    with pytest.raises(ValueError, match="half_extent=1.0"):  # corpus4d's arm lies in the old 0.5 box
        m.condition(b)
    for meta in b["meta"]:
        meta["half_extent"] = 1.0
    x0, _ = m.condition(b)
    assert x0.shape == (2, 3, 16, 8)  # (B, T, aligned queries, C): no sharp latents in 4D
    m.make_loader()  # the corpus says it has sharp points
    m.cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=plain_corpus))
    with pytest.raises(ValueError, match=r"model.vae=tiny.*points.sharp_points"):
        m.make_loader()
    b.pop("sharp_surface")
    with pytest.raises(ValueError, match="points.sharp_points"):
        m.condition(b)
