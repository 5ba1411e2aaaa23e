"""``loom texture --frames``: back-projection of given turntable frames into a mesh's own UV layout, as a user runs it.

Fast tests: a UV-mapped cube (an OBJ with a texture of a smooth function of (u, v)) ray-cast by the independent
renderer of tests/geometry/test_texture.py into a real turntable shard (Loom's schema, its asset_sha256 and a
normalisation with a rotation), then textured: the texture comes back (PSNR), unseen texels are filled, the GLB
carries it, and bad input is refused with a clear message. Blender test: the exactness check of issue 18, a bundled
textured asset rendered by `loom render ttv` with the albedo pass, back-projected into its own UV layout, compared
with its base-colour texture, for two base rotations; the GLB loads in Blender with the texture attached."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from loom.datasets import ttv
from loom.geometry.camera import intrinsics, orbit_c2w, unproject_depth
from loom.inference.texture import Y_UP_TO_Z_UP, texture_from_frames
from loom.platform import shards
from tests.geometry.test_texture import albedo, cube, raycast

LOOM = os.path.join(os.path.dirname(sys.executable), "loom")
ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "src", "loom", "data", "assets")


def rotation_z(a: float) -> np.ndarray:
    m = np.eye(4)
    m[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return m


def write_cube(folder, r=128) -> str:
    """cube.obj + cube.mtl + cube.png (the smooth function at the texel centres): the mesh in OBJ's Y-up frame."""
    import trimesh

    v, f, uv = cube()
    cols, rows = np.meshgrid(np.arange(r), np.arange(r))
    img = np.round(albedo(np.stack([(cols + 0.5) / r, 1 - (rows + 0.5) / r], -1))).astype(np.uint8)
    m = trimesh.Trimesh(vertices=v @ Y_UP_TO_Z_UP, faces=f, process=False,  # Z-up -> the file's Y-up
                        visual=trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(img)))
    text, extra = trimesh.exchange.obj.export_obj(m, include_texture=True, mtl_name="cube.mtl", return_texture=True)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "cube.obj")
    with open(path, "w") as fh:
        fh.write(text)
    for name, data in extra.items():
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)
    return path


def write_turntable(mesh_path: str, out: str, frames=12, size=128, turn=0.7) -> None:
    """One turntable sample of the cube as `loom render ttv` writes it: the file's vertices through Blender's
    import frame and a normalisation (here a rotation about +Z), ray-cast along an orbit."""
    v, f, uv = cube()
    norm = rotation_z(turn)
    world = v @ norm[:3, :3].T
    K = intrinsics(math.radians(40), size, size)
    c2w = orbit_c2w(frames, 2.6, 1.2, phase=0.3)
    imgs, depths, masks = zip(*(raycast(world, f, uv, K, c2w[t], size) for t in range(frames)), strict=True)
    depth, mask = np.stack(depths).astype(np.float32), np.stack(masks)
    pos = np.stack([unproject_depth(depth[t], K, c2w[t]) * mask[t][..., None] for t in range(frames)])
    with open(mesh_path, "rb") as fh:
        sha = hashlib.file_digest(fh, "sha256").hexdigest()
    arrays = {"rgb": np.stack(imgs), "albedo": np.stack(imgs), "normal": np.zeros_like(pos, np.float32),
              "position": pos.astype(np.float32), "depth": depth, "mask": mask,
              "K": np.repeat(K[None], frames, 0).astype(np.float32), "c2w": c2w.astype(np.float32)}
    meta = {"uid": "cube", "asset_sha256": sha, "normalization": norm.tolist(), "kind": "ttv"}
    name = shards.shard_name("ttv", 0)
    size_, digest, keys = shards.write_tar(shards.shard_url(out, name), [("cube-v0", ttv.encode_sample(arrays, meta))])
    shards.write_sidecar(out, shards.ShardRecord(name=name, samples=1, size=size_, sha256=digest, keys=keys))
    shards.write_manifest(out, [name], extra={"kind": "ttv"})


@pytest.fixture(scope="module")
def cube_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cube")
    mesh = write_cube(str(root / "mesh"))
    write_turntable(mesh, str(root / "frames"))
    return mesh, str(root / "frames")


def loom(*args, check=True):
    p = subprocess.run([LOOM, *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"loom {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def test_loom_texture_brings_back_the_texture_in_the_meshs_own_layout(tmp_path, cube_data):
    import trimesh

    mesh, frames = cube_data
    out = str(tmp_path / "out")
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = loom("texture", "--mesh", mesh, "--frames", frames, "--out", out, "--resolution", "128", "--tracking-uri", db,
             "--turntable", "0")
    assert "coverage" in p.stdout and "mesh.glb" in p.stdout and "mlflow:" in p.stdout
    report = json.load(open(os.path.join(out, "report.json")))
    # the orbit sees five faces, not the bottom one: 5/6 of the surface's texels
    assert 0.78 < report["coverage"] < 0.86, report["coverage"]
    assert report["own_texture_psnr_db"] >= 30, report
    assert report["alignment_median_distance"] < 1e-3 and report["key"] == "cube-v0"
    tex = np.asarray(Image.open(os.path.join(out, "texture.png")))
    cov = np.asarray(Image.open(os.path.join(out, "coverage.png")))
    assert tex.shape == (128, 128, 3) and set(np.unique(cov)) == {0, 128, 255}
    # the unseen bottom face is filled from seen texels (no black holes on the surface)
    assert (tex[cov == 128].sum(-1) > 0).all()
    # the GLB carries the texture, in the file's coordinates
    g = trimesh.load(os.path.join(out, "mesh.glb"), force="mesh", process=False)
    assert g.visual.material.baseColorTexture.size == (128, 128)
    src = trimesh.load(mesh, force="mesh", process=False)
    assert np.allclose(np.sort(g.vertices, 0), np.sort(src.vertices, 0), atol=1e-6)
    assert os.path.isfile(os.path.join(out, "mesh.obj")) and os.path.isfile(os.path.join(out, "mesh.mtl"))
    conf = np.load(os.path.join(out, "confidence.npy"))
    assert conf.shape == (128, 128) and ((conf > 0) == (cov == 255)).all()
    # one MLflow run: params, coverage per stage, seconds per stage, the outputs as artifacts
    import mlflow

    rec = json.load(open(os.path.join(out, "mlflow_run.json")))
    client = mlflow.MlflowClient(tracking_uri=db)
    run = client.get_run(rec["run_id"])
    assert run.data.params["resolution"] == "128" and run.data.params["uv"] == "the file's own"
    assert abs(run.data.metrics["coverage"] - report["coverage"]) < 1e-9 and "seconds/back_project" in run.data.metrics
    assert run.data.tags["loom.kind"] == "texture" and run.info.status == "FINISHED"
    assert {"texture.png", "mesh.glb", "report.json", "coverage.png"} <= {a.path for a in client.list_artifacts(
        rec["run_id"])}
    assert set(report["seconds"]) == {"mesh", "read_frames", "rasterise", "back_project", "fill", "write"}


class FrameEcho:
    """A stand-in for a trained run (beside the real tiny run below): it "generates" the view's own rgb, so the
    texture must come back exactly when the run's view of the sample (frame subsampling, resizing, K) is the view
    the geometry is projected with."""

    text_encoder = None

    def __init__(self, frames, size):
        from loom.datasets.transforms import frame_transform

        self._t, self.size = frame_transform(frames, size), size

    def transform(self):
        return self._t

    def video(self, batch, seed=0):
        return batch["rgb"][0].numpy()


def test_the_generative_stage_projects_with_the_runs_view_of_the_sample(tmp_path, cube_data, monkeypatch):
    from loom.inference import texture as tex_mod
    from loom.inference import ttv as ttv_inf

    mesh, frames = cube_data
    monkeypatch.setattr(ttv_inf, "load_run", lambda run, steps=None: FrameEcho(9, 96))
    r = tex_mod.texture_from_run(mesh, "unused-run", str(tmp_path / "out"), frames=frames, resolution=128)
    report = json.load(open(os.path.join(r.out, "report.json")))
    assert report["pass"] == "generated" and report["frames_used"] == 9 and report["stages"][0]["stage"] == 1
    assert r.own_texture_psnr_db >= 28, r  # 9 frames of 96 px: the cube's texture again
    assert os.path.isfile(os.path.join(r.out, "generated.mp4")) and "generate" in r.seconds
    # the loop stops at the coverage target: nothing after the first stage when it is already reached
    done = tex_mod.texture_from_run(mesh, "unused-run", str(tmp_path / "stop"), frames=frames, resolution=128,
                                    stages=3, coverage_target=0.5)
    assert [st["stage"] for st in json.load(open(os.path.join(done.out, "report.json")))["stages"]] == [1]
    # a view with the wrong geometry (frames reversed) no longer reproduces it: the check can fail
    class Reversed(FrameEcho):
        def video(self, batch, seed=0):
            return batch["rgb"][0].numpy()[::-1].copy()

    monkeypatch.setattr(ttv_inf, "load_run", lambda run, steps=None: Reversed(9, 96))
    bad = tex_mod.texture_from_run(mesh, "unused-run", str(tmp_path / "bad"), frames=frames, resolution=128)
    assert bad.own_texture_psnr_db < r.own_texture_psnr_db - 5


def test_reference_image_and_prompt_steer_the_generation(tmp_path, cube_data, monkeypatch):
    from loom.datasets.codecs import decode_video
    from loom.inference import texture as tex_mod
    from loom.inference import ttv as ttv_inf

    mesh, frames = cube_data
    monkeypatch.setattr(ttv_inf, "load_run", lambda run, steps=None: FrameEcho(9, 96))
    ref = str(tmp_path / "ref.png")
    Image.fromarray(np.full((40, 50, 3), (250, 20, 30), np.uint8)).save(ref)
    r = tex_mod.texture_from_run(mesh, "unused-run", str(tmp_path / "out"), frames=frames, resolution=64,
                                 reference=ref)
    video = decode_video(open(os.path.join(r.out, "generated.mp4"), "rb").read())
    assert np.abs(video[0].astype(int) - (250, 20, 30)).mean() < 12  # frame 0 is the reference, resized
    assert np.abs(video[1].astype(int) - (250, 20, 30)).mean() > 40  # the rest is the run's
    assert json.load(open(os.path.join(r.out, "report.json")))["reference"] == ref
    with pytest.raises(ValueError, match="--prompt needs a text encoder"):
        tex_mod.texture_from_run(mesh, "unused-run", str(tmp_path / "p"), frames=frames, resolution=64, prompt="red")
    with pytest.raises(FileNotFoundError, match="--reference"):
        tex_mod.texture_from_run(mesh, "unused-run", str(tmp_path / "p"), frames=frames, resolution=64,
                                 reference=str(tmp_path / "missing.png"))
    p = loom("texture", "--mesh", mesh, "--frames", frames, "--out", str(tmp_path / "x"), "--prompt", "red",
             check=False)
    assert p.returncode != 0 and "need --run" in p.stderr


def test_loom_texture_with_a_trained_tiny_run(tmp_path, cube_data):
    """The real path: a `loom train ttv` run folder (tiny recipe, trained weights stood in by random ones) generates
    the turntable from the cube's condition renders, and its video is back-projected."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from tests.inference.test_ttv import make_run

    mesh, frames = cube_data
    run, _ = make_run(tmp_path, frames, **{"flow.sample_steps": 2})
    out = str(tmp_path / "out")
    p = loom("texture", "--mesh", mesh, "--run", run, "--frames", frames, "--out", out, "--resolution", "64",
             "--turntable", "0", "--no-mlflow", "--stages", "1")
    assert "mlflow:" not in p.stdout and "generate" in p.stdout
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["pass"] == "generated" and report["run"] == os.path.abspath(run) and report["coverage"] > 0.3
    tex = np.asarray(Image.open(os.path.join(out, "texture.png")))
    assert tex.shape == (64, 64, 3) and tex.std() > 0
    assert os.path.isfile(os.path.join(out, "generated.mp4")) and os.path.isfile(os.path.join(out, "mesh.glb"))
    p = loom("texture", "--mesh", mesh, "--out", out, check=False)
    assert p.returncode != 0 and "pass --run RUN" in p.stderr


def test_inpainting_mask_is_exactly_the_unseen_texels_pixels_and_rotations_are_scored(cube_data):
    """The Inpainting Mask Video of a stage is +1 exactly on the pixels whose texel no stage has seen (checked
    against the ray caster's own hit -> UV map), the known video is the frame there and 0 elsewhere; the rotation
    gain is computed by ray casting: with the bottom face unseen, a rotation showing it wins, an orbit that already
    saw everything gains nothing."""
    import torch

    from loom.datasets.ttv import iter_samples
    from loom.geometry import texture as tx
    from loom.inference import texture as T

    mesh_path, frames = cube_data
    mesh = T.load_uv_mesh(mesh_path, 64)
    s = next(iter_samples(frames))
    world = T.world_vertices(mesh, s["meta"])
    surf = tx.rasterise_uv(world, mesh.faces, mesh.uv, 64)
    conf = np.zeros((64, 64))
    conf[:, :32] = 1.0  # the left half of the atlas seen
    keep: dict = {}
    fn = T.known_videos(world, mesh.faces, mesh.uv, conf, keep)
    rgb = torch.from_numpy(s["rgb"][None].astype(np.float32) / 127.5 - 1)
    known, gen = fn(rgb, torch.from_numpy(s["position"][None].astype(np.float32)), torch.from_numpy(s["mask"][None]))
    # independent truth: the UV the ray caster hit at each pixel (the frames' own renderer); known = u < 0.5
    v, f, uv = cube()
    norm = np.asarray(s["meta"]["normalization"])
    expect = np.zeros(s["mask"].shape, bool)
    for t in range(len(s["K"])):
        _, _, m, hit_uv = raycast(v @ norm[:3, :3].T, f, uv, s["K"][t], s["c2w"][t].astype(np.float64), 128,
                                  return_uv=True)
        assert (m == s["mask"][t]).all()
        expect[t] = m & (hit_uv[..., 0] < 0.5)
    g = gen[0, 0].numpy()
    assert set(np.unique(g)) <= {-1.0, 1.0}
    assert ((g < 0) == expect).mean() > 0.99  # float16 positions put a few edge pixels in the neighbouring texel
    assert ((g < 0) <= s["mask"]).all()  # nothing off the object is known
    k = known[0].permute(1, 2, 3, 0).numpy()
    assert (k[g > 0] == 0).all() and np.allclose(k[g < 0], rgb[0].numpy()[g < 0])
    # rotation gains
    seen_all = np.ones((64, 64))
    assert max(T.rotation_gains(mesh, seen_all, s).values()) == 0
    _, conf1 = tx.back_project(surf, s["rgb"], s["depth"], s["mask"], s["K"], s["c2w"])
    gains = T.rotation_gains(mesh, conf1, s)
    best = max(gains, key=gains.get)
    assert gains[best] > 0.1 and gains["x+45"] < gains[best]  # the unseen bottom is a sixth of the surface


def test_a_mesh_without_uvs_is_unwrapped_with_xatlas_and_textured(tmp_path):
    """The cube as an OBJ without a UV map: xatlas makes the atlas, and each seen texel of it carries the colour of
    its surface point (the function of the cube's own UVs at that point, which the frames show)."""
    from loom.geometry import texture as tx
    from loom.inference.texture import load_uv_mesh

    v, f, uv = cube()
    folder = tmp_path / "plain"
    folder.mkdir()
    mesh = str(folder / "cube.obj")
    with open(mesh, "w") as fh:
        fh.writelines(f"v {x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in v @ Y_UP_TO_Z_UP)
        fh.writelines(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in f)
    frames = str(tmp_path / "frames")
    write_turntable(mesh, frames)
    out = str(tmp_path / "out")
    r = texture_from_frames(mesh, frames, out, resolution=128)
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["uv"] == "xatlas" and report["own_texture_psnr_db"] is None and 0.75 < r.coverage < 0.9
    um = load_uv_mesh(mesh, 128)  # the same atlas again (xatlas is deterministic)
    s = tx.rasterise_uv(um.import_frame(), um.faces, um.uv, 128)
    seen = np.asarray(Image.open(os.path.join(out, "coverage.png"))) == 255
    face = s.face[seen]  # xatlas keeps the face order: face i of the atlas is face i of the file
    own_uv = np.einsum("nk,nkd->nd", s.bary[seen], uv[f[face]])
    got = np.asarray(Image.open(os.path.join(out, "texture.png")), float)[seen]
    psnr = 10 * np.log10(255 ** 2 / ((got - albedo(own_uv)) ** 2).mean())
    assert psnr >= 30, psnr


def test_bad_input_is_refused_with_a_clear_message(tmp_path, cube_data):
    mesh, frames = cube_data
    other = tmp_path / "other.obj"
    shutil.copy(mesh, other)
    with open(other, "a") as fh:
        fh.write("\n# another file\n")
    with pytest.raises(ValueError, match="no turntable of"):
        texture_from_frames(str(other), frames, str(tmp_path / "o1"))
    with pytest.raises(ValueError, match="no sample 'nope'"):
        texture_from_frames(mesh, frames, str(tmp_path / "o2"), key="nope")
    # the same frames for a mesh that is not where they were rendered: refused by the alignment check
    import trimesh

    shifted = trimesh.load(mesh, force="mesh", process=False)
    shifted.vertices += [0.3, 0, 0]
    moved = str(tmp_path / "moved.obj")
    shifted.export(moved)
    with pytest.raises(ValueError, match="does not lie where the frames' geometry is"):
        texture_from_frames(moved, frames, str(tmp_path / "o3"), key="cube-v0")
    p = loom("texture", "--mesh", str(tmp_path / "missing.obj"), "--frames", frames, "--out", str(tmp_path / "o4"),
             check=False)
    assert p.returncode != 0 and "no such file" in p.stderr
    import importlib.util

    if importlib.util.find_spec("DracoPy") is None:  # the bundled bunny is Draco-compressed
        with pytest.raises(ValueError, match="Draco-compressed"):
            texture_from_frames(os.path.join(ASSETS, "bunny.glb"), frames, str(tmp_path / "o6"))
    ply = tmp_path / "m.ply"
    ply.write_text("ply\n")
    with pytest.raises(ValueError, match="convert it to .glb"):
        texture_from_frames(str(ply), frames, str(tmp_path / "o5"))


# ------------------------------------------------------------------------------------------ real Blender


def baked_asset(folder) -> str:
    """suzi_checker's geometry and UVs with a texture painted on the SURFACE (a smooth function of the 3D point,
    baked into the atlas and dilated past the chart borders), continuous across UV seams as a real asset's texture
    is, and a matte material (Ks 0: Cycles darkens the Diffuse Color pass of glossy materials by a few percent)."""
    from loom.geometry import texture as tx
    from loom.inference.texture import load_uv_mesh

    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(ASSETS, "suzi_checker.obj"), folder)
    with open(os.path.join(ASSETS, "suzi_checker.mtl")) as fh:
        mtl = "".join("Ks 0.000000 0.000000 0.000000\n" if line.startswith("Ks ") else line for line in fh)
    with open(os.path.join(folder, "suzi_checker.mtl"), "w") as fh:
        fh.write(mtl)
    mesh = load_uv_mesh(os.path.join(folder, "suzi_checker.obj"))
    s = tx.rasterise_uv(mesh.vertices, mesh.faces, mesh.uv, 256)
    p = s.point
    col = 255 * np.stack([0.5 + 0.35 * np.sin(4 * p[..., 0] + 1), 0.5 + 0.35 * np.sin(5 * p[..., 1]),
                          0.5 + 0.35 * np.cos(3 * p[..., 2] + p[..., 0])], -1)
    col = tx.dilate(col, s.covered, 16)
    Image.fromarray(np.clip(np.round(col), 0, 255).astype(np.uint8)).save(os.path.join(folder, "suzi_checker.png"))
    return os.path.join(folder, "suzi_checker.obj")


@pytest.mark.blender
def test_back_projection_of_blenders_albedo_is_exact_for_two_base_rotations(tmp_path):
    """Issue 18's exactness check: `loom render ttv` of a textured asset (suzi_checker's mesh and UVs, a texture
    painted on its surface) with the albedo pass, two variants (two random base rotations), each back-projected into
    the asset's own UV layout: PSNR over the seen texels against the asset's texture (45 dB measured at 192 px,
    12 frames, 256^2 texels); the GLB loads in Blender with the texture attached."""
    pytest.importorskip("bpy")
    mesh = baked_asset(str(tmp_path / "assets"))
    frames = str(tmp_path / "frames")
    loom("render", "ttv", "--assets", str(tmp_path / "assets"), "--out", frames, "--no-progress",
         "--set", "orbit.frames=12", "--set", "render.width=192", "--set", "render.height=192",
         "--set", "lighting.variants=2", "--set", "render.samples=1", "--set", "render.denoise=false",
         "--set", "passes.albedo=true", "--set", "ray.workers=1")
    results, rotations = [], []
    for s in ttv.iter_samples(frames, keys=("meta",)):
        out = str(tmp_path / s["__key__"])
        results.append(texture_from_frames(mesh, frames, out, key=s["__key__"], frames_pass="albedo",
                                           resolution=256))
        rotations.append(np.asarray(s["meta"]["normalization"])[:3, :3])
    assert len(results) == 2 and not np.allclose(rotations[0], rotations[1], atol=1e-3)  # two base rotations
    for r in results:
        assert r.alignment < 1e-3 and r.coverage > 0.5, r
        assert r.own_texture_psnr_db >= 30, r
    # the lit colour is not the texture: the check can fail
    lit = texture_from_frames(mesh, frames, str(tmp_path / "lit"), key=results[0].out.rsplit("/", 1)[-1],
                              frames_pass="rgb", resolution=256)
    assert lit.own_texture_psnr_db < results[0].own_texture_psnr_db - 5
    # Blender imports the textured GLB with its image attached to the material
    code = ("import bpy; bpy.ops.wm.read_factory_settings(use_empty=True); "
            f"bpy.ops.import_scene.gltf(filepath={os.path.join(results[0].out, 'mesh.glb')!r}); "
            "imgs = [n.image for m in bpy.data.materials if m.node_tree for n in m.node_tree.nodes "
            "if n.type == 'TEX_IMAGE' and n.image]; print('IMAGES', [tuple(i.size) for i in imgs])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "IMAGES [(256, 256)]" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]


@pytest.mark.blender
@pytest.mark.slow  # 31 s (default-tier budget); the other Blender texture tests run the stages' back-projection
def test_inpainting_stages_raise_coverage_and_stop(tmp_path):
    """`loom texture --run` end to end with Blender: the cube's conditions rendered by the render job, a tiny run
    generates, each further stage turns the cube by the rotation that shows the most unseen texels, renders the
    partial texture and its mask, generates with them and fuses: coverage rises with every stage."""
    pytest.importorskip("bpy")
    pytest.importorskip("diffusers")
    from tests.inference.test_ttv import make_run

    mesh = write_cube(str(tmp_path / "mesh"))
    run, _ = make_run(tmp_path, str(tmp_path / "unused"), **{"flow.sample_steps": 2})
    out = str(tmp_path / "out")
    loom("texture", "--mesh", mesh, "--run", run, "--out", out, "--resolution", "64", "--no-mlflow",
         "--stages", "3", "--coverage-target", "0.98", "--render-frames", "9", "--render-size", "64",
         "--turntable", "4", "--turntable-size", "48")
    report = json.load(open(os.path.join(out, "report.json")))
    cov = [st["coverage"] for st in report["stages"]]
    # the tiny run sees 5 frames of 32 px: the first orbit leaves much unseen, each stage adds, three stages run
    assert len(cov) == 3 and all(b > a + 0.05 for a, b in zip(cov, cov[1:], strict=False)), cov
    assert report["coverage"] == cov[-1] < 0.98
    for st in report["stages"][1:]:
        assert abs(st["gain_estimate"] - max(st["gains"].values())) < 1e-4 and st["gain_estimate"] > 0.05, st
        for name in ("partial.glb", "generated.mp4", "partial_texture.mp4", "inpainting_mask.mp4"):
            assert os.path.isfile(os.path.join(out, f"stage{st['stage']}", name)), name
    # the turntable render of the result: the textured GLB along the orbit, the cube in every frame
    from loom.datasets.codecs import decode_video

    video = decode_video(open(os.path.join(out, "turntable.mp4"), "rb").read())
    assert video.shape == (4, 48, 48, 3)
    assert all((np.abs(f.astype(int) - f[0, 0]).sum(-1) > 30).mean() > 0.05 for f in video)
    assert "turntable" in report["seconds"]
