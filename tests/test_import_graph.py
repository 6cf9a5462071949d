"""codi_nnsight's import graph, read with `ast`: no import cycles, no private names across subpackages.

Every `import` / `from ... import` statement counts, including those inside functions (they run
when the function does, and a cycle through them is a cycle all the same); only imports under
`if TYPE_CHECKING:` are left out (they never run). An edge goes to the module that defines what
is imported: `from .a import b` is an edge to `a.b` when that is a module, else to `a`. Names a
package's `__getattr__` resolves on first use (`_lazy.lazy_getattr`) are not import statements
and are not edges.

A private name (one dotted part starting with `_`, not a dunder) belongs to the package that
holds it: `patching.store._write_atomic_nc` to `patching`, `_lazy` to `codi_nnsight`. Modules in
that package and its subpackages may import it; others may not.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import codi_nnsight

PACKAGE_DIR = Path(codi_nnsight.__file__).resolve().parent


@dataclass(frozen=True)
class Edge:
    """One import: `source` imports `target` (the module), naming `name` from it, at `where` (file:line)."""

    source: str
    target: str
    imported: str  # the dotted name as imported, e.g. codi_nnsight.patching.store._write_atomic_nc
    where: str


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package in folder `root`: dotted name -> file (a package is its `__init__.py`)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([package, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those only run under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children: list[ast.AST] = list(node.orelse)  # the `else:` branch does run
        else:
            children = list(ast.iter_child_nodes(node))
        for child in children:
            visit(child)

    visit(tree)
    return found


def _scope(module: str, modules: dict[str, Path]) -> str:
    """The package a module belongs to: itself for a package, else its parent."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def _known_prefix(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `dotted` that is one of `modules` (None: not this package's)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def import_edges(modules: dict[str, Path], root: Path) -> list[Edge]:
    """The imports between `modules`, each resolved to the module that defines what it imports."""
    edges: list[Edge] = []
    for source, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        scope = _scope(source, modules)
        where = f"{path.relative_to(root.parent).as_posix()}"
        for node in _import_nodes(tree):
            if isinstance(node, ast.Import):
                dotted = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = scope.split(".")[: len(scope.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                dotted = [f"{base}.{alias.name}" for alias in node.names]
            for name in dotted:
                target = _known_prefix(name, modules)
                if target is not None:
                    edges.append(Edge(source, target, name, f"{where}:{node.lineno}"))
    return edges


def cycles(edges: list[Edge]) -> list[tuple[list[str], list[Edge]]]:
    """Each strongly connected component (Tarjan) that holds a cycle, with one shortest cycle through it."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
        graph.setdefault(e.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # recursion depth <= number of modules (about 60)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for component in sorted(components):
        inside = set(component)
        start = component[0]
        # breadth-first from `start` back to `start` inside the component: a shortest cycle
        paths: dict[str, list[Edge]] = {start: []}
        queue = [start]
        cycle: list[Edge] | None = None
        while queue and cycle is None:
            v = queue.pop(0)
            for w, e in sorted(graph[v].items()):
                if w == start:
                    cycle = [*paths[v], e]
                    break
                if w in inside and w not in paths:
                    paths[w] = [*paths[v], e]
                    queue.append(w)
        assert cycle is not None
        found.append((component, cycle))
    return found


def private_imports(edges: list[Edge], modules: dict[str, Path]) -> list[Edge]:
    """Imports of a private name by a module outside the package that holds it."""
    bad = []
    for e in edges:
        parts = e.imported.split(".")
        importer = _scope(e.source, modules)
        for i, part in enumerate(parts):
            if not part.startswith("_") or (part.startswith("__") and part.endswith("__")):
                continue
            holder = ".".join(parts[:i])
            owner = _scope(holder, modules) if holder in modules else holder
            if not (importer == owner or importer.startswith(owner + ".")):
                bad.append(e)
                break
    return bad


def _describe_cycle(component: list[str], cycle: list[Edge]) -> str:
    """`a -> b -> a   (a.py:3, b.py:9)`, and the whole component when it is larger than the cycle."""
    text = " -> ".join(e.source for e in cycle) + f" -> {cycle[0].source}   (" + ", ".join(e.where for e in cycle) + ")"
    return text if len(component) == len(cycle) else f"{text}; the cycle's component: {', '.join(component)}"


def _package_graph() -> tuple[dict[str, Path], list[Edge]]:
    modules = modules_of(PACKAGE_DIR, "codi_nnsight")
    return modules, import_edges(modules, PACKAGE_DIR)


# -- the checker on a package written for the test ---------------------------------------------
def _write_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for name, text in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return pkg


def test_checker_finds_cycles_through_function_level_and_relative_imports(tmp_path: Path) -> None:
    pkg = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a/__init__.py": "",
            "a/x.py": "def f():\n    from ..b import y\n",  # inside a function: still an edge
            "b/__init__.py": "",
            "b/y.py": "from pkg.a import x\n",  # absolute
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\n",
            "d.py": "from . import c\n",  # c -> d only under TYPE_CHECKING: no cycle
        },
    )
    modules = modules_of(pkg, "pkg")
    edges = import_edges(modules, pkg)
    assert {(e.source, e.target) for e in edges} == {("pkg.a.x", "pkg.b.y"), ("pkg.b.y", "pkg.a.x"), ("pkg.d", "pkg.c")}
    found = cycles(edges)
    assert [(m, [(e.source, e.target) for e in c]) for m, c in found] == [
        (["pkg.a.x", "pkg.b.y"], [("pkg.a.x", "pkg.b.y"), ("pkg.b.y", "pkg.a.x")])
    ]
    assert _describe_cycle(*found[0]) == "pkg.a.x -> pkg.b.y -> pkg.a.x   (pkg/a/x.py:2, pkg/b/y.py:1)"


def test_checker_flags_private_names_from_another_subpackage_only(tmp_path: Path) -> None:
    pkg = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "_util.py": "def helper(): ...\n",
            "cli.py": "from .store.io import _write\nfrom .store import _io\nfrom .store.io import __all__\n",
            "store/__init__.py": "",
            "store/io.py": "from .._util import helper\ndef _write(): ...\n",  # a parent's private module: fine
            "store/_io.py": "",
            "store/sweep.py": "from .io import _write\n",  # the same subpackage: fine
        },
    )
    modules = modules_of(pkg, "pkg")
    bad = private_imports(import_edges(modules, pkg), modules)
    assert [(e.source, e.imported, e.where) for e in bad] == [
        ("pkg.cli", "pkg.store.io._write", "pkg/cli.py:1"),
        ("pkg.cli", "pkg.store._io", "pkg/cli.py:2"),
    ]


# -- codi_nnsight itself ------------------------------------------------------------------------
def test_the_graph_covers_every_module_and_reads_function_level_imports() -> None:
    modules, edges = _package_graph()
    assert {"codi_nnsight", "codi_nnsight.cli", "codi_nnsight.accessor", "codi_nnsight.patching.sweep"} <= set(modules)
    pairs = {(e.source, e.target) for e in edges}
    # `_register_accessor` imports the accessor inside a function; `api.report` the analysis likewise
    assert ("codi_nnsight", "codi_nnsight.accessor") in pairs
    assert ("codi_nnsight.api", "codi_nnsight.analysis.report") in pairs


def test_no_import_cycles() -> None:
    _, edges = _package_graph()
    found = [_describe_cycle(m, c) for m, c in cycles(edges)]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_no_private_names_imported_from_another_subpackage() -> None:
    modules, edges = _package_graph()
    bad = [f"{e.where}: {e.source} imports {e.imported}" for e in private_imports(edges, modules)]
    assert not bad, "private names imported across subpackages:\n" + "\n".join(bad)


if __name__ == "__main__":  # python tests/test_import_graph.py: list what the two checks find
    _modules, _edges = _package_graph()
    for _m, _c in cycles(_edges):
        print("cycle:", _describe_cycle(_m, _c))
    for _e in private_imports(_edges, _modules):
        print(f"private: {_e.where}: {_e.source} imports {_e.imported}")
    pytest.main([__file__, "-q"])
