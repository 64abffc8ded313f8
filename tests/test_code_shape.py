"""The code's shape, read from its source: no module over 600 lines, no function over 100, no import circle among
the project's modules (indexer/, service/, bench/ and eval/; the tests and the migrations aside)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from indexer.config import REPO_ROOT

PACKAGES = ("indexer", "service", "bench", "eval")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


@cache
def modules() -> dict[str, Path]:
    """Every module of the project by its dotted name (a package by its own: `service` is service/__init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(), filename=str(modules()[name]))


def shown(name: str) -> str:
    return str(modules()[name].relative_to(REPO_ROOT))


def imported(name: str) -> set[str]:
    """The project's modules that `name` imports, wherever the import statement is: in a function too, and under
    `if TYPE_CHECKING:` (a circle of types is a circle of the design). `from package import x` imports the module
    package.x if there is one, else the package itself."""
    known = modules()
    is_package = known[name].name == "__init__.py"
    found = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per dot after the first
                parts = name.split(".")
                base = ".".join([*parts[: len(parts) - node.level + is_package], *filter(None, [node.module])])
            else:
                base = node.module or ""
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {module for module in found if module in known and module != name}


def cycles() -> list[list[str]]:
    """One circle through each group of modules that import one another, in a circle (Tarjan's strongly connected
    components, then a path round each)."""
    graph = {name: sorted(imported(name)) for name in modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            groups.append(sorted([node, *group]))

    for node in graph:
        if node not in index:
            visit(node)
    return [circle(graph, group) for group in groups if len(group) > 1]


def circle(graph: dict[str, list[str]], group: list[str]) -> list[str]:
    """A path from the group's first module back to it, through the group (breadth first: a shortest one)."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in graph[node]:
                if successor == start:
                    return [*paths[node], start]
                if successor in members and successor not in paths:
                    paths[successor] = [*paths[node], successor]
                    following.append(successor)
        frontier = following
    raise AssertionError(f"no circle through {group}")


def test_no_module_is_over_600_lines():
    lines = {shown(name): len(path.read_text().splitlines()) for name, path in modules().items()}
    long = [f"{path} ({count} lines)" for path, count in lines.items() if count > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {', '.join(long)}"


def test_no_function_is_over_100_lines():
    long = [
        f"{shown(name)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name in modules()
        for node in ast.walk(tree(name))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_no_import_circle():
    circles = [" -> ".join(found) for found in cycles()]
    assert not circles, f"modules that import one another in a circle: {'; '.join(circles)}"


def test_the_checks_see_the_project_and_its_imports():
    """The checks read something: the project's packages, and imports of every form (a function's own, relative,
    a submodule named by `from package import module`)."""
    assert {"indexer.config", "service", "bench", "eval", "service.openapi.paths"} <= set(modules())
    assert "indexer.config" in imported("service")  # a module-level `from indexer.config import ...`
    assert "service.api" in imported("service")  # inside create_app
    assert "indexer.embedding.model" in imported("service")  # under TYPE_CHECKING
    graph = {"a": ["b"], "b": ["c", "a"], "c": []}
    assert circle(graph, ["a", "b"]) == ["a", "b", "a"]
