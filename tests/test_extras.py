"""Every extra stands alone where the README says it does: what `loom generate` and `loom eval ... --run` import
(loom.inference, loom.models and what they reach below) is installed by the core dependencies plus the `eval`
extra, with no need for `train` (Lightning, DeepSpeed). An import guarded by ``except ImportError`` is optional.
The static scan is backed by a run: `loom eval ttv --run` in a process where every module that only the `train` or
`render` extras install fails to import."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "loom"
# What `--run` loads: inference, the networks it builds, and the pure layers under them.
PACKAGES = ("inference", "models", "datasets", "geometry")


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def _optional(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            return True
    return False


def third_party_imports(files) -> dict[str, set[str]]:
    """top-level module -> files importing it unguarded (module level or inside functions)."""
    found: dict[str, set[str]] = {}
    for path in files:
        tree = ast.parse(path.read_text())
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("loom", "__future__") or _optional(node, parents):
                    continue
                found.setdefault(top, set()).add(str(path))
    return found


def test_eval_extra_installs_what_generation_imports():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = {_name(r) for r in meta["dependencies"] + meta["optional-dependencies"]["eval"]}
    files = [f for p in PACKAGES for f in (SRC / p).rglob("*.py")]
    dists = md.packages_distributions()
    missing = {}
    for module, where in third_party_imports(files).items():
        names = {_name(d) for d in dists.get(module, [module])}
        if not names & allowed:
            missing[module] = sorted(where)
    assert not missing, f"imported by what `--run` loads but not in the core or `eval` dependencies: {missing}"


def test_the_check_sees_a_missing_distribution(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    import lightning\n    try:\n        import ftfy\n    except ImportError:\n        pass\n")
    assert set(third_party_imports([f])) == {"lightning"}


# ---- the eval extra, run without what only train and render install -------------------------------------------------
def installed_closure(lines: list[str]) -> set[str]:
    """Canonical names of the installed distributions that `lines` (requirements, markers evaluated here) pull in,
    transitively, through the installed metadata; requirements not installed here are left out."""
    todo = [Requirement(line) for line in lines]
    todo = [(r.name, frozenset(r.extras)) for r in todo if r.marker is None or r.marker.evaluate({"extra": ""})]
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        names.add(canonicalize_name(dist.metadata["Name"]))
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((req.name, frozenset(req.extras)))
    return names


def modules_only_in(extras: tuple[str, ...], beside: tuple[str, ...]) -> list[str]:
    """Top-level modules of the installed distributions that `extras` install and core + `beside` do not."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    opt = meta["optional-dependencies"]
    only = (installed_closure([r for e in extras for r in opt[e]])
            - installed_closure(meta["dependencies"] + [r for e in beside for r in opt[e]]))
    return sorted(m for m, dists in md.packages_distributions().items()
                  if not m.startswith("_") and {canonicalize_name(d) for d in dists} & only)


def test_the_blocked_modules_are_the_train_and_render_only_ones():
    blocked = modules_only_in(("train", "render"), ("eval",))
    if importlib_ok("lightning"):
        assert {"lightning", "pytorch_lightning"} <= set(blocked)
    if importlib_ok("deepspeed"):
        assert "deepspeed" in blocked
    for shared in ("torch", "diffusers", "peft", "mlflow", "ray", "numpy", "safetensors"):
        assert shared not in blocked, f"{shared} is in the eval extra, yet would be blocked"


def importlib_ok(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.integration
def test_eval_with_run_needs_nothing_that_only_train_or_render_installs(tmp_path):
    """`loom eval ttv --run RUN` (generation from a training run folder, then the metrics, recorded in MLflow) in a
    process where importing any module of a distribution that only the train or render extras install fails."""
    pytest.importorskip("mlflow")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from tests.eval import bench_data
    from tests.eval.test_commands import untrained_ttv_run

    gt = bench_data.make_ttv_case(str(tmp_path / "case"), samples=1, frames=9)["gt"]
    run = untrained_ttv_run(tmp_path, gt, frames=9)
    blocked = modules_only_in(("train", "render"), ("eval",))
    code = ("import sys\n"
            f"for m in {blocked!r}:\n"
            "    sys.modules[m] = None\n"
            "from loom.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            f"leaked = sorted(m for m in sys.modules if m.split('.')[0] in {blocked!r} and sys.modules[m] is not None)\n"
            "assert not leaked, leaked\n"
            "sys.exit(rc)\n")
    argv = ["eval", "ttv", "--recipe", "tiny", "--gt", gt, "--run", run, "--out", str(tmp_path / "ev"),
            "--set", "limit=1", "--set", "metrics=[psnr,ssim]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOOM_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600, env=env,
                       cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert os.path.isfile(tmp_path / "ev" / "pred" / "sphere000.mkv"), os.listdir(tmp_path / "ev")
