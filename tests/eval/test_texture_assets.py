"""``loom eval texture --run RUN --assets MESHES``: TAPESTRY Tab. 2 on the TEXTURED ASSET, for real (Blender renders,
`loom texture --run` with a tiny run, the tiny feature networks, MLflow in SQLite): the original and the textured
asset rendered on one held-out orbit and scored, with the Time column."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from loom.cli import main

pytest.importorskip("bpy")
pytest.importorskip("diffusers")
mlflow = pytest.importorskip("mlflow")

pytestmark = pytest.mark.blender


def test_eval_texture_scores_renders_of_the_textured_asset(tmp_path, monkeypatch, capsys):
    from tests.inference.test_texture import write_cube
    from tests.inference.test_ttv import make_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LOOM_HOME", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_cube(str(tmp_path / "assets"))
    run, _ = make_run(tmp_path, str(tmp_path / "unused"), **{"flow.sample_steps": 2})
    out = tmp_path / "eval"
    rc = main(["eval", "texture", "--recipe", "tiny", "--run", run, "--assets", str(tmp_path / "assets"),
               "--out", str(out), "--set", "views=4", "--set", "view_size=64", "--set", "stages=1",
               "--set", "texture_resolution=64"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    metrics = json.load(open(out / "metrics.json"))["metrics"]
    assert {"fid", "kid", "clip_s", "lpips", "time_s", "coverage"} <= set(metrics) and metrics["items"] == 4
    assert metrics["time_s"] > 0 and 0 < metrics["coverage"] <= 1
    uid = next(n for n in os.listdir(out / "pred") if not n.startswith("."))
    pred = sorted(os.listdir(out / "pred" / uid))
    assert pred == sorted(os.listdir(out / "gt" / uid)) == ["000.png", "001.png", "002.png", "003.png"]
    # both sides are renders of the same geometry from the same cameras: the silhouettes agree
    for name in pred:
        p = np.asarray(Image.open(out / "pred" / uid / name).convert("RGB")).astype(int)
        g = np.asarray(Image.open(out / "gt" / uid / name).convert("RGB")).astype(int)
        fg_p, fg_g = (p != 255).any(-1), (g != 255).any(-1)  # the white background
        assert (fg_p == fg_g).mean() > 0.97, name
    assert os.path.isfile(out / "textured" / uid / "mesh.glb")
    items = list(csv_rows(out / "items.csv"))
    assert all(float(r["seconds"]) > 0 and r["key"] == uid for r in items)
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("bench/texture")
    (r,) = c.search_runs([exp.experiment_id])
    assert "time_s" in r.data.metrics and r.data.params["data"].endswith("assets")


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)
