"""Imports run one way, and every error class the package defines shares one base.

The import graph is read from the source (``ast``), not from ``sys.modules``: every
``import``/``from ... import`` anywhere in a module counts, at module level and inside
functions, relative ones resolved. Two granularities must both be acyclic:

- files: an edge ``a -> b`` when ``a`` imports module ``b`` (``from pkg import name`` is an
  edge to ``pkg.name`` when that is a module, else to ``pkg``, i.e. its ``__init__``);
- sub-packages: each module maps to its first-level unit (``partialfc.head``,
  ``partialfc.dist``, ...; ``partialfc/__init__.py`` is the unit ``partialfc``); edges inside
  one unit are dropped.

Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``; those implicit edges are left
out, else every module would import the top-level re-exports and everything would be a cycle.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import partialfc
from partialfc.errors import PartialFCError
from tests.ast_helpers import import_base

ROOT = Path(partialfc.__file__).parent


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("partialfc", *path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def add(dotted: str) -> None:
        while dotted and dotted not in modules:  # ``import a.b.Name``: the longest module prefix
            dotted = dotted.rpartition(".")[0]
        if dotted and dotted != name:
            targets.add(dotted)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = import_base(node, package)
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {t for t in targets if t.startswith("partialfc")}


def unit(module: str) -> str:
    """The first-level unit of a module: ``partialfc.head.sampler`` -> ``partialfc.head``."""
    return ".".join(module.split(".")[:2])


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with a cycle (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(sorted(c)[0], c, graph) for c in components]


def _cycle_through(start: str, component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path ``start -> ... -> start`` inside ``component`` (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph.get(v, set()) & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is in a cycle but no path returns to it")


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for source, targets in graph.items():
        units.setdefault(unit(source), set()).update(unit(t) for t in targets if unit(t) != unit(source))
    return units


def test_the_graph_reader_resolves_imports_and_finds_cycles(tmp_path):
    """The checker itself, on a small package written here: absolute, relative, function-level
    and ``from pkg import module`` imports become edges; the cycles come back as paths."""
    pkg = tmp_path / "partialfc"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from partialfc.a import thing\n")
    (pkg / "errors.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from .one import thing\n")
    (pkg / "a" / "one.py").write_text("from ..errors import X\n\ndef f():\n    from partialfc.a import two\n")
    (pkg / "a" / "two.py").write_text("import partialfc.a.one\nfrom partialfc import errors\n")
    modules = {"partialfc": pkg / "__init__.py", "partialfc.errors": pkg / "errors.py",
               "partialfc.a": pkg / "a" / "__init__.py", "partialfc.a.one": pkg / "a" / "one.py",
               "partialfc.a.two": pkg / "a" / "two.py"}
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph == {"partialfc": {"partialfc.a"}, "partialfc.errors": set(), "partialfc.a": {"partialfc.a.one"},
                     "partialfc.a.one": {"partialfc.errors", "partialfc.a.two"},
                     "partialfc.a.two": {"partialfc.a.one", "partialfc.errors"}}
    assert find_cycles(graph) == [["partialfc.a.one", "partialfc.a.two", "partialfc.a.one"]]
    assert find_cycles(unit_graph(graph)) == []
    assert find_cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == [["x", "y", "z", "x"]]


def test_no_import_cycle_between_files():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles between files:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycle_between_subpackages():
    graph = import_graph()
    cycles = find_cycles(unit_graph(graph))
    detail = []
    for cycle in cycles:  # name the file-level imports behind each package edge
        for a, b in zip(cycle, cycle[1:]):
            detail += [f"  {s} imports {t}" for s, targets in sorted(graph.items()) if unit(s) == a
                       for t in sorted(targets) if unit(t) == b]
    assert not cycles, ("import cycles between sub-packages:\n"
                        + "\n".join(" -> ".join(c) for c in cycles) + "\n" + "\n".join(detail))


def test_errors_module_imports_nothing_of_the_package():
    """Every module may raise these errors, so ``partialfc.errors`` sits below all of them."""
    assert import_graph()["partialfc.errors"] == set()


def error_classes() -> list[tuple[str, str]]:
    """``(module, class name)`` of every class named ``*Error`` defined in the package."""
    found = []
    for name, path in module_files().items():
        found += [(name, node.name) for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.ClassDef) and node.name.endswith("Error")]
    return found


def test_every_error_class_derives_from_partialfc_error():
    classes = error_classes()
    assert len(classes) >= 6, classes  # InputError, ConfigError, CheckpointError, ... at least
    for module, name in classes:
        assert issubclass(getattr(importlib.import_module(module), name), PartialFCError), f"{module}.{name}"


@pytest.mark.parametrize("name, builtin", [("InputError", ValueError), ("ConfigError", ValueError),
                                           ("CheckpointError", RuntimeError), ("LaunchError", RuntimeError),
                                           ("RecordIOError", ValueError), ("VerificationBinError", ValueError),
                                           ("InputNotFoundError", FileNotFoundError), ("ExportError", ValueError),
                                           ("TrainingDiverged", RuntimeError)])
def test_errors_are_exported_at_top_level_and_keep_their_builtin(name, builtin):
    error = getattr(partialfc, name)
    assert name in partialfc.__all__ and issubclass(error, PartialFCError) and issubclass(error, builtin)
