"""The `loom` command: clear errors for bad input (exit 2, the offending value named), config printing, dry runs,
verification exit codes."""

import subprocess
import sys

import pytest

from loom.platform import shards, storage


def loom(*args, check=False):
    p = subprocess.run([sys.executable, "-m", "loom.cli", *args], capture_output=True, text=True,
                       timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("args,needle", [
    (["--assets", "/no/such/folder"], "/no/such/folder"),
    (["--set", "orbit.frames=abc"], "orbit.frames"),
    (["--set", "orbit.framez=3"], "orbit.framez"),
    (["--recipe", "nope"], "smoke"),
    (["--assets", "objaverse:colour=red"], "colour"),
])
def test_bad_input_is_one_clear_line(args, needle, tmp_path):
    p = loom("render", "ttv", "--out", str(tmp_path / "o"), *args)
    assert p.returncode == 2
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()  # nothing written


def test_print_and_help_config():
    p = loom("render", "ttv", "--recipe", "smoke", "--set", "orbit.frames=9", "--print-config", check=True)
    assert "frames: 9" in p.stdout
    p = loom("render", "ttv", "--help-config", check=True)
    assert "orbit.frames" in p.stdout and "lighting.hdris" in p.stdout


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "o"
    p = loom("render", "ttv", "--recipe", "smoke", "--set", "render.backend=fake", "--set", "lighting.variants=3",
             "--out", str(out), "--dry-run", check=True)
    assert "15 samples" in p.stdout and "60 frames" in p.stdout  # 5 bundled assets x 3 variants x 4 frames
    assert "core-hours" in p.stdout and "GB" in p.stdout
    assert not out.exists()


def test_assets_list_bundled_and_manifest(tmp_path):
    p = loom("assets", "list", "bundled", "--manifest", str(tmp_path / "m.jsonl"), check=True)
    assert "bunny" in p.stdout and "CC0-1.0" in p.stdout
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 5


def test_verify_exit_codes(tmp_path):
    out = str(tmp_path / "o")
    name = shards.shard_name("ttv", 0)
    size, sha, keys = shards.write_tar(shards.shard_url(out, name), [("a", {"x.txt": b"1" * 2000})])
    shards.write_sidecar(out, shards.ShardRecord(name=name, samples=1, size=size, sha256=sha, keys=keys))
    shards.write_manifest(out, [name])
    assert loom("shards", "verify", out).returncode == 0
    storage.write_bytes(shards.shard_url(out, name), storage.read_bytes(shards.shard_url(out, name))[:1024])
    p = loom("shards", "verify", out)
    assert p.returncode == 1 and name in p.stdout


def test_unknown_environment_map_is_refused_before_any_work(tmp_path):
    p = loom("render", "ttv", "--out", str(tmp_path / "o"), "--set", "lighting.hdris=[studio, nowhere]")
    assert p.returncode == 2 and "nowhere" in p.stderr and "studio" in p.stderr
    assert not (tmp_path / "o").exists()
