"""The turntable geometry encodings (``encoding.geometry``: precise, model-input, npz): each decodes to the same
keys, shapes and dtypes, within its documented precision of the renderer's own passes, on a real Blender render
(tests/fixtures/ttv_encodings, made by make_fixture.py there) and on synthetic extremes; old (npz) samples decode
exactly as before; corrupt members are named. The byte targets at 512x512 are checked on fresh renders of the
bundled assets (slow) and by benchmarks/encodings.py."""

import io
import json
import os

import numpy as np
import pytest
import zstandard

from loom.datasets import ttv
from loom.datasets.codecs import decode_planes, encode_planes, oct_decode, oct_encode
from loom.geometry.camera import unproject_depth

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "ttv_encodings")
FIXTURE = os.path.join(FIXTURES, "suzi_checker-128.npz")
ENCODINGS = ("precise", "model-input", "npz")
# The documented bounds (loom.datasets.ttv's table): position per coordinate, depth, normal angle in radians.
BOUNDS = {"precise": (3.07e-5, 5.3e-5, 3e-4), "model-input": (3.95e-3, 6.9e-3, 1e-2), "npz": (4.9e-4, 0.0, 5e-4)}
MEMBERS = {"precise": {"position.q15.zst", "normal.oct14.zst"}, "model-input": {"position.q8.zst", "normal.q8.zst"},
           "npz": {"position.npz", "normal.npz", "depth.npz", "mask.npz"}}


def real() -> dict:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.arctan2(np.linalg.norm(np.cross(a, b), axis=-1), (a * b).sum(-1))


def synthetic(t=2, h=24, w=20) -> dict:
    """Unit-sphere extremes: coordinates at +-1 and 0, normals along every axis (both octahedron halves) and random,
    a camera looking at the origin from distance 2.5."""
    rng = np.random.default_rng(0)
    mask = rng.random((t, h, w)) < 0.7
    pos = rng.uniform(-1, 1, (t, h, w, 3))
    pos[0, 0, :7] = [[1, 1, 1], [-1, -1, -1], [1, -1, 0], [0, 0, 0], [1e-6, -1e-6, 0.5], [0.999999, -1, 1], [0, 1, 0]]
    nrm = rng.standard_normal((t, h, w, 3))
    nrm[0, 1, :7] = [[0, 0, 1], [0, 0, -1], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0.6, 0, -0.8]]
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
    mask[0, :2, :7] = True
    c2w = np.eye(4)[None].repeat(t, 0)
    c2w[:, :3, 3] = [0, 0, -2.5]  # OpenCV camera at z=-2.5 looking along +z at the origin
    depth = np.where(mask, pos[..., 2] + 2.5, 0)
    return {"rgb": rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8),
            "normal": np.where(mask[..., None], nrm, 0).astype(np.float32),
            "position": np.where(mask[..., None], pos, 0).astype(np.float32), "depth": depth.astype(np.float32),
            "mask": mask, "K": np.array([[30, 0, w / 2], [0, 30, h / 2], [0, 0, 1]], np.float32)[None].repeat(t, 0),
            "c2w": c2w.astype(np.float32)}


@pytest.mark.parametrize("geometry", ENCODINGS)
@pytest.mark.parametrize("source", ["real", "synthetic"])
def test_each_encoding_decodes_the_same_schema_within_its_bounds(geometry, source):
    a = real() if source == "real" else synthetic()
    files = ttv.encode_sample(a, {"kind": "ttv"}, "ffv1", geometry)
    assert MEMBERS[geometry] <= set(files) and ttv.geometry_encoding(files) == geometry
    assert not (set().union(*MEMBERS.values()) - MEMBERS[geometry]) & set(files)
    d = ttv.decode_sample(files)
    t, h, w = a["mask"].shape
    expect = {"rgb": ((t, h, w, 3), np.uint8), "normal": ((t, h, w, 3), np.float32),
              "position": ((t, h, w, 3), np.float32), "depth": ((t, h, w), np.float32), "mask": ((t, h, w), bool),
              "K": ((t, 3, 3), np.float32), "c2w": ((t, 4, 4), np.float32)}
    assert set(d) == set(expect) | {"meta"}
    for k, (shape, dtype) in expect.items():
        assert d[k].shape == shape and d[k].dtype == dtype, k
    m = a["mask"]
    np.testing.assert_array_equal(d["mask"], m)
    for k in ("normal", "position", "depth"):
        assert not d[k][~m].any(), f"{k} is not 0 outside the mask"
    pos_bound, depth_bound, normal_bound = BOUNDS[geometry]
    assert np.abs(d["position"] - a["position"])[m].max() <= pos_bound
    assert np.abs(d["depth"] - a["depth"])[m].max() <= max(depth_bound, 1e-7 * np.abs(a["depth"]).max())
    assert angle(d["normal"][m], a["normal"][m]).max() <= normal_bound
    assert np.abs(np.linalg.norm(d["normal"][m], axis=-1) - 1).max() < 1e-3  # unit inside the mask
    if geometry == "precise":  # the bounds are not loose: a coarser code would break them
        assert np.abs(d["position"] - a["position"])[m].max() > 0.5 * pos_bound
    if source == "real":
        # The reader contract: position == unproject(depth) up to the renderer's jitter (~3e-5) plus the rounding
        pts = np.stack([unproject_depth(d["depth"][i].astype(np.float64), d["K"][i].astype(np.float64),
                                        d["c2w"][i].astype(np.float64)) for i in range(t)])
        assert np.abs(pts - d["position"])[m].max() <= 4e-5 + pos_bound + depth_bound
    if geometry == "model-input":
        assert "rgb.mp4" in files and "rgb.mkv" not in files  # H.264 whatever rgb_codec says
    else:
        np.testing.assert_array_equal(d["rgb"], a["rgb"])


def test_smaller_on_the_real_render():
    a = real()
    size = {g: sum(len(b) for b in ttv.encode_sample(a, {}, "ffv1", g).values()) for g in ENCODINGS}
    # at 128x128 the rgb weighs more than at 512 (0.35 of npz there): the geometry members are what shrank
    assert size["precise"] < 0.6 * size["npz"] and size["model-input"] < size["precise"] / 2, size


@pytest.mark.parametrize("geometry", ENCODINGS)
def test_keys_limit_decoding_and_give_the_same_arrays(geometry):
    a = synthetic()
    files = ttv.encode_sample(a, {"kind": "ttv"}, "ffv1", geometry)
    full = ttv.decode_sample(files)
    for keys in [("depth",), ("mask",), ("normal",), ("position", "mask"), ("rgb",), ("K",),
                 ("rgb", "normal", "position", "mask")]:
        part = ttv.decode_sample(files, keys)
        assert set(part) == set(keys) | {"meta"} | ({"c2w"} if keys == ("K",) else set()), keys
        for k in keys:
            np.testing.assert_array_equal(part[k], full[k])


def old_sample(a: dict) -> dict:
    """A sample as Loom wrote it before the encodings existed (the code of that version, inlined)."""
    def npz(**arrays):
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()
    from loom.datasets.codecs import encode_video
    ext, video = encode_video(a["rgb"], "ffv1", full_chroma=True)
    return {ext: video, "normal.npz": npz(normal=a["normal"].astype(np.float16)),
            "position.npz": npz(position=a["position"].astype(np.float16)),
            "depth.npz": npz(depth=a["depth"].astype(np.float32)), "mask.npz": npz(mask=a["mask"].astype(bool)),
            "camera.npz": npz(K=a["K"].astype(np.float32), c2w=a["c2w"].astype(np.float32)),
            "meta.json": json.dumps({"kind": "ttv"}, sort_keys=True).encode()}


def test_an_old_npz_sample_decodes_exactly_as_before_and_npz_still_writes_it():
    a = real()
    old = old_sample(a)
    d = ttv.decode_sample(old)
    for k in ("normal", "position"):
        np.testing.assert_array_equal(d[k], a[k].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(d["depth"], a["depth"])
    np.testing.assert_array_equal(d["mask"], a["mask"])
    new = ttv.encode_sample(a, {"kind": "ttv"}, "ffv1", "npz")
    assert set(new) == set(old)
    for k, v in ttv.decode_sample(new).items():
        np.testing.assert_array_equal(v, d[k]) if k != "meta" else None
    assert ttv.encode_sample(a, {"kind": "ttv"}) .keys() == new.keys()  # the function's default: the old layout


@pytest.mark.parametrize("geometry", ["precise", "model-input"])
def test_samples_of_the_earlier_deflated_store_decode_to_the_same_arrays(geometry):
    """Members written by Loom before the zstd store (tests/fixtures/ttv_encodings/make_legacy.py) hold the same
    codes: they decode to exactly what today's members of the same render decode to."""
    a = real()
    today = ttv.encode_sample(a, {"uid": "suzi_checker"}, "ffv1", geometry)
    with np.load(os.path.join(FIXTURES, "legacy-zlib.npz")) as z:
        old = {name: z[name].tobytes() for name in ttv.LEGACY_LAYOUTS[geometry][:2]}
    legacy = {k: v for k, v in today.items() if k not in ttv.LAYOUTS[geometry][:2]} | old
    assert ttv.geometry_encoding(legacy) == geometry and all(v[:2] == b"PK" for v in old.values())
    for k, v in ttv.decode_sample(legacy).items():
        if k != "meta":
            np.testing.assert_array_equal(v, ttv.decode_sample(today)[k], err_msg=k)
    with pytest.raises(ValueError, match="more than one position member"):
        ttv.decode_sample(today | old)


def test_a_plane_store_that_claims_too_much_is_refused_before_decompressing():
    good = encode_planes(np.zeros((1, 1, 4, 4), np.uint16))
    # a zstd frame header whose content size field says 2**40 bytes (single-segment, 8-byte size)
    hostile = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + (1 << 40).to_bytes(8, "little") + good[-20:]
    with pytest.raises(ValueError, match="content size"):
        decode_planes(hostile)
    with pytest.raises(ValueError, match="neither zstd nor zip"):
        decode_planes(b"GIF89a" + good)


@pytest.mark.parametrize("geometry", ["precise", "model-input"])
def test_corrupt_or_missing_members_are_named(geometry):
    files = ttv.encode_sample(synthetic(), {"kind": "ttv"}, "ffv1", geometry)
    pos, nrm = sorted(MEMBERS[geometry], key=lambda e: not e.startswith("position"))
    for member, cut in ((pos, slice(0, 200)), (nrm, slice(0, -40))):
        bad = {**files, member: files[member][cut]}
        with pytest.raises(ValueError, match=member.replace(".", r"\.")):
            ttv.decode_sample(bad)
    flipped = bytearray(files[pos])
    flipped[len(flipped) // 2] ^= 0xFF  # inside the compressed data: the checksum catches it
    with pytest.raises(ValueError, match=pos.replace(".", r"\.")):
        ttv.decode_sample({**files, pos: bytes(flipped)})
    with pytest.raises(ValueError, match=nrm.replace(".", r"\.")):
        ttv.decode_sample({k: v for k, v in files.items() if k != nrm})
    # planes of another shape (a member from another sample) are refused, naming both
    other = ttv.encode_sample(synthetic(h=8), {}, "ffv1", geometry)
    with pytest.raises(ValueError, match="do not match"):
        ttv.decode_sample({**files, nrm: other[nrm]})
    with pytest.raises(ValueError, match="position member"):
        ttv.decode_sample({k: v for k, v in files.items() if k != pos})


def test_arrays_the_fixed_point_encodings_cannot_hold_are_refused_by_name():
    a = synthetic()
    far = {**a, "position": a["position"] * 1.5}
    for geometry in ("precise", "model-input"):
        with pytest.raises(ValueError, match="'position'.*encode with geometry='npz'"):
            ttv.encode_sample(far, {}, "ffv1", geometry)
        with pytest.raises(ValueError, match="'normal' has vectors of length 0"):
            ttv.encode_sample({**a, "normal": np.zeros_like(a["normal"])}, {}, "ffv1", geometry)
    ttv.encode_sample(far, {}, "ffv1", "npz")  # npz keeps any finite values
    with pytest.raises(ValueError, match="unknown geometry encoding 'fp8'"):
        ttv.encode_sample(a, {}, "ffv1", "fp8")


def test_planes_and_octahedral_codes_round_trip():
    rng = np.random.default_rng(1)
    for dtype, top in ((np.uint16, 65536), (np.uint8, 256)):
        planes = rng.integers(0, top, (2, 3, 5, 7)).astype(dtype)
        back = decode_planes(encode_planes(planes))
        assert back.dtype == dtype and np.array_equal(back, planes)
    assert encode_planes(planes) == encode_planes(planes.copy())  # deterministic bytes
    # outside Loom: zstd, then np.load of the upper-neighbour residuals' byte planes
    split = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(encode_planes(planes))))
    res = planes.copy()
    res[..., 1:, :] -= planes[..., :-1, :]
    np.testing.assert_array_equal(split[0], res)
    n = rng.standard_normal((50000, 3))
    n = np.concatenate([n / np.linalg.norm(n, axis=-1, keepdims=True), np.eye(3), -np.eye(3)])
    err = {bits: angle(oct_decode(oct_encode(n, bits), bits), n).max() for bits in (14, 16)}
    assert err[14] <= 3e-4 and err[16] <= 7e-5 and err[14] > 2 * err[16]


# ---------------------------------------------------------------------------------------------------------- slow
BUNDLED = ("bunny", "bunny_colors", "marble_shaderball", "pmndrs_logo", "suzi_checker")


@pytest.mark.slow
@pytest.mark.blender
def test_byte_targets_at_512_on_the_bundled_assets(tmp_path):
    """0.45 MB (precise) and 0.15 MB (model-input) per 512x512 frame, FFV1 rgb for precise: one frame of each
    bundled asset, rendered here (~10 s each on 2 cores)."""
    import subprocess
    import sys

    from loom.corpora.assets.sources import bundled_assets
    from loom.corpora.ttv import RenderTTVJob
    from loom.platform import config as c
    from loom.render import hdri_path

    cfg = c.resolve(RenderTTVJob, "default", c.parse_set(["orbit.frames=1", "ray.cpus_per_worker=2"]))
    worst = {g: 0.0 for g in ENCODINGS}
    for rec in (r for r in bundled_assets() if r.uid in BUNDLED):
        params = c.to_dict(cfg.task(rec.to_dict(), 0, "test"))
        params.update(asset_path=rec.path, workdir=str(tmp_path), hdri_path=hdri_path(params["lighting"]["hdri"]))
        (tmp_path / "params.json").write_text(json.dumps(params))
        code = ("import json, sys, numpy as np; from loom.render.ttv import render_ttv; "
                "out = render_ttv(json.load(open(sys.argv[1]))); out.pop('info'); np.savez(sys.argv[2], **out)")
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "params.json"), str(tmp_path / "a.npz")],
                       check=True, capture_output=True)
        with np.load(tmp_path / "a.npz") as z:
            a = {k: z[k] for k in z.files}
        for g in ENCODINGS:
            files = ttv.encode_sample(a, {}, "ffv1", g)
            worst[g] = max(worst[g], sum(len(b) for b in files.values()) / 1e6)
            d = ttv.decode_sample(files)
            m = a["mask"]
            assert np.abs(d["position"] - a["position"])[m].max() <= BOUNDS[g][0], (rec.uid, g)
            assert angle(d["normal"][m], a["normal"][m]).max() <= BOUNDS[g][2], (rec.uid, g)
    assert worst["precise"] <= 0.45 and worst["model-input"] <= 0.15, worst


# ---------------------------------------------------------------------------------------------------------- corpus
CUBE = "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 0 0 1\nv 1 0 1\nv 1 1 1\nv 0 1 1\nf 1 2 3 4\nf 5 6 7 8\n"


def corpus_job(assets: str, out: str, *sets: str):
    """`loom render ttv --recipe smoke --set render.backend=fake --set out=... [sets]` as a job spec."""
    from loom.corpora import ttv as ttv_job
    from loom.corpora.assets import resolve_source
    from loom.corpora.base import job_spec
    from loom.platform import config as c

    cfg = c.resolve(ttv_job.RenderTTVJob, "smoke", c.parse_set(["render.backend=fake", f"out={out}", *sets]))
    return cfg, job_spec(cfg, resolve_source(assets))


def two_cubes(tmp_path) -> str:
    """A folder of two distinct cube OBJ files."""
    (tmp_path / "assets").mkdir()
    for i in range(2):
        (tmp_path / "assets" / f"cube{i}.obj").write_text(CUBE + f"# {i}\n")
    return str(tmp_path / "assets")


def members(out: str) -> set[str]:
    from loom.platform import shards

    return {ext for url in shards.shard_urls(out) for _k, files in shards.iter_tar(url) for ext in files}


@pytest.mark.integration
def test_a_new_corpus_is_precise_and_the_section_leaves_the_hash_alone(ray_local, tmp_path):
    from loom.corpora import ttv as ttv_job
    from loom.platform import shards
    from loom.platform.config import config_hash
    from loom.platform.jobs import run_job

    assets = two_cubes(tmp_path)
    # A new folder: precise by default; the task says what it writes.
    cfg, spec = corpus_job(assets, str(tmp_path / "new"), "shards.samples_per_shard=1", "limit=1")
    assert cfg.encoding.geometry == "auto" and cfg.geometry_encoding() == "precise"
    run_job(spec, progress=False)
    assert shards.verify(spec.out) == [] and MEMBERS["precise"] <= members(spec.out)
    assert not MEMBERS["npz"] & members(spec.out)
    for s in ttv.iter_samples(spec.out):
        assert s["position"].dtype == np.float32 and s["mask"].any()
    # The section does not enter the hash: the hash is the one the config had before the section existed.
    before = tuple(f for f in ttv_job.RenderTTVJob.NON_SAMPLE_FIELDS if f != "encoding") + ("passes",)
    assert spec.config_hash == config_hash(cfg, exclude=before + ("encoding",))
    assert spec.config_hash != config_hash(cfg, exclude=before)


@pytest.mark.integration
def test_an_old_corpus_resumes_in_its_own_encoding_and_refuses_another(ray_local, tmp_path):
    from loom.platform import shards, storage
    from loom.platform.config import ConfigError
    from loom.platform.jobs import run_job

    assets = two_cubes(tmp_path)
    _, spec = corpus_job(assets, str(tmp_path / "new"), "shards.samples_per_shard=1")
    # An "old" corpus: written as npz, one shard then lost; a plain rerun (auto) is not refused and keeps npz.
    old_cfg, old = corpus_job(assets, str(tmp_path / "old"), "shards.samples_per_shard=1", "encoding.geometry=npz")
    assert old.config_hash == spec.config_hash
    run_job(old, progress=False)
    storage.remove(shards.sidecar_url(old.out, "ttv-000001.tar"))
    storage.remove(shards.shard_url(old.out, "ttv-000001.tar"))
    rerun_cfg, rerun = corpus_job(assets, old.out, "shards.samples_per_shard=1")
    assert rerun_cfg.geometry_encoding() == "npz"
    summary = run_job(rerun, progress=False)
    assert summary.shards_done == 1 and shards.verify(old.out) == []
    assert MEMBERS["npz"] <= members(old.out) and not MEMBERS["precise"] & members(old.out)
    # Asking that folder for another encoding explicitly is refused, naming the setting.
    with pytest.raises(ConfigError, match="encoding.geometry='model-input'.*'npz'"):
        corpus_job(assets, old.out, "shards.samples_per_shard=1", "encoding.geometry=model-input")
    # model-input: the task says H.264 rgb (what encode_sample writes for it anyway), in the params the worker gets
    mi_cfg, mi = corpus_job(assets, str(tmp_path / "mi"), "encoding.geometry=model-input")
    task = mi.expand(mi.tasks[0].asset, 0)
    assert (task["geometry"], task["rgb_codec"]) == ("model-input", "h264")
