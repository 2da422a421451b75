"""Disk full is one line naming the path and the cause, exit 1, the old target intact and no
half-written line left for --resume (issue 9, item 5). The kernel's own ENOSPC comes from /dev/full."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bleuberi_cli.app import app
from stages.core import jsonl
from stages.core.errors import WriteFailed
from stages.core.jsonl import JsonlWriter
from tests.conftest import ROOT, demo_records, train_args, write_jsonl

SCORED = [{"id": f"q{i}", "prompt": "p", "references": ["the cat sat"], "completions": ["the cat"]} for i in range(50)]


def to_dev_full(target: Path) -> tuple[int, Path]:
    """A temp file whose writes go to /dev/full (every write fails with ENOSPC), at a real temp path."""
    tmp = target.parent / f".{target.name}.abcd1234.tmp"
    tmp.write_bytes(b"")
    return os.open("/dev/full", os.O_WRONLY), tmp


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_score_into_a_full_disk_says_one_line_and_keeps_the_old_file(runner, tmp_path, monkeypatch) -> None:
    data, out = write_jsonl(tmp_path / "in.jsonl", SCORED), tmp_path / "out.jsonl"
    out.write_text("old\n")
    monkeypatch.setattr(jsonl, "new_temp_file", to_dev_full)
    result = runner.invoke(app, ["score", "-i", str(data), "-o", str(out)])
    assert result.exit_code == 1, result.stderr
    expected = f"bleuberi: error: {out}: cannot write: no space left on device (the earlier out.jsonl is kept)\n"
    assert result.stderr == expected
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_a_full_disk_is_one_line(tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", SCORED)
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [sys.executable, "-m", "bleuberi_cli", "score", "-i", str(data)],
            stdout=full,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            timeout=120,
        )
    assert done.returncode == 1
    assert done.stderr == b"bleuberi: error: <stdout>: cannot write: no space left on device\n"


class FillsUp:
    """A file that takes the first `room` bytes, then fails with ENOSPC (like a disk filling up)."""

    def __init__(self, raw, room: int) -> None:
        self.raw, self.room = raw, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.raw.write(data[: self.room])
            self.raw.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def test_a_journal_is_left_without_a_half_line(tmp_path) -> None:
    from stages.core.journal import journals

    out = tmp_path / "gen.jsonl"
    full = pytest.raises(WriteFailed, match=rf"^{out}: cannot write: no space left on device")
    with full, JsonlWriter(out) as writer:
        writer._stream = FillsUp(writer._raw, room=250)
        for record in SCORED:
            writer.write(record)
    assert not out.exists()
    [journal] = journals(out)
    lines = journal.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) > 1  # whole records only: --resume continues after them


def test_a_checkpoint_on_a_full_disk_names_it(runner, tiny_model, tmp_path, monkeypatch) -> None:
    from stages.train import checkpoint

    def full(tensors, path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(checkpoint, "save_file", full)
    data, out = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4)), tmp_path / "run"
    args = train_args(data, out, tiny_model)
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("bleuberi")]
    assert lines == [f"bleuberi: error: {out}/checkpoints/step-1: cannot write: no space left on device"]
    assert "Traceback" not in result.stderr and not list((out / "checkpoints").iterdir())
