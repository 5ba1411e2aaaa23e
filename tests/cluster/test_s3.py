"""Object storage for real: the render job writes its shards, manifest and sidecars to an S3-compatible server on
loopback through fsspec's s3fs, `loom shards verify` checks them there, and the loader reads them back exactly once
(SPEC 7: a cluster is one configuration change away)."""

import os
import subprocess
import sys

import boto3
import pytest

from loom.datasets.loader import LoomLoader

pytestmark = pytest.mark.integration

QUAD = "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nf 1 2 3 4\n"


def test_render_verify_and_load_on_s3(s3_server, tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    for i in range(3):
        (assets / f"quad{i}.obj").write_text(QUAD + f"# {i}\n")
    loom = [sys.executable, "-m", "loom.cli"]
    render = [*loom, "render", "ttv", "--assets", str(assets), "--out", "s3://loom/ttv", "--recipe", "smoke",
              "--set", "render.backend=fake", "--set", "shards.samples_per_shard=2", "--no-progress"]
    p = subprocess.run(render, env=s3_server, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "done 3 samples" in p.stdout
    objects = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="loom")["Contents"]}
    assert {"ttv/manifest.json", "ttv/shards/ttv-000000.tar", "ttv/shards/ttv-000001.tar"} <= objects
    assert not any(".tmp" in k or "partial" in k for k in objects), objects  # atomic writes left nothing behind

    p = subprocess.run([*loom, "shards", "verify", "s3://loom/ttv"], env=s3_server, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "checksums match" in p.stdout, p.stdout + p.stderr

    keys = [k for b in LoomLoader("s3://loom/ttv", batch_size=2, seed=1) for k, pad in
            zip(b["__key__"], b["__pad__"].tolist(), strict=True) if not pad]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 3

    # a rerun against the same bucket does no new work
    p = subprocess.run(render, env=s3_server, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "done 0 samples" in p.stdout and "skipped 3 already complete" in p.stdout, p.stdout
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1")  # never a real bucket
