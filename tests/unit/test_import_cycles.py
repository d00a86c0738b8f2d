"""No import cycle in kaireon_pub or bench, and the worker never reaches the operator commands
(kaireon_pub/ops/) (issue 24): a test that reads every module's imports.

Every `import` and `from … import` statement counts, at module level and inside functions (an
import deferred into a function is a cycle all the same: it only moves the failure to the call).
Imports under `if TYPE_CHECKING:` never run and do not count. `from package import name` is an
edge to the submodule when `name` is one, else to the package. Importing a module runs its
packages' `__init__` first: the reach of a module counts them too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kaireon_pub", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, nested ones included, except under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = node.orelse
        stack.extend(children)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target:
                    found.add(target)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            if f"{base}.{alias.name}" in known:
                found.add(f"{base}.{alias.name}")
            elif base in known:
                found.add(base)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components with more than one module (each holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle through the component's first module, as a path that ends where it starts."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle in {component}")


def reach_paths(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module that importing `start` imports, directly or through others (with the packages
    each one's import runs first), each with one import path from `start` to it."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        parents = [".".join(node.split(".")[:i]) for i in range(1, node.count(".") + 1)]
        for nxt in sorted(graph.get(node, set()) | {p for p in parents if p in graph}):
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    return paths


def reaching(graph: dict[str, set[str]], sources: str, forbidden: str) -> list[str]:
    """The import paths from a module of package `sources` to one of package `forbidden`."""
    found = []
    for name in sorted(n for n in graph if n == sources or n.startswith(sources + ".")):
        for target, path in reach_paths(graph, name).items():
            if target == forbidden or target.startswith(forbidden + "."):
                found.append(" -> ".join(path))
                break
    return found


def test_no_import_cycle():
    graph = import_graph()
    cycles = [" -> ".join(a_cycle(graph, c)) for c in strongly_connected(graph)]
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_the_walk_sees_function_level_imports_and_names_a_cycle(tmp_path):
    # The control: a cycle closed by an import inside a function is found and named.
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n")
    known = {"a", "b", "c"}
    graph = {name: imports_of(name, tmp_path / f"{name}.py", known) for name in known}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": set()}
    assert [a_cycle(graph, c) for c in strongly_connected(graph)] == [["a", "b", "a"]]


def test_the_walk_covers_both_packages():
    graph = import_graph()
    assert {"kaireon_pub.cli", "kaireon_pub.worker.loop", "bench.cli"} <= set(graph)
    assert "kaireon_pub.db.migrate" in graph["kaireon_pub.reaper"]


def test_the_worker_never_imports_the_operator_commands():
    # The worker's backlog query lives in worker/backlog.py, not in ops/ (issue 24): nothing the
    # worker runs pulls in the operator commands, directly or through the modules it imports.
    graph = import_graph()
    assert "kaireon_pub.worker.loop" in graph and "kaireon_pub.ops.status" in graph
    paths = reaching(graph, "kaireon_pub.worker", "kaireon_pub.ops")
    assert paths == [], "kaireon_pub.worker reaches kaireon_pub.ops:\n" + "\n".join(paths)


def test_the_reach_follows_other_modules_and_package_inits():
    # The control: a worker module reaching ops through a third module, or through the __init__
    # of a package it imports from, is named with its path; a module that does not, is not.
    graph = {"w": set(), "w.a": {"x.m"}, "w.b": {"y.n"}, "w.c": {"x"}, "x": set(), "x.m": {"ops.s"},
             "y": {"ops"}, "y.n": set(), "ops": set(), "ops.s": set()}
    assert reaching(graph, "w", "ops") == ["w.a -> x.m -> ops.s", "w.b -> y.n -> y -> ops"]
    assert reaching(graph, "ops", "w") == []
