"""The module tree of docs/architecture.md (moved there from the README) names every module of the library
and the CLI, and nothing else."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def tree_paths() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## The module tree", 1)[1].split("```", 2)[1]
    paths, stack = set(), []  # stack: (indent, folder)
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "/".join([folder for _, folder in stack] + [name.rstrip("/")])
        if name.endswith("/"):
            stack.append((indent, name.rstrip("/")))
        else:
            paths.add(path)
    return paths


def test_the_architecture_tree_matches_the_folders() -> None:
    modules = {
        str(path.relative_to(ROOT))
        for folder in ("stages", "bleuberi_cli")
        for path in (ROOT / folder).rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    listed = tree_paths()
    assert modules - listed == set(), "modules missing from the module tree of docs/architecture.md"
    assert listed - modules == set(), "the module tree of docs/architecture.md names modules that do not exist"


def test_the_step_walk_through_points_at_the_code_it_quotes() -> None:
    """Each `path#Lnumber` anchor of docs/architecture.md is followed by the code found on that line."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    anchors = re.findall(r"`(stages/[\w/]+\.py)#L(\d+)`\s+`([^`]+)`", text)
    assert len(anchors) >= 10  # the GRPO step's walk-through
    wrong = []
    for path, number, code in anchors:
        lines = (ROOT / path).read_text().splitlines()
        line = lines[int(number) - 1] if int(number) <= len(lines) else ""
        if code not in line:
            wrong.append(f"{path}#L{number}: {code!r} not in {line.strip()!r}")
    assert wrong == []
