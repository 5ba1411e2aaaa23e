"""The turntable job end to end with the fake renderer: real Ray, real sandbox processes, real tars on disk.
(The Blender renderer itself is exercised in test_render_ttv.py and test_ttv_blender_e2e.py.)"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from loom.datasets.ttv import iter_samples
from loom.geometry.camera import unproject_depth
from loom.corpora import ttv
from loom.corpora.base import job_spec
from loom.corpora.assets import resolve_source
from loom.platform.jobs import estimate, run_job
from loom.platform import config as c
from loom.platform import shards, storage

pytestmark = pytest.mark.integration

CUBE = "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 0 0 1\nv 1 0 1\nv 1 1 1\nv 0 1 1\n" \
       "f 1 2 3 4\nf 5 6 7 8\nf 1 2 6 5\nf 2 3 7 6\nf 3 4 8 7\nf 4 1 5 8\n"


def make_assets(folder, good=4, bad=True):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        (folder / f"cube{i}.obj").write_text(CUBE + f"# variant {i}\n")
    if bad:
        (folder / "zzfail.obj").write_text("FAIL! this mesh has no faces\n")
        (folder / "zzcrash.obj").write_text("CRASH the importer\n")
    return str(folder)


def job(assets, out, *sets):
    cfg = c.resolve(ttv.RenderTTVJob, "smoke", c.parse_set(["render.backend=fake", f"out={out}", *sets]))
    return job_spec(cfg, resolve_source(assets))


def test_job_renders_writes_and_records_failures(ray_local, tmp_path):
    spec = job(make_assets(tmp_path / "assets"), str(tmp_path / "out"))
    s = run_job(spec, progress=False)
    assert (s.samples_done, s.failed, s.shards_done) == (4, 2, 3)
    reasons = {f["uid"].split("--")[0]: f["reason"] for f in s.failures}
    assert "no faces" in reasons["zzfail"]
    assert "died" in reasons["zzcrash"] and "SIGABRT" in reasons["zzcrash"]
    m = shards.read_manifest(spec.out)
    assert m["complete"] and m["totals"]["samples"] == 4 and m["totals"]["failures"] == 2
    assert shards.verify(spec.out) == []
    rows = storage.read_bytes(storage.join(spec.out, "failures.jsonl")).decode().splitlines()
    assert len(rows) == 2

    samples = list(iter_samples(spec.out))
    assert sorted(s["__key__"].split("--")[0] for s in samples) == [f"cube{i}" for i in range(4)]
    for smp in samples:
        T, H, W, _ = smp["rgb"].shape
        assert (T, H, W) == (4, 64, 64) and smp["rgb"].dtype == np.uint8
        assert smp["meta"]["variant"] == 0 and smp["meta"]["asset_sha256"]
        for t in range(T):
            m_ = smp["mask"][t]
            pts = unproject_depth(smp["depth"][t].astype(np.float64), smp["K"][t].astype(np.float64),
                                  smp["c2w"][t].astype(np.float64))
            assert np.abs(pts[m_] - smp["position"][t][m_]).max() < 1e-3


def test_albedo_pass_reaches_the_shards_and_is_another_config(ray_local, tmp_path):
    assets = make_assets(tmp_path / "assets", good=1, bad=False)
    spec = job(assets, str(tmp_path / "out"), "passes.albedo=true")
    plain = job(assets, str(tmp_path / "x"))
    assert spec.config_hash != plain.config_hash  # never mixed into a plain corpus
    # with the section at its defaults the hash is what it was before the section existed: older corpora resume
    from loom.platform.config import config_hash, from_dict

    cfg = from_dict(ttv.RenderTTVJob, plain.config)
    assert plain.config_hash == config_hash(cfg, exclude=ttv.RenderTTVJob.NON_SAMPLE_FIELDS + ("passes",))
    run_job(spec, progress=False)
    assert shards.verify(spec.out) == []
    (smp,) = list(iter_samples(spec.out))
    assert smp["albedo"].shape == smp["rgb"].shape and smp["albedo"].dtype == np.uint8
    m = smp["mask"]
    assert (smp["albedo"][~m] == smp["rgb"][~m]).all()  # the background, as rgb's
    assert (smp["albedo"][m].astype(int) >= smp["rgb"][m]).all()  # the fake's unlit colour: never darker


def test_partial_texture_pass_reaches_the_shards_and_changes_nothing_else(ray_local, tmp_path):
    from loom.geometry.texture import BASE_TILTS

    assets = make_assets(tmp_path / "assets", good=2, bad=False)
    spec = job(assets, str(tmp_path / "out"), "passes.partial=true", "passes.partial_views=6")
    plain = job(assets, str(tmp_path / "plain"))
    assert spec.config_hash != plain.config_hash
    run_job(spec, progress=False)
    run_job(plain, progress=False)
    assert shards.verify(spec.out) == []
    with_known = {s["__key__"]: s for s in iter_samples(spec.out)}
    for smp in iter_samples(plain.out):  # the same draws: the same render, plus known
        other = with_known[smp["__key__"]]
        assert "known" not in smp
        np.testing.assert_array_equal(other["rgb"], smp["rgb"])
        np.testing.assert_array_equal(other["c2w"], smp["c2w"])
        known, m = other["known"], other["mask"]
        assert known.shape == m.shape and not (known & ~m).any() and 0 < known.sum() < m.sum()
        part = other["meta"]["partial"]
        assert part["tilt"] in BASE_TILTS and part["views"] == 6
        assert part["known_fraction"] == pytest.approx(known.sum() / m.sum())


def test_rerun_does_no_new_work_and_redoes_partial_shards(ray_local, tmp_path):
    spec = job(make_assets(tmp_path / "assets", bad=False), str(tmp_path / "out"))
    run_job(spec, progress=False)
    tars = {n: storage.sha256_of(shards.shard_url(spec.out, n)) for n in ("ttv-000000.tar", "ttv-000001.tar")}
    again = run_job(spec, progress=False)
    assert (again.shards_done, again.shards_skipped, again.samples_skipped) == (0, 2, 4)
    # A tar whose sidecar is missing is partial work: only that shard is redone, byte-identically.
    storage.remove(shards.sidecar_url(spec.out, "ttv-000001.tar"))
    redo = run_job(spec, progress=False)
    assert (redo.shards_done, redo.shards_skipped) == (1, 1)
    assert {n: storage.sha256_of(shards.shard_url(spec.out, n)) for n in tars} == tars


def test_same_task_same_bytes_and_other_seed_differs(ray_local, tmp_path):
    assets = make_assets(tmp_path / "assets", good=1, bad=False)
    a = job(assets, str(tmp_path / "a"))
    b = job(assets, str(tmp_path / "b"))
    d = job(assets, str(tmp_path / "d"), "seed=1")
    for spec in (a, b, d):
        run_job(spec, progress=False)
    sha = [shards.read_manifest(s.out)["shards"][0]["sha256"] for s in (a, b, d)]
    assert sha[0] == sha[1] != sha[2]


def test_other_config_into_same_folder_is_refused(ray_local, tmp_path):
    assets = make_assets(tmp_path / "assets", good=1, bad=False)
    run_job(job(assets, str(tmp_path / "out")), progress=False)
    with pytest.raises(RuntimeError, match="different config"):
        run_job(job(assets, str(tmp_path / "out"), "orbit.frames=5"), progress=False)


def test_unwritable_destination_is_named(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):
        pytest.skip("running as a user that can write anywhere (root)")
    with pytest.raises(PermissionError, match="ro"):
        run_job(job(make_assets(tmp_path / "assets", 1, False), str(ro / "out")), progress=False)


def test_unwritable_destination_file_in_the_way(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="file"):
        run_job(job(make_assets(tmp_path / "assets", 1, False), str(blocker / "out")), progress=False)


def test_dry_run_estimate_calibrates(tmp_path):
    spec = job(make_assets(tmp_path / "assets", 3, False), str(tmp_path / "out"), "lighting.variants=2")
    est = estimate(spec)
    assert (est.tasks, est.frames, est.shards) == (6, 24, 3)
    assert est.bytes_per_frame > 0 and est.core_hours > 0
    assert "core-hours" in est.report()
    assert not storage.exists(spec.out)  # a dry run writes nothing


def test_killed_job_resumes_with_every_sample_exactly_once(tmp_path):
    assets = make_assets(tmp_path / "assets", good=6, bad=False)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "loom.cli", "render", "ttv", "--assets", assets, "--out", out,
           "--recipe", "smoke", "--set", "render.backend=fake", "--set", "shards.samples_per_shard=1",
           "--no-progress"]
    env = {**os.environ, "LOOM_FAKE_DELAY_S": "0.5", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    sidecars = []
    while time.time() < deadline and not sidecars:
        sidecars = [n for n in storage.listdir(os.path.join(out, "shards")) if n.endswith(".json")]
        time.sleep(0.2)
    assert sidecars, "the job never finished a shard"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray cluster and the workers, mid-shard
    proc.wait()
    time.sleep(1)
    done_before = len([n for n in storage.listdir(os.path.join(out, "shards")) if n.endswith(".json")])
    assert done_before < 6, "the job finished before it could be killed: slow it down"
    env["LOOM_FAKE_DELAY_S"] = "0"
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    keys = [s["__key__"] for s in iter_samples(out, keys=("meta",))]
    assert sorted(keys) == sorted(f"{r.uid}_v0" for r in resolve_source(assets))
    assert shards.verify(out) == []
    assert not [n for n in storage.listdir(os.path.join(out, "shards")) if n.startswith(storage.TMP_MARK)]
