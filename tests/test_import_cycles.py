"""No import cycle inside `ichdata`: each module stands on the ones below it.

The configuration lives below the stages that read it (`ichdata.config`), the cluster's credentials below
both cluster routes (`ichdata.security`), so that no stage imports one that imports it back. Every import
counts, wherever it is written: at the top, inside a function, or under `TYPE_CHECKING` (a cycle there
still means two modules that cannot be understood one without the other). Read from the source with
`ast`, nothing imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module of the package folder `package` (dotted name) and the package's modules it imports.

    `from pkg import name` imports the module `pkg.name` where there is one (a submodule: the package's
    `__init__` is then merely initialised first, as for any import of a submodule), else `pkg` itself.
    """
    modules: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of `graph` with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _described(graph: dict[str, set[str]], cycles: list[list[str]]) -> str:
    return "; ".join(", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles)


def test_ichdata_has_no_import_cycle() -> None:
    graph = import_graph(ROOT / "ichdata")
    assert {"ichdata.config", "ichdata.convert", "ichdata.dicom.header"} <= set(
        graph
    )  # its modules were found
    cycles = import_cycles(graph)
    assert not cycles, _described(graph, cycles)


def test_the_cycle_check_finds_a_cycle_through_any_import(tmp_path: Path) -> None:
    """A function-level or `TYPE_CHECKING` import closes a cycle too; a package naming its submodules does not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import B\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.x import X\n")
    (pkg / "sub" / "x.py").write_text("from pkg.sub import y\n")
    (pkg / "sub" / "y.py").write_text("import os\n")
    graph = import_graph(pkg)
    assert graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.sub.x"] == {"pkg.sub.y"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
