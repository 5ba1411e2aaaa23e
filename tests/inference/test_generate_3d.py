"""``loom generate 3d``: the base shape model alone, one image -> one mesh, with tiny random networks (``--base
tiny``) and with a folder laid out as the Step1X-3D release (``BASE/vae``, ``BASE/visual_encoder``)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("point_cloud_utils")
trimesh = pytest.importorskip("trimesh")

FIXTURE_VAE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "step1x3d_vae", "tiny", "vae")
FAST = dict(steps=2, resolution=24)  # a few seconds on one CPU thread


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """An RGBA image: an orange box on a transparent background, off centre."""
    from PIL import Image

    a = np.zeros((48, 64, 4), np.uint8)
    a[8:30, 30:58] = (220, 120, 40, 255)
    path = tmp_path_factory.mktemp("img") / "object.png"
    Image.fromarray(a).save(path)
    return str(path)


def _load(path: str):
    return trimesh.load(path, force="mesh", process=False)


def test_cli_tiny_end_to_end_writes_a_glb_that_trimesh_loads(image, tmp_path):
    out = tmp_path / "sub" / "shape.glb"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "loom.cli", "generate", "3d", "--image", image, "--base", "tiny",
                        "--out", str(out), "--steps", "2", "--resolution", "24", "--seed", "3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    mesh = _load(str(out))
    assert len(mesh.vertices) > 0 and len(mesh.faces) > 0
    assert f"mesh:     {out} ({len(mesh.vertices)} vertices, {len(mesh.faces)} faces)" in r.stdout
    assert np.abs(mesh.vertices).max() <= 1.05 + 1e-5  # marching cubes over Step1X-3D's [-1.05, 1.05]^3
    assert os.listdir(out.parent) == ["shape.glb"]  # the temporary file was renamed, nothing else left


def test_same_seed_same_mesh_other_seed_another(image, tmp_path):
    from loom.inference.shape4d import generate_3d

    a = generate_3d(image, "tiny", str(tmp_path / "a.ply"), seed=0, **FAST)
    b = generate_3d(image, "tiny", str(tmp_path / "b.ply"), seed=0, **FAST)
    c = generate_3d(image, "tiny", str(tmp_path / "c.ply"), seed=1, **FAST)
    ma, mb, mc = (_load(x.path) for x in (a, b, c))
    assert (a.vertices, a.faces) == (len(ma.vertices), len(ma.faces))
    assert np.array_equal(ma.vertices, mb.vertices) and np.array_equal(ma.faces, mb.faces)
    assert ma.vertices.shape != mc.vertices.shape or not np.allclose(ma.vertices, mc.vertices)


def test_image_conditions_the_shape_and_rgb_images_work(image, tmp_path):
    """Another image, same seed -> another mesh (the image tokens reach the DiT); an RGB image is taken as is."""
    from PIL import Image

    from loom.inference.shape4d import generate_3d

    rgb = tmp_path / "flat.jpg"
    Image.fromarray(np.full((40, 40, 3), (30, 200, 90), np.uint8)).save(rgb)
    a = _load(generate_3d(image, "tiny", str(tmp_path / "a.obj"), **FAST).path)
    b = _load(generate_3d(str(rgb), "tiny", str(tmp_path / "b.obj"), **FAST).path)
    assert a.vertices.shape != b.vertices.shape or not np.allclose(a.vertices, b.vertices)


def test_frame_object_fills_the_ratio_centred_like_step1x3d():
    from loom.inference.shape4d import frame_object

    a = np.zeros((40, 80, 4), np.uint8)
    a[2:12, 60:70] = (255, 0, 0, 255)  # a 10 x 10 object in a corner
    f = frame_object(a, 0.9)
    assert f.shape == (80, 80, 4)
    rows, cols = np.nonzero(f[..., 3] > 127)
    # scale = min(40 * 0.9 / 10, 80 * 0.9 / 10) = 3.6: a 36 x 36 object in the middle of the 80 x 80 square
    assert rows.max() - rows.min() + 1 == pytest.approx(36, abs=1) and cols.max() - cols.min() + 1 == pytest.approx(
        36, abs=1)
    assert (rows.min() + rows.max()) / 2 == pytest.approx(39.5, abs=1)
    assert (cols.min() + cols.max()) / 2 == pytest.approx(39.5, abs=1)
    rgb = np.zeros((8, 8, 3), np.uint8)
    assert frame_object(rgb) is rgb and frame_object(a, 0.0) is a


def _release(root, image_encoder: str) -> str:
    """A folder laid out as Step1X-3D-Geometry-1300m: the base DiT (tiny), vae/ (the tiny upstream-layout fixture:
    8-channel latents like the tiny DiT) and visual_encoder/ (a transformers DINOv2 folder, or a Step1X-3D
    Dinov2Encoder config that names one)."""
    from loom.models.shape4d_dit import ImageFeatures, Shape4DDiT

    base = root / "Step1X-3D-Geometry-tiny"
    Shape4DDiT.tiny(seed=5, spatiotemporal=False).save_pretrained(str(base))
    shutil.copytree(FIXTURE_VAE, base / "vae")
    dino = root / "dinov2-tiny"
    ImageFeatures.tiny(seed=5).model.save_pretrained(str(dino))
    if image_encoder == "transformers":
        shutil.copytree(dino, base / "visual_encoder")
    else:
        (base / "visual_encoder").mkdir()
        (base / "visual_encoder" / "config.json").write_text(json.dumps({"dino_type": str(dino), "image_size": 28}))
    return str(base)


@pytest.mark.parametrize("image_encoder", ["transformers", "dinov2_encoder_config"])
def test_a_release_folder_supplies_its_vae_and_image_encoder(image, tmp_path, image_encoder):
    from loom.inference.shape4d import generate_3d

    base = _release(tmp_path, image_encoder)
    done = generate_3d(image, base, str(tmp_path / "m.obj"), latents=16, **FAST)
    assert done.vae == os.path.join(base, "vae")
    want = os.path.join(base, "visual_encoder") if image_encoder == "transformers" else str(tmp_path / "dinov2-tiny")
    assert done.image_encoder == want
    assert len(_load(done.path).faces) == done.faces > 0


def test_refusals_name_the_field_and_what_to_pass(image, tmp_path):
    from loom.inference.shape4d import generate_3d
    from loom.models.shape_vae import ShapeVAE

    out = str(tmp_path / "m.glb")
    with pytest.raises(FileNotFoundError, match=r"--image .*does not exist: pass an image"):
        generate_3d(str(tmp_path / "missing.png"), "tiny", out)
    with pytest.raises(FileNotFoundError, match=r"--base.*does not exist.*released Step1X-3D-Geometry-1300m folder"):
        generate_3d(image, str(tmp_path / "no-base"), out)
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--vae is not given and --base .* has no vae/ folder: pass --vae"):
        generate_3d(image, str(tmp_path / "bare"), out)
    (tmp_path / "bare" / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--image-encoder is not given .* no visual_encoder/"):
        generate_3d(image, str(tmp_path / "bare"), out)
    with pytest.raises(ValueError, match=r"unknown mesh format '\.stl'.*\.glb, \.obj, \.ply"):
        generate_3d(image, "tiny", str(tmp_path / "m.stl"))
    wide = tmp_path / "vae16"
    ShapeVAE.tiny(latent_channels=16).save_pretrained(str(wide))
    with pytest.raises(ValueError, match=r"16-channel latents but the DiT models 8"):
        generate_3d(image, "tiny", out, vae=str(wide), **FAST)
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["bare", "vae16"]
