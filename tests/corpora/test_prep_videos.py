"""``loom prep videos``: real-video clips for GGI training. The signals on known inputs (flow of a translating
pattern, edges of a depth step, a tiny random DPT depth model), the clip rule, and the job end to end with real Ray
(video file, DL3DV-style frame folder, a corrupt video as a failure row, resume)."""

import hashlib
import json
import os

import numpy as np
import pytest

from loom.corpora import videos as V
from loom.datasets import clips
from loom.datasets.codecs import encode_video
from loom.geometry import video_signals as vs
from loom.platform import config as c
from loom.platform import shards

cv2 = pytest.importorskip("cv2", reason="needs opencv-python-headless (the data extra)")

H, W = 48, 64
SHIFT = (-2, 1)  # content moves 2 px left and 1 px down per frame


def _texture(h, w, seed=0):
    """Smooth random texture (blurred noise): every patch is distinctive, as optical flow needs."""
    rng = np.random.default_rng(seed)
    t = cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.float32), (0, 0), 1.5)
    return cv2.normalize(t, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def translating_frames(n, h=H, w=W, shift=SHIFT, seed=0):
    """(n,h,w,3) frames of a texture translating by ``shift`` (dx, dy) pixels per frame, integer: no resampling."""
    big = _texture(h + 80, w + 80, seed)
    dx, dy = shift
    x0, y0 = 40, 40
    return np.stack([big[y0 - dy * t: y0 - dy * t + h, x0 - dx * t: x0 - dx * t + w] for t in range(n)])


# ------------------------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("method", vs.FLOW_METHODS)
def test_flow_of_a_translating_pattern_is_the_shift(method):
    f = translating_frames(2)
    flow = vs.optical_flow(f[0], f[1], method)
    assert flow.shape == (H, W, 2) and flow.dtype == np.float32
    # Away from the borders (where content enters and leaves the frame) both methods recover an integer shift of
    # a well-textured pattern to a small fraction of a pixel; 0.25 px mean error is 8x looser than what they reach
    # (0.02 px DIS, 0.002 px Farneback) and still 8x tighter than the shift.
    inner = flow[8:-8, 8:-8]
    assert np.abs(inner - np.array(SHIFT, np.float32)).mean() < 0.25


def test_clip_flows_shapes_and_last_to_first_direction():
    f = translating_frames(3)
    fwd, l2f = vs.clip_flows(f)
    assert fwd.shape == (2, H, W, 2) and l2f.shape == (H, W, 2)
    # Last to first is the opposite of two steps: (+4, -2).
    assert np.abs(np.median(l2f[8:-8, 8:-8].reshape(-1, 2), 0) - [4, -2]).max() < 0.5


def test_depth_edges_follow_depth_steps_not_texture():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 2, (H // 4, W // 4)).repeat(4, 0).repeat(4, 1) * 255  # hard-edged texture everywhere
    rgb = np.repeat(blocks[..., None], 3, -1).astype(np.uint8)
    flat = np.full((1, H, W), 0.5, np.float32)
    step = np.zeros((1, H, W), np.float32)
    step[:, :, W // 2:] = 1.0  # a depth jump at x = W/2
    assert vs.depth_edges(flat).max() == 0  # the textured image's flat depth: no edge at all
    e = vs.depth_edges(step)[0]
    assert e.dtype == np.uint8 and set(np.unique(e)) <= {0, 255}
    cols = np.nonzero(e.any(0))[0]
    assert cols.min() >= W // 2 - 2 and cols.max() <= W // 2 + 1  # only along the jump ...
    assert e[4:-4, W // 2 - 2: W // 2 + 2].any(1).all()  # ... and all along it
    # The same detector on the image itself finds texture everywhere: the test above is not trivially met.
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)[None] / 255.0
    assert (vs.depth_edges(grey)[0] > 0).mean() > 0.1
    # A smooth depth ramp (a slanted floor) has no edges either.
    ramp = np.broadcast_to(np.linspace(0, 1, W, dtype=np.float32), (1, H, W))
    assert vs.depth_edges(ramp).max() == 0


def test_edges_of_the_frames_are_the_hed_ablation_and_see_texture():
    """edges.source=rgb (Tab. 3's "HED" row): the same detector on the frames finds the texture that the edges of
    a flat depth map (HED-S, the default) do not."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 2, (H // 4, W // 4)).repeat(4, 0).repeat(4, 1) * 255
    rgb = np.repeat(blocks[None, ..., None], 3, -1).astype(np.uint8)
    p = c.to_dict(V.DepthEdgeSettings(source="rgb"))
    e, method = V.edges_of_frames(rgb, p)
    assert method == "canny-of-frames" and e.shape == (1, H, W) and (e > 0).mean() > 0.1
    flat, _ = V.edges_of_depth(np.full((1, H, W), 0.5, np.float32), p)
    assert flat.max() == 0


def test_raft_flow_in_the_prep_job(tmp_path):
    """flow.method=raft runs Loom's RAFT (loom.models.raft, checked against torchvision by tests/models/test_raft.py)
    from a local weights file inside the job's entry: the clip's flows come from the network, the sample's meta
    names it, and a raft config without weights is refused by name. (Random weights: no accuracy to assert.)"""
    from safetensors.torch import save_file

    from loom.models.raft import RAFT, RAFT_SMALL, raft_flow

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = RAFT(RAFT_SMALL).eval()
    weights = str(tmp_path / "raft_small.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    with pytest.raises(c.ConfigError, match="flow.raft_weights"):
        V.FlowSettings(method="raft")
    with pytest.raises(c.ConfigError, match="gpus_per_worker"):
        c.resolve(V.PrepVideosJob, "tiny", [("flow.method", "raft"), ("flow.raft_weights", weights),
                                            ("flow.device", "cuda")])  # any order of --set flags
    p = c.to_dict(V.FlowSettings(method="raft", raft_weights=weights, iters=2))
    frames = translating_frames(3)
    fwd, l2f = vs.clip_flows(frames, "raft", V.flow_model(p))
    assert fwd.shape == (2, H, W, 2) and l2f.shape == (H, W, 2) and np.isfinite(fwd).all()
    np.testing.assert_allclose(fwd[1], raft_flow(frames[1], frames[2], net, iters=2), atol=1e-5)
    assert not np.allclose(fwd[0], vs.optical_flow(frames[0], frames[1]), atol=0.5)  # not OpenCV's
    src = tmp_path / "v"
    src.mkdir()
    (src / "walk.mkv").write_bytes(encode_video(translating_frames(12), "ffv1", fps=24)[1])
    cfg = c.resolve(V.PrepVideosJob, "tiny", [("videos", str(src)), ("out", str(tmp_path / "out")),
                                              ("flow.raft_weights", weights), ("flow.method", "raft"),
                                              ("flow.iters", 2)])
    (task,) = V.build_tasks(cfg, V.find_sources(cfg.videos))
    work = tmp_path / "work"
    work.mkdir()
    res = V.prep_entry({**task.params, "workdir": str(work)})
    meta = json.loads(res["files"]["meta.json"])
    assert meta["flow"] == {"method": "raft", "weights": "raft_small.safetensors", "iters": 2}


def test_clip_starts_rule():
    s = vs.clip_starts(100, frames=10, stride=2, clips=3, seed=5)
    assert s == vs.clip_starts(100, frames=10, stride=2, clips=3, seed=5)  # seeded
    assert s != vs.clip_starts(100, frames=10, stride=2, clips=3, seed=6)
    span = vs.clip_span(10, 2)
    assert span == 19 and all(0 <= x <= 100 - span for x in s)
    room = 100 - span + 1
    assert all(c * room / 3 <= x < (c + 1) * room / 3 for c, x in enumerate(s))  # stratified: one per third
    assert vs.frame_indices(s[0], 10, 2)[-1] == s[0] + 18
    assert vs.clip_starts(19, 10, 2, 1, 0) == [0]
    with pytest.raises(ValueError, match="needs 19"):
        vs.clip_starts(18, 10, 2, 1, 0)


def test_fit_frame_covers_and_crops_without_stretching():
    img = np.zeros((540, 960, 3), np.uint8)
    img[:, 480:] = 255  # right half white
    out = vs.fit_frame(img, 720, 480)
    assert out.shape == (480, 720, 3)
    # 960x540 -> 853x480, centre 720 columns: the boundary stays in the middle.
    assert out[:, 355].max() == 0 and out[:, 365].min() == 255


def test_depth_from_a_tiny_local_dpt_model(tmp_path):
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
                    patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 16, 16],
                    fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5], head_in_index=-1)
    DPTForDepthEstimation(cfg).save_pretrained(tmp_path / "dpt")
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(tmp_path / "dpt")
    frames = translating_frames(3)
    p = c.to_dict(V.DepthSettings(model=str(tmp_path / "dpt"), batch=2))
    depth, method = V.estimate_depth(frames, p)
    assert method.startswith("DPTForDepthEstimation")
    assert depth.shape == (3, H, W) and depth.dtype == np.float32
    assert depth.min() == 0.0 and depth.max() == 1.0  # normalised over the clip
    assert depth.std() > 0
    with pytest.raises(FileNotFoundError, match="depth.model"):
        V.estimate_depth(frames, {**p, "model": str(tmp_path / "missing")})


def test_caption_from_a_tiny_local_blip_model_else_the_template(tmp_path):
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["a", "room", "street", "with", "tree", "the"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *words]
    d = tmp_path / "blip"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    text = dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, encoder_hidden_size=16, max_position_embeddings=32, bos_token_id=5,
                sep_token_id=3, pad_token_id=0)
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).save_pretrained(d)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=BertTokenizer(str(d / "vocab.txt"), bos_token="[DEC]")).save_pretrained(d)
    frame = translating_frames(1)[0]
    p = c.to_dict(V.CaptionSettings(model=str(d), max_new_tokens=5))
    caption, method = V.caption_frame(frame, p, {"uid": "u", "name": "n"})
    assert method == "blip" and caption and set(caption.split()) <= set(words)
    caption, method = V.caption_frame(frame, c.to_dict(V.CaptionSettings(prompt="scene {name}")),
                                      {"uid": "u", "name": "hall"})
    assert (caption, method) == ("scene hall", "template")
    with pytest.raises(FileNotFoundError, match="caption.model"):
        V.caption_frame(frame, {**p, "model": str(tmp_path / "missing")}, {"uid": "u", "name": "n"})


def test_standin_depth_is_said_so_and_hed_without_weights_is_a_clear_error():
    frames = translating_frames(2)
    depth, method = V.estimate_depth(frames, c.to_dict(V.DepthSettings()))
    assert method == "standin-median-luminance" and depth.shape == (2, H, W)
    with pytest.raises(c.ConfigError, match="hed_weights"):
        V.DepthEdgeSettings(method="hed")
    with pytest.raises(FileNotFoundError, match="ControlNetHED.pth"):
        V.edges_of_depth(depth, c.to_dict(V.DepthEdgeSettings(method="hed", hed_weights="/nonexistent.pth")))


def test_recipes_resolve_and_bad_settings_are_refused():
    for name in c.recipes(V.PrepVideosJob):
        cfg = c.resolve(V.PrepVideosJob, name)
        assert cfg.clip.width % cfg.noise.downsample == 0
    with pytest.raises(c.ConfigError, match="noise.downsample"):
        c.resolve(V.PrepVideosJob, "default", [("clip.width", 724)])
    with pytest.raises(c.ConfigError, match="caption.prompt"):
        c.resolve(V.PrepVideosJob, "default", [("caption.prompt", "a {what}")])


# ------------------------------------------------------------------------------------------------------ the job


def _make_source(root):
    """A folder with a video file (FFV1, exact pixels) + licence sidecar, a corrupt .mp4, and a DL3DV-style scene
    with two resolutions of frame folders."""
    src = root / "videos"
    (src / "scene7" / "images_4").mkdir(parents=True)
    (src / "scene7" / "images_8").mkdir()
    frames = translating_frames(14)
    _, data = encode_video(frames, "ffv1", fps=24)
    (src / "walk.mkv").write_bytes(data)
    (src / "walk.mkv.license").write_text("CC-BY-4.0\n")
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    for t, f in enumerate(translating_frames(12, seed=1)):
        cv2.imwrite(str(src / "scene7" / "images_4" / f"frame_{t + 1:05d}.png"), f[..., ::-1])
        cv2.imwrite(str(src / "scene7" / "images_8" / f"frame_{t + 1:05d}.png"), f[::2, ::2, ::-1])
    (src / "LICENSES.json").write_text(json.dumps({"scene7": "DL3DV-10K terms"}))
    return src


@pytest.fixture(scope="module")
def job(ray_local, tmp_path_factory):
    from loom.platform.jobs import run_job

    root = tmp_path_factory.mktemp("prep")
    src = _make_source(root)
    cfg = c.resolve(V.PrepVideosJob, "tiny", [("videos", str(src)), ("out", str(root / "out")),
                                              ("shards.samples_per_shard", 1)])
    sources = V.find_sources(cfg.videos, frame_folder=cfg.clip.frame_folder, default_license=cfg.license)
    spec = V.job_spec(cfg, sources)
    return cfg, src, sources, spec, run_job(spec, progress=False)


@pytest.mark.integration
def test_sources_found_with_licences_and_the_preferred_frame_folder(job):
    _, src, sources, _, _ = job
    by = {s["rel"]: s for s in sources}
    assert set(by) == {"broken.mp4", "scene7", "walk.mkv"}
    assert by["walk.mkv"]["license"] == "CC-BY-4.0" and by["scene7"]["license"] == "DL3DV-10K terms"
    assert by["broken.mp4"]["license"] == "unknown"
    assert by["scene7"]["path"].endswith("scene7/images_4") and len(by["scene7"]["frames"]) == 12
    assert by["walk.mkv"]["sha256"] == hashlib.sha256((src / "walk.mkv").read_bytes()).hexdigest()


@pytest.mark.integration
def test_job_writes_clips_and_a_failure_row_for_the_corrupt_video(job):
    cfg, _, _, spec, s = job
    assert (s.samples_done, s.failed) == (2, 1)
    [f] = s.failures
    assert f["key"].startswith("broken") and "broken.mp4" in f["reason"]
    rows = [json.loads(line) for line in open(f"{cfg.out}/failures.jsonl")]
    assert [r["key"] for r in rows] == [f["key"]]
    assert shards.verify(cfg.out) == []
    assert clips.check(cfg.out) == []
    from loom import cli

    assert cli.main(["shards", "verify", cfg.out]) == 0
    samples = {x["meta"]["uid"].split("--")[0]: x for x in clips.iter_samples(cfg.out)}
    assert set(samples) == {"walk", "scene7"}
    T, C = cfg.clip.frames, cfg.noise.channels
    for smp in samples.values():
        assert smp["rgb"].shape == (T, H, W, 3)
        assert smp["noise"].shape == (1 + (T - 1) // 4, C, H // 8, W // 8)
        assert smp["depth"].shape == smp["edges"].shape == (T, H, W)
        m = smp["meta"]
        assert m["kind"] == "clips" and m["caption"] and len(m["frame_indices"]) == T
        assert m["depth"]["method"].startswith("standin") and m["edges"]["method"] == "canny-of-depth"
        # The stored flow (float16) is still the pattern's shift.
        assert np.abs(smp["flow_fwd"][:, 8:-8, 8:-8] - np.array(SHIFT, np.float32)).mean() < 0.25
    walk = samples["walk"]["meta"]
    assert walk["fps"] == 24 and walk["license"] == "CC-BY-4.0" and walk["source_frames"] == 14
    assert samples["scene7"]["meta"]["sha256_of"] == "listing"
    # The clip's frames are the source frames it names (FFV1 is lossless).
    src = translating_frames(14)
    np.testing.assert_array_equal(samples["walk"]["rgb"], src[walk["frame_indices"]])


@pytest.mark.integration
def test_rerun_resumes_and_a_changed_config_is_refused(job):
    from loom.platform.jobs import run_job

    cfg, _, sources, spec, _ = job
    again = run_job(spec, progress=False)
    assert (again.samples_done, again.samples_skipped, again.shards_skipped) == (0, 2, 3)
    other = V.job_spec(c.override(cfg, "clip.stride", 2), sources)
    with pytest.raises(RuntimeError, match="different config"):
        run_job(other, progress=False)


@pytest.mark.integration
def test_contact_sheet_of_a_clip(job):
    from loom.datasets.inspect import contact_sheet_clips

    cfg = job[0]
    smp = next(clips.iter_samples(cfg.out))
    sheet = contact_sheet_clips(smp, max_frames=4)
    assert sheet.shape == (4 * H, 5 * W, 3) and sheet.dtype == np.uint8
    assert sheet[:, 2 * W: 3 * W].max() == 255  # the edges column shows edges


def test_cli_dry_run_lists_the_plan(tmp_path, capsys):
    from loom import cli

    src = tmp_path / "v"
    src.mkdir()
    _, data = encode_video(translating_frames(10), "ffv1")
    (src / "a.mkv").write_bytes(data)
    assert cli.main(["prep", "videos", "--videos", str(src), "--out", str(tmp_path / "o"), "--recipe", "tiny",
                     "--set", "clip.clips_per_video=2", "--dry-run"]) == 0
    assert "1 video file(s) and 0 frame folder(s) -> 2 clip(s)" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_videos_on_an_fsspec_url_are_found_and_read(tmp_path):
    """memory:// stands in for s3:// (the worker copies a remote video to its task folder for PyAV)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    frames = translating_frames(10)
    _, data = encode_video(frames, "ffv1")
    fs.pipe("/prepsrc/a.mkv", data)
    [src] = V.find_sources("memory://prepsrc")
    assert src["path"].startswith("memory://") and src["path"].endswith("/prepsrc/a.mkv")
    assert src["sha256"] == hashlib.sha256(data).hexdigest()
    clip = c.to_dict(V.ClipSettings(frames=5, width=W, height=H, stride=2))
    rgb, info = V.read_clip_frames(src, clip, 0, starts_seed=3, workdir=str(tmp_path))
    assert info["frame_indices"] == list(range(info["frame_indices"][0], info["frame_indices"][0] + 9, 2))
    np.testing.assert_array_equal(rgb, frames[info["frame_indices"]])
    fs.rm("/prepsrc", recursive=True)


@pytest.mark.integration
def test_loom_train_ggi_trains_on_the_clips(job, tmp_path):
    """The two halves of issue 19 meet: the tiny GGI recipe trains on `loom prep videos` output (its 4 noise channels
    are the tiny VAE's latent channels; 9 frames -> 3 latent frames)."""
    import subprocess
    import sys

    pytest.importorskip("diffusers")
    cfg = job[0]
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOOM_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([loom, "train", "ggi", "--recipe", "tiny", "--data", cfg.out, "--out", str(tmp_path / "run"),
                        "--set", "trainer.max_steps=2", "--set", "trainer.progress=false"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert os.path.isfile(os.path.join(str(tmp_path / "run"), "transformer", "config.json"))
