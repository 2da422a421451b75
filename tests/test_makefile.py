"""examples/Makefile: the recipe as separate subcommands, rebuilt only where inputs changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import EXAMPLES, ROOT, demo_records, read_jsonl_text, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")]


def make(tmp_path, tiny_model, *targets: str) -> subprocess.CompletedProcess:
    variables = {
        "MODEL": str(tiny_model),
        "POOL": str(tmp_path / "pool.jsonl"),
        "HELDOUT": str(tmp_path / "heldout.jsonl"),
        "N": "4",
        "STEPS": "2",
        "TOKENS": "4",
        "OUT": str(tmp_path / "out"),
        "BLEUBERI": f"{sys.executable} -m bleuberi_cli",
    }
    command = ["make", "-f", str(EXAMPLES / "Makefile"), "-C", str(EXAMPLES), *targets]
    command += [f"{key}={value}" for key, value in variables.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_make_runs_the_recipe_and_rebuilds_only_what_changed(tmp_path, tiny_model) -> None:
    write_jsonl(tmp_path / "pool.jsonl", demo_records("pool", count=8))
    write_jsonl(tmp_path / "heldout.jsonl", demo_records(count=3))
    first = make(tmp_path, tiny_model)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    assert len(read_jsonl_text((out / "selected.jsonl").read_text())) == 4
    assert (out / "train/adapter/adapter_model.safetensors").is_file()
    assert "| trained |" in (out / "eval/report.md").read_text()

    nothing = make(tmp_path, tiny_model)
    assert nothing.returncode == 0 and "bleuberi_cli" not in nothing.stdout  # all up to date

    (tmp_path / "heldout.jsonl").touch()  # only the evaluation depends on the held-out set
    again = make(tmp_path, tiny_model)
    assert again.returncode == 0, again.stderr
    ran = [line for line in again.stdout.splitlines() if "bleuberi_cli" in line]
    assert len(ran) == 1 and " eval " in ran[0]

    agreement = make(tmp_path, tiny_model, "agreement")
    assert agreement.returncode == 0, agreement.stderr
    assert "| bleu | 58.3% |" in (out / "agreement.md").read_text()
