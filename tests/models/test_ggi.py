"""The GGI model line (VideoFrom3D 3.3-3.4, `loom.models.ggi`) on tiny random CogVideoX parts: the widened input is
the base model at step 0, the input layout is the authors' (anchors at the first and last latent frames, zeros
between; edge latents are the VAE's mode times its scaling factor), the flow LoRA loads and stays frozen, a released
GGI transformer loads as it is, and both objectives train and sample."""

import numpy as np
import pytest
import torch

from loom.models import ggi

pytest.importorskip("diffusers")
pytest.importorskip("peft")

TINY = ggi.GGIModelSettings(transformer=ggi.TINY, vae=ggi.TINY, text_len=8)


def latents(b=2, f=3, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, f, c, 4, 4, generator=g)


def test_widened_input_is_exactly_the_base_model_at_step_zero():
    base = ggi.tiny_transformer(seed=3).eval()
    wide = ggi.build_transformer(TINY, seed=3).eval()
    assert base.config.in_channels == 8 and wide.config.in_channels == 12
    x, v, e = latents(seed=1), latents(seed=2), latents(seed=3) * 10
    t = torch.tensor([10, 900])
    text = torch.randn(2, 8, 16)
    with torch.no_grad():
        want = ggi.forward(base, torch.cat([x, v], 2), t, text)
        got = ggi.forward(wide, ggi.model_input(x, v, e), t, text)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # whatever the edges are
    # the new channels do learn: a non-zero weight there changes the output
    with torch.no_grad():
        wide.patch_embed.proj.weight[:, 8:] = 0.1
        moved = ggi.forward(wide, ggi.model_input(x, v, e), t, text)
    assert not torch.allclose(moved, want)
    with pytest.raises(ValueError, match="narrow"):
        ggi.widen_patch_embed(wide, 8)


def test_a_transformer_with_learned_position_embeddings_refuses_another_size_by_name():
    from diffusers import CogVideoXTransformer3DModel

    tr = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=12, out_channels=4,
                                     time_embed_dim=8, text_embed_dim=16, num_layers=1, sample_width=4,
                                     sample_height=4, sample_frames=9, max_text_seq_length=8,
                                     use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
    with torch.no_grad():
        assert ggi.forward(tr, torch.randn(1, 3, 12, 4, 4), torch.tensor([1]), torch.zeros(1, 8, 16)).shape[-1] == 4
    with pytest.raises(ValueError, match="fix its frames to 32x32.*the data is 48x32"):
        ggi.forward(tr, torch.randn(1, 3, 12, 4, 6), torch.tensor([1]), torch.zeros(1, 8, 16))


def test_anchor_and_edge_latents_follow_the_authors_layout():
    vae = ggi.tiny_vae()
    g = torch.Generator().manual_seed(0)
    first, last = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    v = ggi.anchor_latents(vae, first, last, latent_frames=4)
    assert v.shape == (1, 4, 4, 4, 4)
    with torch.no_grad():
        z0 = vae.encode(first[:, :, None]).latent_dist.mode() * vae.config.scaling_factor
        z1 = vae.encode(last[:, :, None]).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(v[:, 0], z0[:, :, 0])
    torch.testing.assert_close(v[:, -1], z1[:, :, 0])
    assert v[:, 1:-1].eq(0).all()
    edges = torch.rand(1, 3, 13, 32, 32, generator=g) * 2 - 1
    h = ggi.encode(vae, edges)
    assert h.shape == (1, 4, 4, 4, 4)  # 13 frames -> 1 + 12/4 latent frames, frames before channels
    with torch.no_grad():
        ref = vae.encode(edges).latent_dist.mode() * vae.config.scaling_factor  # (B,C,F',h,w)
    torch.testing.assert_close(h, ref.permute(0, 2, 1, 3, 4))
    assert ggi.padded_frames(46) == 49 and ggi.padded_frames(49) == 49 and ggi.padded_frames(1) == 1
    frames = edges[0, 0, :11].numpy()
    padded = ggi.pad_last(frames, ggi.padded_frames(len(frames)))
    assert padded.shape[0] == 13 and np.array_equal(padded[11], frames[10])


def save_flow_lora(path, transformer, rank=4, seed=0) -> str:
    """A LoRA file in diffusers' format (what Go-with-the-Flow publishes), with random non-zero weights."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, mod in transformer.named_modules():
        if name.endswith(ggi.LORA_TARGETS) and isinstance(mod, torch.nn.Linear):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.1
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.1
    save_file(state, str(path))
    return str(path)


def test_flow_lora_loads_changes_the_model_and_stays_frozen(tmp_path):
    plain = ggi.build_transformer(TINY, seed=0).eval()
    lora = save_flow_lora(tmp_path / "flow.safetensors", plain)
    import dataclasses

    m = ggi.build_transformer(dataclasses.replace(TINY, flow_lora=lora), seed=0).eval()
    x, t, text = ggi.model_input(latents(), latents(seed=1), latents(seed=2)), torch.tensor([500, 500]), \
        torch.randn(2, 8, 16)
    with torch.no_grad():
        assert not torch.allclose(ggi.forward(m, x, t, text), ggi.forward(plain, x, t, text))
    lora_params = [n for n, p in m.named_parameters() if "lora_" in n]
    assert lora_params and not any(p.requires_grad for n, p in m.named_parameters() if "lora_" in n)
    assert all(p.requires_grad for n, p in m.named_parameters() if "lora_" not in n)  # the rest trains
    with pytest.raises(FileNotFoundError, match="flow_lora"):
        ggi.build_transformer(dataclasses.replace(TINY, flow_lora=str(tmp_path / "nope.safetensors")))


def test_a_released_ggi_transformer_loads_as_it_is(tmp_path):
    trained = ggi.build_transformer(TINY, seed=5)
    with torch.no_grad():
        trained.patch_embed.proj.weight[:, 8:] = 0.3  # what training changed
    folder = tmp_path / "ggi" / "transformer"
    trained.save_pretrained(str(folder))
    import dataclasses

    back = ggi.build_transformer(dataclasses.replace(TINY, transformer=str(tmp_path / "ggi")))
    assert back.config.in_channels == 12
    torch.testing.assert_close(back.patch_embed.proj.weight, trained.patch_embed.proj.weight)


@pytest.mark.parametrize("objective", ["v", "epsilon"])
def test_a_few_steps_lower_the_loss_and_sampling_gives_frames(objective):
    torch.manual_seed(0)
    tr = ggi.build_transformer(TINY, seed=0)
    sched = ggi.make_scheduler(objective=objective)
    x0, v, e, eps = latents(seed=1), latents(seed=2), latents(seed=3), latents(seed=4)
    text = torch.zeros(2, 8, 16)
    t = torch.tensor([300, 700])
    opt = torch.optim.AdamW([p for p in tr.parameters() if p.requires_grad], lr=3e-3)
    first = ggi.loss(tr, sched, x0, eps, t, v, e, text, objective).mean()
    for _ in range(30):
        opt.zero_grad()
        ggi.loss(tr, sched, x0, eps, t, v, e, text, objective).mean().backward()
        opt.step()
    assert ggi.loss(tr, sched, x0, eps, t, v, e, text, objective).mean() < 0.7 * first
    vae = ggi.tiny_vae()
    z = ggi.sample(tr.eval(), sched, eps, v, e, text, steps=3)
    assert z.shape == x0.shape and torch.isfinite(z).all()
    video = ggi.decode(vae, z)
    assert video.shape == (2, 9, 32, 32, 3) and video.dtype == torch.uint8
    noise = ggi.blend_noise(latents(b=64, seed=7), latents(b=64, seed=8), 0.5)
    assert abs(noise.std().item() - 1) < 0.05


def save_tiny_t5(path, d_model=16) -> str:
    """A tiny random T5EncoderModel with the test tokenizer, as CogVideoX's text_encoder/ + tokenizer/ folders."""
    import transformers

    from tests.models.test_text_encoder import WORDS, save_tiny_tokenizer

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=4 + len(WORDS) + 40, d_model=d_model, d_kv=8, d_ff=32, num_layers=1,
                                num_heads=2, relative_attention_num_buckets=8)
    transformers.T5EncoderModel(cfg).save_pretrained(str(path / "text_encoder"))
    save_tiny_tokenizer(path / "tokenizer")
    return str(path)


def test_t5_prompts_are_cogvideox_pipeline_embeddings(tmp_path):
    """Padded to max_length and encoded WITHOUT an attention mask (CogVideoX's pipeline): every row, padding too."""
    import transformers

    root = save_tiny_t5(tmp_path / "cog")
    enc = ggi.T5Prompts(root, max_length=8)
    got = enc.encode(["a red chair", "a car"])
    assert got.shape == (2, 8, 16)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "cog" / "tokenizer"))
    model = transformers.T5EncoderModel.from_pretrained(str(tmp_path / "cog" / "text_encoder")).eval()
    ids = tok(["a red chair", "a car"], padding="max_length", max_length=8, truncation=True,
              add_special_tokens=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids)[0]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got[0], got[1])
    assert ggi.prompts_of([{"caption": "a hall"}, {}], "a scene") == ["a hall", "a scene"]
    with pytest.raises(FileNotFoundError, match="model.text_encoder"):
        ggi.T5Prompts(str(tmp_path))


def test_classifier_free_guidance_follows_the_prompt_difference():
    tr = ggi.build_transformer(TINY, seed=0).eval()
    sched = ggi.make_scheduler()
    noise, v, e = latents(b=1, seed=1), latents(b=1, seed=2), latents(b=1, seed=3)
    text, neg = torch.randn(1, 8, 16), torch.zeros(1, 8, 16)

    def run(**kw):
        return ggi.sample(tr, sched, noise, v, e, text, steps=2, generator=torch.Generator().manual_seed(0), **kw)

    plain = run()
    # with the prompt equal to the negative, guidance changes nothing (uncond == cond)
    torch.testing.assert_close(ggi.sample(tr, sched, noise, v, e, neg, steps=2, generator=torch.Generator()
                                          .manual_seed(0), guidance=4.0, negative=neg),
                               ggi.sample(tr, sched, noise, v, e, neg, steps=2,
                                          generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(run(guidance=4.0, negative=neg), plain)


def test_a_model_fit_to_one_clip_inbetweens_it_back_from_its_anchors_and_warped_noise():
    """Generation reproduces the anchors: a tiny model fit to one clip (its anchors, edges, warped noise), sampled
    from that noise, gives the clip's first and last latent frames back, and frames that decode close to the clip's
    own VAE reconstruction at both ends (a random VAE does not give the pixels back; its reconstruction is the
    bound)."""
    torch.manual_seed(0)
    tr = ggi.build_transformer(TINY, seed=0)
    vae, sched = ggi.tiny_vae(), ggi.make_scheduler()
    g = torch.Generator().manual_seed(0)
    video = torch.nn.functional.avg_pool3d(torch.rand(1, 3, 9, 32, 32, generator=g) * 2 - 1, (1, 5, 5), 1, (0, 2, 2))
    x0 = ggi.encode(vae, video)
    v = ggi.anchor_latents(vae, video[:, :, 0], video[:, :, -1], 3)
    e = ggi.encode(vae, torch.zeros(1, 3, 9, 32, 32))
    eps, text = torch.randn(x0.shape, generator=g), torch.zeros(1, 8, 16)
    opt = torch.optim.AdamW([p for p in tr.parameters() if p.requires_grad], lr=2e-3, weight_decay=0)
    for _ in range(300):
        opt.zero_grad()
        ggi.loss(tr, sched, x0, eps, torch.randint(0, 1000, (1,), generator=g), v, e, text).mean().backward()
        opt.step()
    z = ggi.sample(tr.eval(), sched, eps, v, e, text, steps=10)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # the first latent frame is the first anchor's (CogVideoX's causal VAE encodes frame 0 alone); the last latent
    # frame covers the last 4 frames, so it is the clip's, which the end anchor conditions
    assert rel(z[:, 0], v[:, 0]) < 0.3 and rel(z[:, -1], x0[:, -1]) < 0.3, (rel(z[:, 0], v[:, 0]),
                                                                            rel(z[:, -1], x0[:, -1]))
    assert rel(torch.randn_like(z[:, 0]), v[:, 0]) > 1  # what an unfit model's frames would be
    frames = ggi.decode(vae, z)[0].float()  # (F,H,W,3)
    recon = ggi.decode(vae, x0)[0].float()
    assert (frames[0] - recon[0]).abs().mean() < 8 and (frames[-1] - recon[-1]).abs().mean() < 8
