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
from tests.test_first_hour_more import kill_at, kill_at_slowed_batch, slow_command

pytestmark = pytest.mark.slow


def _journaled(target: Path) -> list[dict]:
    """The records in the journals beside `target`, a live writer's too."""
    found = target.parent.glob(f".{target.name}.*.tmp")
    return [record for journal in sorted(found) for record in journal_records(journal)]


def _first_line(stderr: str) -> str:
    return stderr.splitlines()[0] if stderr else ""


def test_a_killed_generate_keeps_its_batches_for_a_resume_added_after_the_kill(runner, tiny_model, tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records("pool", count=12))
    args = ["generate", "-i", str(pool), "--model", str(tiny_model), "--max-new-tokens", "4", "--temperature", "0",
            "--batch-size", "3"]  # fmt: skip
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, [*args, "-q", "-o", str(whole)]).exit_code == 0
    out = tmp_path / "out.jsonl"
    kill_at_slowed_batch(slow_command(tmp_path, [*args, "-q", "-o", str(out)]))
    assert not out.exists()  # never a half-done file
    assert len(_journaled(out)) == 3  # the first batch whole; the kill took only the batch in progress

    # a rerun without --resume says they are there (it is killed again before its first batch is done)
    said = kill_at_slowed_batch(slow_command(tmp_path, [*args, "-o", str(out)], fast=0))
    assert said[0] == (
        f"{out}: 3 finished records of an earlier run are there (the journal a killed run left); "
        "add --resume to keep them (this run starts over)"
    )

    resumed = runner.invoke(app, [*args, "-o", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert _first_line(resumed.stderr) == f"resuming: kept 3 finished records of {out} (the journal a killed run left)"
    assert out.read_bytes() == whole.read_bytes()  # every id once, in input order, byte for byte
    assert journals(out) == []  # what the killed runs left is gone once the file is whole


REWARDS = """
import os, sys, time

def slow_after(completions, id, **kwargs):
    if int(id[0].removeprefix("r")) >= int(os.environ["SLOW_FROM"]):
        sys.stderr.write("TEST: slowed at " + id[0] + "\\n"); sys.stderr.flush()
        time.sleep(600)  # the test kills it long before
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLOW_FROM": "5"}
    command = [sys.executable, "-m", "bleuberi_cli", *args, "-o", str(out)]
    kill_at(subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True), "TEST: slowed at r5")
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
    kill_at_slowed_batch(slow_command(tmp_path, [*args, "-q", "-o", str(out)]))
    answers = Path(f"{out}.answers")
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
