"""The package's shape, held by its own imports: no import circle (function-local
imports included), subpackages that import only those below them, a cheap
`import worldlm_jax`, and no module that only tests import."""
import ast
import os
import subprocess
import sys

import worldlm_jax

ROOT = os.path.dirname(worldlm_jax.__file__)
# bottom to top: a subpackage (or top-level module) imports only those before it
FLOORS = ("errors", "tree_ops", "model", "outputs", "plugins", "tree", "data", "privacy", "engine", "config", "run",
          "sweeps", "cli")
TOP = ("__init__", "moved")  # the package's lazy API and the old paths: they import by name, at run time


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = "worldlm_jax." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(module: str, path: str) -> set[str]:
    """The package modules `module` imports, anywhere in its body (function-local too)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_module_imports_itself_back_through_others():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(GRAPH[m]):
            assert state.get(d) != 1, f"import circle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_every_module_sits_on_a_floor():
    floors = {_floor(m) for m in MODULES}
    assert floors <= set(FLOORS) | set(TOP), floors - set(FLOORS) - set(TOP)


def test_subpackages_import_only_the_floors_below():
    rank = {f: i for i, f in enumerate(FLOORS)}
    upward = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
              if _floor(m) not in TOP and _floor(d) != _floor(m) and rank[_floor(d)] > rank[_floor(m)]]
    assert not upward, upward


def test_every_module_is_used_by_the_package():
    """A module only tests import is a path the engine left behind."""
    used = {d for deps in GRAPH.values() for d in deps}
    entry = {"worldlm_jax", "worldlm_jax.cli", "worldlm_jax.cli.__main__"}  # the package; `worldlm`, `python -m`
    packages = {m for m, p in MODULES.items() if p.endswith("__init__.py")}  # imported as `worldlm_jax.<name>`
    assert not set(MODULES) - used - entry - packages, sorted(set(MODULES) - used - entry - packages)


def test_importing_the_package_does_not_load_jax():
    code = "import sys, worldlm_jax; assert 'jax' not in sys.modules, 'jax loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
