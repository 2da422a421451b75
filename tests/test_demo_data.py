"""The demo data ships inside the installed package (issue 9, item 10): `demo:pool` resolves to it, a
wheel carries it, and examples/data/ (for the Makefile) holds the same bytes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from stages.run.config import data_path
from tests.conftest import EXAMPLES, ROOT

IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info")


@pytest.mark.parametrize("name", ["pool", "heldout"])
def test_the_packaged_demo_data_is_the_examples_data(name) -> None:
    packaged = data_path(f"demo:{name}")
    assert packaged.parent == ROOT / "stages" / "run" / "demo_data"
    assert packaged.read_bytes() == (EXAMPLES / "data" / f"{name}.jsonl").read_bytes()


@pytest.mark.slow
def test_a_wheel_carries_the_demo_data(tmp_path) -> None:
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the working tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "stages", "bleuberi_cli"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": IGNORE} if copy is shutil.copytree else {}))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    done = subprocess.run([*build, str(source)], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [wheel] = tmp_path.glob("bleuberi-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"stages/run/demo_data/pool.jsonl", "stages/run/demo_data/heldout.jsonl"} <= names
