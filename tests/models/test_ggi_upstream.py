"""Loom's GGI input layout against the authors' code: ``tests/fixtures/ggi_upstream`` holds what VideoFrom3D's own
pipeline (``mypipes/pipe_intp2.py``'s ``prepare_latents``, ``ggi.py``'s edge latents, ``myutils.ch_channel_cnn``)
computed at tiny size, with the tiny networks it ran on (``make_golden.py`` there says how it was made)."""

import os

import numpy as np
import pytest
import torch

from loom.models import ggi

diffusers = pytest.importorskip("diffusers")
FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "ggi_upstream")


def test_anchor_and_edge_latents_and_the_forward_match_the_authors_pipeline():
    vae = diffusers.AutoencoderKLCogVideoX.from_pretrained(os.path.join(FIX, "vae")).eval()
    base = diffusers.CogVideoXTransformer3DModel.from_pretrained(os.path.join(FIX, "transformer")).eval()
    inp, gold = np.load(os.path.join(FIX, "inputs.npz")), np.load(os.path.join(FIX, "golden.npz"))

    def image(a):  # uint8 (H,W,3) -> (1,3,H,W) in [-1, 1]
        return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1

    noise = torch.from_numpy(inp["noise"])
    v = ggi.anchor_latents(vae, image(inp["first"]), image(inp["last"]), noise.shape[1])
    edges = torch.from_numpy(inp["edges"])[None, None].expand(-1, 3, -1, -1, -1) * 2 - 1
    h = ggi.encode(vae, edges)
    x = ggi.model_input(noise, v, h)
    c = noise.shape[2]
    # anchors at the first and last latent frames, zeros between, x the VAE factor; edges x the VAE factor
    np.testing.assert_allclose(torch.cat([v, h], 2).numpy(), gold["image_latents"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(x.numpy(), gold["model_input"], rtol=0, atol=2e-5)
    assert np.abs(gold["model_input"][:, 1, c: 2 * c]).max() == 0  # the authors' zeros between the anchors
    ggi.widen_patch_embed(base, 3 * c)
    with torch.no_grad():
        out = ggi.forward(base, x, torch.tensor([int(inp["t"])]), torch.from_numpy(inp["text"]))
    np.testing.assert_allclose(out.numpy(), gold["output"], rtol=0, atol=1e-4)
