"""No import cycle among art_core's modules, counting function-local imports as well as module-level ones.

A function-local import only hides a cycle until that function runs (and makes import order matter), so it
counts. Imports under ``if TYPE_CHECKING:`` never run and do not. Importing a submodule of a package also runs
the package's ``__init__``; that edge is implied, not written, so it is not counted either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "art_core"


def modules(root: Path = ROOT / PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (``art_core`` for its ``__init__``)."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere outside ``if TYPE_CHECKING:`` blocks."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                targets.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:  # `from pkg import sub` imports the submodule, not pkg's namespace
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def test_art_core_has_no_import_cycle() -> None:
    graph = import_graph()
    found = cycles(graph)
    described = [" -> ".join(f"{m} (imports {sorted(graph[m] & set(c))})" for m in c) for c in found]
    assert not found, (
        "import cycles in art_core; move the shared piece into a module below both:\n" + "\n".join(described)
    )


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        (
            {"a": "import art_core.b\n", "b": "def f():\n    from art_core import a\n"},
            [["art_core.a", "art_core.b"]],
        ),
        (
            {
                "a": "import art_core.b\n",
                "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import art_core.a\n",
            },
            [],
        ),
        ({"a": "from . import b\n", "b": "from .a import x\n"}, [["art_core.a", "art_core.b"]]),
        ({"a": "from art_core import b\n", "b": "x = 1\n"}, []),
    ],
)
def test_the_checker_sees_function_local_and_relative_imports(
    tmp_path: Path, sources: dict[str, str], expected: list[list[str]]
) -> None:
    root = tmp_path / PACKAGE
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, source in sources.items():
        (root / f"{name}.py").write_text(source)
    known = modules(root)
    assert cycles({name: imported(name, path, known) for name, path in known.items()}) == expected
