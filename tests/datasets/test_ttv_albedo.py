"""The turntable schema's optional albedo member (``passes.albedo=true``): stored losslessly as ``albedo.mkv`` whatever
the rgb codec, decoded to ``albedo``, absent (and the sample byte-for-byte as before) when the job did not render it.
The fake backend produces it on request, so the corpus path can be tested without Blender."""

import io

import numpy as np
import pytest

from loom.corpora import ttv as ttv_job
from loom.datasets import ttv
from loom.datasets.inspect import contact_sheet
from loom.platform import config as c
from loom.platform.config import to_dict

av = pytest.importorskip("av")

T, H, W = 3, 16, 16


def arrays(albedo: bool) -> dict:
    rng = np.random.default_rng(0)
    a = {"rgb": rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8),
         "normal": np.zeros((T, H, W, 3), np.float32), "position": np.zeros((T, H, W, 3), np.float32),
         "depth": np.zeros((T, H, W), np.float32), "mask": np.ones((T, H, W), bool),
         "K": np.eye(3, dtype=np.float32)[None].repeat(T, 0), "c2w": np.eye(4, dtype=np.float32)[None].repeat(T, 0)}
    if albedo:
        # Noise: any lossy step (or a swapped channel) would change it.
        a["albedo"] = rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    return a


def test_albedo_member_round_trips_losslessly_and_is_optional():
    with_albedo = arrays(albedo=True)
    files = ttv.encode_sample(with_albedo, {"kind": "ttv"}, "h264")  # lossy rgb: albedo stays lossless anyway
    with av.open(io.BytesIO(files["albedo.mkv"])) as f:
        assert f.streams.video[0].codec_context.name == "ffv1"
    out = ttv.decode_sample(files)
    np.testing.assert_array_equal(out["albedo"], with_albedo["albedo"])
    assert set(ttv.decode_sample(files, keys=("albedo",))) == {"albedo", "meta"}
    assert "albedo" not in ttv.decode_sample(files, keys=("rgb",))

    plain = arrays(albedo=False)
    files = ttv.encode_sample(plain, {"kind": "ttv"}, "ffv1")
    assert "albedo.mkv" not in files and "albedo" not in ttv.decode_sample(files)
    # The members without albedo are exactly those of a sample written with it, less albedo.mkv.
    both = ttv.encode_sample({**plain, "albedo": with_albedo["albedo"]}, {"kind": "ttv"}, "ffv1")
    assert {k: v for k, v in both.items() if k != "albedo.mkv"} == files
    with pytest.raises(ValueError, match="albedo"):
        ttv.decode_sample(files, keys=("albedo",))
    with pytest.raises(ValueError, match="'albedo'"):
        ttv.encode_sample({**plain, "albedo": with_albedo["albedo"][:, :8]}, {}, "ffv1")

    sheet = contact_sheet(out)  # an albedo column beside rgb, normal, position, depth, mask
    assert sheet.shape[1] == 6 * W and contact_sheet(ttv.decode_sample(files)).shape[1] == 5 * W


def test_fake_backend_albedo_is_the_unlit_colour_over_the_background(tmp_path):
    from loom.render.fake import render_sphere

    cfg = c.resolve(ttv_job.RenderTTVJob, "smoke", c.parse_set(["render.backend=fake", "passes.albedo=true",
                                                               "render.background=[0.2,0.4,0.6]"]))
    assert ttv_job.RenderTTVJob().passes.albedo is False  # opt-in
    asset = {"uid": "a", "source": "test", "sha256": "0" * 64}
    params = to_dict(cfg.task(asset, 0, "hash"))
    assert params["albedo"] is True
    (tmp_path / "a.obj").write_text("v 0 0 0\n")
    out = render_sphere({**params, "asset_path": str(tmp_path / "a.obj")})
    alb, rgb, mask = out["albedo"], out["rgb"], out["mask"]
    assert alb.shape == rgb.shape and alb.dtype == np.uint8
    assert (alb[~mask] == [51, 102, 153]).all() and (rgb[~mask] == alb[~mask]).all()
    # Unlit: at least as bright as the shaded rgb everywhere on the object, and brighter on most of it.
    assert (alb[mask].astype(int) >= rgb[mask]).all() and (alb[mask].astype(int) > rgb[mask]).any(-1).mean() > 0.5
    ttv.check_arrays(out)
    assert "albedo" not in render_sphere({**params, "albedo": False, "asset_path": str(tmp_path / "a.obj")})
