"""Tiny 4D corpora for training tests: the fake swinging arm (`loom.render.fake.arm_sequence`, the contract of
the Blender extraction) through the 4D job's own mesh processing (`loom.corpora.shape4d.process_sequence`),
written as real Loom shards with a manifest and the job's config.yaml, without Ray (seconds, not minutes); and the
tiny VAE and 4D runs trained on them with the `loom` command, shared by the shape-VAE, 4D-training and inference
tests."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import yaml

from loom.datasets import shape4d as schema
from loom.render import fake
from loom.corpora.shape4d import process_sequence
from loom.platform import shards


def make_4d_corpus(out: str, samples: int = 2, frames: int = 4, size: int = 32, surface: int = 512,
                   queries: int = 32, sdf_near: int = 384, sdf_volume: int = 128, truncation: float = 0.05,
                   per_shard: int = 2) -> list[str]:
    """``samples`` arm sequences seen from different azimuths, in shards of ``per_shard``; the points settings
    (and ``sdf_truncation``) go into ``out/config.yaml`` as the 4D job writes them."""
    points = {"surface": surface, "queries": queries, "query_candidates": 4 * surface, "inner_threshold": 0.05,
              "watertight_resolution": 3000, "sdf_near": sdf_near, "sdf_volume": sdf_volume,
              "sdf_truncation": truncation}
    names, keys = [], []
    for s in range(0, samples, per_shard):
        items = []
        for i in range(s, min(samples, s + per_shard)):
            camera = {"azimuth": 0.3 + 2 * math.pi * i / max(samples, 1), "elevation": 0.3, "fill": 0.85}
            params = {"asset_path": __file__, "frames": frames, "width": size, "height": size, "camera": camera}
            seq = fake.arm_sequence(params)
            info = seq.pop("info")
            arrays = process_sequence({**seq, "half_extent": 0.5}, points, seed=i, timings={})
            arrays.update(video=seq["video"], K=seq["K"], c2w=seq["c2w"])
            meta = {"kind": "4d", "uid": f"arm{i}", "seed": i, "half_extent": 0.5,
                    "frame_times": [float(x) for x in seq["frame_times"]], "normalization": info["normalization"]}
            items.append((f"arm{i:03d}", schema.encode_sample(arrays, meta)))
        name = shards.shard_name("4d", len(names))
        sz, sha, k = shards.write_tar(shards.shard_url(out, name), items)
        shards.write_sidecar(out, shards.ShardRecord(name=name, samples=len(k), size=sz, sha256=sha, keys=k))
        names.append(name)
        keys += k
    shards.write_manifest(out, names, extra={"kind": "4d"})
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump({"points": points, "sequence": {"frames": frames, "half_extent": 0.5}}, f)
    return keys


# ------------------------------------------------------------------------------------------ trained tiny runs
# The VAE and 4D runs below take a minute each and are read by the training tests of both model lines and by the
# inference tests: each is made once per test session under one folder (its MLflow database beside the runs).

LOOM = os.path.join(os.path.dirname(sys.executable), "loom")
FRAMES = 4
S4_SETS = ("trainer.max_steps=24", "trainer.checkpoint_every=2", "optim.lr=3e-3", "data.batch_size=2")


def once(tmp_path_factory, name: str, make) -> str:
    """``make(path)`` the first time in this test session, then the same ``<session tmp>/shape4d/<name>``; a
    folder whose ``make`` failed is made again from scratch."""
    root = tmp_path_factory.getbasetemp() / "shape4d"
    path, done = root / name, root / f".{name}.done"
    if not done.exists():
        shutil.rmtree(path, ignore_errors=True)
        root.mkdir(exist_ok=True)
        make(str(path))
        done.touch()
    return str(path)


def loom(*args, env=None, check=True):
    """``loom ARGS`` in a subprocess, as a user runs it (one thread; no MLflow URI inherited from the developer's
    shell, only one that ``env`` names)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    e.pop("MLFLOW_TRACKING_URI", None)
    e.update(env or {})
    p = subprocess.run([LOOM, *args], capture_output=True, text=True, env=e, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"loom {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def loom_train(model, out, data, *sets, env=None, resume=False, check=True):
    args = ["train", model, "--recipe", "tiny", "--data", data, "--out", out, "--set", "trainer.progress=false"]
    for s in sets:
        args += ["--set", s]
    # the default MLflow store, in $LOOM_HOME: beside the run, where mlflow_runs() reads it
    env = {"LOOM_HOME": os.path.dirname(out), **(env or {})}
    return loom(*args, *(["--resume"] if resume else []), env=env, check=check)


def mlflow_runs(out, metric="train/loss"):
    """({run name: [(run id, [(step, value)], run)]}, client) of the MLflow database beside ``out``."""
    import mlflow

    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{os.path.join(os.path.dirname(out), 'mlflow.db')}")
    res = {}
    for r in c.search_runs([c.get_experiment_by_name("loom").experiment_id]):
        hist = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, metric))
        res.setdefault(r.info.run_name, []).append((r.info.run_id, hist, r))
    return res, c


def shared_corpus(tmp_path_factory) -> str:
    """Two arm sequences of FRAMES frames (the corpus every 4D test and run reads)."""
    return once(tmp_path_factory, "4d", lambda p: make_4d_corpus(p, samples=2, frames=FRAMES))


def trained_vae(tmp_path_factory, corpus: str) -> str:
    """A tiny VAE run trained 30 steps with ZeRO-3 (parameters sharded: the save gathers them), sample meshes
    every 10."""
    return once(tmp_path_factory, "vae", lambda p: loom_train(
        "vae", p, corpus, "trainer.max_steps=30", "trainer.checkpoint_every=30", "trainer.zero_stage=3",
        "sample.every=10"))


def base_folder(tmp_path_factory) -> str:
    """A tiny random base DiT saved as a pretrained base (spatiotemporal=False)."""
    from loom.models.shape4d_dit import Shape4DDiT

    return once(tmp_path_factory, "base", lambda p: Shape4DDiT.tiny(seed=3, spatiotemporal=False).save_pretrained(p))


def trained_shape4d(tmp_path_factory, corpus: str, vae_run: str, base_dir: str) -> str:
    """A tiny 4D run (the run named ``full``): S4_SETS on the trained VAE and the saved base."""
    return once(tmp_path_factory, "full", lambda p: loom_train(
        "shape4d", p, corpus, *S4_SETS, f"model.base={base_dir}", f"model.vae={vae_run}/vae"))
