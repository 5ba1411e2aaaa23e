"""Anchor views along a trajectory (loom.inference.scene, the SAG half of `loom generate scene`) on random tiny
FLUX parts and a scene made without Blender: a textured plane seen by a camera sliding sideways, so the geometric
warp between keyframes is a known shift."""

import numpy as np
import pytest

pytest.importorskip("diffusers")
from loom.inference import scene as S  # noqa: E402

H, W, T, F = 64, 96, 9, 64.0  # frames of 64 x 96 px, focal 64 px


def plane_scene():
    """A plane at depth 2 in front of a camera moving 1/16 unit right per frame: 2 px of flow per frame."""
    K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]], np.float32)
    c2w = np.repeat(np.eye(4, dtype=np.float32)[None], T, 0)
    c2w[:, 0, 3] = np.arange(T) / 16
    edges = np.zeros((T, H, W, 4), bool)
    for t in range(T):
        edges[t, :, (60 - 2 * t) % W, 0] = True  # a vertical crease fixed on the plane
    return {"depth": np.full((T, H, W), 2.0, np.float32), "mask": np.ones((T, H, W), bool),
            "K": np.repeat(K[None], T, 0), "c2w": c2w, "edges": edges}


def test_keyframes_rule():
    assert S.pick_keyframes(46) == [0, 45]
    assert S.pick_keyframes(91) == [0, 45, 90]
    assert S.pick_keyframes(100) == [0, 45, 90, 99]
    assert S.pick_keyframes(93) == [0, 45, 92]  # 92 is only 2 after 90: the last segment takes 47 frames
    assert S.pick_keyframes(9, every=4) == [0, 4, 8]
    with pytest.raises(ValueError, match="shorter than one segment"):
        S.pick_keyframes(3)
    with pytest.raises(ValueError, match="at least 4"):
        S.pick_keyframes(50, every=2)


def test_the_warp_of_an_anchor_follows_the_geometry():
    s = plane_scene()
    img = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    warped, known = S.warp_anchor(img, s, 0, 8)  # 16 px: frame 8's pixel u shows frame 0's u + 16
    assert known[:, : W - 16].all() and not known[:, W - 15:].any()
    np.testing.assert_allclose(warped[:, : W - 16].astype(int), img[:, 16:].astype(int), atol=1)
    assert (warped[:, W - 15:] == 0).all()


def test_guided_anchors_agree_with_the_previous_one_where_it_is_seen():
    """The second anchor, sampled with the first warped into its view (Sparse Appearance-guided Sampling), matches
    that warp on the seen part (as the VAE gives it back) more closely than an anchor sampled from its structure
    alone, and both runs give the first anchor identically."""
    from loom.models import sag

    parts = sag.build(sag.SAGModelSettings(base=sag.TINY, controlnet=sag.TINY, text_len=16))
    s = plane_scene()
    kw = dict(steps=8, replace_steps=6, cfg_start=2, progress=lambda *_: None)
    guided, warps = S.anchor_views(parts, s, [0, 8], "[v] wall", **kw)
    plain, _ = S.anchor_views(parts, s, [0, 8], "[v] wall", guided=False, **kw)
    np.testing.assert_array_equal(guided[0], plain[0])
    warped, known = warps[8]
    target = sag.decode(parts.vae, sag.encode(parts.vae, sag.image_input(warped)))[0].astype(np.float32)
    inner = sag.known_mask(known, (H, W), blur=(1, 0.0))[0, 0].numpy() > 0.5  # what was replaced

    def err(img):
        return np.abs(img.astype(np.float32) - target)[inner].mean()

    # measured: 25.4 vs 32.4 grey levels (a random tiny DiT keeps moving the latent after the replacement stops;
    # the models test shows the latent-level effect)
    assert inner.mean() > 0.3 and err(guided[8]) < 0.9 * err(plain[8]), (err(guided[8]), err(plain[8]))
    assert guided[8].shape == (H, W, 3)


def test_generate_scene_writes_the_video_reuses_finished_work_and_refuses_other_settings(tmp_path):
    """SAG anchors + GGI between them on the plane scene (tiny random models): the video has every frame of the
    keyframes' range, anchors/structure/warps/segments are written, one MLflow run holds the settings and media; a
    rerun after losing the last anchor and segment (a kill) rebuilds them into the same video, a rerun of a
    finished folder takes everything kept, and other settings into the same folder are refused."""
    import json
    import os
    import types

    import mlflow
    import torch

    from loom.datasets.codecs import decode_video
    from loom.inference.inbetween import load_ggi_run
    from loom.models import sag
    from loom.platform.tracking import TrackingSettings
    from tests.inference.test_inbetween import make_run

    s = plane_scene()
    g = torch.Generator().manual_seed(0)
    s["noise"] = torch.randn((T, 4, H // 8, W // 8), generator=g).numpy()
    s["rgb"] = np.zeros((T, H, W, 3), np.uint8)
    style = types.SimpleNamespace(parts=sag.build(sag.SAGModelSettings(base=sag.TINY, controlnet=sag.TINY,
                                                                       text_len=16)))
    model = load_ggi_run(make_run(tmp_path), steps=2)
    out = str(tmp_path / "video")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    msgs = []
    kw = dict(prompt="[v] wall", every=4, sampling={"steps": 4, "replace_steps": 2, "cfg_start": 2},
              settings={"scene": "plane", "key": "k"}, progress=msgs.append)
    done = S.generate_scene(out, s, style, model, tracking=TrackingSettings(uri=uri, experiment="scene"), **kw)
    assert done["keyframes"] == [0, 4, 8] and done["frames"] == 9 and done["complete"]
    video = decode_video(open(os.path.join(out, "video.mkv"), "rb").read())
    assert video.shape == (9, H, W, 3)
    for d, names in (("anchors", {"0000.png", "0004.png", "0008.png"}), ("segments", {"0000-0004.npy",
                                                                                      "0004-0008.npy"})):
        assert set(os.listdir(os.path.join(out, d))) == names
    assert {"0004.png", "0004.known.png", "0008.png"} <= set(os.listdir(os.path.join(out, "warps")))
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("scene").experiment_id])
    assert run.data.params["keyframes"] == "[0, 4, 8]" and run.data.params["sag.replace_steps"] == "2"
    assert {"video.mp4", "anchors", "structure", "warps", "scene.json"} <= {a.path for a in
                                                                          client.list_artifacts(run.info.run_id)}
    # a kill after the first segment: the last anchor and segment are gone; the rerun makes the same video
    os.remove(os.path.join(out, "anchors", "0008.png"))
    os.remove(os.path.join(out, "segments", "0004-0008.npy"))
    msgs.clear()
    S.generate_scene(out, s, style, model, **kw)
    assert sum("kept from" in m for m in msgs) == 3  # anchors 0 and 4, segment 0..4
    np.testing.assert_array_equal(decode_video(open(os.path.join(out, "video.mkv"), "rb").read()), video)
    msgs.clear()
    S.generate_scene(out, s, style, model, **kw)
    assert sum("kept from" in m for m in msgs) == 5
    with pytest.raises(ValueError, match="seed differ"):
        S.generate_scene(out, s, style, model, seed=1, **kw)
    assert json.load(open(os.path.join(out, "scene.json")))["complete"]


@pytest.mark.blender
@pytest.mark.integration
@pytest.mark.slow  # 57 s; the anchor-view steps stay in the default tier in this file
def test_loom_generate_scene_from_the_bundled_scene_trajectory_and_a_reference(tmp_path):
    """The user's command end to end at tiny size: the bundled scene rendered along the orbit by the scene job
    (Blender), a style LoRA trained on the reference image by `loom train style` (its own process), SAG anchors and
    GGI between them: a video of the requested length, and a rerun that takes every anchor and segment kept."""
    pytest.importorskip("bpy")
    import json
    import os
    import subprocess
    import sys

    from PIL import Image

    from loom.datasets.codecs import decode_video
    from tests.inference.test_inbetween import make_run

    ggi = make_run(tmp_path)
    ref = str(tmp_path / "reference.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)).save(ref)
    out = str(tmp_path / "scene-video")
    cmd = [os.path.join(os.path.dirname(sys.executable), "loom"), "generate", "scene", "--scene", "bundled-scene",
           "--trajectory", "orbit", "--frames", "9", "--size", "32x32", "--every", "4", "--reference", ref,
           "--style-recipe", "tiny", "--style-set", "trainer.max_steps=2", "--ggi", ggi, "--steps", "3",
           "--replace-steps", "2", "--ggi-steps", "2", "--out", out, "--tracking-uri",
           f"sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    video = decode_video(open(os.path.join(out, "video.mkv"), "rb").read())
    assert video.shape == (9, 32, 32, 3)
    done = json.load(open(os.path.join(out, "scene.json")))
    assert done["keyframes"] == [0, 4, 8] and done["complete"] and done["settings"]["prompt"] == "[v]"
    assert sorted(os.listdir(os.path.join(out, "anchors"))) == ["0000.png", "0004.png", "0008.png"]
    assert os.path.isfile(os.path.join(out, "style", "lora", "pytorch_lora_weights.safetensors"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0 and p.stdout.count("kept from") + p.stderr.count("kept from") == 5, p.stderr[-2000:]
    np.testing.assert_array_equal(decode_video(open(os.path.join(out, "video.mkv"), "rb").read()), video)
