"""``loom cache latents``: a tiny random Wan VAE (and tiny random umT5 and CLIP encoders) over a tiny fake-rendered
turntable corpus, through real Ray and real sandbox processes, checked for shapes, keys, parity with direct encoder
runs, captions, resume and clear errors."""

import json
import os

import numpy as np
import pytest
import torch

from loom.datasets import latents as lat_ds
from loom.datasets.ttv import iter_samples as iter_ttv
from loom.corpora import latents
from loom.platform import config as c
from loom.platform import shards, storage

diffusers = pytest.importorskip("diffusers")

TINY_VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True],
            "latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [1.5, 0.5, 2.0, 1.0]}


def save_tiny_vae(path) -> str:
    torch.manual_seed(0)
    diffusers.AutoencoderKLWan(**TINY_VAE).save_pretrained(str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------- unit tests


# The frame policies (trim, pad, exact) are the model line's: tests/models/test_ttv.py.


def test_input_mappings_are_in_range():
    rgb = np.array([[[[0, 255, 128]]]], np.uint8)
    x = latents.video_input("rgb", rgb)
    assert x.shape == (3, 1, 1, 1) and x[0].item() == -1.0 and x[1].item() == 1.0
    pos = np.array([[[[0.5, -2.0, 0.0]]]], np.float32)
    assert latents.video_input("position", pos, 0.5).flatten().tolist() == [1.0, -1.0, 0.0]


def test_vae_shapes_and_mask_pooling(tmp_path):
    from loom.models.video_vae import load_video_vae

    vae = load_video_vae(save_tiny_vae(tmp_path / "vae"))
    assert (vae.spatial_factor, vae.temporal_factor, vae.z_dim) == (8, 4, 4)
    assert not any(p.requires_grad for p in vae.parameters())
    z = vae.encode(torch.rand(2, 3, 9, 16, 24) * 2 - 1)
    assert z.shape == (2, 4, 3, 2, 3) == (2, *vae.latent_shape(9, 16, 24))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    m = torch.zeros(5, 16, 16)
    m[0, :8, :8] = 1  # first frame alone -> latent frame 0
    m[1:3, 8:, 8:] = 1  # half of frames 1..4 -> latent frame 1
    p = vae.pool_mask(m)
    assert p.shape == (2, 2, 2)
    assert p[0].tolist() == [[1.0, 0.0], [0.0, 0.0]] and p[1].tolist() == [[0.0, 0.0], [0.0, 0.5]]


def test_sample_text_captions_win_over_the_template():
    meta = {"uid": "u1", "variant": 2, "lighting": {"hdri": "studio"}}
    t = "a {uid} (v{variant}, {lighting[hdri]}) {key}"
    assert latents.sample_text("k", meta, t, None) == ("a u1 (v2, studio) k", "template", [])
    assert latents.sample_text("k", meta, t, {"u1": "a red chair"}) == ("a red chair", "captions", [])
    text, src, warnings = latents.sample_text("k", meta, t, {"u2": "a red chair"})
    assert (text, src) == ("a u1 (v2, studio) k", "template") and "'u1'" in warnings[0]
    with pytest.raises(ValueError, match="license"):
        latents.sample_text("k", meta, "{license}", None)


def test_captions_files(tmp_path):
    rows = tmp_path / "c.jsonl"
    rows.write_text('{"uid": "a", "caption": "x"}\n\n{"uid": "b", "caption": "y"}\n')
    assert latents.read_captions(str(rows))[0] == {"a": "x", "b": "y"}
    obj = tmp_path / "c.json"
    obj.write_text('{"a": "x"}')
    assert latents.read_captions(str(obj))[0] == {"a": "x"}
    for text, match in [('{"uid": "a"}', "line 1"), ('{"uid": "a", "caption": "x"}\n{"uid": "a", "caption": "z"}',
                                                     "two different"), ('{"uid": "a", "caption": " "}', "empty")]:
        rows.write_text(text)
        with pytest.raises(ValueError, match=match):
            latents.read_captions(str(rows))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        latents.read_captions(str(tmp_path / "nope.jsonl"))
    # In the sandbox: a captions file changed since the job was planned is refused, not silently used.
    from loom.platform.errors import TaskError

    obj.write_text('{"a": "x"}')
    planned = {"captions": str(obj), "captions_sha256": latents.read_captions(str(obj))[1]}
    assert latents._captions(planned) == {"a": "x"}
    obj.write_text('{"a": "changed"}')
    latents._STATE.pop("captions", None)
    with pytest.raises(TaskError, match="changed"):
        latents._captions(planned)


def test_missing_vae_dir_is_named(tmp_path):
    cfg = c.resolve(latents.CacheLatentsJob, "default", [("vae", str(tmp_path / "no-such-vae")),
                                                         ("source", str(tmp_path))])
    with pytest.raises(FileNotFoundError, match="no-such-vae"):
        latents.job_spec(cfg)


def test_recipes_load_and_bad_settings_are_refused():
    for name in c.recipes(latents.CacheLatentsJob):
        assert isinstance(c.resolve(latents.CacheLatentsJob, name), latents.CacheLatentsJob)
    job = latents.CacheLatentsJob
    assert c.resolve(job, "default", [("text_encoder", "/x"), ("prompt", "a {uid}, light {lighting[hdri]}")])
    # Settings that would be ignored without their encoder, and templates naming what a sample does not have.
    for key, value in [("captions", "c.jsonl"), ("tokenizer", "/t"), ("prompt", "a chair"),
                       ("image_processor", "/p")]:
        with pytest.raises(c.ConfigError, match=key):
            c.resolve(job, "default", [(key, value)])
    for template, match in [("a {colour} chair", "colour"), ("a {} chair", "positional"), ("a {uid", "template")]:
        with pytest.raises(c.ConfigError, match=match):
            c.resolve(job, "default", [("text_encoder", "/x"), ("prompt", template)])
    with pytest.raises(c.ConfigError, match="captions"):
        c.resolve(job, "default", [("text_encoder", "/x"), ("captions", "caps.txt")])
    with pytest.raises(c.ConfigError, match="passes"):
        c.resolve(latents.CacheLatentsJob, "default", [("passes", ["rgb", "depth"])])
    with pytest.raises(c.ConfigError, match="partial=false"):  # a partial texture needs the colour and positions
        c.resolve(latents.CacheLatentsJob, "default", [("passes", ["normal"])])
    with pytest.raises(c.ConfigError, match="gpus_per_worker"):
        c.resolve(latents.CacheLatentsJob, "default", [("device", "cuda")])


# ------------------------------------------------------------------------------------------ the job, with Ray


def make_corpus(out, frames=5, *sets) -> str:
    """A finished turntable job's folder: fake renders of 3 assets, 2 per shard (2 shards), no Ray needed."""
    from loom.corpora import ttv
    from loom.platform.jobs import plan_shards

    folder = out.parent / "assets"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (folder / f"cube{i}.obj").write_text(f"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n# {i}\n")
    from loom.corpora.assets import resolve_source
    from loom.corpora.base import job_spec

    cfg = c.resolve(ttv.RenderTTVJob, "smoke", c.parse_set(
        ["render.backend=fake", f"out={out}", f"orbit.frames={frames}", "render.width=32", "render.height=24", *sets]))
    spec = job_spec(cfg, resolve_source(str(folder)))
    for sh in plan_shards(spec.tasks, "ttv", 2):
        samples = []
        for t in sh["tasks"]:
            res = ttv.render_entry({**spec.params(t), "asset_path": t.asset["path"], "workdir": str(out.parent)})
            samples.append((t.key, res["files"]))
        size, sha, keys = shards.write_tar(shards.shard_url(str(out), sh["name"]), samples)
        shards.write_sidecar(str(out), shards.ShardRecord(name=sh["name"], samples=len(keys), size=size, sha256=sha,
                                                          keys=keys))
    shards.write_manifest(str(out), [s["name"] for s in plan_shards(spec.tasks, "ttv", 2)], extra={"kind": "ttv"})
    return str(out)


@pytest.mark.integration
def test_cache_job_parity_resume_and_keys(ray_local, tmp_path):
    src = make_corpus(tmp_path / "ttv", frames=7)  # 7 frames: trimmed to 5 -> 2 latent frames
    vae_dir = save_tiny_vae(tmp_path / "vae")
    cfg = c.resolve(latents.CacheLatentsJob, "default", [("source", src), ("out", str(tmp_path / "lat")),
                                                         ("vae", vae_dir), ("store_dtype", "float32"),
                                                         ("batch", 2)])
    spec = latents.job_spec(cfg)
    s = latents.run_cache(spec, progress=False)
    assert (s.samples_done, s.failed, s.shards_done) == (3, 0, 2)
    assert shards.verify(cfg.out) == []

    source = {smp["__key__"]: smp for smp in iter_ttv(src)}
    got = {smp["__key__"]: smp for smp in lat_ds.iter_samples(cfg.out)}
    assert sorted(got) == sorted(source) and len(got) == 3
    # Output shard i holds the keys of source shard i.
    for a, b in zip(shards.read_manifest(src)["shards"], shards.read_manifest(cfg.out)["shards"], strict=True):
        assert a["keys"] == b["keys"]

    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan.from_pretrained(vae_dir).eval()
    mean = torch.tensor(TINY_VAE["latents_mean"]).view(1, 4, 1, 1, 1)
    std = torch.tensor(TINY_VAE["latents_std"]).view(1, 4, 1, 1, 1)
    for key, smp in got.items():
        ttv_s = source[key]
        assert smp["rgb_latent"].shape == (4, 2, 3, 4)  # z_dim, 1 + (5-1)/4, 24/8, 32/8
        assert smp["normal_latent"].shape == smp["position_latent"].shape == (4, 2, 3, 4)
        assert smp["mask_latent"].shape == (2, 3, 4)
        assert 0 <= smp["mask_latent"].min() and smp["mask_latent"].max() <= 1 and smp["mask_latent"].max() > 0
        np.testing.assert_array_equal(smp["K"], ttv_s["K"])
        np.testing.assert_array_equal(smp["c2w"], ttv_s["c2w"])
        meta = smp["meta"]["latents"]
        assert meta["frames"] == {"source": 7, "used": 5, "policy": "trim"}
        assert meta["vae"]["weights_sha256"] and meta["source"]["key"] == key
        assert meta["normalization"]["std"] == pytest.approx(TINY_VAE["latents_std"])
        assert smp["meta"]["asset_sha256"] == ttv_s["meta"]["asset_sha256"]
        # Parity: a direct encode of the same inputs, normalised the Wan way.
        inputs = {
            "rgb": torch.from_numpy(ttv_s["rgb"][:5]).float() / 127.5 - 1,
            "normal": torch.from_numpy(ttv_s["normal"][:5]).clamp(-1, 1),
            "position": torch.from_numpy(ttv_s["position"][:5]).clamp(-1, 1),
        }
        with torch.no_grad():
            for name, x in inputs.items():
                mu = ref.encode(x.permute(3, 0, 1, 2)[None]).latent_dist.mean
                want = ((mu - mean) / std)[0].numpy()
                np.testing.assert_allclose(smp[f"{name}_latent"], want, rtol=1e-4, atol=1e-5)
        # The sample's partial texture (no known pass in this corpus: a plane cut), encoded as the passes are.
        assert meta["partial"]["source"] == "plane cut" and 0 < meta["partial"]["known_fraction"] < 1
        known_v, gen, _ = latents.partial_texture(key, ttv_s, list(range(5)))
        with torch.no_grad():
            for name, x in (("known", known_v), ("inpaint", gen)):
                want = ((ref.encode(x[None]).latent_dist.mean - mean) / std)[0].numpy()
                np.testing.assert_allclose(smp[f"{name}_latent"], want, rtol=1e-4, atol=1e-5)

    tars = {n["name"]: n["sha256"] for n in shards.read_manifest(cfg.out)["shards"]}
    again = latents.run_cache(latents.job_spec(cfg), progress=False)
    assert (again.shards_done, again.shards_skipped, again.samples_skipped) == (0, 2, 3)
    # A shard without its sidecar is redone, byte for byte.
    storage.remove(shards.sidecar_url(cfg.out, "latents-000001.tar"))
    redo = latents.run_cache(latents.job_spec(cfg), progress=False)
    assert (redo.shards_done, redo.shards_skipped) == (1, 1)
    assert {n["name"]: n["sha256"] for n in shards.read_manifest(cfg.out)["shards"]} == tars
    # Another config into the same folder is refused rather than mixed in.
    other = c.override(cfg, "normalize", False)
    with pytest.raises(RuntimeError, match="different config"):
        latents.run_cache(latents.job_spec(other), progress=False)


@pytest.mark.integration
def test_cached_partial_textures_are_the_renders_known_pass(ray_local, tmp_path):
    src = make_corpus(tmp_path / "ttv", 5, "passes.partial=true", "passes.partial_views=4")
    cfg = c.resolve(latents.CacheLatentsJob, "default", [("source", src), ("out", str(tmp_path / "lat")),
                                                         ("vae", save_tiny_vae(tmp_path / "vae"))])
    assert latents.run_cache(latents.job_spec(cfg), progress=False).samples_done == 3
    source = {smp["__key__"]: smp for smp in iter_ttv(src)}
    for smp in lat_ds.iter_samples(cfg.out):
        s = source[smp["__key__"]]
        part = smp["meta"]["latents"]["partial"]
        assert part["source"] == "render known pass"
        assert part["known_fraction"] == pytest.approx(s["known"].sum() / s["mask"].sum(), abs=1e-6)
        known_v, gen, _ = latents.partial_texture(smp["__key__"], s, list(range(5)))
        assert torch.equal(gen[0] < 0, torch.from_numpy(s["known"]))  # given exactly on the known pixels
        assert smp["known_latent"].shape == smp["inpaint_latent"].shape == smp["rgb_latent"].shape


@pytest.mark.integration
def test_changed_source_shard_is_a_failure_row_per_sample(ray_local, tmp_path):
    src = make_corpus(tmp_path / "ttv", frames=5)
    vae_dir = save_tiny_vae(tmp_path / "vae")
    cfg = c.resolve(latents.CacheLatentsJob, "default", [("source", src), ("out", str(tmp_path / "lat")),
                                                         ("vae", vae_dir), ("partial", False), ("passes", ["normal"])])
    spec = latents.job_spec(cfg)
    first = shards.shard_url(src, "ttv-000000.tar")
    data = bytearray(storage.read_bytes(first))
    data[600] ^= 0xFF  # inside the first member's data
    storage.write_bytes(first, bytes(data))
    s = latents.run_cache(spec, progress=False)
    assert (s.samples_done, s.failed) == (1, 2)
    assert all("sha256" in f["reason"] for f in s.failures)
    (smp,) = list(lat_ds.iter_samples(cfg.out))
    assert set(smp) == {"normal_latent", "mask_latent", "K", "c2w", "meta", "__key__", "__shard__", "__index__"}
    assert smp["normal_latent"].dtype == np.float32 and smp["normal_latent"].shape == (4, 2, 3, 4)


def test_cli_dry_run_and_missing_vae(tmp_path, capsys):
    import argparse

    from loom.corpora.commands import register_cache

    p = argparse.ArgumentParser()
    register_cache(p.add_subparsers())
    src = make_corpus(tmp_path / "ttv", frames=5)
    vae_dir = save_tiny_vae(tmp_path / "vae")
    args = p.parse_args(["cache", "latents", "--source", src, "--vae", vae_dir, "--out", str(tmp_path / "o"),
                         "--dry-run"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "3 sample(s) in 2 source shard(s)" in text
    assert "s/sample" in text and "core-hours" in text and not os.path.exists(tmp_path / "o")  # priced, not run
    args = p.parse_args(["cache", "latents", "--source", src, "--vae", vae_dir, "--out", str(tmp_path / "o"),
                         "--dry-run", "--no-calibrate", "--assets-total", "30000"])
    assert args.func(args) == 0 and "core-hours" not in capsys.readouterr().out
    args = p.parse_args(["cache", "latents", "--source", src, "--vae", str(tmp_path / "nope"), "--dry-run"])
    with pytest.raises(FileNotFoundError, match="nope"):
        args.func(args)


# ------------------------------------------------------------------------------- text and image encoders


def _encoder_corpus(tmp_path):
    from tests.models.test_image_encoder import save_tiny_clip
    from tests.models.test_text_encoder import save_tiny_umt5

    src = make_corpus(tmp_path / "ttv", frames=5)
    return src, save_tiny_vae(tmp_path / "vae"), save_tiny_umt5(tmp_path / "umt5"), save_tiny_clip(tmp_path / "clip")


def test_encoder_dirs_captions_and_hash(tmp_path):
    src, vae_dir, umt5, clip = _encoder_corpus(tmp_path)
    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"uid": "x", "caption": "a red chair"}\n')
    base = [("source", src), ("vae", vae_dir), ("text_encoder", umt5), ("image_encoder", clip),
            ("captions", str(caps))]

    def chash(*over):
        return latents.job_spec(c.resolve(latents.CacheLatentsJob, "default", base + list(over))).config_hash

    h = chash()
    assert chash() == h
    assert chash(("prompt", "a {uid}")) != h
    assert chash(("text_max_length", 64)) != h
    caps.write_text('{"uid": "x", "caption": "a blue chair"}\n')
    assert chash() != h
    h = chash()
    assert chash(("out", str(tmp_path / "elsewhere"))) == h  # paths do not enter the hash, contents do
    # Encoders by content: other weights in the same folder change the hash.
    from tests.models.test_image_encoder import save_tiny_clip

    save_tiny_clip(clip, seed=1)
    assert chash() != h
    vae_only = [("source", src), ("vae", vae_dir)]
    assert latents.job_spec(c.resolve(latents.CacheLatentsJob, "default", vae_only)).config_hash != chash()
    # Missing folders and files are named before anything runs.
    for key, match in [("text_encoder", "no-such-umt5"), ("image_encoder", "no-such-clip"),
                       ("captions", "no-such-caps.jsonl"), ("tokenizer", "no-such-tok")]:
        with pytest.raises(FileNotFoundError, match=match):
            latents.job_spec(c.resolve(latents.CacheLatentsJob, "default", base + [(key, str(tmp_path / match))]))


def test_digest_of_a_released_pth_is_its_content(tmp_path):
    # A released Wan encoder is one .pth file (resolve_text_dirs returns the file): its bytes, not a folder walk,
    # must key the cache, or new weights under the same name would reuse stale latents.
    pth = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    pth.write_bytes(b"weights one")
    first = latents.dir_digest(str(pth))
    assert first == latents.dir_digest(str(pth))
    pth.write_bytes(b"weights two")
    assert latents.dir_digest(str(pth))["weights_sha256"] != first["weights_sha256"]


@pytest.mark.integration
def test_cache_job_with_text_and_image_encoders(ray_local, tmp_path):
    from loom.models.image_encoder import load_image_encoder
    from loom.models.text_encoder import load_text_encoder, prompt_clean

    src, vae_dir, umt5, clip = _encoder_corpus(tmp_path)
    source = {smp["__key__"]: smp for smp in iter_ttv(src, keys=("rgb", "meta"))}
    uids = sorted({smp["meta"]["uid"] for smp in source.values()})
    captioned = uids[0]
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"uid": captioned, "caption": "  a red &amp; blue\n chair "}) + "\n"
                    + json.dumps({"uid": "not-in-corpus", "caption": "a cat"}) + "\n")
    cfg = c.resolve(latents.CacheLatentsJob, "default", [
        ("source", src), ("out", str(tmp_path / "lat")), ("vae", vae_dir), ("partial", False), ("passes", ["normal"]),
        ("store_dtype", "float32"), ("text_encoder", umt5), ("image_encoder", clip), ("captions", str(caps)),
        ("prompt", "a 3d object {uid} on a turntable")])
    s = latents.run_cache(latents.job_spec(cfg), progress=False)
    assert (s.samples_done, s.failed) == (3, 0)

    text_enc, image_enc = load_text_encoder(umt5), load_image_encoder(clip)
    got = {smp["__key__"]: smp for smp in lat_ds.iter_samples(cfg.out)}
    assert sorted(got) == sorted(source)
    for key, smp in got.items():
        assert set(smp) == {"normal_latent", "mask_latent", "text_embed", "image_embed", "K", "c2w", "meta",
                            "__key__", "__shard__", "__index__"}
        meta, uid = smp["meta"]["latents"], smp["meta"]["uid"]
        # Image: the penultimate CLIP tokens of source frame 0.
        assert smp["image_embed"].shape == (17, 32)
        want = image_enc.encode(source[key]["rgb"][:1])[0].numpy()
        np.testing.assert_allclose(smp["image_embed"], want, rtol=1e-5, atol=1e-5)
        assert meta["image_encoder"]["tokens"] == 17 and meta["image_encoder"]["frame"] == 0
        # Text: a caption wins over the template; a uid without one gets the template and a warning.
        raw = "  a red &amp; blue\n chair " if uid == captioned else f"a 3d object {uid} on a turntable"
        text = meta["text"]
        assert text["prompt"] == prompt_clean(raw) and text["from"] == ("captions" if uid == captioned else "template")
        assert (meta["warnings"] == []) == (uid == captioned)
        if uid != captioned:
            assert uid in meta["warnings"][0]
        (want,) = text_enc.encode([raw])
        assert smp["text_embed"].shape == (want.shape[0], 32) == (text["tokens"], 32)
        np.testing.assert_allclose(smp["text_embed"], want.numpy(), rtol=1e-5, atol=1e-5)
        assert lat_ds.pad_text_embed(smp["text_embed"]).shape == (512, 32)
        assert meta["text_encoder"]["max_length"] == 512 and meta["text_encoder"]["captions_sha256"]
    assert got[next(k for k in got if got[k]["meta"]["uid"] == captioned)]["meta"]["latents"]["text"]["prompt"] == (
        "a red & blue chair")
    # Resume: a finished job is skipped, encoders included.
    again = latents.run_cache(latents.job_spec(cfg), progress=False)
    assert (again.shards_done, again.shards_skipped) == (0, 2)
