"""Readers shared by the infra/ checks: the YAML manifests, the Dockerfile, pyproject pins and constraints.txt."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
RAY_UP = INFRA / "ray-up"
DOCKERFILE = INFRA / "Dockerfile"
CONSTRAINTS = INFRA / "constraints.txt"
IMAGE_REGISTRY = "registry.example.com/loom"  # the placeholder the manifests use (docs: replace with yours)


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[dict]:
    """Every non-empty document of a (multi-document) YAML file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)]


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_objects() if d["kind"] == kind]


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) of a RayCluster, RayJob, Deployment or StatefulSet."""
    spec = obj.get("spec", {})
    if obj["kind"] == "RayJob":
        spec = spec.get("rayClusterSpec")
        if spec is None:
            return []
    if obj["kind"] in ("RayCluster", "RayJob"):
        out = [("head", spec["headGroupSpec"]["template"])]
        out += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
        return out
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return [(obj["metadata"]["name"], spec["template"])]
    return []


# ---- pins ----------------------------------------------------------------------------------------------------------
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def project_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = pyproject()["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def exact_pin(name: str, extras: tuple[str, ...] = ("render", "train", "eval", "dev")) -> str:
    """The version infra/constraints.txt pins `name` to (pyproject.toml holds ranges; a test of test_images checks
    that each range admits its pin). `name` must be a requirement of `extras`."""
    assert canonicalize_name(name) in {canonicalize_name(r.name) for r in project_requirements(extras)}, (
        f"{name} is not a requirement of pyproject's {extras} extras")
    return constraints()[canonicalize_name(name)]


def constraints_python() -> str:
    """The Python version constraints.txt was generated with (its header), the images' Python."""
    return re.search(r"^# Python (\d+\.\d+\.\d+);", CONSTRAINTS.read_text(), re.M).group(1)


def applies_to_constraints(req: Requirement) -> bool:
    """Whether `req` applies on the constraints' Python (bpy differs by Python version: environment markers)."""
    python = constraints_python()
    env = {"python_version": python.rsplit(".", 1)[0], "python_full_version": python, "extra": ""}
    return req.marker is None or req.marker.evaluate(env)


def constraints() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            out[canonicalize_name(name)] = version
    return out


# ---- Dockerfile ----------------------------------------------------------------------------------------------------
@dataclass
class Instruction:
    line: int
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # continuation lines joined, comments inside them dropped


@dataclass
class Stage:
    name: str
    base: str  # image reference or the name of an earlier stage, with ARGs substituted
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name). Enough of the Dockerfile grammar for these checks: line continuations,
    comment lines inside them, ARG substitution in FROM."""
    instructions: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            current = stages[name] = Stage(name, image)
        elif current is None:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before the first FROM"
            key, _, value = ins.args.partition("=")
            global_args[key] = value
        else:
            current.instructions.append(ins)
    return global_args, stages


def stage_args(stage: Stage) -> dict[str, str]:
    return {k: v for k, _, v in (i.args.partition("=") for i in stage.all("ARG"))}


def ancestry(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built on, nearest first."""
    out = [stages[name]]
    while out[-1].base in stages:
        out.append(stages[out[-1].base])
    return out


def run_commands(ins: Instruction) -> list[list[str]]:
    """A RUN instruction's shell commands split at &&, ||, ; and pipes, as argv lists (mount flags dropped)."""
    args = re.sub(r"^(--\S+\s+)+", "", ins.args)
    return [shlex.split(part) for part in re.split(r"&&|\|\||;|\|", args) if part.strip()]


def expand(word: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), word)
