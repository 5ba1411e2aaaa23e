"""``loom generate inbetween`` (VideoFrom3D's GGI at inference) with a tiny random run on a scene corpus made without
Blender: the video covers the anchors' frame range exactly, segments chain, the output is a function of the seed and
of the anchors, and bad input is refused by name."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from loom.platform import config as cfgmod
from tests.training.corpus_ggi import make_scene_corpus

pytest.importorskip("diffusers")


def make_run(root) -> str:
    """A `loom train ggi` run folder: the tiny recipe's config.yaml and a transformer/ as training saves it."""
    from loom.models import ggi
    from loom.training.ggi import TrainGGIJob
    from loom.training.ggi.module import save_transformer

    run = os.path.join(str(root), "run")
    cfg = cfgmod.resolve(TrainGGIJob, "tiny", [("out", run), ("sample.steps", 2)])
    os.makedirs(run)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(cfgmod.dump_yaml(cfg))
    tr = ggi.build_transformer(cfg.model, 0)
    import torch

    with torch.no_grad():
        tr.patch_embed.proj.weight[:, 8:] = 0.05  # as if trained: the anchors and edges matter
    save_transformer(tr, os.path.join(run, "transformer"))
    return run


def anchors(folder, frames: dict[int, tuple[int, int, int]]) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, colour in frames.items():
        Image.fromarray(np.full((40, 48, 3), colour, np.uint8)).save(os.path.join(folder, f"{i:04d}.png"))
    return str(folder)


def test_inbetween_covers_the_keyframes_and_follows_seed_and_anchors(tmp_path):
    from loom.inference.inbetween import generate_inbetween

    data = str(tmp_path / "scene")
    make_scene_corpus(data, samples=1, frames=13, size=32)
    run = make_run(tmp_path)
    a = anchors(tmp_path / "a", {0: (200, 30, 30), 6: (30, 200, 30), 12: (30, 30, 200)})
    out = generate_inbetween(run, a, str(tmp_path / "v.mp4"), data=data)
    from loom.datasets.codecs import decode_video

    video = decode_video(open(out, "rb").read())
    assert video.shape == (13, 32, 32, 3)  # frames 0..12, the join at 6 shown once
    info = json.load(open(str(tmp_path / "v.json")))
    assert info["anchors"] == [0, 6, 12] and info["frames"] == 13
    # the frames themselves (H.264 encoding is not bit-reproducible across runs): a function of seed and anchors
    from loom.inference.inbetween import inbetween, load_ggi_run, read_anchors, read_scene

    model, sample = load_ggi_run(run), read_scene(data, None)
    keys = read_anchors(a, (32, 32))
    first = inbetween(model, sample, keys, seed=0, progress=lambda _: None)
    assert first.shape == (13, 32, 32, 3) and np.abs(first.astype(int) - video).mean() < 8
    np.testing.assert_array_equal(inbetween(model, sample, keys, seed=0, progress=lambda _: None), first)
    assert not np.array_equal(inbetween(model, sample, keys, seed=1, progress=lambda _: None), first)
    moved = inbetween(model, sample, {**keys, 12: np.full((32, 32, 3), 250, np.uint8)}, seed=0,
                      progress=lambda _: None)
    np.testing.assert_array_equal(moved[:7], first[:7])  # the first segment does not see the last anchor
    assert not np.array_equal(moved[7:], first[7:])  # the end anchor reaches the last segment


def test_a_released_ggi_transformer_generates_with_its_base(tmp_path):
    """`--transformer DIR --base DIR`: the authors' checkpoint layout (a transformer folder; the VAE, scheduler and T5
    from CogVideoX-5B-I2V's folder) runs without a Loom run folder; a base model is refused as a GGI transformer."""
    from loom.inference.inbetween import generate_inbetween
    from loom.models import ggi
    from loom.training.ggi.module import save_transformer

    data = str(tmp_path / "scene")
    make_scene_corpus(data, samples=1, frames=9, size=32)
    save_transformer(ggi.build_transformer(ggi.GGIModelSettings(transformer=ggi.TINY, vae=ggi.TINY)),
                     str(tmp_path / "checkpoint-1350" / "transformer"))
    ggi.tiny_vae().save_pretrained(str(tmp_path / "base" / "vae"))
    a = anchors(tmp_path / "a", {0: (200, 30, 30), 8: (30, 30, 200)})
    out = generate_inbetween(None, a, str(tmp_path / "v.mp4"), data=data, steps=2,
                             checkpoint=(str(tmp_path / "checkpoint-1350"), str(tmp_path / "base")))
    info = json.load(open(str(tmp_path / "v.json")))
    assert os.path.isfile(out) and info["frames"] == 9 and info["steps"] == 2 and info["guidance"] == 1.0
    ggi.tiny_transformer().save_pretrained(str(tmp_path / "i2v" / "transformer"))
    with pytest.raises(ValueError, match="not a GGI transformer"):
        generate_inbetween(None, a, str(tmp_path / "x.mp4"), data=data,
                           checkpoint=(str(tmp_path / "i2v"), str(tmp_path / "base")))
    with pytest.raises(ValueError, match="not both"):
        generate_inbetween(str(tmp_path), a, str(tmp_path / "x.mp4"), data=data,
                           checkpoint=(str(tmp_path / "i2v"), str(tmp_path / "base")))


def test_a_run_trained_without_structure_generates_without_it(tmp_path, monkeypatch):
    """A run with data.structure=none (Tab. 3's first row) is given a blank edge video at generation, as in its
    training, whatever the scene's edges; a run trained with edges gets the scene's."""
    import torch

    from loom.inference.inbetween import inbetween, load_ggi_run, read_scene
    from loom.models import ggi

    data = str(tmp_path / "scene")
    make_scene_corpus(data, samples=1, frames=9, size=32)
    s = read_scene(data, None)
    keys = {0: np.full((32, 32, 3), 200, np.uint8), 8: np.full((32, 32, 3), 30, np.uint8)}
    seen, real = [], ggi.sample
    monkeypatch.setattr(ggi, "sample", lambda tr, sc, noise, v, e, *a, **k: seen.append(e) or real(tr, sc, noise, v,
                                                                                                     e, *a, **k))
    model = load_ggi_run(make_run(tmp_path), steps=1)
    blank = ggi.encode(model.vae, ggi.edges_input(np.zeros((1, 9, 32, 32), np.float32)))
    assert model.structure == "edges"
    inbetween(model, s, keys, progress=lambda *_: None)
    assert not torch.allclose(seen[-1], blank, atol=1e-3)
    model.structure = "none"
    inbetween(model, s, keys, progress=lambda *_: None)
    torch.testing.assert_close(seen[-1], blank)


def test_bad_anchors_are_refused_by_name(tmp_path):
    from loom.inference.inbetween import generate_inbetween

    data = str(tmp_path / "scene")
    make_scene_corpus(data, samples=1, frames=9, size=32)
    run = make_run(tmp_path)
    with pytest.raises(ValueError, match="at least 4 frames apart"):
        generate_inbetween(run, anchors(tmp_path / "close", {0: (0, 0, 0), 2: (9, 9, 9)}), str(tmp_path / "x.mp4"),
                           data=data)
    with pytest.raises(ValueError, match="beyond the trajectory"):
        generate_inbetween(run, anchors(tmp_path / "far", {0: (0, 0, 0), 20: (9, 9, 9)}), str(tmp_path / "x.mp4"),
                           data=data)
    with pytest.raises(ValueError, match="at least two"):
        generate_inbetween(run, anchors(tmp_path / "one", {0: (0, 0, 0)}), str(tmp_path / "x.mp4"), data=data)
    bad = anchors(tmp_path / "named", {0: (0, 0, 0), 8: (9, 9, 9)})
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(bad, "start.png"))
    with pytest.raises(ValueError, match="named by their frame index"):
        generate_inbetween(run, bad, str(tmp_path / "x.mp4"), data=data)
    with pytest.raises(FileNotFoundError, match="not a `loom train ggi` run"):
        generate_inbetween(str(tmp_path), anchors(tmp_path / "ok", {0: (0, 0, 0), 8: (9, 9, 9)}),
                           str(tmp_path / "x.mp4"), data=data)
    wide = str(tmp_path / "wide")
    make_scene_corpus(wide, samples=1, frames=9, size=32, channels=16)
    with pytest.raises(ValueError, match="noise.channels=4"):
        generate_inbetween(run, anchors(tmp_path / "ok2", {0: (0, 0, 0), 8: (9, 9, 9)}), str(tmp_path / "x.mp4"),
                           data=wide)


@pytest.mark.blender
def test_the_cli_renders_the_scene_with_blender_and_inbetweens(tmp_path):
    """The real path: `loom generate inbetween --scene --trajectory` renders the bundled scene's edges and warped
    noise along the orbit with the scene job (Blender), then generates between the two anchors."""
    pytest.importorskip("bpy")
    import subprocess
    import sys

    run = make_run(tmp_path)
    a = anchors(tmp_path / "a", {0: (200, 30, 30), 8: (30, 30, 200)})
    out = str(tmp_path / "scene.mp4")
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    p = subprocess.run([loom, "generate", "inbetween", "--run", run, "--anchors", a, "--scene", "bundled-scene",
                        "--trajectory", "orbit", "--size", "32x32", "--out", out],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    from loom.datasets.codecs import decode_video
    from loom.datasets.scene import iter_samples

    assert decode_video(open(out, "rb").read()).shape == (9, 32, 32, 3)
    (s,) = list(iter_samples(str(tmp_path / "scene-scene"), keys=("edges", "noise")))
    assert s["edges"].any() and s["noise"].shape == (9, 4, 4, 4)  # the VAE's 4 latent channels, 8x smaller


@pytest.mark.integration
@pytest.mark.slow  # 52 s; `loom generate inbetween` through Blender stays in the default tier
def test_a_trained_run_inbetweens_a_clip_whose_ends_decode_close_to_the_anchors(tmp_path):
    """The whole user path at tiny size: `loom train ggi` fits one clip (a pan), then `loom generate inbetween
    --run` with that clip's first and last frames as anchors writes a video of the requested frames whose first and
    last frames are the anchors as the run's VAE reproduces them (a random tiny VAE does not give pixels back: its
    own reconstruction of each anchor is the target), much closer than the same generation from the untrained
    model."""
    import subprocess
    import sys

    from loom.datasets.codecs import decode_video
    from loom.datasets.scene import iter_samples
    from loom.inference.inbetween import generate_inbetween, load_ggi_run
    from loom.models import ggi
    from tests.training.runs import loom_train

    data = str(tmp_path / "scene")
    make_scene_corpus(data, samples=1, frames=9, size=32)
    (s,) = list(iter_samples(data, keys=("rgb",)))
    a = str(tmp_path / "anchors")
    os.makedirs(a)
    for i in (0, 8):
        Image.fromarray(s["rgb"][i]).save(os.path.join(a, f"{i:04d}.png"))
    run = str(tmp_path / "run")
    loom_train("ggi", run, data, "trainer.max_steps=120", "optim.lr=3e-3", "optim.weight_decay=0",
               "trainer.checkpoint_every=1000", "trainer.log_every=50")
    out = str(tmp_path / "video.mp4")
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    p = subprocess.run([loom, "generate", "inbetween", "--run", run, "--anchors", a, "--data", data,
                        "--degradation", "0", "--steps", "10", "--out", out],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    video = decode_video(open(out, "rb").read()).astype(np.float32)
    assert video.shape == (9, 32, 32, 3)
    model = load_ggi_run(run)
    clip = ggi.frames_input(s["rgb"][None])
    recon = ggi.decode(model.vae, ggi.encode(model.vae, clip))[0].numpy().astype(np.float32)
    err = [np.abs(video[i] - recon[i]).mean() for i in (0, 8)]
    untrained = make_run(tmp_path / "untrained")
    base = str(tmp_path / "base.mp4")
    generate_inbetween(untrained, a, base, data=data, degradation=0.0, steps=10)
    far = decode_video(open(base, "rb").read()).astype(np.float32)
    far_err = [np.abs(far[i] - recon[i]).mean() for i in (0, 8)]
    assert max(err) < 10 and min(far_err) > 2 * max(err), (err, far_err)
