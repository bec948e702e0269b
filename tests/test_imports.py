"""The package's import structure: no cycle, no module reading another's private name, a functional
core without Flax, tools loaded lazily."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

import jaxbn

PACKAGE = pathlib.Path(jaxbn.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, top_level_only: bool) -> set[str]:
    """The modules ``path`` imports (``from jaxbn import linen`` counts as ``jaxbn.linen``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    return {
        name: {m for m in _imports(path, top_level_only) if m in MODULES and m != name}
        for name, path in MODULES.items()
    }


def test_no_import_cycle_anywhere():
    """Every import in the package, at module level or inside a function, goes one way."""
    graph = _graph(top_level_only=False)
    for package in [name for name, path in MODULES.items() if path.name == "__init__.py"]:
        for edges in graph.values():  # a submodule importing its parent package is no edge back
            edges.discard(package)
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(child) :] + [child])}")
            if child not in state:
                visit(child, stack + [child])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def _private_names_read(name: str, path: pathlib.Path) -> list[str]:
    """The ``_names`` (not dunders, not modules) of other jaxbn modules that module ``name`` reads:
    ``module._name``, ``jaxbn.module._name`` or ``from jaxbn.module import _name``."""
    private = lambda attr: attr.startswith("_") and not attr.startswith("__")
    tree = ast.parse(path.read_text())
    bound = {"jaxbn": "jaxbn"}  # local name -> the jaxbn module it is
    read = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):  # import jaxbn.module as name
            bound.update((a.asname, a.name) for a in node.names if a.asname and a.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in MODULES:  # a module, private or not, is shared by design
                    bound[alias.asname or alias.name] = full
                elif private(alias.name) and node.module != name:
                    read.append(f"line {node.lineno}: {full}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not private(node.attr):
            continue
        owner, parts = node.value, []
        while isinstance(owner, ast.Attribute):
            owner, parts = owner.value, [owner.attr, *parts]
        if isinstance(owner, ast.Name) and owner.id in bound:
            module = ".".join([bound[owner.id], *parts])
            if module in MODULES and module != name:
                read.append(f"line {node.lineno}: {module}.{node.attr}")
    return read


def test_no_module_reads_another_modules_private_name():
    """What two jaxbn modules share lives in one place under a name that module exports
    (``DESIGN.md``)."""
    read = {name: _private_names_read(name, path) for name, path in MODULES.items()}
    assert not {name: names for name, names in read.items() if names}


def test_the_functional_core_imports_no_flax():
    """What `import jaxbn` loads (its module-level imports, transitively) names no flax module."""
    graph = _graph(top_level_only=True)
    loaded, todo = set(), ["jaxbn"]
    while todo:
        name = todo.pop()
        if name not in loaded:
            loaded.add(name)
            todo.extend(graph[name])
    assert "jaxbn.linen" not in loaded and "jaxbn.recalibration" not in loaded
    for name in loaded:
        flax = {
            m for m in _imports(MODULES[name], top_level_only=True) if m.split(".")[0] == "flax"
        }
        assert not flax, f"{name} imports {sorted(flax)} at import time"


@pytest.mark.slow
def test_import_jaxbn_loads_no_flax_in_a_fresh_interpreter():
    code = (
        "import sys, jaxbn; assert not [m for m in sys.modules if m.split('.')[0] == 'flax'], "
        "'flax was imported'; jaxbn.recalibrate; assert 'flax' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize(
    "function, module",
    [
        ("recalibrate", "jaxbn.recalibration"),
        ("fold_batch_norm", "jaxbn.folding"),
        ("inspect_batch_norms", "jaxbn.inspection"),
    ],
)
def test_tools_are_reachable_from_jaxbn_and_their_modules_are_modules(function, module):
    imported = importlib.import_module(module)
    assert type(imported).__name__ == "module"
    assert getattr(jaxbn, function) is getattr(
        imported, function
    )  # the function, also after the import
    assert function in jaxbn.__all__ and function in dir(jaxbn)


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'recalibration_tool'"):
        jaxbn.recalibration_tool  # noqa: B018
