"""examples/Makefile: the recipe as separate subcommands, rebuilt only where inputs changed."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import demo_records, read_jsonl_text, run_make, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")]


def test_make_runs_the_recipe_and_rebuilds_only_what_changed(tmp_path, tiny_model) -> None:
    write_jsonl(tmp_path / "pool.jsonl", demo_records("pool", count=8))
    write_jsonl(tmp_path / "heldout.jsonl", demo_records(count=3))
    first = run_make(tmp_path, tiny_model)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    assert len(read_jsonl_text((out / "selected.jsonl").read_text())) == 4
    assert (out / "train/adapter/adapter_model.safetensors").is_file()
    assert "| trained |" in (out / "eval/report.md").read_text()

    nothing = run_make(tmp_path, tiny_model)
    assert nothing.returncode == 0 and "bleuberi_cli" not in nothing.stdout  # all up to date

    (tmp_path / "heldout.jsonl").touch()  # only the evaluation depends on the held-out set
    again = run_make(tmp_path, tiny_model)
    assert again.returncode == 0, again.stderr
    ran = [line for line in again.stdout.splitlines() if "bleuberi_cli" in line]
    assert len(ran) == 1 and " eval " in ran[0]

    agreement = run_make(tmp_path, tiny_model, "agreement")
    assert agreement.returncode == 0, agreement.stderr
    assert "| bleu | 58.3% |" in (out / "agreement.md").read_text()
