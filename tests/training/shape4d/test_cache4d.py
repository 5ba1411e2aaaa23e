"""``loom cache 4d`` and training from its shards: the frozen shape VAE and DINOv2 run once over a 4D corpus (real Ray,
real sandbox processes, the `loom` command), the cached latents and tokens equal what the training step computes
from the corpus itself, a cache made with other encoders is refused, and ``loom train shape4d`` trains from it."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from loom.corpora import latents4d
from loom.datasets.io import generic_decode
from loom.platform import config as cfgmod
from loom.platform import shards
from loom.training import shape4d
from loom.training.shape4d.data import make_shape4d_loader
from tests.training.corpus4d import loom, loom_train, once, shared_corpus

pytest.importorskip("lightning")
pytest.importorskip("point_cloud_utils")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return shared_corpus(tmp_path_factory)


def cache(corpus, out, *sets):
    args = ["cache", "4d", "--recipe", "tiny", "--source", corpus, "--out", out, "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return loom(*args)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, corpus):
    return once(tmp_path_factory, "4d-latents", lambda p: cache(corpus, p))


def module(source, *sets):
    from loom.training.shape4d.module import Shape4DModule

    sets = (f"data.source={source}", "data.batch_size=2", *sets)
    cfg = cfgmod.resolve(shape4d.TrainShape4DJob, "tiny", cfgmod.parse_set(sets))
    return Shape4DModule(cfg)


def batch_of(m):
    return next(iter(m.make_loader()))


def test_cache_holds_what_the_training_step_would_compute(corpus, cached):
    m = shards.read_manifest(cached)
    assert m["kind"] == "latents4d" and m["complete"] and sum(s["samples"] for s in m["shards"]) == 2
    raw, cache_m = module(corpus), module(cached)
    x_raw, img_raw = raw.condition(batch_of(raw))
    b = batch_of(cache_m)
    assert set(b) >= {"shape_latent", "image_tokens", "meta"} and "surface" not in b and "video" not in b
    x_c, img_c = cache_m.condition(b)
    assert x_c.shape == x_raw.shape and img_c.shape == img_raw.shape
    torch.testing.assert_close(x_c, x_raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(img_c, img_raw, atol=1e-5, rtol=1e-5)
    meta = b["meta"][0]["latents4d"]
    assert meta["encoders"]["vae"]["latent_channels"] == x_c.shape[-1]
    assert meta["source"]["shard_sha256"] in {s["sha256"] for s in shards.read_manifest(corpus)["shards"]}
    # frames are subsampled in the cached arrays as in the corpus's
    two = make_shape4d_loader(dataclasses.replace(cache_m.cfg.data, frames=2, batch_size=1), 0, cached=True)
    assert next(iter(two))["shape_latent"].shape[1] == 2


def test_a_cache_of_other_encoders_or_with_point_settings_is_refused(tmp_path, cached):
    m = module(cached, "trainer.seed=1")  # the tiny encoders of another seed: other weights
    with pytest.raises(ValueError, match="cached with another vae than this run's model.vae"):
        m.condition(batch_of(m))
    with pytest.raises(ValueError, match="data.surface_points"):
        module(cached, "data.surface_points=64").make_loader()
    p = loom("cache", "4d", "--recipe", "tiny", "--source", cached, "--out", str(tmp_path / "x"), check=False)
    assert p.returncode != 0 and "encodes 4D corpora" in p.stderr


def test_fixed_point_subsets_follow_the_seed_and_the_key(tmp_path, corpus):
    """The sandbox entry in this process (the job around it is tested above): the same subsets on every run."""
    def encode(**sets):
        cfg = cfgmod.resolve(latents4d.Cache4DJob, "tiny", cfgmod.parse_set(
            [f"source={corpus}", f"out={tmp_path / 'o'}", *(f"{k}={v}" for k, v in sets.items())]))
        task = latents4d.job_spec(cfg).tasks[0]
        res = latents4d.encode_entry({**task.params, "workdir": str(tmp_path)})
        assert not res["failures"]
        return [generic_decode(files) for _, files in res["samples"]]

    a, b, c, every = encode(surface_points=128), encode(surface_points=128), encode(surface_points=128, seed=3), encode()
    assert a[0]["meta"]["latents4d"]["points"]["surface"] == 128 and every[0]["meta"]["latents4d"]["points"][
        "surface"] > 128
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x["shape_latent"], y["shape_latent"])  # the same subsets from the same seed
    assert not np.allclose(a[0]["shape_latent"], every[0]["shape_latent"])  # a subset, not every point
    # another seed: other tiny encoders and other subsets
    assert c[0]["meta"]["latents4d"]["encoders"] != a[0]["meta"]["latents4d"]["encoders"]


def test_train_shape4d_from_the_cache(tmp_path, cached):
    out = str(tmp_path / "run")
    loom_train("shape4d", out, cached, "trainer.max_steps=2", "trainer.checkpoint_every=2")
    with open(os.path.join(out, "spatiotemporal", "loom.json")) as f:
        info = json.load(f)
    assert info["step"] == 2 and info["base_digest_start"] == info["base_digest_end"]
