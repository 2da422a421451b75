""".ci/floors.py: the oldest versions pyproject.toml allows, which CI's floors environment installs (issue 36)."""

from __future__ import annotations

import importlib.util
import sys
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

PROJECT = """
[project]
requires-python = ">=3.10"
dependencies = ["typer>=0.29", "tomli>=1.1; python_version < '3.11'", "torch>=2.13,<3"]
[project.optional-dependencies]
plot = ["matplotlib>=3.7"]
wandb = ["wandb>=0.17"]
dev = ["pytest>=8", "matplotlib>=3.7"]
"""


def load_floors() -> ModuleType:
    spec = importlib.util.spec_from_file_location("floors", ROOT / ".ci" / "floors.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], project: str, *args: str) -> tuple[int, str, str]:
    path = tmp_path / "pyproject.toml"
    path.write_text(project)
    try:
        code = load_floors().main(["--pyproject", str(path), *args])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_dependencies_and_the_tested_extras_are_pinned_at_their_floors(tmp_path, capsys) -> None:
    code, out, _ = run(tmp_path, capsys, PROJECT)
    # the marker stays; an upper bound is dropped; wandb is installed by no CI environment, dev's own tools
    # (pytest) are not what users run
    assert (code, out.splitlines()) == (
        0,
        ["typer==0.29", "tomli==1.1; python_version < '3.11'", "torch==2.13", "matplotlib==3.7"],
    )


def test_a_dependency_with_no_floor_is_refused(tmp_path, capsys) -> None:
    code, out, _ = run(tmp_path, capsys, PROJECT.replace('"typer>=0.29"', '"typer"'))
    assert out == "" and code == "floors: no >= floor that CI could test in pyproject.toml: typer"


def test_the_oldest_python_is_read_from_requires_python(tmp_path, capsys) -> None:
    assert run(tmp_path, capsys, PROJECT, "--python")[:2] == (0, "python3.10\n")


def test_check_compares_each_floor_with_what_is_installed(tmp_path, capsys) -> None:
    installed = version("pytest")
    at_floor = f'[project]\nrequires-python = ">=3.10"\ndependencies = ["pytest>={installed}"]\n'
    python = sys.version.split()[0]
    assert run(tmp_path, capsys, at_floor, "--check")[:2] == (0, f"floors: Python {python}, pytest {installed}\n")
    code, _, err = run(tmp_path, capsys, at_floor.replace(installed, "7.0"), "--check")
    assert (code, err) == (1, f"floors: not at the floor: pytest {installed} (floor 7.0)\n")


def test_the_projects_floors_include_the_ml_stack() -> None:
    pinned = {name: floor for name, floor, _ in load_floors().floors(ROOT / "pyproject.toml")}
    assert {"torch", "transformers", "peft", "gguf", "numpy", "typer"} <= set(pinned)
