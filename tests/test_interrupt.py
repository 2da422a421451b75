"""Ctrl-C is a real SIGINT sent to a real process: one line on stderr, exit 130, and a way to continue."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, demo_records, train_args, write_jsonl

pytestmark = pytest.mark.slow  # real processes and real signals


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "bleuberi_cli", *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt_after_first_line(process: subprocess.Popen, deadline: float = 120.0) -> tuple[str, str]:
    """Wait for the first stdout record (a finished step), then send SIGINT; returns (stdout, stderr)."""
    first = process.stdout.readline()  # type: ignore[union-attr]
    assert first, "the process ended before its first record"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=deadline)
    return first + out, err


def test_sigint_during_train_saves_a_checkpoint_and_says_how_to_resume(tiny_model, tmp_path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", demo_records("pool", 8))
    run_dir = tmp_path / "run"
    args = train_args(data, run_dir, tiny_model, device="cpu", max_steps=200, num_generations=2, save_steps=1000)
    process = _start(args, tmp_path)
    _stdout, stderr = _interrupt_after_first_line(process)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    said = re.fullmatch(
        r"bleuberi: interrupted at step (\d+) of 200; saved (\S+): continue with --resume, or use it as it is "
        r"with --adapter (\S+)",
        last,
    )
    assert said and said.group(2) == said.group(3), last
    saved = Path(said.group(2))
    assert (saved / "adapter_model.safetensors").is_file() and saved.parent == run_dir / "checkpoints"
    assert saved.name == f"step-{said.group(1)}" and int(said.group(1)) < 200  # it stopped early, at a step boundary
    # the checkpoint is an adapter as it is: generate with it, as the message says
    used = subprocess.run(
        [sys.executable, "-m", "bleuberi_cli", "generate", "-i", str(data), "--model", str(tiny_model)]
        + ["--max-new-tokens", "2", "--adapter", str(saved)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert used.returncode == 0, used.stderr
    assert all(r["generation"]["adapter"] == str(saved) for r in map(json.loads, used.stdout.splitlines()))


def test_sigint_during_run_says_how_to_continue(tiny_model, tmp_path) -> None:
    from tests.conftest import tiny_overrides

    overrides = [o for o in tiny_overrides(tiny_model) if not o.startswith("train.max_steps")]
    args = ["run", "-o", str(tmp_path / "run")]
    for item in [*overrides, "train.max_steps=200"]:
        args += ["--set", item]
    process = _start(args, tmp_path)
    # `run` prints no record until the end: wait for its first checkpoint instead.
    checkpoints = tmp_path / "run" / "train" / "checkpoints"
    deadline = time.monotonic() + 120
    while not any(checkpoints.glob("step-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read()  # type: ignore[union-attr]
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == ""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("bleuberi: interrupted during train;") and "to continue" in last
