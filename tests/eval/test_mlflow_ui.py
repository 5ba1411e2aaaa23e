"""The benchmarks against a real ``mlflow server`` started on loopback, and what a reviewer sees: headless Chromium
opens the MLflow UI, finds the benchmark's runs with their metrics, and opens the leaderboard artifact."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from loom.cli import main
from tests.eval import bench_data
from tests.eval.chromium import Chromium, find_chromium

mlflow = pytest.importorskip("mlflow")
MLFLOW = os.path.join(os.path.dirname(sys.executable), "mlflow")

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([MLFLOW, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", f"file://{root / 'artifacts'}", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {open(root / 'server.log').read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker (its own session)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def evaluated(server, tmp_path_factory):
    """Two evaluations (identical and perturbed predictions) and the leaderboard, logged to the server."""
    root = tmp_path_factory.mktemp("ttv-server")
    case = bench_data.make_ttv_case(str(root / "data"))
    for name in ("same", "noisy"):
        assert main(["eval", "ttv", "--recipe", "tiny", "--gt", case["gt"], "--pred", case[name], "--out",
                     str(root / "out" / name), "--set", f"tracking.uri={server}"]) == 0  # fmt: skip
    assert main(["leaderboard", "ttv", "--uri", server]) == 0
    assert not (root / "out" / "mlflow.db").exists()  # nothing went to the SQLite default
    c = mlflow.MlflowClient(tracking_uri=server)
    exp = c.get_experiment_by_name("bench/ttv")
    runs = {r.info.run_name: r for r in c.search_runs([exp.experiment_id])}
    return c, exp, runs


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def test_benchmark_runs_and_leaderboard_on_a_real_server(server, evaluated, capsys):
    c, exp, runs = evaluated
    assert set(runs) == {"same", "noisy", "leaderboard"}
    same, noisy = runs["same"].data, runs["noisy"].data
    assert same.metrics["psnr"] == 100.0 and same.metrics["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert noisy.metrics["psnr"] < same.metrics["psnr"] and noisy.metrics["fvd"] > same.metrics["fvd"]
    assert same.params["features"] == "tiny-random" and same.params["checkpoint"] == "-"
    media = {os.path.basename(a.path) for a in c.list_artifacts(runs["noisy"].info.run_id, "media")}
    assert {"sphere000.mp4", "sphere000.png"} <= media
    # the artifacts as the server hands them out
    lb = runs["leaderboard"].info.run_id
    q = urllib.parse.urlencode({"path": "leaderboard.html", "run_uuid": lb})
    page = _get(f"{server}/get-artifact?{q}")
    assert '<tr class="tiny" data-model="same"' in page and page.count('<td class="best">') == 4
    q = urllib.parse.urlencode({"path": "items.json", "run_uuid": runs["noisy"].info.run_id})
    assert "sphere002" in _get(f"{server}/get-artifact?{q}")
    capsys.readouterr()
    assert main(["leaderboard", "ttv", "--uri", server, "--no-log", "--format", "markdown"]) == 0
    assert "| same | **100.00** | **1.000** | **0.000** | **0.0** |" in capsys.readouterr().out


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not on PATH: `make browser` installs Debian's "
                    "chromium package (apt-get install -y chromium)")
def test_a_reviewer_sees_the_runs_and_the_leaderboard_in_the_mlflow_ui(server, evaluated):
    c, exp, runs = evaluated
    eid = exp.experiment_id
    with Chromium(find_chromium()) as browser:
        # the experiment's runs page lists the evaluations (and the leaderboard run)
        browser.open(f"{server}/#/experiments/{eid}/runs")
        text = browser.wait_text(lambda t: all(n in t for n in ("same", "noisy", "leaderboard")))
        assert all(n in text for n in ("same", "noisy", "leaderboard")), text[-2000:]
        # each run's page shows its metrics at full precision (JavaScript's shortest round-trip form, as repr)
        for name in ("same", "noisy"):
            r = runs[name]
            browser.open(f"{server}/#/experiments/{eid}/runs/{r.info.run_id}")
            want = [m for k, v in r.data.metrics.items() for m in (k, repr(v) if v != int(v) else str(int(v)))]
            text = browser.wait_text(lambda t, want=want: all(w in t for w in want))
            assert all(w in text for w in want), (want, text[-3000:])
            assert "tiny-random" in text  # the feature networks are in plain sight
        # the leaderboard artifact, rendered by the UI's artifact viewer (an iframe): the best row is marked
        browser.open(f"{server}/#/experiments/{eid}/runs/{runs['leaderboard'].info.run_id}/artifacts/"
                     "leaderboard.html")
        html = browser.wait_frame_html(lambda h: 'id="leaderboard"' in h)
        assert 'id="leaderboard"' in html, "the leaderboard iframe never rendered"
        best_row = html.split('data-model="same"', 1)[1].split("</tr>", 1)[0]
        assert best_row.count('<td class="best"><strong>') == 4
        other = html.split('data-model="noisy"', 1)[1].split("</tr>", 1)[0]
        assert "<strong>" not in other
