"""Contract tests of the shape VAE (ShapeGen4D 3.1: Step1X-3D's released VAE) on tiny configs, golden-output parity
with Step1X-3D's own implementation (tests/fixtures/step1x3d_vae), the released key layout, farthest point sampling,
and marching cubes against an analytic sphere."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from loom.models.shape_vae import (
    DiagonalGaussian,
    ShapeVAE,
    ShapeVAEConfig,
    fps_queries,
    grid_points,
    marching_cubes,
    mesh_from_sdf,
    sphere_sdf,
    vae_loss,
)
from tests.models.contract import BlocksContract

B, S, Q, M = 2, 64, 8, 20
RADIUS = 0.3
FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "step1x3d_vae")


def _sphere_surface(n: int, g: torch.Generator, radius: float = RADIUS) -> torch.Tensor:
    """(n, 6) points on a sphere with their outward normals."""
    d = torch.randn(n, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    return torch.cat([radius * d, d], dim=-1)


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    surface = torch.stack([_sphere_surface(S, g) for _ in range(B)])  # (B, S, 6)
    return dict(surface=surface, queries=fps_queries(surface, Q, backend="torch"),
                points=torch.rand(B, M, 3, generator=g) - 0.5)


def _mesh_stats(v: np.ndarray, f: np.ndarray) -> tuple[float, int]:
    """(signed volume, Euler characteristic) of a triangle mesh."""
    tri = v[f].astype(np.float64)  # (F, 3, 3)
    volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    return volume, len(v) - len(np.unique(edges, axis=0)) + len(f)


# ---------------------------------------------------------------------------------------------------- contract


def test_forward_shapes():
    vae = ShapeVAE.tiny()
    out = vae(**_inputs())
    assert out.sdf.shape == (B, M) and out.kl.shape == (B,) and out.latents.shape == (B, Q, 8)
    assert out.posterior.mean.shape == out.posterior.logvar.shape == (B, Q, 8)
    assert torch.isfinite(out.sdf).all() and torch.isfinite(out.kl).all()


def test_bf16_weights_return_float32():
    vae = ShapeVAE.tiny()
    x = _inputs()
    ref = vae(**x, sample=False)
    out = ShapeVAE.tiny().to(torch.bfloat16)(**x, sample=False)
    assert out.sdf.dtype == out.latents.dtype == out.kl.dtype == torch.float32
    assert (out.sdf - ref.sdf).abs().max() < 0.02 * vae.config.tau


def test_encode_mean_or_sample():
    vae = ShapeVAE.tiny()
    x = _inputs()
    mean, post = vae.encode(x["surface"], x["queries"], sample=False)
    assert torch.equal(mean, post.mean)
    a, _ = vae.encode(x["surface"], x["queries"], sample=True, generator=torch.Generator().manual_seed(1))
    b, _ = vae.encode(x["surface"], x["queries"], sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, mean)


def test_latent_i_belongs_to_query_i():
    """Permuting the queries permutes the latents the same way (what makes aligned queries give aligned latents),
    and the number of latents follows the number of queries."""
    vae = ShapeVAE.tiny()
    x = _inputs()
    perm = torch.randperm(Q, generator=torch.Generator().manual_seed(0))
    z, _ = vae.encode(x["surface"], x["queries"], sample=False)
    zp, _ = vae.encode(x["surface"], x["queries"][:, perm], sample=False)
    torch.testing.assert_close(zp, z[:, perm], atol=1e-5, rtol=1e-5)
    z3, _ = vae.encode(x["surface"], x["queries"][:, :3], sample=False)
    assert z3.shape == (B, 3, 8)


def test_decode_in_chunks_equals_decode_at_once():
    vae = ShapeVAE.tiny()
    z = torch.randn(B, Q, 8, generator=torch.Generator().manual_seed(0))
    pts = _inputs()["points"]
    torch.testing.assert_close(vae.decode(z, pts, chunk=7), vae.decode(z, pts), atol=1e-6, rtol=1e-6)


def test_output_is_in_units_of_tau_and_negative_inside():
    """The network predicts Step1X-3D's TSDF / tau, positive inside; decode gives -tau x that (Loom's SDF, negative
    inside): the same weights with twice the tau give twice the SDF."""
    vae = ShapeVAE.tiny()
    big = ShapeVAE(ShapeVAEConfig.tiny(tau=0.1))
    big.load_state_dict(vae.state_dict())
    z = torch.randn(B, Q, 8, generator=torch.Generator().manual_seed(0))
    pts = _inputs()["points"]
    torch.testing.assert_close(big.decode(z, pts), 2 * vae.decode(z, pts))
    raw = vae.query_tsdf(vae.decode_features(z), pts)
    torch.testing.assert_close(vae.decode(z, pts), -0.05 * raw)


def test_backward_reaches_the_encoder():
    vae = ShapeVAE.tiny()
    out = vae(**_inputs(), generator=torch.Generator().manual_seed(0))
    vae_loss(out.sdf, torch.zeros_like(out.sdf), out.kl)["loss"].backward()
    assert any(p.grad.abs().sum() > 0 for p in vae.encoder.self_attn.parameters())
    assert vae.encoder.input_proj.weight.grad.abs().sum() > 0


def test_save_load_round_trip(tmp_path):
    vae = ShapeVAE.tiny(seed=3)
    vae.save_pretrained(tmp_path / "vae")
    with open(tmp_path / "vae" / "config.json") as f:
        assert json.load(f)["width"] == 32
    loaded = ShapeVAE.from_pretrained(tmp_path / "vae")
    assert loaded.config == vae.config
    x = _inputs()
    assert torch.equal(loaded(**x, sample=False).sdf, vae(**x, sample=False).sdf)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShapeVAE.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ShapeVAE.from_pretrained(tmp_path / "empty")
    ShapeVAE.tiny().save_pretrained(tmp_path / "vae")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**cfg, "width": 64}))
    with pytest.raises(ValueError, match="do not match"):
        ShapeVAE.from_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**cfg, "depth": 3}))
    with pytest.raises(ValueError, match="unknown ShapeVAEConfig fields"):
        ShapeVAE.from_pretrained(tmp_path / "vae")


def test_config_validation_and_sizes():
    with pytest.raises(ValueError, match="width=30 must be divisible by heads=4"):
        ShapeVAEConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="tau"):
        ShapeVAEConfig(tau=0.0)
    with pytest.raises(ValueError, match="num_latents=15 must be even"):
        ShapeVAEConfig(num_latents=15)
    paper = ShapeVAEConfig.paper()
    assert (paper.width, paper.heads, paper.encoder_layers, paper.decoder_layers, paper.latent_channels,
            paper.num_latents, paper.sharp_edges, paper.num_freqs, paper.include_pi, paper.qkv_bias,
            paper.qk_norm) == (768, 12, 8, 16, 64, 2048, True, 8, False, False, False)


def test_input_validation():
    vae = ShapeVAE.tiny()
    x = _inputs()
    with pytest.raises(ValueError, match="surface must be"):
        vae.encode(x["surface"][..., :3], x["queries"])
    with pytest.raises(ValueError, match="queries must be"):
        vae.encode(x["surface"], x["queries"][:1])
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.zeros(B, Q, 5), x["points"])
    with pytest.raises(ValueError, match="one shape's latents"):
        vae.extract_mesh(torch.zeros(2, Q, 8), resolution=4)
    with pytest.raises(ValueError, match="no sharp-edge branch"):
        vae.encode(x["surface"], x["queries"], sharp_surface=x["surface"])
    sharp = ShapeVAE.tiny(sharp_edges=True)
    with pytest.raises(ValueError, match="pass sharp_surface"):
        sharp.encode(x["surface"], x["queries"])
    with pytest.raises(ValueError, match="sharp_surface must be"):
        sharp.encode(x["surface"], x["queries"], sharp_surface=x["surface"][..., :3])


def test_kl_and_loss():
    zero = DiagonalGaussian(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    assert torch.equal(zero.kl(), torch.zeros(2))
    shifted = DiagonalGaussian(torch.ones(2, 3, 4), torch.zeros(2, 3, 4))
    torch.testing.assert_close(shifted.kl(), torch.full((2,), 0.5))  # 0.5 * mu^2
    pred, target = torch.full((2, 5), 0.01), torch.zeros(2, 5)
    out = vae_loss(pred, target, shifted.kl(), kl_weight=0.1, tau=0.05)
    torch.testing.assert_close(out["sdf"], torch.tensor(0.04))  # (0.01 / 0.05)^2
    torch.testing.assert_close(out["loss"], torch.tensor(0.04 + 0.1 * 0.5))
    with pytest.raises(ValueError, match="same shape"):
        vae_loss(pred, target[:, :2], shifted.kl())


# ---------------------------------------------------------------------------------------------------- sharp edges


def _sharp_inputs(seed: int = 0) -> dict:
    """_inputs plus sharp-edge points (a ring around the sphere, normals pointing out) and FPS queries among them."""
    g = torch.Generator().manual_seed(seed + 100)
    angle = torch.rand(B, S, generator=g) * 2 * torch.pi
    ring = torch.stack([angle.cos(), angle.sin(), torch.zeros_like(angle)], dim=-1)  # (B, S, 3)
    sharp = torch.cat([RADIUS * ring, ring], dim=-1)
    return dict(_inputs(seed), sharp_surface=sharp, sharp_queries=fps_queries(sharp, 4, backend="torch"))


def test_sharp_branch_latents_and_attention():
    """Latents are the surface queries' then the sharp queries'; every latent (surface queries' too) sees the
    sharp-edge points, and without sharp queries the latents are the aligned queries' alone."""
    vae = ShapeVAE.tiny(sharp_edges=True)
    x = _sharp_inputs()
    z, post = vae.encode(x["surface"], x["queries"], sample=False, sharp_surface=x["sharp_surface"],
                         sharp_queries=x["sharp_queries"])
    assert z.shape == post.mean.shape == (B, Q + 4, 8)
    moved = dict(x, sharp_surface=x["sharp_surface"] * torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1.0]) + torch.tensor(
        [0.0, 0.0, 0.05, 0.0, 0.0, 0.0]))
    z_moved, _ = vae.encode(moved["surface"], moved["queries"], sample=False, sharp_surface=moved["sharp_surface"],
                            sharp_queries=x["sharp_queries"])
    assert ((z_moved - z)[:, :Q].abs().amax(-1) > 1e-4).all()  # each surface-query latent changed
    aligned, _ = vae.encode(x["surface"], x["queries"], sample=False, sharp_surface=x["sharp_surface"])
    assert aligned.shape == (B, Q, 8)
    perm = torch.randperm(Q, generator=torch.Generator().manual_seed(0))
    permuted, _ = vae.encode(x["surface"], x["queries"][:, perm], sample=False, sharp_surface=x["sharp_surface"])
    torch.testing.assert_close(permuted, aligned[:, perm], atol=1e-5, rtol=1e-5)
    out = vae(x["surface"], x["queries"], x["points"], sample=False, sharp_surface=x["sharp_surface"])
    assert out.sdf.shape == (B, M) and torch.isfinite(out.sdf).all()


def test_queries_without_normals_take_their_nearest_surface_normal():
    """A query that is a surface point embeds exactly as that point (upstream's FPS tokens); one off the samples
    takes its nearest sample's normal."""
    vae = ShapeVAE.tiny(sharp_edges=True)
    x = _sharp_inputs()
    idx = torch.tensor([[3, 17, 40], [0, 63, 5]])
    with_normals = torch.gather(x["surface"], 1, idx[..., None].expand(-1, -1, 6))  # (B, 3, 6)
    a, _ = vae.encode(x["surface"], with_normals, sample=False, sharp_surface=x["sharp_surface"])
    b, _ = vae.encode(x["surface"], with_normals[..., :3], sample=False, sharp_surface=x["sharp_surface"])
    assert torch.equal(a, b)
    nudged = with_normals[..., :3] * 1.001
    c, _ = vae.encode(x["surface"], nudged, sample=False, sharp_surface=x["sharp_surface"])
    d, _ = vae.encode(x["surface"], torch.cat([nudged, with_normals[..., 3:]], -1), sample=False,
                      sharp_surface=x["sharp_surface"])
    torch.testing.assert_close(c, d)
    e, _ = vae.encode(x["surface"], torch.cat([nudged, -with_normals[..., 3:]], -1), sample=False,
                      sharp_surface=x["sharp_surface"])
    assert not torch.allclose(c, e, atol=1e-3)  # the normal is part of the query token


# ---------------------------------------------------------------------------------------------------- upstream


def _golden(name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(FIXTURES, name, "golden.safetensors"))


@pytest.mark.parametrize("name,folder", [("tiny", ""), ("variant", "vae")])
def test_parity_with_step1x3d(name, folder):
    """The tiny checkpoints Step1X-3D's own MichelangeloAutoencoder wrote load through Loom's loader (the release
    folder or its vae/ folder) and give upstream's latents, posterior, KL, decoded tokens and TSDF (fp32)."""
    g = _golden(name)
    vae = ShapeVAE.from_pretrained(os.path.join(FIXTURES, name, folder))
    surface = g["surface"]
    queries = torch.gather(surface, 1, g["query_index"][..., None].expand(-1, -1, 6))  # upstream's FPS picks
    kw = {}
    if "sharp_surface" in g:
        sharp = g["sharp_surface"]
        kw = dict(sharp_surface=sharp, sharp_queries=torch.gather(sharp, 1, g["sharp_query_index"][..., None].expand(
            -1, -1, 6)))
    assert vae.config.sharp_edges == ("sharp_surface" in g)
    with torch.no_grad():
        z, post = vae.encode(surface, queries, sample=False, **kw)
        features = vae.decode_features(z)
        tsdf = vae.query_tsdf(features, g["points"], chunk=7)
        sdf = vae.decode(z, g["points"])
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, g["latents"], **close)
    torch.testing.assert_close(post.mean, g["mean"], **close)
    torch.testing.assert_close(post.logvar, g["logvar"], **close)
    torch.testing.assert_close(post.kl(), g["kl"], **close)
    torch.testing.assert_close(features, g["features"], **close)
    torch.testing.assert_close(tsdf, g["tsdf"], **close)
    torch.testing.assert_close(sdf, -vae.config.tau * g["tsdf"], **close)
    assert g["tsdf"].abs().max() > 1.0  # outputs far from zero: the comparison can fail


def test_released_size_has_the_released_keys_and_shapes():
    """The full-size model (built on the meta device from the config that loads the release) has exactly the
    state-dict keys and shapes of Step1X-3D's MichelangeloAutoencoder at that size (released_keys.json)."""
    with open(os.path.join(FIXTURES, "released_keys.json")) as f:
        doc = json.load(f)
    config = ShapeVAEConfig.from_step1x3d(doc["shape_model"])
    assert config == ShapeVAEConfig.paper()
    with torch.device("meta"):
        vae = ShapeVAE(config)
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == doc["keys"]
    assert sum(p.numel() for p in vae.parameters()) == doc["parameters"] == 191_591_553


def test_step1x3d_config_fields():
    """Missing fields mean upstream's defaults; options Loom does not build are refused by name."""
    c = ShapeVAEConfig.from_step1x3d({"point_feats": 3, "use_downsample": True, "width": 64, "heads": 4})
    assert (c.include_pi, c.qkv_bias, c.qk_norm, c.ln_post, c.sharp_edges, c.num_latents, c.latent_channels) == (
        True, True, False, False, True, 256, 64)
    with pytest.raises(ValueError, match="use_downsample=False is not supported"):
        ShapeVAEConfig.from_step1x3d({"point_feats": 3})
    with pytest.raises(ValueError, match="point_feats=0"):
        ShapeVAEConfig.from_step1x3d({"use_downsample": True})
    with pytest.raises(ValueError, match=r"unknown Step1X-3D VAE config fields \['depth'\]"):
        ShapeVAEConfig.from_step1x3d({"depth": 3})


def test_released_folder_with_a_missing_or_foreign_key_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "release" / "vae"
    shutil.copytree(os.path.join(FIXTURES, "tiny", "vae"), folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "encoder.cross_attn_sharp.ln_2.bias"}, weights)
    with pytest.raises(ValueError, match=r"missing \['encoder.cross_attn_sharp.ln_2.bias'\]"):
        ShapeVAE.from_pretrained(tmp_path / "release")
    save_file({**state, "encoder.query": torch.zeros(16, 32)}, weights)
    with pytest.raises(ValueError, match=r"unexpected \['encoder.query'\]"):
        ShapeVAE.from_pretrained(folder)
    # a Loom folder of the same network round-trips with the same keys
    save_file(state, weights)
    vae = ShapeVAE.from_pretrained(folder)
    vae.save_pretrained(tmp_path / "loom")
    assert set(load_file(tmp_path / "loom" / "model.safetensors")) == set(state)
    assert ShapeVAE.from_pretrained(tmp_path / "loom").config == vae.config


# ---------------------------------------------------------------------------------------------------- FPS


def _fps_property(points: torch.Tensor, chosen: torch.Tensor) -> None:
    """Greedy FPS: no point is farther from the chosen set than the closest two chosen points are apart."""
    cover = torch.cdist(points, chosen).min(dim=1).values.max()
    pair = torch.cdist(chosen, chosen) + torch.eye(len(chosen)) * 1e9
    assert cover <= pair.min() + 1e-6


@pytest.mark.parametrize("backend", ["torch", "fpsample"])
def test_fps_queries(backend):
    g = torch.Generator().manual_seed(0)
    cloud = torch.cat([torch.rand(500, 3, generator=g), torch.randn(500, 3, generator=g)], dim=-1)  # + "normals"
    if backend == "fpsample":
        pytest.importorskip("fpsample")
    chosen = fps_queries(cloud, 32, backend=backend)
    assert chosen.shape == (32, 3)
    # every query is one of the input points (positions only; extra channels dropped)
    assert (chosen[:, None] == cloud[None, :, :3]).all(-1).any(-1).all()
    assert len(torch.unique(chosen, dim=0)) == 32
    _fps_property(cloud[:, :3], chosen)
    batched = fps_queries(torch.stack([cloud, cloud.flip(0)]), 32, backend=backend)
    assert batched.shape == (2, 32, 3)
    assert torch.equal(fps_queries(cloud, 32, backend=backend), chosen)  # deterministic


def test_fps_torch_is_exact_fps():
    """The torch fallback picks exactly what fpsample's reference FPS picks from the same start."""
    fpsample = pytest.importorskip("fpsample")
    cloud = torch.rand(300, 3, generator=torch.Generator().manual_seed(1))
    ours = fps_queries(cloud, 20, backend="torch", start=7)
    ref = cloud[np.asarray(fpsample.fps_sampling(cloud.numpy(), 20, start_idx=7), dtype=np.int64)]
    assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match="q=301"):
        fps_queries(cloud, 301)
    with pytest.raises(ValueError, match="backend"):
        fps_queries(cloud, 3, backend="numpy")


# ---------------------------------------------------------------------------------------------------- meshing


def test_mesh_of_an_analytic_sphere_has_the_right_radius():
    resolution, bounds = 48, (-0.5, 0.5)
    center = (0.05, -0.02, 0.03)
    v, f = mesh_from_sdf(sphere_sdf(RADIUS, center), resolution, bounds, chunk=5000)
    assert v.dtype == np.float32 and f.dtype == np.int64 and v.shape[1] == f.shape[1] == 3
    r = np.linalg.norm(v - np.array(center), axis=1)
    h = (bounds[1] - bounds[0]) / (resolution - 1)
    # linear interpolation of an exact distance field puts vertices within a small fraction of a cell
    assert np.abs(r - RADIUS).max() < 0.05 * h
    volume, euler = _mesh_stats(v, f)
    assert euler == 2  # one closed surface of genus 0
    assert volume == pytest.approx(4 / 3 * np.pi * RADIUS**3, rel=0.01)  # positive: outward normals
    # the chunking of the grid evaluation does not change anything
    v2, f2 = mesh_from_sdf(sphere_sdf(RADIUS, center), resolution, bounds, chunk=resolution**3)
    assert np.array_equal(v, v2) and np.array_equal(f, f2)


def test_mesh_level_and_empty_field():
    axis = grid_points(24, (-0.5, 0.5)).numpy()
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    grid = np.sqrt(x**2 + y**2 + z**2) - 0.2
    v, _ = marching_cubes(grid, (-0.5, 0.5), level=0.1)  # the 0.1 level set of a 0.2 sphere: radius 0.3
    assert np.abs(np.linalg.norm(v, axis=1) - 0.3).max() < 0.01
    v, f = marching_cubes(np.ones((8, 8, 8)), (-0.5, 0.5))
    assert v.shape == (0, 3) and f.shape == (0, 3)
    with pytest.raises(ValueError, match="grid must be"):
        marching_cubes(np.ones((8, 8, 4)))
    with pytest.raises(ValueError, match="not finite"):
        mesh_from_sdf(lambda p: torch.full((len(p),), float("nan")), 4)


# ---------------------------------------------------------------------------------------------------- overfitting


def _sphere_problem(n_surface=256, n_queries=32, n_sdf=512, tau=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    surface = _sphere_surface(n_surface, g)[None]  # (1, S, 6)
    queries = fps_queries(surface[0], n_queries, backend="torch")[None]  # (1, Q, 3)
    near = _sphere_surface(n_sdf // 2, g)[:, :3] + 0.02 * torch.randn(n_sdf // 2, 3, generator=g)
    volume = (torch.rand(n_sdf // 2, 3, generator=g) - 0.5) * 1.05
    points = torch.cat([near, volume])[None]  # (1, M, 3)
    sdf = (points.norm(dim=-1) - RADIUS).clamp(-tau, tau)  # truncated, negative inside, like the shards
    return surface, queries, points, sdf


def _overfit(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    surface, queries, points, sdf = _sphere_problem()
    vae = ShapeVAE.tiny(seed=seed)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    # decaying to zero damps Adam's late oscillations, so a short run ends at its best
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    errors = []
    for _ in range(steps):
        out = vae(surface, queries, points, sample=False)
        losses = vae_loss(out.sdf, sdf, out.kl, kl_weight=1e-4, tau=vae.config.tau)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        schedule.step()
        errors.append((out.sdf - sdf).abs().mean().item())
    return vae, surface, queries, errors


def test_vae_overfits_one_sphere_and_meshes_it():
    """~3 s on one core: 250 steps on one sphere cut the mean SDF error twentyfold, and marching cubes on the
    trained decoder gives a sphere of the right radius."""
    vae, surface, queries, errors = _overfit(250)
    assert errors[-1] < 0.06 * errors[0]
    assert errors[-1] < 0.002  # 4% of tau
    latents, _ = vae.encode(surface, queries, sample=False)
    # inside the supervised box, away from its sparsely sampled corners; cells of 0.02
    v, f = vae.extract_mesh(latents[0], resolution=40, bounds=(-0.4, 0.4))
    r = np.linalg.norm(v, axis=1)
    assert np.median(r) == pytest.approx(RADIUS, abs=0.003)
    assert np.abs(r - RADIUS).max() < 0.02


class TestShapeVAEContract(BlocksContract):
    """Shapes, determinism, save/load, backward and the declared blocks (tests/models/contract.py); the output is
    the decoded SDF of the posterior mean, the training loss the VAE's own (sampled latents, SDF + KL)."""

    output_shape = (B, M)

    def make_model(self, seed=0):
        return ShapeVAE.tiny(seed=seed)

    def make_inputs(self, seed=0):
        return _inputs(seed)

    def forward(self, model, inputs):
        return model(**inputs, sample=False).sdf

    def save(self, model, path):
        model.save_pretrained(path)

    def load(self, model, path):
        return ShapeVAE.from_pretrained(path)

    def loss(self, model, inputs):
        out = model(**inputs, generator=torch.Generator().manual_seed(0))
        return vae_loss(out.sdf, torch.zeros_like(out.sdf), out.kl)["loss"]
