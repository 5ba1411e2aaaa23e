"""``loom generate 4d --video``: an in-the-wild clip in, a registered, topology-consistent, textured 4D mesh out
(ShapeGen4D section 4, appendix A). The "video" is a twisting bunny with vertex colours, moved by a known pose and
rendered by a camera the command does not know; the "generated" meshes are the same frames in the canonical pose,
each remeshed with its own topology (what per-frame marching cubes gives), passed with ``--meshes``. The model's
own generation is tested in test_shape4d.py; here every later stage runs for real."""

import json
import math
import os

import numpy as np
import pytest
import torch

from loom.geometry import camera as cam
from tests.training.corpus4d import loom

pcu = pytest.importorskip("point_cloud_utils")
trimesh = pytest.importorskip("trimesh")

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "src", "loom", "data", "assets")
T = 4


def _rot(axis, deg):
    a = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    t = math.radians(deg)
    x = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * x + (1 - math.cos(t)) * x @ x


def _twist(v, deg):
    """Each point turned about +Z by ``deg`` x its height: a non-rigid motion."""
    a = np.radians(deg) * (v[:, 2] - v[:, 2].min()) / np.ptp(v[:, 2])
    c, s = np.cos(a), np.sin(a)
    return np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1], v[:, 2]], 1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(video folder of RGBA frames, meshes folder, the true pose's rotation)."""
    from PIL import Image

    from loom.geometry.raster import interpolate, rasterize

    root = tmp_path_factory.mktemp("clip")
    m = trimesh.load(os.path.join(ASSETS, "bunny_colors.ply"), force="mesh", process=False)
    v = np.asarray(m.vertices) @ _rot((1, 0, 0), 90).T  # Y up -> Z up
    colours = np.asarray(m.visual.vertex_colors[:, :3], np.float64) / 255.0
    s = cam.similarity_to_unit_sphere(v)
    v = v @ s[:3, :3].T + s[:3, 3]
    f = np.asarray(m.faces, np.int64)
    true_rot = _rot((0, 0, 1), 50)  # the pose of the object in the video
    K = cam.intrinsics(math.radians(40), 160, 120)
    c2w = cam.look_at((0.0, -3.2, 0.4))
    video, meshes = root / "video", root / "meshes"
    video.mkdir()
    meshes.mkdir()
    for t in range(T):
        vt = _twist(v, 25.0 * t)
        r = rasterize(torch.as_tensor(vt @ true_rot.T, dtype=torch.float32), torch.as_tensor(f),
                      torch.as_tensor(K, dtype=torch.float32), torch.as_tensor(c2w, dtype=torch.float32)[None],
                      (120, 160))
        col = interpolate(r, torch.as_tensor(colours, dtype=torch.float32))[0].numpy()
        rgba = np.concatenate([col, r.mask[0].numpy()[..., None]], -1)
        Image.fromarray((rgba * 255 + 0.5).astype(np.uint8)).save(video / f"{t:03d}.png")
        # the "generated" frame: canonical pose, its own triangulation
        dv, df, _, _ = pcu.decimate_triangle_mesh(vt, f.astype(np.int32), 3000 - 300 * t)
        trimesh.Trimesh(dv, df, process=False).export(meshes / f"frame_{t:03d}.obj")
    return str(video), str(meshes), true_rot


def _iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.integration
def test_video_to_registered_textured_4d_mesh(clip, tmp_path):
    """Through the CLI: outputs, one topology and one UV map for all frames, renders from the reference camera that
    cover the input's object (the registration found the pose), colours from the video, one MLflow run; a rerun
    keeps every stage and other inputs into the same folder are refused."""
    import mlflow
    from PIL import Image

    from loom.inference.animated import read_animated_glb
    from loom.inference.shape4d_video import Z_UP_TO_Y_UP, render_textured

    video, meshes, true_rot = clip
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["generate", "4d", "--video", video, "--meshes", meshes, "--out", str(out), "--size", "96", "--fast",
            "--similarity", "iou", "--decimate", "1500", "--texture-resolution", "128", "--turntable", "4"]
    p = loom(*args, env={"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"})
    assert "4D mesh:  4 frames" in p.stdout, p.stdout
    for name in ("animated.glb", "side_by_side.mp4", "turntable.mp4", "report.json", "texture.png"):
        assert (out / name).is_file(), name
    assert sorted(n for n in os.listdir(out / "frames") if n.endswith(".obj")) == [f"frame_{t:03d}.obj"
                                                                                  for t in range(T)]
    anim = read_animated_glb(str(out / "animated.glb"))
    assert anim.frames.shape[0] == T and len(anim.faces) <= 1500 + 10

    report = json.loads((out / "report.json").read_text())
    reg = report["registration"]
    K, c2w = np.asarray(reg["K"]), np.asarray(reg["c2w"])
    texture = np.asarray(Image.open(out / "texture.png").convert("RGB"))
    uv = anim.uv
    inputs = [np.asarray(Image.open(out / "input" / f"frame_{t:03d}.png")) for t in range(T)]
    ious = []
    for t in range(T):
        world = anim.frames[t] @ Z_UP_TO_Y_UP  # the files are +Y up; the reference camera's world is +Z up
        r = render_textured(world, anim.faces, uv, texture, K, c2w, 96)[0]
        ious.append(_iou(r[..., 3] >= 128, inputs[t][..., 3] >= 128))
        if t == 0:
            both = (r[..., 3] >= 128) & (inputs[0][..., 3] >= 128)
            err = np.abs(r[both][:, :3].astype(float) - inputs[0][both][:, :3].astype(float)).mean()
            assert err < 30, err  # frame 1's texture is the video's first frame, seen from the registered camera
    assert min(ious) > 0.8, ious
    assert ious[0] > 0.88, ious
    # the pose found: the reference camera sees the registered mesh as the video's camera saw the posed one, up to
    # the few degrees by which the prepare stage's crop (centred on the object, not the image) turns the view
    c2w_video = cam.look_at((0.0, -3.2, 0.4))
    expected = c2w[:3, :3] @ c2w_video[:3, :3].T @ true_rot
    m = np.asarray(reg["transform"])[:3, :3] / reg["scale"]
    angle = math.degrees(math.acos(np.clip((np.trace(m @ expected.T) - 1) / 2, -1, 1)))
    assert angle < 10, angle

    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("generate-4d").experiment_id])
    assert run.data.metrics["registration/silhouette_iou"] > 0.8
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"side_by_side.mp4", "turntable.mp4", "animated.glb"} <= arts

    # the same command again (its function, in this process): every stage kept; other settings are refused
    from loom.inference.shape4d_video import Video4DSettings, generate_4d_video

    before = os.path.getmtime(out / "tracked.npz")
    st = Video4DSettings(size=96, fast=True, similarity="iou", decimate=1500, texture_resolution=128, turntable=4)
    lines = []
    generate_4d_video(None, video, str(out), meshes=meshes, settings=st, progress=lines.append)
    assert not any("registered frame 1" in x or "tracked" in x for x in lines), lines
    assert os.path.getmtime(out / "tracked.npz") == before
    with pytest.raises(ValueError, match="another command"):
        generate_4d_video(None, video, str(out), meshes=meshes, settings=Video4DSettings(size=128, fast=True))


def test_texture_run_gets_frame_1_with_the_sequence_atlas(tmp_path, monkeypatch):
    """``--texture-run``: `loom texture --run` (tested on its own in test_texture.py) receives frame 1 as a GLB
    whose UVs and triangles it keeps (`load_uv_mesh` reads them back unchanged, +Y up), so the map it writes fits
    every frame's atlas vertices."""
    from PIL import Image

    from loom.inference import shape4d_video as sv
    from loom.inference import texture as tex

    m = trimesh.creation.icosphere(subdivisions=2)
    v, f = np.asarray(m.vertices), np.asarray(m.faces)
    vmap, faces, uv = sv.uv_unwrap(v, f, 128)
    seen = {}

    def fake_texture_from_run(mesh_path, run, out, **kw):
        seen["mesh"], seen["run"], seen["kw"] = tex.load_uv_mesh(mesh_path, kw["resolution"]), run, kw
        Image.fromarray(np.full((128, 128, 3), 77, np.uint8)).save(os.path.join(out, "texture.png"))
        return tex.Textured(out=out, coverage=0.5, alignment=0.0, own_texture_psnr_db=None, files=[])

    monkeypatch.setattr(tex, "texture_from_run", fake_texture_from_run)
    texture, cov = sv.texture_with_run(str(tmp_path), v[vmap], faces, uv, "RUN", seed=3, resolution=128)
    got = seen["mesh"]
    assert not got.unwrapped and np.array_equal(got.faces, faces)
    assert np.abs(got.uv - uv).max() < 1e-6
    assert np.allclose(got.vertices, v[vmap] @ sv.Z_UP_TO_Y_UP.T, atol=1e-6)
    assert seen["run"] == "RUN" and seen["kw"]["seed"] == 3 and cov == 0.5 and texture.shape == (128, 128, 3)
