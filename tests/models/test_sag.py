"""VideoFrom3D's SAG sampler (loom.models.sag) on random tiny FLUX parts: the ControlNet condition and the prompt
steer the sample, Sparse Appearance-guided Sampling makes the known region of a view agree with the warped
previous anchor more than sampling without it, the known mask shrinks the warp as the authors' Warp does, and the
distribution-alignment loss trains a LoRA."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from loom.models import sag  # noqa: E402

H = W = 64


@pytest.fixture(scope="module")
def parts():
    return sag.build(sag.SAGModelSettings(base=sag.TINY, controlnet=sag.TINY, text_len=16))


def edges_image(row: int) -> torch.Tensor:
    e = -torch.ones(1, 3, H, W)
    e[:, :, row:row + 2] = 1
    return e


def run(parts, seed=0, **kw):
    kw.setdefault("edges", edges_image(20))
    return sag.sample(parts, kw.pop("prompt", "[v] house"), (H, W), generator=torch.Generator().manual_seed(seed),
                      steps=kw.pop("steps", 6), cfg_start=kw.pop("cfg_start", 2), replace_steps=kw.pop("replace", 3),
                      **kw)


def test_seed_prompt_and_edges_steer_the_sample(parts):
    a = run(parts)
    assert a.shape == (1, 16, H // 8, W // 8) and torch.isfinite(a).all()
    torch.testing.assert_close(run(parts), a)
    assert not torch.allclose(run(parts, seed=1), a)
    assert not torch.allclose(run(parts, prompt="[w] tower"), a, atol=1e-4)
    assert not torch.allclose(run(parts, edges=edges_image(40)), a, atol=1e-4)
    torch.testing.assert_close(run(parts, control_weight=0.0), run(parts, edges=edges_image(40), control_weight=0.0))
    img = sag.decode(parts.vae, a)
    assert img.shape == (1, H, W, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError, match="multiples of 16"):
        sag.sample(parts, "x", (40, 64))


def test_appearance_guided_replacement_makes_the_overlap_agree(parts):
    """The previous anchor warped into this view is known on the left 5/8: with the replacement of eq. (1) for the
    first half of the steps, the new view's latent AND pixels there are closer to the warp's than without it (the
    paper's 12 of 25), and the unknown right part is still generated (not the warp's zeros)."""
    g = torch.Generator().manual_seed(3)
    prev = (torch.nn.functional.avg_pool2d(torch.rand(1, 3, H, W, generator=g), 5, 1, 2) * 2 - 1)
    known = np.zeros((H, W), bool)
    known[:, :40] = True
    warped = prev * torch.from_numpy(known)[None, None]
    z_known = sag.encode(parts.vae, warped)
    m = sag.known_mask(known, (H // 8, W // 8), shrink=(3, 1), blur=(1, 0.0))
    inside = m[0, 0] > 0.5

    def errors(z):
        lat = ((z - z_known) ** 2).mean(1)[0][inside].mean().item()
        px = (sag.decode(parts.vae, z)[0].astype(np.float32) - sag.decode(parts.vae, z_known)[0])
        return lat, np.abs(px[:, :32]).mean()

    with_, without = (errors(run(parts, seed=5, known=z_known, mask=m, replace=r, steps=8)) for r in (4, 0))
    assert with_[0] < 0.6 * without[0] and with_[1] < without[1], (with_, without)
    assert not torch.allclose(run(parts, seed=5, known=z_known, mask=m, replace=4, steps=8)[..., 6:],
                              z_known[..., 6:], atol=0.1)


def test_known_mask_shrinks_the_warp_by_the_authors_dilation():
    known = np.zeros((128, 128), bool)
    known[:, :64] = True
    m = sag.known_mask(known, (16, 16))  # 5x5 kernel, 12 iterations: the unknown side grows by 24 px = 3 latents
    assert m.shape == (1, 1, 16, 16)
    assert (m[0, 0, :, :4] > 0.99).all() and (m[0, 0, :, 6:] < 0.01).all()
    exact = sag.known_mask(known, (16, 16), shrink=(1, 0), blur=(1, 0.0))
    assert (exact[0, 0, :, :8] == 1).all() and (exact[0, 0, :, 8:] == 0).all()


def test_the_alignment_loss_trains_a_lora_on_the_dit_and_controlnet(parts):
    from peft import LoraConfig

    tr, cn = parts.transformer, parts.controlnet
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["attn.to_q", "attn.to_k", "attn.to_v"]),
                   adapter_name="style")
    cn.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["attn.to_q"]), adapter_name="style")
    try:
        params = [p for n, p in list(tr.named_parameters()) + list(cn.named_parameters()) if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        g = torch.Generator().manual_seed(0)
        x0 = sag.encode(parts.vae, torch.rand(1, 3, H, W, generator=g) * 2 - 1)
        tokens, pooled = parts.text.encode(["[v] style"])
        noise = torch.randn(x0.shape, generator=g)
        ts = sag.train_timesteps(parts.scheduler, (H // 16) * (W // 16))
        assert ts.shape == (999,) and ts[0] == 1 and (ts.diff() < 0).all()
        opt = torch.optim.Adam(params, lr=1e-2)
        losses = []
        for _ in range(8):
            opt.zero_grad()
            loss = sag.loss(parts, x0, edges_image(20), tokens, pooled, torch.tensor([0.6]), noise).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] and all(p.grad is not None for p in params)
    finally:
        for net in (tr, cn):
            net.delete_adapters(["style"])
