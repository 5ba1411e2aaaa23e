"""The house rules of CONVENTIONS.md, checked on every `make test` so that a wrong arrow fails CI instead of waiting
for a reviewer: the import-linter contracts of pyproject.toml ([tool.importlinter]: layers, training apart from
inference, eval through inference, render below corpora), and what import-linter cannot see, read from the source
with ``ast``:

- every ``loom`` import names a module that exists (import-linter silently drops imports of missing modules, so a
  stale path left behind by a move would otherwise pass the contracts);
- no private name (leading underscore) is imported from another top-level package;
- no import cycle between the modules of src/loom, counting imports inside functions (they are cycles the moment
  both functions run);
- entry points named by string (``importlib.import_module``) only where a process boundary needs them;
- models stay single-device files.

Imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PYPROJECT = ROOT / "pyproject.toml"

# Where an entry point may be named by a string: the function runs in another process (a sandboxed Blender child, a
# Ray task), which receives "module:function" and imports it there.
STRING_IMPORT_ALLOWED = {"loom.platform.sandbox", "loom.platform.jobs"}

# A model file is a single-device network (CONVENTIONS.md, "Models are single-device files").
NOT_IN_MODELS = ("torch.distributed", "deepspeed", "lightning", "pytorch_lightning", "ray", "mlflow", "bpy")


# ---------------------------------------------------------------------------------------------------- reading source


def _module_files() -> dict[str, Path]:
    """Every module of the ``loom`` package by dotted name (a package by its own name, for its ``__init__.py``)."""
    modules = {}
    for path in sorted((SRC / "loom").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


@dataclass(frozen=True)
class Import:
    importer: str  # the module whose source holds the statement
    target: str  # the loom module it imports (the package, for a name defined in its __init__)
    names: tuple[str, ...]  # what the statement takes from the target ("" for `import loom.x`)
    line: int
    resolved: bool  # False: no such module in src/loom

    def where(self) -> str:
        return f"{MODULES[self.importer].relative_to(ROOT)}:{self.line}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of the tree except the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


@functools.cache
def _trees() -> dict[str, ast.AST]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _absolute(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _is_loom(name: str) -> bool:
    return name == "loom" or name.startswith("loom.")


@functools.cache
def _imports() -> list[Import]:
    found = []
    for importer, tree in _trees().items():
        for node in _statements(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_loom(alias.name):
                        found.append(Import(importer, alias.name, ("",), node.lineno, alias.name in MODULES))
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(importer, node)
                if not _is_loom(base):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in MODULES:  # `from loom.platform import shards`: the submodule
                        found.append(Import(importer, sub, ("",), node.lineno, True))
                    else:  # a name defined in the module (or in the package's __init__)
                        found.append(Import(importer, base, (alias.name,), node.lineno, base in MODULES))
    return found



def _top(module: str) -> str:
    """The top-level package a module belongs to: ``loom.eval.metrics.iou`` -> ``loom.eval``."""
    return ".".join(module.split(".")[:2])


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# ---------------------------------------------------------------------------------------------------- import-linter


def _lint_imports() -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                                                                 "lint_imports_command()"]
    env = dict(os.environ, PYTHONPATH=str(SRC))  # the working tree, whatever is installed
    return subprocess.run([*cmd, "--no-cache", "--no-logo", str(PYPROJECT)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_linter_contracts_are_kept():
    pytest.importorskip("importlinter", reason="pip install -e '.[dev]' (import-linter holds the layers)")
    run = _lint_imports()
    assert run.returncode == 0, f"an import breaks a layer contract of pyproject.toml [tool.importlinter]:\n" \
                                f"{run.stdout}\n{run.stderr}"
    assert "0 broken" in run.stdout and " kept" in run.stdout, run.stdout


def _contracts():
    """(contract, graph) with the contracts of pyproject.toml and the import graph of src/loom."""
    grimp = pytest.importorskip("grimp", reason="pip install -e '.[dev]' (import-linter holds the layers)")
    from importlinter import api  # noqa: F401 - configures import-linter's settings
    from importlinter.application.use_cases import read_user_options
    from importlinter.contracts.forbidden import ForbiddenContract
    from importlinter.contracts.independence import IndependenceContract
    from importlinter.contracts.layers import LayersContract

    kinds = {"layers": LayersContract, "independence": IndependenceContract, "forbidden": ForbiddenContract}
    options = read_user_options(str(PYPROJECT))
    contracts = {c["id"]: kinds[c["type"]](name=c["name"], session_options=options.session_options,
                                          contract_options=c) for c in options.contracts_options}
    sys.path.insert(0, str(SRC))
    try:
        graph = grimp.build_graph("loom", cache_dir=None)
    finally:
        sys.path.remove(str(SRC))
    return contracts, graph


@pytest.mark.parametrize("importer, imported, contract", [
    ("loom.geometry.camera", "loom.platform.config", "layers"),  # pure math reaching up
    ("loom.models.ttv_dit", "loom.training.launch", "layers"),  # a network knowing its trainer
    ("loom.render.fake", "loom.corpora.ttv", "render-below-corpora"),
    ("loom.inference", "loom.training.launch", "training-inference"),
    ("loom.eval.benchmarks", "loom.training.launch", "eval-uses-inference"),
    ("loom.datasets.codecs", "loom.models.flow", "layers"),  # siblings of one layer
])
def test_the_contracts_catch_a_wrong_arrow(importer, imported, contract):
    """The same contracts, on the graph of today plus one wrong import, are broken: they hold something."""
    from copy import deepcopy

    contracts, graph = _contracts()
    graph = deepcopy(graph)
    graph.add_import(importer=importer, imported=imported, line_number=1, line_contents=f"import {imported}")
    assert not contracts[contract].check(graph, verbose=False).kept


# ---------------------------------------------------------------------------------------------------- what ast sees


def test_every_loom_import_names_an_existing_module():
    missing = [f"{i.where()}: imports {i.target} (names {', '.join(i.names)}), which is not a module of src/loom"
               for i in _imports() if not i.resolved]
    assert not missing, "imports of modules that do not exist (a move left them behind):\n" + "\n".join(missing)


def test_no_private_name_crosses_a_package():
    crossing = []
    for i in _imports():
        if _top(i.importer) == _top(i.target):
            continue
        private = [n for n in i.names if _private(n)] + [p for p in i.target.split(".") if _private(p)]
        if private:
            crossing.append(f"{i.where()}: {i.importer} imports {', '.join(private)} from {i.target}")
    assert not crossing, ("private names imported from another package (make them public where they live, or move "
                          "the code that needs them):\n" + "\n".join(crossing))


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in _imports():
        if i.resolved and i.target != i.importer:
            graph[i.importer].add(i.target)
    return graph


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative: the import graph may be deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                components.append(sorted(component))
    return components


def _cycle_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle inside a strongly connected component, from its first module back to it (breadth first)."""
    inside, start = set(component), component[0]
    parent: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & inside):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return component


def import_cycles() -> list[list[str]]:
    graph = _graph()
    return [_cycle_through(graph, c) for c in _strongly_connected(graph) if len(c) > 1]


def test_strongly_connected_components_of_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(_strongly_connected(graph)) == [["a", "b", "c"], ["d"], ["e"]]
    assert _cycle_through(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycles = import_cycles()
    lines = []
    graph = _graph()
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            at = next(i.where() for i in _imports() if i.importer == a and i.target == b)
            lines.append(f"    {a} imports {b} at {at}")
        assert all(b in graph[a] for a, b in zip(cycle, cycle[1:]))
    assert not cycles, ("import cycles (module-level or inside functions; move the shared part down a layer):\n"
                        + "\n".join(lines))


def _import_module_calls(tree: ast.AST) -> Iterator[ast.Call]:
    for node in _statements(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
                    isinstance(f, ast.Name) and f.id in ("import_module", "__import__")):
                yield node


def test_entry_points_are_named_by_string_only_at_process_boundaries():
    """A dependency hidden in a string is one no contract sees: import the module. Strings stay where the code runs
    in another process (the sandbox, Ray tasks). Literal names of other packages (optional extras) are fine."""
    hidden = []
    for module, tree in _trees().items():
        if module in STRING_IMPORT_ALLOWED:
            continue
        for call in _import_module_calls(tree):
            arg = call.args[0] if call.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not _is_loom(arg.value):
                continue
            what = ast.unparse(arg) if arg is not None else "?"
            hidden.append(f"{MODULES[module].relative_to(ROOT)}:{call.lineno}: import_module({what})")
    assert not hidden, ("modules named by string outside a process boundary (import them directly; allowed only in "
                        f"{sorted(STRING_IMPORT_ALLOWED)}):\n" + "\n".join(hidden))


def test_models_are_single_device_files():
    found = []
    for module, tree in _trees().items():
        if _top(module) != "loom.models":
            continue
        for node in _statements(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                names += [f"torch.{a.name}" for a in node.names]
            for name in names:
                if any(name == bad or name.startswith(bad + ".") for bad in NOT_IN_MODELS):
                    found.append(f"{MODULES[module].relative_to(ROOT)}:{node.lineno}: {name}")
    assert not found, ("a model file imports distributed or job machinery (sharding intent is declared with "
                       "_no_split_modules and applied by loom.training.launch):\n" + "\n".join(found))


def test_the_ast_checks_see_what_they_look_for(tmp_path):
    """The checks above, on a small made-up source, find a private import, a function-level import and a string
    import: they can fail."""
    source = ("from loom.platform.config import _hidden\n"
              "def f():\n    from loom.eval import metrics\n    import importlib\n"
              "    return importlib.import_module('loom.cli')\n"
              "if TYPE_CHECKING:\n    from loom.cli import main\n")
    tree = ast.parse(source)
    froms = [n for n in _statements(tree) if isinstance(n, ast.ImportFrom)]
    assert sorted(n.module for n in froms) == ["loom.eval", "loom.platform.config"]  # TYPE_CHECKING body left out
    assert _private("_hidden") and not _private("__version__")
    assert [ast.unparse(c.args[0]) for c in _import_module_calls(tree)] == ["'loom.cli'"]
