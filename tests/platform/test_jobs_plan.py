"""The shard plan (plan.json): reruns into the same folder agree on what goes where, whatever the parameters'
layout; a different config or asset list is refused."""

from __future__ import annotations

import pytest

from loom.platform import storage
from loom.platform.jobs import PLAN, JobSpec, Task, load_or_write_plan
from loom.platform.ray import RaySettings


def _spec(out: str, params: dict, shas=("a", "b", "c"), chash: str = "h1") -> JobSpec:
    tasks = [Task(key=f"k{i}", asset={"uid": f"u{i}", "sha256": s}, params=dict(params), frames=1)
             for i, s in enumerate(shas)]
    return JobSpec(kind="ttv", entry="x:y", tasks=tasks, out=out, config={}, config_hash=chash, timeout_s=1.0,
                   ray=RaySettings(), samples_per_shard=2)


def test_rerun_with_another_parameter_layout_reuses_the_plan(tmp_path):
    out = str(tmp_path)
    first = load_or_write_plan(_spec(out, {"radius": 2.0, "height_z": 0.1}))
    again = load_or_write_plan(_spec(out, {"orbit": {"radius": 2.0, "height": 0.1}}))
    assert [s["name"] for s in first] == [s["name"] for s in again] == ["ttv-000000.tar", "ttv-000001.tar"]
    assert storage.read_json(storage.join(out, PLAN))["shards"][0]["tasks"][0][4] == {"radius": 2.0,
                                                                                       "height_z": 0.1}


@pytest.mark.parametrize("change", [dict(shas=("a", "b", "d")), dict(chash="h2")])
def test_rerun_with_other_assets_or_config_is_refused(tmp_path, change):
    load_or_write_plan(_spec(str(tmp_path), {"p": 1}))
    with pytest.raises(RuntimeError, match="already holds a ttv job with a different"):
        load_or_write_plan(_spec(str(tmp_path), {"p": 1}, **change))


def _objaverse_like(tmp_path, n: int):
    """n asset records as an Objaverse manifest has them: long remote paths, annotations."""
    from loom.corpora.assets import AssetRecord

    return [AssetRecord(uid=f"{i:032x}", source="objaverse", license="CC-BY-4.0", size=123456, format="glb",
                        path=f"s3://objaverse-bucket/hf-objaverse-v1/glbs/000-{i % 160:03d}/{i:032x}.glb",
                        sha256=f"{i:064x}", annotations={"name": "a chair " * 8, "animationCount": 0,
                                                         "categories": ["furniture"] * 4})
            for i in range(n)]


def test_render_plan_is_small_per_task_and_expands_to_the_same_params(tmp_path):
    from loom.corpora import ttv
    from loom.corpora.base import job_spec, sample_config_hash
    from loom.platform import config as c
    from loom.platform.config import to_dict

    # the paper recipe; the fake backend: job_spec checks Blender's HDRIs otherwise (no bpy on Python 3.12)
    cfg = c.resolve(ttv.RenderTTVJob, "default", c.parse_set([f"out={tmp_path / 'o'}", "render.backend=fake"]))
    records = _objaverse_like(tmp_path, 50)
    spec = job_spec(cfg, records)
    assert len(spec.tasks) == 200 and all(t.params is None for t in spec.tasks)
    load_or_write_plan(spec)
    url = storage.join(spec.out, PLAN)
    per_task = storage.size(url) / len(spec.tasks)
    assert per_task <= 300, per_task  # issue 22: <= 0.3 KB a task (was ~2.3 KB with the parameters inside)
    doc = storage.read_json(url)
    assert len(doc["assets"]) == 50 and "annotations" not in doc["assets"][0]
    # the worker's parameters are those the task drew in the driver, and a pure function of (asset, variant)
    t = spec.tasks[5]
    want = to_dict(cfg.task(t.asset, t.variant, sample_config_hash(cfg)))
    assert spec.params(t) == want and spec.params(t) == spec.params(t)
    assert want["lighting"]["hdri"] == cfg.lighting.hdris[t.variant] and t.key.endswith(f"_v{t.variant}")


def test_a_plan_of_the_first_format_resumes_and_is_rewritten(tmp_path):
    out = str(tmp_path)
    spec = _spec(out, {"p": 1})
    old = {"kind": "ttv", "config_hash": "h1", "shards": [
        {"name": "ttv-000000.tar", "tasks": [{"key": "k0", "asset": {"uid": "u0", "sha256": "a"}, "params": {"p": 0},
                                              "frames": 1},
                                             {"key": "k1", "asset": {"uid": "u1", "sha256": "b"}, "params": {"p": 0},
                                              "frames": 1}]},
        {"name": "ttv-000001.tar", "tasks": [{"key": "k2", "asset": {"uid": "u2", "sha256": "c"}, "params": {"p": 0},
                                              "frames": 1}]}]}
    storage.write_json(storage.join(out, PLAN), old)
    plan = load_or_write_plan(spec)
    assert [[t.key for t in s["tasks"]] for s in plan] == [["k0", "k1"], ["k2"]]
    doc = storage.read_json(storage.join(out, PLAN))
    assert doc["format"] == "loom-plan/2" and doc["shards"][1]["tasks"][0][4] == {"p": 1}  # today's parameters
    old["shards"][1]["tasks"][0]["asset"]["sha256"] = "zz"
    storage.write_json(storage.join(out, PLAN), old)
    with pytest.raises(RuntimeError, match="different asset list"):
        load_or_write_plan(spec)


def test_assets_total_scales_the_estimate_and_prices_it():
    from loom.platform.jobs import Estimate, PriceSettings

    spec = _spec("/unused", {"frames": 4}, shas=("a", "b", "c", "d"))
    from loom.platform.jobs import estimate

    here = estimate(spec, calibrate=False)
    big = estimate(spec, calibrate=False, assets_total=30000, assets_here=2, price=PriceSettings(cpu_core_hour=0.1))
    assert (here.tasks, here.frames, here.shards) == (4, 4, 2)
    assert (big.tasks, big.frames, big.shards, big.assets) == (60000, 60000, 30000, 30000)
    e = Estimate(tasks=1000, shards=250, frames=61000, seconds_per_frame=3.6, seconds_per_task_fixed=10.0,
                 bytes_per_frame=0.4e6, threads=2, workers=8, gpu=True, price=PriceSettings(
                     cpu_core_hour=0.05, gpu_hour=2.0, storage_tb_month=20.0),
                 bytes_by_encoding={"precise": 0.4e6, "model-input": 0.1e6}, encoding="precise")
    hours = 1000 * (10.0 + 3.6 * 61) / 3600
    assert e.core_hours == pytest.approx(hours * 2) and e.gpu_hours == pytest.approx(hours)
    assert e.cost()["compute"] == pytest.approx(hours * 2 * 0.05 + hours * 2.0)
    assert e.cost()["storage_month"] == pytest.approx(61000 * 0.4e6 / 1e12 * 20.0)
    text = e.report()
    assert "model-input" in text and "6.100 GB" in text and "24.400 GB" in text and "<- this job" in text and "GPU-hours" in text


def test_prices_do_not_change_what_a_corpus_is():
    from loom.corpora.base import sample_config_hash
    from loom.corpora.latents import NON_SAMPLE_FIELDS as LATENTS
    from loom.corpora.latents4d import NON_SAMPLE_FIELDS as LATENTS4D
    from loom.corpora.scene import RenderSceneJob
    from loom.corpora.shape4d import Render4DJob
    from loom.corpora.ttv import RenderTTVJob
    from loom.platform import config as c

    for cls in (RenderTTVJob, Render4DJob, RenderSceneJob):
        a = c.resolve(cls, "default")
        b = c.resolve(cls, "default", [("price.cpu_core_hour", 9.0), ("price.currency", "EUR")])
        assert sample_config_hash(a) == sample_config_hash(b), cls  # a corpus begun before still resumes
    assert "price" in LATENTS and "price" in LATENTS4D
