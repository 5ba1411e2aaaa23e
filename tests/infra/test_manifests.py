"""infra/kuberay: the manifests parse, validate against KubeRay's CRD schemas (vendored) and Kubernetes' own schemas
(kubernetes-validate), and refer to each other, to the images and to Loom's CLI consistently."""

from __future__ import annotations

import copy
import io
import json
import re
import shlex
from contextlib import redirect_stderr, redirect_stdout

import jsonschema
import pytest
import yaml

from tests.infra.infra_files import (DOCKERFILE, IMAGE_REGISTRY, INFRA, KUBERAY, constraints, exact_pin, k8s_objects,
                                     load_docs, of_kind, parse_dockerfile, pod_templates, pyproject, yaml_files)

KUBERAY_SCHEMA = INFRA / "schemas" / "kuberay-v1.7.0.json"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest and newest Kubernetes these manifests are checked against
CORE_KINDS = {"Secret", "Service", "Deployment", "StatefulSet", "PersistentVolumeClaim"}

try:
    import kubernetes_validate
except ImportError:  # the `infra` extra
    kubernetes_validate = None
needs_kubernetes_validate = pytest.mark.skipif(
    kubernetes_validate is None, reason="kubernetes-validate not installed: `make infra-check` or "
    "pip install -e '.[infra]'")


def test_every_yaml_file_parses():
    files = yaml_files()
    assert len(files) >= 8, files
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} holds no YAML document"
        assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"


def test_the_manifests_hold_the_objects_the_docs_describe():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in k8s_objects())
    assert ("RayCluster", "loom") in kinds
    assert {("RayJob", "loom-render-ttv"), ("RayJob", "loom-train-ttv")} <= set(kinds)
    assert {("Deployment", "mlflow"), ("Service", "mlflow"), ("StatefulSet", "mlflow-db"),
            ("Service", "mlflow-db")} <= set(kinds)
    assert {("Secret", "loom-object-store"), ("Secret", "loom-mlflow-db")} <= set(kinds)
    for _, obj in k8s_objects():
        assert "namespace" not in obj["metadata"], "namespaces come from kubectl -n, not the files"


# ---- KubeRay CRD schemas -------------------------------------------------------------------------------------------
def strict(schema):
    """Refuse unknown fields, as `kubectl apply` (server-side field validation, strict) does: an object schema with
    properties and no additionalProperties or x-kubernetes-preserve-unknown-fields gets additionalProperties false.
    Without this a misspelt field (minReplica) validates, and the API server would drop it silently."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def kuberay():
    doc = json.loads(KUBERAY_SCHEMA.read_text())
    assert doc["x-source"]["license"] == "Apache-2.0" and re.fullmatch(r"[0-9a-f]{40}", doc["x-source"]["commit"])
    defs = strict(doc["$defs"])

    def validator(kind: str):
        return jsonschema.Draft202012Validator({"$defs": defs, "$ref": f"#/$defs/{kind}"})

    return {kind: validator(kind) for kind in ("RayCluster", "RayJob")}


def errors(validator, obj) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_ray_objects_validate_against_the_kuberay_crd(kuberay, kind):
    objs = of_kind(kind)
    assert objs
    for obj in objs:
        assert obj["apiVersion"] == "ray.io/v1"
        assert errors(kuberay[kind], obj) == [], obj["metadata"]["name"]


@pytest.mark.parametrize("mutate, expect", [
    (lambda c: c["spec"]["workerGroupSpecs"][0].update(minReplica=1), "minReplica"),  # misspelt field
    (lambda c: c["spec"]["workerGroupSpecs"][0].update(maxReplicas="4"), "maxReplicas"),  # wrong type
    (lambda c: c["spec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),  # required
    (lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolicy=3), "image"),
    (lambda c: c["spec"]["workerGroupSpecs"][1]["template"]["spec"].update(nodeselector={}), "nodeselector"),
])
def test_kuberay_validation_catches_broken_clusters(kuberay, mutate, expect):
    cluster = copy.deepcopy(of_kind("RayCluster")[0])
    mutate(cluster)
    found = errors(kuberay["RayCluster"], cluster)
    assert found and any(expect in e for e in found), found


def test_kuberay_validation_catches_a_broken_job(kuberay):
    job = copy.deepcopy(next(j for j in of_kind("RayJob") if "rayClusterSpec" in j["spec"]))
    job["spec"]["shutdownAfterJobFinish"] = True
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    found = errors(kuberay["RayJob"], job)
    assert any("shutdownAfterJobFinish" in e for e in found) and any("num-cpus" in e for e in found), found


def cluster_spec(obj: dict) -> dict:
    """A RayCluster's spec, or the spec of the cluster a RayJob creates ({} for a job on an existing cluster)."""
    return obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"].get("rayClusterSpec", {})


def test_worker_groups_have_sane_autoscaling_bounds():
    """minReplicas <= replicas <= maxReplicas (KubeRay's webhook rule, not part of the CRD schema)."""
    for obj in of_kind("RayCluster") + of_kind("RayJob"):
        for group in cluster_spec(obj).get("workerGroupSpecs", []):
            lo, n, hi = group["minReplicas"], group.get("replicas", group["minReplicas"]), group["maxReplicas"]
            assert 0 <= lo <= n <= hi, f"{obj['metadata']['name']}/{group['groupName']}: {lo} <= {n} <= {hi}"


def test_the_cluster_has_a_cpu_render_group_and_a_gpu_training_group():
    (cluster,) = of_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "tasks must not land on the head"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    render, train = groups["render-cpu"], groups["train-gpu"]
    assert render["maxReplicas"] > render["minReplicas"] >= 0 and train["maxReplicas"] > train["minReplicas"] >= 0
    render_pod, train_pod = render["template"]["spec"], train["template"]["spec"]
    render_res = render_pod["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in render_res.get("limits", {}) and "tolerations" not in render_pod
    assert render_pod["containers"][0]["image"].split("/")[-1].startswith("loom-render:")
    gpu = train_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpu) >= 1 and train_pod["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == gpu
    assert any(t["key"] == "nvidia.com/gpu" for t in train_pod["tolerations"]) and train_pod["nodeSelector"]
    assert train_pod["containers"][0]["image"].split("/")[-1].startswith("loom-train:")


# ---- Kubernetes' own schemas ---------------------------------------------------------------------------------------
@needs_kubernetes_validate
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_against_kubernetes_schemas(version):
    checked = 0
    for _, obj in k8s_objects():
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, version, strict=True)
            checked += 1
    assert checked >= 7


@needs_kubernetes_validate
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_ray_pod_templates_validate_against_kubernetes_schemas(version):
    """The pod templates inside RayCluster/RayJob, checked as core PodTemplates too (KubeRay's CRD embeds them)."""
    for obj in of_kind("RayCluster") + of_kind("RayJob"):
        for where, template in pod_templates(obj):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"x-{where}"},
                       "template": template}
            kubernetes_validate.validate(wrapped, version, strict=True)


@needs_kubernetes_validate
def test_kubernetes_validation_catches_a_broken_deployment():
    deployment = copy.deepcopy(next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["envfrom"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# ---- references between the files ---------------------------------------------------------------------------------
def containers(obj):
    for _, template in pod_templates(obj):
        yield from template["spec"]["containers"]


def test_secret_and_volume_references_resolve():
    secrets = {s["metadata"]["name"]: set(s.get("stringData", s.get("data", {}))) for s in of_kind("Secret")}
    claims = {p["metadata"]["name"] for p in of_kind("PersistentVolumeClaim")}
    for _, obj in k8s_objects():
        for c in containers(obj):
            for ref in c.get("envFrom", []):
                assert ref["secretRef"]["name"] in secrets, f"{obj['metadata']['name']}: {ref}"
            for env in c.get("env", []):
                key = env.get("valueFrom", {}).get("secretKeyRef")
                if key:
                    assert key["key"] in secrets.get(key["name"], ()), f"{obj['metadata']['name']}: {key}"
        for _, template in pod_templates(obj):
            names = {v["name"] for v in template["spec"].get("volumes", [])}
            names |= {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
            for v in template["spec"].get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, v
            for c in template["spec"]["containers"]:
                assert {m["name"] for m in c.get("volumeMounts", [])} <= names, c["name"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secrets["loom-object-store"]


def test_every_ray_pod_gets_object_storage_credentials_and_the_tracking_server():
    (mlflow_svc,) = [s for s in of_kind("Service") if s["metadata"]["name"] == "mlflow"]
    expected = f"http://mlflow:{mlflow_svc['spec']['ports'][0]['port']}"
    for obj in of_kind("RayCluster") + of_kind("RayJob"):
        for c in containers(obj):
            assert {"secretRef": {"name": "loom-object-store"}} in c.get("envFrom", []), c["name"]
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI") == expected, f"{obj['metadata']['name']}/{c['name']}"


def test_services_select_their_pods():
    workloads = of_kind("Deployment") + of_kind("StatefulSet")
    for svc in of_kind("Service"):
        selector = svc["spec"]["selector"]
        matches = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"Service {svc['metadata']['name']} selects {len(matches)} workloads"
        ports = {p["name"] for c in matches[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    for w in workloads:
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()


def test_mlflow_server_uses_a_database_and_s3_artifacts():
    (deployment,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[:2] == ["mlflow", "server"]
    assert any(re.fullmatch(r"--artifacts-destination=s3://\S+", a) for a in args)
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "loom-mlflow-db"
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "mlflow:5000" in hosts, "the Ray pods' Host header (http://mlflow:5000) must be allowed"
    (db,) = of_kind("StatefulSet")
    assert db["spec"]["volumeClaimTemplates"], "the database needs a persistent volume"
    image = db["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"postgres:\d+\.\d+-\w+", image), f"{image} is not a pinned PostgreSQL image"
    uri = next(s for s in of_kind("Secret") if s["metadata"]["name"] == "loom-mlflow-db")["stringData"]
    assert uri["MLFLOW_BACKEND_STORE_URI"].startswith(f"postgresql://{uri['POSTGRES_USER']}:")
    assert f"@{db['metadata']['name']}:5432/{uri['POSTGRES_DB']}" in uri["MLFLOW_BACKEND_STORE_URI"]


def test_images_are_dockerfile_targets_at_the_project_version():
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    version = pyproject()["project"]["version"]
    for _, obj in k8s_objects():
        for c in containers(obj):
            if c["image"].startswith("postgres:"):
                continue
            registry, _, name_tag = c["image"].rpartition("/")
            name, _, tag = name_tag.partition(":")
            assert registry == IMAGE_REGISTRY and tag == version, c["image"]
            assert name.startswith("loom-") and name[5:] in stages, f"{c['image']}: no Dockerfile target {name[5:]}"


def test_ray_versions_agree():
    """rayVersion (KubeRay picks probes by it) = the ray the images install."""
    ray = constraints()["ray"]
    specs = [cluster_spec(obj) for obj in of_kind("RayCluster") + of_kind("RayJob")]
    assert len([s for s in specs if s]) >= 2
    for spec in specs:
        if spec:
            assert spec["rayVersion"] == ray


def test_rayjobs_target_a_cluster():
    names = {c["metadata"]["name"] for c in of_kind("RayCluster")}
    for job in of_kind("RayJob"):
        spec = job["spec"]
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), job["metadata"]["name"]
        if "clusterSelector" in spec:
            assert spec["clusterSelector"]["ray.io/cluster"] in names
            assert "shutdownAfterJobFinishes" not in spec, "a job on a shared cluster must not delete it"
        else:
            assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


# ---- the entrypoints are valid Loom commands -----------------------------------------------------------------------
def loom_print_config(argv: list[str]) -> tuple[int, str]:
    """Run `loom ARGV --print-config` in this process: parses every option and --set key, renders nothing."""
    from loom.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main([*argv, "--print-config"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue() + err.getvalue()


def test_rayjob_entrypoints_are_valid_loom_commands():
    for job in of_kind("RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "loom", job["spec"]["entrypoint"]
        rc, output = loom_print_config([a for a in argv[1:] if a != "--no-progress"])
        assert rc == 0, f"{job['metadata']['name']}: {output[-500:]}"
        config = yaml.safe_load(output)
        if argv[1] == "render":
            assert config["out"].startswith("s3://") and config["ray"]["address"] == "auto"
        else:
            assert config["data"]["source"].startswith("s3://") and config["ray"]["address"] == "auto"
            assert config["ray"]["gpus_per_worker"] >= 1
            assert config["out"].startswith("/runs/"), "training --out must be on the shared loom-runs volume"
            group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
            gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            assert config["ray"]["workers"] == gpus * group["maxReplicas"], "one rank per GPU"


def test_a_wrong_entrypoint_is_refused():
    rc, output = loom_print_config(["train", "ttv", "--set", "ray.worker=2"])
    assert rc != 0 and "ray.worker" in output


def test_mlflow_image_pin_matches_the_client():
    """The server image's MLflow is pyproject's pin (the train extra), so the REST API versions agree."""
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    args = dict(i.args.split("=", 1) for i in stages["mlflow"].all("ARG"))
    assert args["MLFLOW_VERSION"] == exact_pin("mlflow", ("train",))
    assert KUBERAY.joinpath("mlflow.yaml").exists()
