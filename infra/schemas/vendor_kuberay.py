"""Vendor the parts of KubeRay's CRD schemas that Loom's manifests need, as one JSON Schema document.

    git clone --branch v1.7.0 https://github.com/ray-project/kuberay /tmp/kuberay
    python infra/schemas/vendor_kuberay.py /tmp/kuberay --ref v1.7.0 > infra/schemas/kuberay-v1.7.0.json

From `ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml` it keeps the served, stored version `v1` of
each CRD's `openAPIV3Schema`, without `status` (the operator writes it, manifests never do). It changes nothing
else, but to keep the file small it writes each repeated subschema once under `$defs` and points to it with `$ref`:
the pod template (`PodTemplateSpec`, identical for the head, the worker groups and the RayJob submitter) and the
cluster spec (`RayClusterSpec`, identical in a RayCluster's `spec` and a RayJob's `spec.rayClusterSpec`). The script
checks that those subschemas are identical before it merges them, so a KubeRay release where they differ fails here.

KubeRay is Apache-2.0 licensed (LICENSE-kuberay beside this file); so is this derived schema.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import yaml

CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CRD_DIR = "ray-operator/config/crd/bases"


def _read(repo: Path, ref: str | None, relpath: str) -> str:
    if ref is None:
        return (repo / relpath).read_text()
    git_dir = repo / ".git" if (repo / ".git").exists() else repo  # a work tree or a bare mirror
    return subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{ref}:{relpath}"], check=True,
                          capture_output=True, text=True).stdout


def v1_schema(crd_text: str, kind: str) -> dict:
    crd = yaml.safe_load(crd_text)
    if crd["spec"]["names"]["kind"] != kind:
        raise SystemExit(f"expected the CRD of {kind}, found {crd['spec']['names']['kind']}")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    if not (version["served"] and version["storage"]):
        raise SystemExit(f"{kind} v1 is not the served storage version")
    schema = version["schema"]["openAPIV3Schema"]
    schema["properties"].pop("status", None)
    return schema


def _hoist(schema: dict, path: list[str], defs: dict, name: str) -> None:
    parent = schema
    for key in path[:-1]:
        parent = parent[key]
    sub = parent[path[-1]]
    if name in defs and defs[name] != sub:
        raise SystemExit(f"{'.'.join(path)} differs from the {name} found before: vendor by hand")
    defs[name] = sub
    parent[path[-1]] = {"$ref": f"#/$defs/{name}"}


def vendor(repo: Path, ref: str | None) -> dict:
    commit = None
    if ref is not None:
        git_dir = repo / ".git" if (repo / ".git").exists() else repo
        commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", f"{ref}^{{commit}}"], check=True,
                                capture_output=True, text=True).stdout.strip()
    cluster = v1_schema(_read(repo, ref, f"{CRD_DIR}/{CRDS['RayCluster']}"), "RayCluster")
    job = v1_schema(_read(repo, ref, f"{CRD_DIR}/{CRDS['RayJob']}"), "RayJob")
    defs: dict = {}
    p = "properties"
    for spec in (cluster[p]["spec"], job[p]["spec"][p]["rayClusterSpec"]):
        _hoist(spec, [p, "headGroupSpec", p, "template"], defs, "PodTemplateSpec")
        _hoist(spec, [p, "workerGroupSpecs", "items", p, "template"], defs, "PodTemplateSpec")
    _hoist(job, [p, "spec", p, "submitterPodTemplate"], defs, "PodTemplateSpec")
    _hoist(cluster, [p, "spec"], defs, "RayClusterSpec")
    _hoist(job, [p, "spec", p, "rayClusterSpec"], defs, "RayClusterSpec")
    defs["RayCluster"], defs["RayJob"] = cluster, job
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "KubeRay CRD schemas (ray.io/v1 RayCluster, RayJob), vendored by infra/schemas/vendor_kuberay.py; "
                    "validate with {'$ref': '#/$defs/RayCluster'} or '#/$defs/RayJob'.",
        "x-source": {
            "repository": "https://github.com/ray-project/kuberay",
            "ref": ref,
            "commit": commit,
            "files": [f"{CRD_DIR}/{f}" for f in CRDS.values()],
            "license": "Apache-2.0",
        },
        "$defs": defs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", type=Path, help="a KubeRay checkout or bare git mirror")
    parser.add_argument("--ref", help="a tag or commit to read with git show (default: the files in the work tree)")
    args = parser.parse_args()
    print(json.dumps(vendor(args.repo, args.ref), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
