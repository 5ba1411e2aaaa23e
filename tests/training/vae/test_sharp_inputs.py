"""The shape VAE's sharp-edge inputs in training: shards with ``sharp_surface`` (the 4D job's points.sharp_points)
through the loader, Step1X-3D's split of FPS queries for static shapes, and the refusals of a sharp-edge VAE on
shards without those points or outside its [-1, 1] box. Fast: a two-sample corpus made in-process."""

import dataclasses
import os
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

from loom.corpora.shape4d import process_sequence
from loom.models.shape_vae import ShapeVAE
from loom.platform import config as cfgmod
from loom.training import vae as vae_line
from loom.models import shape_inputs
from loom.training.vae import data as vae_data
from tests.training import corpus4d

pytest.importorskip("point_cloud_utils")
pytest.importorskip("fpsample")

SHARP = 48


def _with_sharp(seq, p, **kw):
    return process_sequence(seq, {**p, "sharp_points": SHARP}, **kw)


@pytest.fixture(scope="module")
def sharp_corpus(tmp_path_factory):
    """corpus4d's arm corpus with SHARP sharp-edge points per frame, its config.yaml saying so."""
    out = str(tmp_path_factory.mktemp("sharp4d"))
    with mock.patch.object(corpus4d, "process_sequence", _with_sharp):
        corpus4d.make_4d_corpus(out, samples=2, frames=3, surface=256, queries=16, sdf_near=128, sdf_volume=64)
    path = os.path.join(out, "config.yaml")
    with open(path) as f:
        doc = yaml.safe_load(f)
    doc["points"]["sharp_points"] = SHARP
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return out


@pytest.fixture(scope="module")
def plain_corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("plain4d"))
    corpus4d.make_4d_corpus(out, samples=2, frames=2, surface=256, queries=16, sdf_near=128, sdf_volume=64)
    return out


def tiny(*sets):
    return cfgmod.resolve(vae_line.TrainVAEJob, "tiny", cfgmod.parse_set(("data.sdf_points=100",) + sets))


def batch_of(cfg, sharp):
    return next(iter(vae_data.make_vae_loader(dataclasses.replace(cfg.data, batch_size=2), 0, sharp=sharp)))


def test_static_batches_split_fps_queries_between_surface_and_sharp_points(sharp_corpus):
    cfg = tiny(f"data.source={sharp_corpus}", "data.queries=fps", "data.num_queries=12", "data.sharp_points=40")
    b = batch_of(cfg, sharp=True)
    assert isinstance(b["sharp_surface"], np.ndarray)  # handed over as numpy, not bf16-cast
    assert b["sharp_surface"].shape == (2, 3, 40, 6)
    assert b["queries"].shape == b["sharp_queries"].shape == (2, 3, 6, 3)
    for key, cloud in (("queries", "surface"), ("sharp_queries", "sharp_surface")):
        d = np.linalg.norm(b[key][:, :, :, None] - b[cloud][:, :, None, :, :3], axis=-1)
        assert d.min(-1).max() < 1e-6  # FPS of the points of that set
    inputs = shape_inputs.encoder_inputs(b, sharp_edges=True)
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {
        "surface": (6, 256, 6), "queries": (6, 6, 3), "sharp_surface": (6, 40, 6), "sharp_queries": (6, 6, 3)}
    vae = ShapeVAE.tiny(sharp_edges=True, num_latents=12)
    latents, _ = vae.encode(sample=False, **inputs)
    assert latents.shape == (6, 12, vae.config.latent_channels)  # Q + Q' latents, upstream's 2 x 1,024 at size
    with pytest.raises(ValueError, match="even"):
        shape_inputs.PointSubset(fps=7, sharp_fps=True)


def test_aligned_batches_carry_sharp_points_but_no_sharp_queries(sharp_corpus):
    b = batch_of(tiny(f"data.source={sharp_corpus}"), sharp=True)
    assert b["sharp_surface"].shape == (2, 3, SHARP, 6) and "sharp_queries" not in b
    inputs = shape_inputs.encoder_inputs(b, sharp_edges=True)
    assert set(inputs) == {"surface", "queries", "sharp_surface"}
    vae = ShapeVAE.tiny(sharp_edges=True)
    latents, _ = vae.encode(sample=False, **inputs)
    assert latents.shape[:2] == (6, 16)  # the aligned queries are all the latents
    assert set(shape_inputs.encoder_inputs(b, sharp_edges=False)) == {"surface", "queries"}


def test_a_sharp_vae_is_refused_on_shards_without_sharp_points(plain_corpus, sharp_corpus):
    with pytest.raises(ValueError, match=r"sharp_surface.*points.sharp_points=0"):
        vae_data.check_sharp_points(True, plain_corpus, "the VAE")
    vae_data.check_sharp_points(False, plain_corpus, "the VAE")
    vae_data.check_sharp_points(True, sharp_corpus, "the VAE")
    b = batch_of(tiny(f"data.source={plain_corpus}"), sharp=False)
    with pytest.raises(ValueError, match="points.sharp_points"):
        shape_inputs.encoder_inputs(b, sharp_edges=True)
    with pytest.raises(Exception, match="points.sharp_points"):  # the reader, where no config.yaml says it
        batch_of(tiny(f"data.source={plain_corpus}"), sharp=True)
    from loom.training.vae.module import VAEModule

    cfg = tiny(f"data.source={plain_corpus}", "model.sharp_edges=true", "data.num_queries=16")
    m = VAEModule(cfg)
    assert m.vae.config.sharp_edges
    with pytest.raises(ValueError, match="points.sharp_points"):
        m.make_loader()


def test_a_sharp_vae_is_refused_outside_the_step1x3d_box():
    shape_inputs.check_box(True, [{"uid": "a", "half_extent": 1.0}])
    shape_inputs.check_box(False, [{"uid": "a", "half_extent": 0.5}])
    with pytest.raises(ValueError, match=r"sequence.half_extent=1.0"):
        shape_inputs.check_box(True, [{"uid": "a", "half_extent": 0.5}])


def test_recipes_match_their_shards():
    from loom.corpora import shape4d as job

    paper, smoke = (cfgmod.resolve(job.Render4DJob, n, []) for n in ("default", "smoke"))
    assert tiny().model.tau == 0.01 <= smoke.points.sdf_truncation  # the tiny VAE reads smoke and default shards
    assert cfgmod.resolve(vae_line.TrainVAEJob, "default", []).model.tau == paper.points.sdf_truncation == 0.01
    assert paper.sequence.half_extent == shape_inputs.VAE_HALF_EXTENT
    assert paper.points.sharp_points == paper.points.surface == 32768
    assert 0 < smoke.points.sharp_points < 1000
