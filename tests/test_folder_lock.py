"""One run per output folder (issue 9, item 2), and a finished run removes the leftovers of killed ones
(item 4)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from bleuberi_cli.app import app
from stages.core.lock import LOCK_NAME, FolderLocked, folder_lock
from tests.conftest import ROOT, demo_records, train_args, write_jsonl

HOLD = """import sys, time
from stages.core.lock import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path) -> None:
    held = rf"in use by another bleuberi process \(pid {os.getpid()} on .+, started 20"
    with folder_lock(tmp_path / "run"), pytest.raises(FolderLocked, match=held), folder_lock(tmp_path / "run"):
        pass
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released and removed
    with folder_lock(tmp_path / "run"):  # free again
        pass


def test_train_and_run_refuse_a_locked_folder_until_its_holder_dies(runner, tiny_model, tmp_path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
        busy = runner.invoke(app, train_args(data, out, tiny_model, max_steps=2, save_steps=1))
        assert busy.exit_code == 1 and busy.stdout == ""
        assert (
            f"in use by another bleuberi process (pid {holder.pid} on " in busy.stderr and busy.stderr.count("\n") == 1
        )
        run_busy = runner.invoke(app, ["run", "-o", str(out), "--set", f"model={tiny_model}", "--set", "device=cpu"])
        assert run_busy.exit_code == 1 and f"pid {holder.pid}" in run_busy.stderr, run_busy.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_NAME).exists()  # left by the killed holder: stale, and must not block
    done = runner.invoke(app, train_args(data, out, tiny_model, max_steps=2, save_steps=1))
    assert done.exit_code == 0, done.stderr
    assert not (out / LOCK_NAME).exists()


def test_a_finished_run_removes_only_our_own_leftovers(runner, tiny_model, tmp_path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-1.k2j4h6g8").mkdir(parents=True)  # a staging folder cut by a kill
    (out / "checkpoints" / ".step-1.k2j4h6g8" / "adapter_model.safetensors").write_bytes(b"half")
    ours = [out / ".metrics.jsonl.ab12cd34.tmp", out / ".config.json.zz_9y8x7.tmp"]
    theirs = [out / ".keepme", out / "notes.tmp", out / ".hidden.abcdefgh"]  # a plain file: not a staging folder
    for path in ours + theirs:
        path.write_text("x")
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    done = runner.invoke(app, train_args(data, out, tiny_model, max_steps=2, save_steps=1))
    assert done.exit_code == 0, done.stderr
    assert not any(p.exists() for p in ours) and not (out / "checkpoints" / ".step-1.k2j4h6g8").exists()
    assert all(p.exists() for p in theirs)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
