"""`loom render` over an asset folder holding files of mesh formats Loom does not import: they are named in the
job's output and are rows of failures.jsonl, on the first run and on reruns, and the plan stays the same. Fake
renderer, real Ray and sandbox."""

import json

import pytest

from loom import cli
from loom.platform import shards, storage

pytestmark = pytest.mark.integration

CUBE = "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 0 0 1\nv 1 0 1\nv 1 1 1\nv 0 1 1\n" \
       "f 1 2 3 4\nf 5 6 7 8\nf 1 2 6 5\nf 2 3 7 6\nf 3 4 8 7\nf 4 1 5 8\n"


def test_unsupported_files_are_named_in_the_summary_and_the_failure_manifest(ray_local, tmp_path, capsys):
    assets = tmp_path / "assets"
    (assets / "props").mkdir(parents=True)
    for i in range(2):
        (assets / f"cube{i}.obj").write_text(CUBE + f"# {i}\n")
    (assets / "props" / "chair.dae").write_text("<COLLADA/>")
    (assets / "car.3ds").write_bytes(b"MM\0\0")
    out = tmp_path / "out"
    argv = ["render", "ttv", "--assets", str(assets), "--out", str(out), "--recipe", "smoke",
            "--set", "render.backend=fake", "--set", "shards.samples_per_shard=2", "--no-progress"]

    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    rows = [json.loads(x) for x in storage.read_bytes(storage.join(str(out), shards.FAILURES)).decode().splitlines()]
    reasons = {r["uid"].split("--")[0]: r["reason"] for r in rows}
    assert set(reasons) == {"car", "props-chair"}
    assert "unsupported format .dae" in reasons["props-chair"] and "chair.dae" in reasons["props-chair"]
    assert "unsupported format .3ds" in reasons["car"] and "convert it to .glb" in reasons["car"]
    for name in ("chair.dae", "car.3ds"):
        assert name in first
    assert "not rendered: 2 file(s)" in first
    m = shards.read_manifest(str(out))
    assert m["totals"]["samples"] == 2 and m["totals"]["failures"] == 2
    plan = storage.read_bytes(storage.join(str(out), "plan.json"))
    # the cubes fill the first shard exactly as they would without the unsupported files
    doc = json.loads(plan)  # tasks: [key, asset index, variant, frames]
    assert [doc["assets"][t[1]]["format"] for t in doc["shards"][0]["tasks"]] == ["obj", "obj"]

    assert cli.main(argv) == 0  # a rerun: nothing new to do, the same plan, and the files are still named
    again = capsys.readouterr().out
    assert storage.read_bytes(storage.join(str(out), "plan.json")) == plan
    assert "done 0 samples" in again and "not rendered: 2 file(s)" in again and "chair.dae" in again
    assert len(storage.read_bytes(storage.join(str(out), shards.FAILURES)).decode().splitlines()) == 2
