"""Run folders on object storage for real (loopback S3, moto's server): `loom train ttv --out s3://...` killed after
its step-2 checkpoint and resumed with --resume from a fresh local cache (as on a fresh clone) gives the losses of an
uninterrupted local run; `loom export ttv` and `loom eval ttv` read that run from the bucket and write there."""

import os
import subprocess
import sys

import boto3
import pytest

from tests.training.corpus import make_ttv_corpus

pytestmark = pytest.mark.integration
pytest.importorskip("lightning")
pytest.importorskip("deepspeed")
mlflow = pytest.importorskip("mlflow")

LOOM = [sys.executable, "-m", "loom.cli"]
SETS = ("trainer.max_steps=6", "trainer.checkpoint_every=2", "data.known_prob=0.5")


def objects(prefix=""):
    listed = boto3.client("s3").list_objects_v2(Bucket="loom", Prefix=prefix)
    return {o["Key"]: o["Size"] for o in listed.get("Contents", [])}


def loom(env, *args, check=True):
    p = subprocess.run([*LOOM, *args], env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def train(env, out, corpus, *sets, resume=False, check=True):
    args = ["train", "ttv", "--recipe", "tiny", "--data", corpus, "--out", out, "--set", "trainer.progress=false"]
    for s in (*SETS, *sets):
        args += ["--set", s]
    return loom(env, *args, *(["--resume"] if resume else []), check=check)


def history(db, name):
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = c.get_experiment_by_name("loom")
    (r,) = [r for r in c.search_runs([exp.experiment_id]) if r.info.run_name == name]
    return r, [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, "train/loss")]


@pytest.fixture()
def env(s3_server, tmp_path):
    e = {**s3_server, "LOOM_HOME": str(tmp_path / "home"), "LOOM_CACHE": str(tmp_path / "cache-a")}
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def test_a_run_on_s3_killed_and_resumed_from_a_fresh_cache_continues_exactly(env, tmp_path):
    from loom.training import launch

    corpus = str(tmp_path / "corpus")
    make_ttv_corpus(corpus, samples=3, frames=5, size=32)
    url = "s3://loom/runs/killed"
    p = train({**env, "LOOM_FAIL_AT_STEP": "3"}, url, corpus, check=False)
    assert p.returncode == 17, p.stderr[-3000:]
    ckpt = objects("runs/killed/checkpoints/")
    assert "runs/killed/checkpoints/last.ckpt/latest" in ckpt, sorted(ckpt)
    assert any(k.startswith("runs/killed/checkpoints/step-0000002.ckpt/checkpoint/") for k in ckpt), sorted(ckpt)
    assert {"runs/killed/config.yaml", "runs/killed/mlflow_run.json"} <= set(objects("runs/killed/"))
    assert launch.last_checkpoint(url) == f"{url}/checkpoints/last.ckpt"
    with pytest.raises(FileExistsError, match="--resume"):  # a new run over it: refused, nothing overwritten
        launch.check_resume(url, False)
    with pytest.raises(FileNotFoundError, match="s3://loom/runs/none"):
        launch.check_resume("s3://loom/runs/none", True)
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket/run: the bucket 'no-such-bucket' does not"):
        launch.check_resume("s3://no-such-bucket/run", False)

    fresh = {**env, "LOOM_CACHE": str(tmp_path / "cache-b")}  # nothing local of the killed run: all from the bucket
    resumed = train(fresh, url, corpus, resume=True)
    assert f"downloaded {url}/checkpoints/last.ckpt" in resumed.stderr
    r, got = history(tmp_path / "home" / "mlflow.db", "killed")  # one MLflow run, continued
    # step 2 was logged by the killed process and again after the resume: the same loss only if the weights, the
    # optimizer, the RNG and the data position all came back from the bucket (the local resume test compares a
    # resumed run with an uninterrupted one)
    assert sorted({s for s, _ in got}) == list(range(6)) and len(got) == 7, got
    twice = [v for s, v in got if s == 2]
    assert twice[0] == pytest.approx(twice[1], rel=1e-6, abs=1e-7), got
    assert r.data.tags["out"] == url  # MLflow records where the run lives, not the staging folder
    keys = set(objects("runs/killed/"))
    assert {"runs/killed/lora/pytorch_lora_weights.safetensors", "runs/killed/samples/step-0000006.mp4",
            "runs/killed/checkpoints/step-0000006.ckpt/latest"} <= keys, sorted(keys)
    assert "runs/killed/checkpoints/step-0000002.ckpt/latest" not in keys  # keep_checkpoints=2 removed it there too
    assert not any(".tmp-" in k for k in keys), sorted(keys)  # atomic writes left nothing behind


def test_export_and_eval_read_a_run_on_s3_and_write_there(env, tmp_path, monkeypatch, capsys):
    from loom.cli import main
    from loom.inference.run import read_run_config
    from loom.platform import storage
    from tests.eval import bench_data
    from tests.eval.test_commands import untrained_ttv_run

    monkeypatch.setenv("LOOM_HOME", env["LOOM_HOME"])
    monkeypatch.setenv("LOOM_CACHE", env["LOOM_CACHE"])
    case = bench_data.make_ttv_case(str(tmp_path / "case"))
    local = untrained_ttv_run(tmp_path, case["gt"], frames=9)
    url = "s3://loom/runs/untrained"
    storage.upload_tree(local, url)

    assert main(["export", "ttv", "--run", url, "--out", "s3://loom/exports/final", "--no-mlflow"]) == 0
    keys = objects("exports/final/")
    assert {"exports/final/README.md", "exports/final/pytorch_lora_weights.safetensors"} <= set(keys)
    with open(os.path.join(local, "lora", "pytorch_lora_weights.safetensors"), "rb") as f:
        assert storage.read_bytes("s3://loom/exports/final/pytorch_lora_weights.safetensors") == f.read()
    card = storage.read_bytes("s3://loom/exports/final/README.md").decode()
    assert f"Run folder: `{url}`" in card and f"`{url}/lora`" in card
    capsys.readouterr()
    # not over an existing export without --overwrite
    assert main(["export", "ttv", "--run", url, "--out", "s3://loom/exports/final", "--no-mlflow"]) != 0
    assert "'s3://loom/exports/final' exists and is not empty" in capsys.readouterr().err

    ev = "s3://loom/evals/untrained"
    args = ["eval", "ttv", "--recipe", "tiny", "--gt", case["gt"], "--run", url, "--out", ev, "--set", "limit=1",
            "--set", "metrics=[psnr,ssim]"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert f"to {ev}" in first.out, first.out + first.err
    keys = objects("evals/untrained/")
    assert {"evals/untrained/metrics.json", "evals/untrained/items.csv", "evals/untrained/config.yaml"} <= set(keys)
    assert any(k.startswith("evals/untrained/pred/") and k.endswith(".mkv") for k in keys), sorted(keys)
    assert f"run: {url}" in storage.read_bytes(f"{ev}/config.yaml").decode()
    assert main(args) == 0  # a rerun: the run is not downloaded again, the predictions are reused from the bucket
    again = capsys.readouterr()
    assert "downloaded" not in again.err and "reused 1 prediction(s)" in again.out, again.out + again.err

    doc, path = read_run_config(url, "lora", "loom train ttv")  # what `loom generate ttv --run` reads first
    assert doc["model"]["transformer"] == "tiny" and path.startswith(env["LOOM_CACHE"])
    with pytest.raises(FileNotFoundError, match="s3://loom/runs/missing"):
        read_run_config("s3://loom/runs/missing", "lora", "loom train ttv")
    from loom.inference.ttv import load_run  # `loom generate ttv` / `loom texture --run s3://...`

    model = load_run(url)
    assert model.path.startswith(env["LOOM_CACHE"]) and os.path.isdir(os.path.join(model.path, "lora"))


def test_eval_reads_ground_truth_shards_and_predictions_from_the_bucket(env, tmp_path, monkeypatch, capsys):
    import json

    from loom.cli import main
    from loom.platform import storage
    from tests.eval import bench_data

    monkeypatch.setenv("LOOM_HOME", env["LOOM_HOME"])
    monkeypatch.setenv("LOOM_CACHE", env["LOOM_CACHE"])
    case = bench_data.make_ttv_case(str(tmp_path / "case"), samples=2)
    for name in ("gt", "noisy"):
        storage.upload_tree(case[name], f"s3://loom/cases/{name}")

    def evaluate(pred, out):
        args = ["eval", "ttv", "--recipe", "tiny", "--gt", "s3://loom/cases/gt", "--pred", pred, "--out", out,
                "--set", "metrics=[psnr,ssim]"]
        assert main(args) == 0
        with open(os.path.join(out, "metrics.json")) as f:
            return json.load(f), capsys.readouterr()

    local, first = evaluate(case["noisy"], str(tmp_path / "local"))
    remote, got = evaluate("s3://loom/cases/noisy", str(tmp_path / "remote"))
    assert "--pred s3://loom/cases/noisy: 2 of 2 file(s) downloaded" in got.out, got.out
    assert "--gt" not in got.out  # shards are read from the bucket, not copied
    assert remote["metrics"] == local["metrics"] and remote["metrics"]["psnr"] < 40  # the same scores as local files
    cfg = (tmp_path / "remote" / "config.yaml").read_text()
    assert "pred: s3://loom/cases/noisy" in cfg and env["LOOM_CACHE"] not in cfg
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("bench/ttv").experiment_id])
    logged = {r.data.params["predictions"] for r in runs}
    assert logged == {"s3://loom/cases/noisy", case["noisy"]}, logged  # the URL, not the local copy
    _, again = evaluate("s3://loom/cases/noisy", str(tmp_path / "remote"))
    assert "0 of 2 file(s) downloaded" in again.out, again.out
    # a prediction removed from the bucket is not scored from the stale copy: its key is reported missing
    (key,) = [k for k in objects("cases/noisy/")][:1]
    boto3.client("s3").delete_object(Bucket="loom", Key=key)
    args = ["eval", "ttv", "--recipe", "tiny", "--gt", "s3://loom/cases/gt", "--pred", "s3://loom/cases/noisy",
            "--out", str(tmp_path / "third"), "--set", "metrics=[psnr]"]
    assert main(args) != 0
    assert os.path.basename(key).split(".")[0] in capsys.readouterr().err
    assert main(["eval", "ttv", "--gt", "s3://loom/cases/gt", "--pred", "s3://loom/cases/none", "--out",
                 str(tmp_path / "x")]) != 0
    assert "--pred s3://loom/cases/none: no such folder" in capsys.readouterr().err
