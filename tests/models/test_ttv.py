"""The turntable-video model line's shared parts (`loom.models.ttv`): VAE input conventions, context tokens, the
conditioning of pixel and latent batches and the sampler, on the tiny random DiT and VAE."""

import numpy as np
import pytest
import torch

from loom.models import ttv

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def test_vae_frame_policies():
    assert ttv.vae_frame_indices(5, "exact") == [0, 1, 2, 3, 4]
    assert ttv.vae_frame_indices(7, "trim") == [0, 1, 2, 3, 4]
    assert ttv.vae_frame_indices(7, "pad") == [0, 1, 2, 3, 4, 5, 6, 6, 6]
    assert ttv.vae_frame_indices(4, "trim") == [0]
    with pytest.raises(ValueError, match="frames=exact"):
        ttv.vae_frame_indices(4, "exact")
    with pytest.raises(ValueError, match="no frames"):
        ttv.vae_frame_indices(0)


def test_vae_input_maps_every_pixel_value_into_unit_range_and_back_exactly():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    x = ttv.vae_input("rgb", pixels)
    assert x.dtype == torch.float32 and x.shape == (1, 16, 16, 3)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert np.array_equal(ttv.unit_to_uint8(x).numpy(), pixels)
    normal = ttv.vae_input("normal", torch.tensor([1.0009765625, -1.5, 0.25], dtype=torch.float16))
    assert normal.tolist() == [1.0, -1.0, 0.25]
    assert ttv.vae_input("position", np.array([0.5, -2.0, 0.1], np.float32), 0.5).tolist() == pytest.approx(
        [1.0, -1.0, 0.2])
    with pytest.raises(ValueError, match="depth"):
        ttv.vae_input("depth", pixels)


def test_the_default_prompt_is_one_for_the_cache_and_training():
    from loom.corpora.latents import CacheLatentsJob
    from loom.training.ttv.config import DataSettings

    assert CacheLatentsJob().prompt == DataSettings().prompt == ttv.DEFAULT_PROMPT


def test_pad_tokens_pads_cuts_and_refuses_other_widths():
    out = ttv.pad_tokens([torch.ones(3, 4), torch.ones(9, 4)], 5, 4, 2)
    assert out.shape == (2, 5, 4) and out[0, :3].eq(1).all() and out[0, 3:].eq(0).all() and out[1].eq(1).all()
    assert ttv.pad_tokens(None, 5, 4, 2).eq(0).all()
    with pytest.raises(ValueError, match="width"):
        ttv.pad_tokens([torch.ones(3, 7)], 5, 4, 1)


def test_prompt_for_formats_meta_and_names_a_missing_field():
    assert ttv.prompt_for("a {uid}", {"uid": "cat"}) == "a cat"
    with pytest.raises(ValueError, match=r"data.prompt=.*'colour'.*\['uid'\]"):
        ttv.prompt_for("a {colour} thing", {"uid": "cat"})


def test_builders_refuse_unset_folders_naming_the_field():
    m = ttv.ModelSettings()
    with pytest.raises(FileNotFoundError, match="model.transformer"):
        ttv.build_dit(m, 0)
    with pytest.raises(FileNotFoundError, match="model.vae"):
        ttv.build_vae(m, 0)
    assert ttv.build_encoders(m) == {"text": None, "image": None}


@pytest.fixture(scope="module")
def parts():
    m = ttv.ModelSettings(transformer=ttv.TINY, vae=ttv.TINY, lora_rank=4)
    dit = ttv.build_dit(m, 0).eval()
    cond = ttv.Conditioner(ttv.build_vae(m, 0), ttv.build_encoders(m), position_radius=1.0, text_len=512,
                           image_len=4, prompt=ttv.DEFAULT_PROMPT)
    return dit, cond


def pixel_batch(b=2, t=6, size=16, seed=0):
    g = np.random.default_rng(seed)
    return {"rgb": torch.from_numpy(g.integers(0, 256, (b, t, size, size, 3), dtype=np.uint8)),
            "normal": torch.from_numpy(g.uniform(-1, 1, (b, t, size, size, 3)).astype(np.float16)),
            "position": torch.from_numpy(g.uniform(-1, 1, (b, t, size, size, 3)).astype(np.float32)),
            "mask": torch.from_numpy(g.uniform(0, 1, (b, t, size, size)) > 0.3),
            "__key__": [f"s{i}" for i in range(b)], "meta": [{"uid": f"s{i}"} for i in range(b)]}


def test_pixel_conditioning_shapes_and_nothing_known_is_the_constant_videos(parts):
    dit, cond = parts
    batch = pixel_batch()
    c = cond(batch, dit, "cpu")
    # 6 frames are trimmed to 5 = 1 + 4: two latent frames of 16/8 = 2 x 2
    assert c["x0"].shape == (2, 16, 2, 2, 2) and c["geometry"].shape == (2, 64, 2, 2, 2)
    assert c["reference"].shape == (2, 16, 2, 2, 2)
    assert torch.equal(c["reference"][:, :, 0], c["x0"][:, :, 0]) and c["reference"][:, :, 1:].eq(0).all()
    assert c["text"].shape == (2, 512, dit.text_dim) and c["text"].eq(0).all()  # no text encoder, nothing cached
    assert c["image"].shape == (2, 4, dit.image_dim) and c["image"].eq(0).all()
    # "nothing known" is the latent of the all-zeros known video and of the all-generate mask video
    known = c["geometry"][:, 32:48]
    mask = c["geometry"][:, 48:64]
    assert torch.allclose(known, cond.const_latent("known", 2, 2, 2).expand(2, -1, -1, -1, -1), atol=1e-5)
    assert torch.allclose(mask, cond.const_latent("mask", 2, 2, 2).expand(2, -1, -1, -1, -1), atol=1e-5)
    # a caller's known videos reach the geometry latents, and nothing else
    drawn = cond(batch, dit, "cpu", known=lambda rgb, pos, m: (rgb.permute(0, 4, 1, 2, 3),
                                                                 -torch.ones_like(rgb.permute(0, 4, 1, 2, 3))))
    assert torch.equal(drawn["x0"], c["x0"]) and torch.equal(drawn["geometry"][:, :32], c["geometry"][:, :32])
    assert not torch.allclose(drawn["geometry"][:, 32:], c["geometry"][:, 32:])


def test_a_batchs_known_pass_reaches_the_known_videos_on_the_vae_frames(parts):
    dit, cond = parts
    batch = pixel_batch()
    seen = {}

    def known(rgb, pos, m, **kw):
        seen.update(kw)
        return rgb.permute(0, 4, 1, 2, 3), torch.ones_like(rgb.permute(0, 4, 1, 2, 3))

    cond(batch, dit, "cpu", known=known)
    assert seen == {}  # no pass, no keyword: the callers written before it keep working
    vis = torch.from_numpy(np.random.default_rng(1).uniform(0, 1, (2, 6, 16, 16)) > 0.5)
    cond({**batch, "known": vis}, dit, "cpu", known=known)
    assert torch.equal(seen["visible"], vis[:, :5])  # 6 frames trimmed to 1 + 4, as rgb


def test_latent_batches_use_cached_embeddings_and_the_constant_videos(parts):
    dit, cond = parts
    z = torch.randn(1, 16, 2, 2, 2)
    batch = {"rgb_latent": z, "normal_latent": z + 1, "position_latent": z - 1,
             "text_embed": [torch.ones(3, dit.text_dim)], "image_embed": torch.full((1, 4, dit.image_dim), 2.0)}
    c = cond(batch, dit, "cpu")
    assert torch.equal(c["x0"], z) and torch.equal(c["geometry"][:, 16:32], z - 1)
    assert torch.equal(c["geometry"][:, 32:48], cond.const_latent("known", 2, 2, 2))
    assert c["text"][0, :3].eq(1).all() and c["text"][0, 3:].eq(0).all() and c["image"].eq(2).all()


def test_latent_batches_take_their_cached_partial_texture_with_the_known_probability(parts):
    dit, cond = parts
    b = 32
    z = torch.randn(b, 16, 2, 2, 2)
    batch = {"rgb_latent": z, "normal_latent": z, "position_latent": z, "known_latent": z + 3, "inpaint_latent": z - 3}
    gens = [torch.Generator().manual_seed(i) for i in range(b)]
    c = cond(batch, dit, "cpu", known=ttv.PartialTextures(0.5, gens))
    took = [bool(torch.equal(c["geometry"][i, 32:48], z[i] + 3)) for i in range(b)]
    const = cond.const_latent("known", 2, 2, 2)[0]
    for i in range(b):
        if took[i]:
            assert torch.equal(c["geometry"][i, 48:], z[i] - 3)
        else:  # the others: nothing known, as in generation
            assert torch.equal(c["geometry"][i, 32:48], const)
    assert 6 < sum(took) < 26
    never = cond(batch, dit, "cpu", known=ttv.PartialTextures(0.0, gens))
    assert torch.equal(never["geometry"][:, 32:48], const.expand(b, -1, -1, -1, -1))
    assert torch.equal(cond(batch, dit, "cpu")["geometry"], never["geometry"])  # generation: nothing known


def test_sampler_is_a_function_of_the_seed(parts):
    dit, cond = parts
    c = cond(pixel_batch(b=1), dit, "cpu")
    a = ttv.sample_latents(dit, c, steps=2, shift=5.0, seed=0)
    assert a.shape == c["x0"].shape
    assert torch.equal(a, ttv.sample_latents(dit, c, steps=2, shift=5.0, seed=0))
    assert not torch.equal(a, ttv.sample_latents(dit, c, steps=2, shift=5.0, seed=1))
    video = ttv.latents_to_uint8(cond.vae, a)
    assert video.shape == (1, 5, 16, 16, 3) and video.dtype == np.uint8


def test_generation_feeds_frame_zero_as_start_image_and_a_zero_ref_latent(parts):
    dit, cond = parts
    assert dit.has_ref_conv  # the tiny model has Wan2.1-Fun-V1.1's reference path
    c = cond(pixel_batch(), dit, "cpu")
    assert c["ref_latent"].shape == (2, 16, 1, 2, 2) and c["ref_latent"].eq(0).all()


def _gens(b, seed):
    return [torch.Generator().manual_seed(seed * 100 + i) for i in range(b)]


def test_training_draws_put_the_reference_in_exactly_one_slot(parts):
    dit, cond = parts
    batch = pixel_batch(b=8, t=9)  # 9 frames -> 3 latent frames
    never_drop = ttv.ConditionSettings(ref_first=0.5, drop_reference=0, drop_geometry=0, drop_image=0, drop_text=0)
    c = cond(batch, dit, "cpu", draws=(never_drop, _gens(8, 0)))
    start = c["reference"][:, :, 0].flatten(1).abs().sum(1) > 0
    ref = c["ref_latent"].flatten(1).abs().sum(1) > 0
    assert torch.equal(start, ~ref)  # one slot or the other, never both, never neither
    assert 0 < int(start.sum()) < 8  # both kinds occur at ref_first = 0.5 over 8 samples
    assert torch.equal(c["reference"][start, :, 0], c["x0"][start, :, 0])
    # a ref_conv input is one other frame encoded alone: frame k of the (trimmed) video, k >= 1
    i = int((~start).nonzero()[0])
    alone = [cond.vae.encode(ttv.vae_input("rgb", batch["rgb"][i:i + 1, k]).permute(0, 3, 1, 2)[:, :, None])
             for k in range(1, 9)]
    assert any(torch.allclose(c["ref_latent"][i:i + 1], a, atol=1e-5) for a in alone)
    # the same generators give the same draws (exact resume)
    again = cond(batch, dit, "cpu", draws=(never_drop, _gens(8, 0)))
    assert all(torch.equal(c[k], again[k]) for k in c)


def test_training_draws_drop_each_condition_with_its_probability(parts):
    dit, cond = parts
    batch = pixel_batch(b=4, t=5)
    drop_all = ttv.ConditionSettings(ref_first=1.0, drop_reference=1, drop_geometry=1, drop_image=1, drop_text=1)
    c = cond(batch, dit, "cpu", draws=(drop_all, _gens(4, 1)))
    for k in ("reference", "ref_latent", "geometry", "text", "image"):
        assert c[k].eq(0).all(), k
    keep = ttv.ConditionSettings(ref_first=1.0, drop_reference=0, drop_geometry=0, drop_image=0, drop_text=0)
    kept = cond(batch, dit, "cpu", draws=(keep, _gens(4, 1)))
    plain = cond(batch, dit, "cpu")
    assert all(torch.equal(kept[k], plain[k]) for k in plain)  # ref_first=1 and no drops = generation's inputs
    with pytest.raises(ValueError, match="drop_text"):
        ttv.ConditionSettings(drop_text=1.5)
