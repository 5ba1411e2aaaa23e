"""Where Loom installs (infra/INSTALL.md): ranges in pyproject.toml that a GPU image's own torch satisfies, exact pins
only in infra/constraints.txt (which every environment made by the Makefile installs under), Blender by Python
version, the Python 3.12 run of CI without Blender, and the guard that keeps its skips to the Blender tests."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.conftest import HAS_BPY

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME_EXTRAS = ("data", "render", "train", "eval")


def requirements(extra: str, python: str | None = None) -> list[Requirement]:
    """The extra's requirements that apply on `python` ("3.12"; None: all of them)."""
    reqs = [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    if python is None:
        return reqs
    env = {"python_version": python, "python_full_version": f"{python}.0", "extra": extra}
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def test_every_supported_python_is_admitted():
    spec = SpecifierSet(PROJECT["requires-python"])
    assert all(Version(v) in spec for v in ("3.11.7", "3.12.1", "3.13.0"))
    assert not any(Version(v) in spec for v in ("3.10.13", "3.14.0"))


def test_runtime_extras_hold_ranges_and_admit_the_torch_of_gpu_images():
    """No == in the extras a user installs (the pins are constraints.txt's); torch >= 2.6 whatever the image has."""
    for extra in RUNTIME_EXTRAS:
        for req in requirements(extra):
            assert not any(s.operator in ("==", "===") for s in req.specifier), f"[{extra}] pins {req}"
        (torch,) = [r for r in requirements(extra) if r.name == "torch"]
        for version in ("2.6.0", "2.11.0+cu130", "2.13.0", "2.15.0"):
            assert torch.specifier.contains(version), f"[{extra}] {torch} refuses torch {version}"
        assert not torch.specifier.contains("2.5.1"), f"[{extra}] {torch}: Loom needs torch >= 2.6"


@pytest.mark.parametrize("python, admitted, refused", [
    ("3.11", ["5.0.1"], ["4.5.15", "5.1.2"]),  # the tested renderer (Blender 5.0), the images'
    ("3.13", ["5.1.0", "5.1.2"], ["5.0.1", "5.2.4", "5.3.0"]),  # 5.2+ wheels lack the Draco glTF bridge
    ("3.12", [], ["5.0.1"]),  # no bpy is built for 3.12: pip finds none and refuses [render]
])
def test_blender_is_chosen_by_python_version(python, admitted, refused):
    bpy = [r for r in requirements("render", python) if r.name == "bpy"]
    assert len(bpy) == 1, f"[render] on {python}: {bpy}"
    assert all(bpy[0].specifier.contains(v) for v in admitted), (python, bpy[0], admitted)
    assert not any(bpy[0].specifier.contains(v) for v in refused), (python, bpy[0], refused)
    for extra in ("data", "train", "eval"):
        assert "bpy" not in {r.name for r in requirements(extra)}, f"[{extra}] must not need Blender"


def test_the_data_extra_is_the_render_extra_without_blender():
    """What the Python 3.12 run installs for the data jobs' tests is what [render] installs, bpy aside."""
    render = {str(r) for r in requirements("render") if r.name != "bpy"}
    assert render == {str(r) for r in requirements("data")}


# ---- the Makefile and CI ----------------------------------------------------------------------------------------------
def dry_run(target: str) -> list[list[str]]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under `make test`
    out = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    lines = out.stdout.replace("\\\n", " ").splitlines()  # continuation lines joined
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("make")]


def pip_installs(commands: list[list[str]]) -> list[list[str]]:
    return [c for c in commands if "pip" in c and "install" in c and "-e" in c]


def test_every_environment_installs_under_the_constraints_file():
    for target, venv, extras in (("setup", ".venv", "render,train,eval,infra,dev"),
                                 ("test-py312", ".venv312", "data,train,eval,infra,dev")):
        commands = dry_run(target)
        (line,) = pip_installs(commands)
        assert line[1] == f"{venv}/bin/python", line
        assert line[line.index("-c") + 1] == "infra/constraints.txt", line
        assert line[-2:] == ["-e", f".[{extras}]"], line
        downloads = [c for c in commands if "pip" in c and "download" in c and "-c" in c]
        if target == "test-py312":  # PyPI's wheels kept in the repository's ignored cache, installed from there
            (download,) = downloads
            wheels = download[download.index("-d") + 1]
            assert wheels.startswith(".cache/") and line[line.index("--find-links") + 1] == wheels, (download, line)
            assert download[download.index("-c") + 1] == "infra/constraints.txt" and download[-1] == f".[{extras}]"
        else:
            assert not downloads and "--find-links" not in line, commands


def test_the_python_312_run_has_no_blender_and_fails_on_other_skips_and_on_no_tests():
    commands = dry_run("test-py312")
    (venv,) = [c[c.index("venv") - 2:] for c in commands if "venv" in c and c[c.index("venv") - 1] == "-m"]
    assert venv == ["python3.12", "-m", "venv", ".venv312"], venv
    (pytest_line,) = [" ".join(c) for c in commands if "pytest" in c]
    assert pytest_line.startswith(".venv312/bin/python -m pytest -q "), pytest_line
    assert "--allow-skips bpy|chromium;" in pytest_line, pytest_line
    ignored = [a.removeprefix("--ignore=") for a in pytest_line.split() if a.startswith("--ignore=")]
    assert all((ROOT / p).is_dir() for p in ignored), ignored
    for tier in ("tests/training", "tests/eval", "tests/inference", "tests/models", "tests/datasets"):
        assert tier not in ignored, f"the trainers' tests must run on 3.12: {tier}"
    for node in (a.removeprefix("--deselect=") for a in pytest_line.split() if a.startswith("--deselect=")):
        path, name = node.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), f"--deselect {node}: no such test (renamed?)"
    assert "$rc -eq 5" in pytest_line and "exit 1" in pytest_line  # nothing collected is a failure


def test_ci_runs_the_main_tests_then_the_python_312_run():
    """`.ci/run` is the README's test command, then the Python 3.12 run (issue 16: so installing on 3.12 cannot
    regress), with errors stopping it (set -e) and pyenv's 3.12 named when python3.12 is not on PATH."""
    text = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("make ")]
    assert commands == ["make test", "make test-py312"], commands
    assert "set -euo pipefail" in text and "PYENV_VERSION=3.12" in text
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme.split("\n## ")[0], "the README's first screen names the test command"


def test_the_python_312_environment_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    p = subprocess.run(["git", "check-ignore", "-q", ".venv312/bin/python"], cwd=ROOT)
    assert p.returncode == 0, ".venv312/ is not in .gitignore"


# ---- the skip guard of tests/conftest.py ------------------------------------------------------------------------------
GUARDED = '''
import pytest

def test_ok():
    pass

def test_skips_for_blender():
    pytest.importorskip("bpy_that_is_not_here", reason="needs bpy")
'''


def run_guarded(tmp_path, files: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """pytest on `files` with tests/conftest.py's hooks, outside Loom's own pytest settings."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text("from tests.conftest import (pytest_addoption, pytest_configure,\n"
                                          "                            pytest_collection_modifyitems)\n")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *args,
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_allowed_skips_pass(tmp_path):
    p = run_guarded(tmp_path, {"test_a.py": GUARDED}, "--allow-skips", "bpy")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 passed, 1 skipped" in p.stdout


def test_a_skip_for_another_reason_fails_the_run_and_is_named(tmp_path):
    other = GUARDED + "\ndef test_needs_a_library():\n    pytest.importorskip('ftfy_not_installed')\n"
    module_level = "import pytest\npytest.importorskip('lightning_not_installed')\n\ndef test_x():\n    pass\n"
    p = run_guarded(tmp_path, {"test_a.py": other, "test_b.py": module_level}, "--allow-skips", "bpy")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "skips not allowed by --allow-skips" in p.stdout
    assert "test_a.py::test_needs_a_library" in p.stdout and "ftfy_not_installed" in p.stdout
    assert "test_b.py" in p.stdout and "lightning_not_installed" in p.stdout
    assert "test_skips_for_blender: " not in p.stdout  # the allowed skip is not listed
    assert run_guarded(tmp_path, {}).returncode == 0  # without the option, skips are only reported


def test_blender_modules_skip_without_bpy_and_run_with_it(tmp_path):
    """A module named *blender* is marked `blender`; without bpy it skips saying so, with bpy it runs."""
    body = "def test_renders():\n    assert False, 'ran'\n"
    p = run_guarded(tmp_path, {"test_x_blender_e2e.py": body}, "--allow-skips", "bpy")
    if HAS_BPY:
        assert p.returncode == 1 and "ran" in p.stdout, p.stdout
    else:
        assert p.returncode == 0 and "1 skipped" in p.stdout and "needs Blender (bpy)" in p.stdout, p.stdout
