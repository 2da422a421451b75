"""A kill (SIGKILL) of generate, score, eval or select loses at most the batch in progress, whatever the
flags (issue 27): `--resume`, added only after the kill, keeps what the killed command finished and says
so on its first stderr line; without it the rerun says how to keep them. The output a reader sees is
never a half-written line: the file appears only when a command succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bleuberi_cli.app import app
from stages.core.journal import journal_records, journals
from tests.conftest import ROOT, demo_records, write_jsonl
from tests.test_first_hour_more import wait_for

pytestmark = pytest.mark.slow

# A bleuberi command whose generation batches after the first `BLEUBERI_TEST_FAST` take `BLEUBERI_TEST_SLOW`
# seconds each: long enough to kill it between two batches without racing the clock.
SLOW_BATCHES = """
import os, sys, time
from stages.engines.generator import Generator
sample_ids, calls = Generator.sample_ids, [0]
def slow(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] > int(os.environ["BLEUBERI_TEST_FAST"]):
        time.sleep(float(os.environ["BLEUBERI_TEST_SLOW"]))
    return sample_ids(self, *args, **kwargs)
Generator.sample_ids = slow
from bleuberi_cli.app import app
sys.argv = ["bleuberi", *sys.argv[1:]]
app()
"""


def slow_command(tmp_path: Path, args: list[str], *, fast: int = 1, **kwargs) -> subprocess.Popen:
    script = tmp_path / "slow_batches.py"
    script.write_text(SLOW_BATCHES)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BLEUBERI_TEST_SLOW": "60", "BLEUBERI_TEST_FAST": str(fast)}
    return subprocess.Popen([sys.executable, str(script), *args], cwd=tmp_path, env=env, **kwargs)


def _journaled(target: Path) -> list[dict]:
    """The records in the journals beside `target`, a live writer's too."""
    found = target.parent.glob(f".{target.name}.*.tmp")
    return [record for journal in sorted(found) for record in journal_records(journal)]


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 120) -> bool:
    try:
        return wait_for(condition, timeout)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def _first_line(stderr: str) -> str:
    return stderr.splitlines()[0] if stderr else ""


def test_a_killed_generate_keeps_its_batches_for_a_resume_added_after_the_kill(runner, tiny_model, tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records("pool", count=12))
    args = ["generate", "-i", str(pool), "--model", str(tiny_model), "--max-new-tokens", "4", "--temperature", "0",
            "--batch-size", "3"]  # fmt: skip
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, [*args, "-q", "-o", str(whole)]).exit_code == 0
    out = tmp_path / "out.jsonl"
    proc = slow_command(tmp_path, [*args, "-q", "-o", str(out)], stderr=subprocess.DEVNULL)
    assert _kill_when(proc, lambda: len(_journaled(out)) >= 3), "the first batch never reached the journal"
    assert not out.exists()  # never a half-done file
    assert len(_journaled(out)) == 3  # the first batch whole; the kill took only the batch in progress

    # a rerun without --resume says they are there (it is killed again before its first batch is done)
    again = slow_command(tmp_path, [*args, "-o", str(out)], fast=0, stderr=subprocess.PIPE, text=True)
    line = again.stderr.readline().strip()
    again.send_signal(signal.SIGKILL)
    again.wait(timeout=60)
    assert line == (
        f"{out}: 3 finished records of an earlier run are there (the journal a killed run left); "
        "add --resume to keep them (this run starts over)"
    )

    resumed = runner.invoke(app, [*args, "-o", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert _first_line(resumed.stderr) == f"resuming: kept 3 finished records of {out} (the journal a killed run left)"
    assert out.read_bytes() == whole.read_bytes()  # every id once, in input order, byte for byte
    assert journals(out) == []  # what the killed runs left is gone once the file is whole


REWARDS = """
import os, time

def slow_after(completions, id, **kwargs):
    if int(id[0].removeprefix("r")) >= int(os.environ["SLOW_FROM"]):
        time.sleep(float(os.environ.get("SLOW_SECONDS", "0")))
    return [float(len(c)) for c in completions]
"""


def test_a_killed_score_keeps_the_records_it_scored(runner, tmp_path, monkeypatch):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS)
    rows = [{"id": f"r{i}", "prompt": "P", "references": ["R"], "completions": ["a" * i]} for i in range(8)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["score", "-i", str(data), "-m", f"py:{rewards}:slow_after", "-m", "bleu", "-j", "1"]
    monkeypatch.setenv("SLOW_FROM", "99")
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, [*args, "-q", "-o", str(whole)]).exit_code == 0
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLOW_FROM": "5", "SLOW_SECONDS": "60"}
    command = [sys.executable, "-m", "bleuberi_cli", *args, "-o", str(out)]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    assert _kill_when(proc, lambda: len(_journaled(out)) >= 5)
    assert [r["id"] for r in _journaled(out)] == ["r0", "r1", "r2", "r3", "r4"] and not out.exists()

    resumed = runner.invoke(app, [*args, "-o", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert _first_line(resumed.stderr) == f"resuming: kept 5 finished records of {out} (the journal a killed run left)"
    assert "8 records (8 completions)" in resumed.stderr and "5 of them kept from an earlier run" in resumed.stderr
    assert out.read_bytes() == whole.read_bytes()


def test_a_killed_eval_keeps_the_answers_it_finished(runner, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "heldout.jsonl", demo_records(count=6))
    args = ["eval", "-i", str(data), "--model", str(tiny_model), "--max-new-tokens", "4", "--batch-size", "2",
            "--bootstrap-resamples", "20", "-m", "bleu"]  # fmt: skip
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, [*args, "-q", "-o", str(whole)]).exit_code == 0
    out = tmp_path / "out.jsonl"
    proc = slow_command(tmp_path, [*args, "-q", "-o", str(out)], stderr=subprocess.DEVNULL)
    answers = Path(f"{out}.answers")
    assert _kill_when(proc, lambda: len(_journaled(answers)) >= 2), "the first batch never reached the journal"
    assert not out.exists() and len(_journaled(answers)) == 2

    resumed = runner.invoke(app, [*args, "-o", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert _first_line(resumed.stderr) == f"resuming: kept 2 finished answers of {out} (the journal a killed run left)"
    assert [orjson.loads(line) for line in out.read_bytes().splitlines()] == [
        orjson.loads(line) for line in whole.read_bytes().splitlines()
    ]
    assert journals(answers) == []


def test_a_killed_select_leaves_no_half_file(runner, tmp_path):
    """select ranks the whole pool in memory and writes its output once: a kill before that leaves no file
    and no journal (there is no finished work to keep), and the rerun writes it whole."""
    rows = [{"id": f"r{i}", "prompt": "P", "references": ["R"], "score": i / 10} for i in range(10)]
    out = tmp_path / "hard.jsonl"
    command = [sys.executable, "-m", "bleuberi_cli", "select", "--mode", "hard", "-n", "3", "-o", str(out)]
    proc = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(b"".join(orjson.dumps(row) + b"\n" for row in rows[:5]))
    proc.stdin.flush()  # half the pool read; the rest never comes
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists() and journals(out) == []
    result = runner.invoke(app, ["select", "--mode", "hard", "-n", "3", "-o", str(out)], input="".join(
        orjson.dumps(row).decode() + "\n" for row in rows
    ))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert [orjson.loads(line)["id"] for line in out.read_bytes().splitlines()] == ["r0", "r1", "r2"]
