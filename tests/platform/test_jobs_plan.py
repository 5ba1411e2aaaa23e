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
    assert storage.read_json(storage.join(out, PLAN))["shards"][0]["tasks"][0]["params"] == {"radius": 2.0,
                                                                                               "height_z": 0.1}


@pytest.mark.parametrize("change", [dict(shas=("a", "b", "d")), dict(chash="h2")])
def test_rerun_with_other_assets_or_config_is_refused(tmp_path, change):
    load_or_write_plan(_spec(str(tmp_path), {"p": 1}))
    with pytest.raises(RuntimeError, match="already holds a ttv job with a different"):
        load_or_write_plan(_spec(str(tmp_path), {"p": 1}, **change))
