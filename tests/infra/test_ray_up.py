"""infra/ray-up: the cluster files validate against Ray's autoscaler schema (ray-schema.json of the installed Ray, and
Ray's own config check that `ray up` runs), their EC2 node configs against botocore's RunInstances model, and they set
nodes up the way the images do."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest

from tests.infra.infra_files import IMAGE_REGISTRY, RAY_UP, constraints, load_docs, pyproject

FILES = sorted(RAY_UP.glob("*.yaml"))
ray = pytest.importorskip("ray", reason="ray is not installed (render/train extras)")


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def config(path: Path) -> dict:
    (doc,) = load_docs(path)
    return doc


def test_both_cluster_files_exist():
    assert {p.name for p in FILES} == {"cluster.yaml", "cluster-docker.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_cluster_file_validates_against_ray_schema(path):
    validator = jsonschema.Draft7Validator(ray_schema())
    found = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config(path))]
    assert found == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_ray_up_accepts_the_cluster_file(path):
    """What `ray up` does first: fill in the provider's defaults, then validate (no cloud is contacted)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config(path)))


def test_ray_schema_catches_a_misspelt_field():
    bad = copy.deepcopy(config(FILES[0]))
    bad["available_node_types"]["render_cpu"]["max_worker"] = 3
    bad["docker"] = {"imagee": "x"}
    messages = [e.message for e in jsonschema.Draft7Validator(ray_schema()).iter_errors(bad)]
    assert any("max_worker" in m for m in messages) and any("imagee" in m for m in messages), messages


@pytest.fixture(scope="module")
def run_instances():
    """botocore's EC2 RunInstances input model (shipped with botocore, read offline) and a validator for it."""
    botocore = pytest.importorskip("botocore.session", reason="botocore is not installed (s3fs brings it)")
    from botocore.validate import ParamValidator

    shape = botocore.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape

    def check(node_config: dict) -> str:
        # Ray adds the counts and tags itself before it calls create_instances(**node_config).
        report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, shape)
        return report.generate_report() if report.has_errors() else ""

    return check


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_node_configs_are_valid_run_instances_parameters(path, run_instances):
    for name, node in config(path)["available_node_types"].items():
        assert run_instances(node["node_config"]) == "", name


def test_run_instances_validation_catches_a_misspelt_field(run_instances):
    node = copy.deepcopy(config(FILES[0])["available_node_types"]["train_gpu"]["node_config"])
    node["BlockDeviceMappings"][0]["Ebs"]["VolumeSizeGB"] = 10
    assert "VolumeSizeGB" in run_instances(node)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_the_cluster_has_a_cpu_render_kind_and_a_gpu_training_kind(path):
    cfg = config(path)
    types = cfg["available_node_types"]
    assert set(types) == {"head", "render_cpu", "train_gpu"} and cfg["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}, "tasks must not land on the head"
    for kind in ("render_cpu", "train_gpu"):
        assert 0 <= types[kind]["min_workers"] < types[kind]["max_workers"]
    assert cfg["max_workers"] >= types["render_cpu"]["max_workers"] + types["train_gpu"]["max_workers"]
    assert re.match(r"(c|m)\d", types["render_cpu"]["node_config"]["InstanceType"]), "render workers are CPU VMs"
    assert re.match(r"(p|g)\d", types["train_gpu"]["node_config"]["InstanceType"]), "training workers are GPU VMs"
    images = {t["node_config"]["ImageId"] for t in types.values()}
    assert len(images) == 1, "one AMI for every node: Ray needs the same Python patch version everywhere"


def test_vm_setup_runs_the_makefile_set_up_step():
    """cluster.yaml installs Loom as the images do: make setup under constraints.txt, then Ray's dashboard."""
    cfg = config(RAY_UP / "cluster.yaml")
    commands = [" ".join(c.split()) for c in cfg["setup_commands"]]
    assert "cd ~/loom && PIP_CONSTRAINT=infra/constraints.txt make setup" in commands
    ray_line = next(c for c in commands if "ray[default]" in c)
    assert f'"ray[default]=={constraints()["ray"]}"' in ray_line and "PIP_CONSTRAINT=infra/constraints.txt" in ray_line
    assert not any(re.search(r"pip install .*-e ", c) for c in commands), "Loom is installed by make setup only"
    assert cfg["file_mounts"] == {"/home/ubuntu/loom": "."}
    assert {".venv", ".cache", ".git"} <= set(cfg["rsync_exclude"])
    assert any("python3.11" in c for c in commands)


def test_docker_variant_runs_the_images():
    cfg = config(RAY_UP / "cluster-docker.yaml")
    version = pyproject()["project"]["version"]
    assert cfg["docker"]["image"] == f"{IMAGE_REGISTRY}/loom-render:{version}"
    gpu = cfg["available_node_types"]["train_gpu"]["docker"]["worker_image"]
    assert gpu == f"{IMAGE_REGISTRY}/loom-train:{version}"
    assert cfg["setup_commands"] == [], "the images hold Loom: nothing to install on the nodes"
