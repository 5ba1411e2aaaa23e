"""``loom eval scene`` (VideoFrom3D Tab. 2) on a synthetic scene: a textured plane seen by a camera sliding sideways
(:mod:`tests.eval.scene_data`), where the anchors warp exactly onto the truth. The tiny recipe's random stand-in
networks mean nothing, so network columns are checked only for what must hold for any network (1 for a static
video, equality for identical embeddings)."""

import json
import os

import numpy as np
import pytest
import torch

from loom.cli import main
from loom.eval import bench_scene, leaderboard
from loom.eval.metrics import lpips as lpips_metric, psnr as psnr_metric, ssim as ssim_metric
from loom.eval.networks import clip as clip_net, lpips as lpips_net
from loom.platform import config as cfgmod
from tests.eval import scene_data

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LOOM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))  # nothing found by accident


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return scene_data.make_scene_case(str(tmp_path_factory.mktemp("scene")))


def loom(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_equalisation_and_psnr_d_are_blind_to_monotone_transforms():
    eq = bench_scene.equalize(np.array([3.0, 1.0, 2.0, 2.0, 10.0]))
    assert eq.tolist() == [0.75, 0.0, 0.375, 0.375, 1.0]  # average ranks 3, 0, 1.5, 1.5, 4 over n - 1 = 4
    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 5, (16, 16)).astype(np.float32)
    mask = np.ones((16, 16), bool)
    mask[:4] = False
    depth[:2] = 0  # no geometry: left out even where the mask says otherwise
    inv = 1.0 / np.maximum(depth, 1e-3)
    assert bench_scene.psnr_d(depth, 0.3 * inv**2 + 7, mask, 100.0) == 100.0  # scale, shift, gamma: all forgiven
    flipped = bench_scene.psnr_d(depth, depth, mask, 100.0)  # depth instead of inverse depth: the order reversed
    noisy = bench_scene.psnr_d(depth, inv + rng.normal(0, 0.05, inv.shape), mask, 100.0)
    assert flipped < 6 < 15 < noisy < 100
    assert bench_scene.psnr_d(depth, inv, np.zeros_like(mask), 100.0) is None


def test_masked_metrics_are_loom_metrics_on_a_full_mask_and_ignore_unknown_pixels():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.random((3, 48, 64), dtype=np.float32))
    b = (a + torch.from_numpy(rng.normal(0, 0.1, (3, 48, 64)).astype(np.float32))).clamp(0, 1)
    full = np.ones((48, 64), bool)
    assert bench_scene.masked_psnr(a, b, full, 100.0) == pytest.approx(float(psnr_metric(a[None], b[None])), abs=1e-4)
    assert bench_scene.masked_ssim(a, b, full) == pytest.approx(float(ssim_metric(a[None], b[None])), abs=1e-5)
    net = lpips_net.tiny_random("alex", seed=0)
    lp = bench_scene.masked_lpips(net, a, b, full)
    assert lp == pytest.approx(float(lpips_metric(a[None], b[None], network=net)), rel=1e-3)  # same mean
    half = np.zeros((48, 64), bool)
    half[:, :32] = True
    c = b.clone()
    c[:, :, 32:] = 1 - c[:, :, 32:]  # changes only where nothing is known: PSNR and the mask's PSNR unchanged
    assert bench_scene.masked_psnr(a, c, half, 100.0) == bench_scene.masked_psnr(a, b, half, 100.0)
    assert bench_scene.masked_psnr(a, a, half, 100.0) == 100.0
    assert bench_scene.masked_ssim(a, a, half) == pytest.approx(1.0, abs=1e-6)
    assert bench_scene.masked_lpips(net, a, a, half) == pytest.approx(0.0, abs=1e-7)
    assert bench_scene.masked_psnr(a, b, ~full, 100.0) is None and bench_scene.masked_lpips(net, a, b, ~full) is None


def test_pseudo_ground_truth_is_the_truth_where_known_and_takes_the_nearer_anchor():
    arr = scene_data.scene_arrays()
    sample = {k: arr[k] for k in ("depth", "mask", "K", "c2w")}
    gt, kf = scene_data.truth(), scene_data.KEYFRAMES
    anchors = {k: gt[k] for k in kf}
    for i in (1, 2, 3, 5, 7):
        img, known = bench_scene.pseudo_gt(anchors, sample, kf, i)
        assert (known == arr["mask"][i]).all()  # both warps together see all of the plane, never the sky
        assert (img[known] == gt[i][known]).all()
    bright = {k: (gt[k] // 2 + (100 if k == 4 else 0)).astype(np.uint8) for k in kf}  # anchors told apart
    img, known = bench_scene.pseudo_gt(bright, sample, kf, 5)  # nearer to anchor 4 than to 8
    both = known & ~np.isin(np.arange(scene_data.W), range(scene_data.W - scene_data.STEP, scene_data.W))[None]
    assert (img[both] == (gt[5] // 2 + 100)[both]).all()
    img, _ = bench_scene.pseudo_gt(bright, sample, kf, 7)  # nearer to 8: its pixels, where 8 sees them
    seen_by_8 = known & (np.arange(scene_data.W) >= scene_data.STEP)[None]
    assert (img[seen_by_8] == (gt[7] // 2)[seen_by_8]).all()


def test_eval_scene_ranks_truth_over_perturbations_logs_one_run_each_and_the_leaderboard(case, tmp_path, capsys):
    out = tmp_path / "evals"
    for name in ("exact", "noisy", "static", "shuffled"):
        rc, stdout, err = loom(capsys, "eval", "scene", "--recipe", "tiny", "--pred", case[name], "--out", out / name)
        assert rc == 0, err
    assert "TINY RANDOM" in err and "MUSIQ not computed" in err
    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("bench/scene")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["exact", "noisy", "shuffled", "static"]  # one run each
    m = {r.info.run_name: r.data.metrics for r in runs}
    ex, no = m["exact"], m["noisy"]
    # the truth against its own pseudo ground truth: the PSNR cap, SSIM 1, LPIPS 0, on the plane (sky unknown)
    assert ex["psnr"] == 100.0 and ex["ssim"] == pytest.approx(1.0, abs=1e-6) and ex["lpips"] < 1e-6
    assert ex["items"] == 2 and ex["scored_frames"] == 12 and ex["known"] == pytest.approx(1 - scene_data.SKY / 32)
    assert no["psnr"] < 25 and no["ssim"] < 0.8 and no["lpips"] > 0.05  # worse on every fidelity column
    # VBench's consistency: exactly 1 for a static video, lower for shuffled noisy frames; CLIP-I 1 on the reference
    assert m["static"]["sc"] == pytest.approx(1.0, abs=1e-6) and m["static"]["bc"] == pytest.approx(1.0, abs=1e-6)
    assert m["shuffled"]["sc"] < m["static"]["sc"] - 1e-5 and m["shuffled"]["bc"] < m["static"]["bc"] - 1e-5
    assert m["static"]["clip_i"] == pytest.approx(1.0, abs=1e-5) and m["exact"]["clip_i"] < 1 - 1e-4
    assert {"psnr_d", "clip_a"} <= set(ex) and "musiq" not in ex
    run = next(r for r in runs if r.info.run_name == "exact")
    assert "MUSIQ not computed" in run.data.tags["mlflow.note.content"]
    assert run.data.params["features.dino"].startswith("tiny-random") and run.data.params["features"] == "tiny-random"
    rows = json.load(open(out / "exact" / "items.json"))
    assert [r["key"] for r in rows] == ["style0", "style1"]  # the relative scene and reference paths resolved
    assert rows[0]["psnr"] == rows[1]["psnr"] == 100.0 and rows[1]["clip_i"] == pytest.approx(rows[0]["clip_i"])
    assert os.path.isfile(out / "exact" / "media" / "style0.png")

    rc, stdout, err = loom(capsys, "leaderboard", "scene", "--no-log")
    assert rc == 0, err
    head = next(ln for ln in stdout.splitlines() if ln.startswith("Model")).split()
    assert head[1:19:2] == ["PSNR", "SSIM", "LPIPS", "PSNR-D", "CLIP-A", "MUSIQ", "CLIP-I", "SC", "BC"]
    assert [c.label for c in leaderboard.collect(uri, "scene").columns] == head[1:19:2]
    assert leaderboard.collect(uri, "scene").rows[0].model == "exact"


def test_missing_networks_leave_their_columns_out_with_a_note_and_present_ones_load(case, tmp_path):
    weights = tmp_path / "weights"
    clip_net.save_tiny_random(weights / "clip" / "clip-vit-large-patch14")  # Loom's registered CLIP, required
    sets = [("pred", case["noisy"]), ("out", str(tmp_path / "o")), ("tracking.enabled", False),
            ("features.weights", str(weights)), ("features.device", "cpu"),
            ("metrics", ["psnr", "ssim", "psnr_d", "clip_a", "musiq", "clip_i", "sc", "bc"])]
    res = bench_scene.evaluate(cfgmod.resolve(bench_scene.EvalSceneJob, "default", sets))
    assert {"psnr", "ssim", "clip_i"} <= set(res["metrics"])
    assert not {"psnr_d", "clip_a", "musiq", "sc", "bc"} & set(res["metrics"])
    notes = " ".join(json.load(open(tmp_path / "o" / "metrics.json"))["notes"])
    for label, where in (("SC", "dino-vitb16"), ("PSNR-D", "Depth-Anything-V2-Large-hf"),
                         ("CLIP-A", "sa_0_4_vit_l_14_linear.pth"), ("BC", "clip-vit-base-patch32")):
        assert f"{label} not computed: no local weights" in notes and where in notes
    assert "MUSIQ not computed" in notes
    # the same files in place (tiny, through the real loading path): every column but MUSIQ is back
    bench_scene.save_tiny_dino(weights / "dino" / "dino-vitb16")
    bench_scene.save_tiny_depth(weights / "depth" / "Depth-Anything-V2-Large-hf")
    bench_scene.save_tiny_aesthetic(weights / "aesthetic" / "sa_0_4_vit_l_14_linear.pth", dim=16)
    clip_net.save_tiny_random(weights / "clip" / "clip-vit-base-patch32", seed=1)
    res = bench_scene.evaluate(cfgmod.resolve(bench_scene.EvalSceneJob, "default", sets))
    assert {"psnr_d", "clip_a", "sc", "bc"} <= set(res["metrics"]) and "musiq" not in res["metrics"]
    assert res["params"]["features"] == "real" and "sha256=" in res["params"]["features.depth"]


def test_depth_preprocessing_matches_the_dpt_processor(tmp_path):
    from transformers import AutoImageProcessor

    path = bench_scene.save_tiny_depth(tmp_path / "depth")
    est = bench_scene.load_depth(path)
    proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    for h, w in ((40, 64), (64, 40), (30, 30)):
        img = np.zeros((h, w, 3), np.uint8)
        assert est.input_size(h, w) == tuple(proc(images=img, return_tensors="pt")["pixel_values"].shape[-2:])
    frames = torch.rand(2, 3, 40, 64)
    assert est(frames).shape == (2, 40, 64)


def test_bad_inputs_are_refused_with_what_to_do(case, tmp_path, capsys):
    bad = tmp_path / "bad"
    scene_data.write_out(str(bad / "a"), scene_data.truth()[:, :16], case["scenes"])
    rc, _, err = loom(capsys, "eval", "scene", "--recipe", "tiny", "--pred", bad, "--out", tmp_path / "o", "--set",
                      "tracking.enabled=false")
    assert rc == 2 and "evaluate against the render" in err
    scene_data.write_out(str(bad / "a"), scene_data.truth(), case["scenes"], complete=False)
    rc, _, err = loom(capsys, "eval", "scene", "--recipe", "tiny", "--pred", bad, "--out", tmp_path / "o")
    assert rc == 2 and "not complete" in err
    os.remove(bad / "a" / "scene.json")
    rc, _, err = loom(capsys, "eval", "scene", "--recipe", "tiny", "--pred", bad, "--out", tmp_path / "o")
    assert rc == 2 and "holds no scene.json" in err
    with pytest.raises(cfgmod.ConfigError, match="metrics"):
        cfgmod.resolve(bench_scene.EvalSceneJob, "tiny", [("metrics", ["psnr", "fvd"])])
    assert cfgmod.resolve(bench_scene.EvalSceneJob, "default").tracking.experiment == "bench/scene"
