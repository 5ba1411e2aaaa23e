"""Every extra stands alone where the README says it does: what `loom generate` and `loom eval ... --run` import
(loom.inference, loom.models and what they reach below) is installed by the core dependencies plus the `eval`
extra, with no need for `train` (Lightning, DeepSpeed). An import guarded by ``except ImportError`` is optional."""

from __future__ import annotations

import ast
import importlib.metadata as md
import pathlib
import re
import sys
import tomllib

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
