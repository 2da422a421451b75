"""examples/Makefile redoes a step when the settings that produce it change (issue 9, item 12): after a
small build, `make N=... STEPS=...` is not "Nothing to be done"."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import demo_records, run_make, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")]


def steps_run(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    marker = " -m bleuberi_cli "
    return [line.split(marker)[1].split()[0] for line in result.stdout.splitlines() if marker in line]


def test_changed_settings_redo_the_steps_they_produce(tmp_path, tiny_model) -> None:
    write_jsonl(tmp_path / "pool.jsonl", demo_records("pool", count=8))
    write_jsonl(tmp_path / "heldout.jsonl", demo_records(count=3))
    assert steps_run(run_make(tmp_path, tiny_model)) == ["generate", "score", "select", "train", "eval"]
    assert steps_run(run_make(tmp_path, tiny_model)) == []  # same settings: nothing to do

    assert steps_run(run_make(tmp_path, tiny_model, N="3")) == ["select", "train", "eval"]
    assert steps_run(run_make(tmp_path, tiny_model, N="3", STEPS="3")) == ["train", "eval"]
    steps = [line for line in (tmp_path / "out/train/metrics.jsonl").read_text().splitlines() if line]
    assert len(steps) == 3  # a new run of 3 steps, not the old one continued or refused
    # Generation settings: generated again from the start (not appended to the old answers).
    redo = run_make(tmp_path, tiny_model, N="3", STEPS="3", TOKENS="5")
    assert steps_run(redo) == ["generate", "score", "select", "train", "eval"]
    generated = (tmp_path / "out/pool.generated.jsonl").read_text().splitlines()
    assert len(generated) == 8 and all('"max_new_tokens":5' in line for line in generated)
