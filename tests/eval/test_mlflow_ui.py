"""The benchmarks against a real ``mlflow server`` started on loopback, and what a reviewer sees: headless Chromium
opens the MLflow UI at the address Loom prints and finds, on the first screen, the experiment as model training
(its runs, not the GenAI overview) with the leaderboard's standings on top; each run's metrics; the media playing."""

import io

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
from loom.platform.tracking import ui_url
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
    assert set(runs) == {"same", "noisy"}  # the evaluations only: the table is not a run among the models
    same, noisy = runs["same"].data, runs["noisy"].data
    assert same.metrics["psnr"] == 100.0 and same.metrics["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert noisy.metrics["psnr"] < same.metrics["psnr"] and noisy.metrics["fvd"] > same.metrics["fvd"]
    assert same.params["features"] == "tiny-random" and same.params["checkpoint"] == "-"
    media = {os.path.basename(a.path) for a in c.list_artifacts(runs["noisy"].info.run_id, "media")}
    assert {"sphere000.mp4", "sphere000.png"} <= media
    # the experiment as the server hands it out: model training, the leaderboard as its description
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    note = exp.tags["mlflow.note.content"]
    assert note.startswith("**Leaderboard** (best first): 1. **same**: PSNR ↑ **100.00**")
    assert "| same | **100.00** | **1.000** | **0.000** | **0.0** |" in note
    # the side-by-side video as the server serves it: H.264 yuv420p, which every browser plays
    q = urllib.parse.urlencode({"path": "media/sphere000.mp4", "run_uuid": runs["noisy"].info.run_id})
    with urllib.request.urlopen(f"{server}/get-artifact?{q}", timeout=30) as r:
        data = r.read()
    av = pytest.importorskip("av")
    with av.open(io.BytesIO(data)) as f:
        cc = f.streams.video[0].codec_context
        assert (cc.name, cc.pix_fmt) == ("h264", "yuv420p")
    q = urllib.parse.urlencode({"path": "items.json", "run_uuid": runs["noisy"].info.run_id})
    assert "sphere002" in _get(f"{server}/get-artifact?{q}")
    capsys.readouterr()
    assert main(["leaderboard", "ttv", "--uri", server, "--no-log", "--format", "markdown"]) == 0
    assert "| same | **100.00** | **1.000** | **0.000** | **0.0** |" in capsys.readouterr().out


# The text a person sees without scrolling or unfolding anything: text nodes whose box lies inside the window and
# inside every ancestor that clips (overflow other than visible), at least half of the line's height showing.
VISIBLE_TEXT = """(() => {
  const W = window.innerWidth, H = window.innerHeight, out = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (!n.textContent.trim()) continue;
    const range = document.createRange();
    range.selectNodeContents(n);
    for (const r of range.getClientRects()) {
      let top = Math.max(r.top, 0), bottom = Math.min(r.bottom, H), left = Math.max(r.left, 0),
          right = Math.min(r.right, W), hidden = false;
      for (let e = n.parentElement; e && e !== document.documentElement; e = e.parentElement) {
        const s = getComputedStyle(e);
        if (s.visibility === "hidden" || s.display === "none" || s.opacity === "0") { hidden = true; break; }
        if (s.overflowX !== "visible" || s.overflowY !== "visible") {
          const c = e.getBoundingClientRect();
          top = Math.max(top, c.top); bottom = Math.min(bottom, c.bottom);
          left = Math.max(left, c.left); right = Math.min(right, c.right);
        }
      }
      if (!hidden && bottom - top >= 0.5 * r.height && right - left > 0) { out.push(n.textContent); break; }
    }
  }
  return out.join(" ").replace(/\\s+/g, " ");
})()"""


def in_order(text: str, *words: str) -> bool:
    i = 0
    for w in words:
        i = text.find(w, i)
        if i < 0:
            return False
        i += len(w)
    return True


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not on PATH: `make browser` installs Debian's "
                    "chromium package (apt-get install -y chromium)")
def test_a_reviewer_sees_the_runs_and_the_leaderboard_in_the_mlflow_ui(server, evaluated):
    c, exp, runs = evaluated
    eid = exp.experiment_id
    # the leader with its values, in the paper's column order, as the standings' first line shows them
    leader = ("Leaderboard", "same", "PSNR", "100.00", "SSIM", "1.000", "LPIPS", "0.000", "FVD", "0.0")

    def first_screen(browser, until):
        browser.wait_text(lambda t: "Leaderboard" in t)  # the app has loaded the experiment
        end, text = time.monotonic() + 60, ""
        while time.monotonic() < end:
            text = browser.evaluate(VISIBLE_TEXT) or ""
            if until(text):
                break
            time.sleep(0.5)
        return text

    with Chromium(find_chromium()) as browser:
        # the address Loom prints (`loom leaderboard`, `loom runs`): the runs of a model-training experiment, with
        # the standings above them, on the first screen
        browser.open(ui_url(server, eid))
        seen = first_screen(browser, lambda t: in_order(t, *leader) and "noisy" in t and "Run Name" in t)
        assert in_order(seen, *leader), seen
        assert "Run Name" in seen and "noisy" in seen  # the runs table, not the GenAI overview
        assert not any(w in seen for w in ("Latency", "Tool calls", "No data available")), seen
        # the full table is there to unfold, each row linking to its run's page
        rid = runs["same"].info.run_id
        assert browser.evaluate(f"!!document.querySelector('a[href*=\"runs/{rid}\"]')")
        # an address without the view (the UI's own default is GenAI): the standings still head the page
        browser.open(f"{server}/#/experiments/{eid}")
        seen = first_screen(browser, lambda t: in_order(t, *leader))
        assert in_order(seen, *leader), seen
        # each run's page shows its metrics at full precision (JavaScript's shortest round-trip form, as repr)
        for name in ("same", "noisy"):
            r = runs[name]
            browser.open(ui_url(server, eid, r.info.run_id))
            want = [m for k, v in r.data.metrics.items() for m in (k, repr(v) if v != int(v) else str(int(v)))]
            text = browser.wait_text(lambda t, want=want: all(w in t for w in want))
            assert all(w in text for w in want), (want, text[-3000:])
            assert "tiny-random" in text  # the feature networks are in plain sight
        # the evaluation media play in the UI's artifact viewer (an FFV1 file, say, would not)
        noisy = runs["noisy"].info.run_id
        browser.open(f"{server}/#/experiments/{eid}/runs/{noisy}/artifacts/media/sphere000.mp4")
        end, size = time.monotonic() + 60, None
        while time.monotonic() < end and not (size and size[0] > 0):
            size = browser.evaluate("(() => { const v = document.querySelector('video'); "
                                    "return v ? [v.videoWidth, v.videoHeight] : null })()")
            time.sleep(0.5)
        assert size and size[0] > 0 and size[1] > 0, f"the video did not play: {size}"
