"""The shape the code keeps so it stays easy to change: short functions, and modules that import in one
direction only (no cycle, not even one hidden inside a function or behind TYPE_CHECKING)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("stages", "bleuberi_cli")
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def long_functions(path: Path, root: Path = ROOT) -> list[str]:
    """Functions longer than the limit, counted from their first decorator (a typer signature counts);
    each named by its path under `root`."""
    tree = ast.parse(path.read_text())
    too_long = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = (node.end_lineno or node.lineno) - start + 1
            if length > MAX_FUNCTION_LINES:
                too_long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return too_long


def imported(path: Path, known: set[str]) -> set[str]:
    """The project modules a module imports anywhere in it (`from a.b import c` names a.b.c when that is a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, from where it was entered)."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif state[nxt] == 0:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node, [node])
    return found


def test_no_function_is_longer_than_sixty_lines() -> None:
    too_long = [entry for path in modules().values() for entry in long_functions(path)]
    assert too_long == []


def test_no_import_cycles() -> None:
    found = modules()
    known = set(found)
    # a package's __init__ importing its own modules is how packages work, not a cycle between modules
    graph = {
        name: {m for m in imported(path, known) if not name.startswith(m + ".") and not m.startswith(name + ".")}
        for name, path in found.items()
    }
    assert cycles(graph) == []


def test_the_checks_can_fail(tmp_path) -> None:
    """The two checks above find what they look for."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    body = "\n".join(f"    x = {i}" for i in range(MAX_FUNCTION_LINES))
    long_file = tmp_path / "stages" / "probe.py"  # not in the checkout: conftest fails a test that writes there
    long_file.parent.mkdir()
    long_file.write_text(f"def f():\n{body}\n")
    assert long_functions(long_file, tmp_path) == [f"stages/probe.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]
