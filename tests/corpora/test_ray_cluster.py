"""The same command joins a running Ray cluster when given its address (here a head node started with `ray start`
on this machine), instead of starting a local Ray."""

import os
import shutil
import subprocess
import sys

import pytest

from loom.datasets.ttv import iter_samples

pytestmark = pytest.mark.integration

CUBE = "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nf 1 2 3 4\n"


@pytest.fixture()
def ray_head():
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([ray_bin, "start", "--head", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env, timeout=120)
    try:
        yield env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)


def test_job_runs_on_a_cluster_given_by_address(ray_head, tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    for i in range(2):
        (assets / f"quad{i}.obj").write_text(CUBE + f"# {i}\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "loom.cli", "render", "ttv", "--assets", str(assets),
                        "--out", str(out), "--recipe", "smoke", "--set", "render.backend=fake",
                        "--set", "ray.address=auto", "--no-progress"],
                       capture_output=True, text=True, env=ray_head, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "done 2 samples" in p.stdout
    # The job's driver connected to the existing cluster rather than starting its own.
    assert "connected to the Ray cluster at auto" in p.stderr, p.stderr
    assert len(list(iter_samples(str(out), keys=("meta",)))) == 2
