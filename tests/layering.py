"""The import graph of the project's packages, read with ``ast`` (nothing is imported).

DESIGN.md's dependency direction: ``events`` ← ``orchestrator`` ← ``trainer``, ``rollout`` ←
``ops``; ``trainer`` and ``rollout`` never import each other. Every import statement counts,
including those inside functions and under ``TYPE_CHECKING``: a lazy import is still a
dependency, and a cycle through one is still a knot a reader has to untie.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

LAYERS: dict[str, frozenset[str]] = {
    "events": frozenset({"events"}),
    "orchestrator": frozenset({"events", "orchestrator"}),
    "trainer": frozenset({"events", "orchestrator", "trainer"}),
    "rollout": frozenset({"events", "orchestrator", "rollout"}),
    "ops": frozenset({"events", "orchestrator", "trainer", "rollout", "ops"}),
}
"""Which top-level packages each package may import."""


def modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """``{"events.codec": path, "events": path/__init__.py, ...}`` under ``root``."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imported(node: ast.AST, me: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = me.split(".")
            keep = len(parts) - node.level + (1 if is_package else 0)
            base = ".".join([*parts[:keep], *([base] if base else [])])
        return [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return []


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """Module → the project modules it imports (an import of a name resolves to its module)."""
    mods = modules(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for target in _imported(node, name, path.name == "__init__.py"):
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def forbidden(
    graph: Mapping[str, set[str]], layers: Mapping[str, frozenset[str]] = LAYERS
) -> list[str]:
    """``"a.b -> c.d"`` for every import against the dependency direction."""
    out = []
    for source, targets in sorted(graph.items()):
        allowed = layers.get(source.split(".")[0])
        for target in sorted(targets):
            if allowed is not None and target.split(".")[0] not in allowed:
                out.append(f"{source} -> {target}")
    return out
