"""The first day with one's own data (issue 33, findings 4 to 6): training says how far it is and what an
interrupted run left, a reader that closes stdout stops every stage within a batch, and help and messages
agree with the tool. (Findings 1 to 3: tests/test_output_paths.py, tests/test_long_prompts.py,
tests/test_split.py; the walkthrough: tests/test_own_data_walkthrough.py.)"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bleuberi_cli.app import app
from stages.train.loop import newest_checkpoint_note
from tests.conftest import ROOT, demo_records, read_jsonl_text, run_args, train_args, write_jsonl

# --- finding 4: training progress and what an interrupted run left -----------------------------------


def test_training_says_step_n_of_m_the_time_per_step_and_the_time_left(runner, tmp_path, tiny_model) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", demo_records("pool", 4))
    result = runner.invoke(app, train_args(data, tmp_path / "run", tiny_model, max_steps=6, num_generations=2))
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("train: step")]
    assert [line.split(" |")[0] for line in lines] == [f"train: step {i}/6" for i in range(1, 7)]
    # the rate is measured from the end of the first step on, over two steps at least (as select and eval do)
    assert not any("s/step" in line for line in lines[:2])
    assert all(re.search(r" \| [\d.e+-]+ s/step, about \d+s left$", line) for line in lines[2:5]), lines
    assert re.search(r" \| [\d.e+-]+ s/step$", lines[5])  # nothing left to estimate
    records = read_jsonl_text(result.stdout)
    assert [(r["step"], r["total_steps"]) for r in records] == [(i, 6) for i in range(1, 7)]


def test_a_run_stopped_at_once_names_its_newest_checkpoint(tmp_path) -> None:
    assert newest_checkpoint_note(tmp_path) == f"no checkpoint saved yet in {tmp_path}: rerun to start over"
    for step in (2, 10, 4):
        (tmp_path / "checkpoints" / f"step-{step}").mkdir(parents=True)
    newest = tmp_path / "checkpoints" / "step-10"
    assert newest_checkpoint_note(tmp_path) == (
        f"the newest checkpoint is {newest}: continue with --resume, or use it as it is with --adapter {newest}"
    )


# --- finding 5: a closed stdout stops every stage within a batch -------------------------------------

READER = "import sys; sys.stdin.buffer.readline(); sys.exit(0)"  # `head -1`: one line, then gone

BATCHES_UNTIL_STOPPED = """
import sys
from stages.core.errors import OutputClosed
from stages.core.jsonl import reader_gone
from stages.engines.base import SamplingParams
from stages.engines.generator import Batching, Generator
from stages.generate import generate_file
import time

prompts = ["Say " + "yes " * (40 - i) for i in range(20)]  # input order = longest first...
prompts[1] = "Hi"  # ...but the second record is the shortest: the window's last batch
records = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)]
seen = []

def on_batch(prompts, tokens):
    seen.append(prompts)
    if len(seen) == 2:  # the first record went out after batch 1: wait until its reader has left
        deadline = time.time() + 60
        while not reader_gone() and time.time() < deadline:
            time.sleep(0.05)

try:
    generate_file(records, None, lambda: Generator.load(sys.argv[1]), SamplingParams(2, 0.0),
                  Batching(batch_size=1), on_batch=on_batch)
except OutputClosed:
    pass
sys.stderr.write(f"batches {len(seen)}\\n")
"""


def _piped_into_a_one_line_reader(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, bytes]:
    """Run `argv` with its stdout read by a process that takes one line and leaves (as `| head -1`)."""
    reader = subprocess.Popen([sys.executable, "-c", READER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, stdout=reader.stdin, stderr=subprocess.PIPE, cwd=cwd, env=env, timeout=600)
    reader.stdin.close()  # type: ignore[union-attr]
    reader.wait(timeout=60)
    return done, done.stderr


@pytest.mark.slow
def test_generate_into_head_stops_within_one_batch(tmp_path, tiny_model) -> None:
    """Batches run longest first in a window of 16, and records leave in input order: the second record waits
    for the window's last batch. Before, generate went on until it could write that record; now it stops at
    the first batch after its reader left."""
    done, err = _piped_into_a_one_line_reader([sys.executable, "-c", BATCHES_UNTIL_STOPPED, str(tiny_model)], tmp_path)
    assert done.returncode == 0, err.decode()
    # the reader leaves after the first record: generate stops at the next batch's end, or the one after it
    # when the reader took longer than that batch (16 before: it waited for the second record's batch)
    assert err.decode().splitlines()[-1] in ("batches 1", "batches 2")


@pytest.mark.slow
def test_train_into_head_stops_after_the_step_with_a_checkpoint(tmp_path, tiny_model) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", demo_records("pool", 4))
    args = train_args(data, tmp_path / "run", tiny_model, max_steps=100, num_generations=2, save_steps=1000)
    done, err = _piped_into_a_one_line_reader([sys.executable, "-m", "bleuberi_cli", *args], tmp_path)
    assert done.returncode == 0, err.decode()
    said = re.search(rb"the reader of stdout is gone: stopped at step (\d+) of 100; saved (\S+): continue", err)
    assert said, err.decode()[-1500:]
    assert int(said.group(1)) < 100 and Path(said.group(2).decode()).is_dir()
    assert b"Traceback" not in err


@pytest.mark.slow
def test_eval_with_its_reader_gone_stops_before_the_next_system(tmp_path, tiny_model, tiny_adapter) -> None:
    data = write_jsonl(tmp_path / "heldout.jsonl", demo_records(count=6))
    args = ["eval", "-i", str(data), "--model", str(tiny_model), "--adapter", str(tiny_adapter)]
    args += ["--max-new-tokens", "2", "--batch-size", "1", "--bootstrap-resamples", "10"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before the first batch
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        argv = [sys.executable, "-m", "bleuberi_cli", *args]
        done = subprocess.run(argv, stdout=write_end, stderr=subprocess.PIPE, env=env, timeout=600)
    finally:
        os.close(write_end)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "generating with base" in err and "generating with adapter0" not in err and "| base |" not in err


# --- finding 6: help and messages that agree with the tool --------------------------------------------


@pytest.mark.parametrize("command", ["select", "run", "split", "score", "env"])
def test_every_command_takes_help_all(runner, command) -> None:
    result = runner.invoke(app, [command, "--help-all"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"Usage: bleuberi {command} ")


def test_selects_output_help_promises_no_resume(runner) -> None:
    text = " ".join(runner.invoke(app, ["select", "--help"]).stdout.split())
    assert "-o, --output FILE" in text and "--resume" not in text


def documented_commands() -> list[tuple[str, str]]:
    """(command, flag) for every flag the README's recipe and the own-data walkthrough give a command."""
    pages = [(ROOT / "README.md").read_text(), (ROOT / "docs" / "own-data.md").read_text()]
    found = set()
    for text in pages:
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in re.split(r"\||\n(?!\s)", block.replace("\\\n", " ")):
                words = line.split()
                if len(words) > 1 and words[0] == "bleuberi":
                    found |= {(words[1], w.split("=")[0]) for w in words[2:] if w.startswith("-")}
    return sorted(found)


@pytest.mark.parametrize(("command", "flag"), documented_commands())
def test_every_flag_the_docs_use_is_in_the_short_help(runner, command, flag) -> None:
    text = runner.invoke(app, [command, "--help"]).stdout
    assert re.search(rf"(^|[ ,]){re.escape(flag)}[ ,/\n]", text, re.M), f"bleuberi {command} --help hides {flag}"


def test_the_train_help_shows_what_the_readme_recipe_sets(runner) -> None:
    text = runner.invoke(app, ["train", "--help"]).stdout
    for flag in ("--per-device-train-batch-size", "--max-prompt-length", "--save-steps"):
        assert flag in text


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["generate", "--temperature", "-1"], "--temperature must be >= 0"),
        (["eval", "--top-p", "2"], "--top-p must be in (0, 1]"),
        (["train", "-o", "x", "--max-completion-length", "0"], "--max-completion-length must be >= 1"),
        (["train", "-o", "x", "--temperature", "0"], "--temperature must be > 0 for training"),
        (["generate", "--max-prompt-length", "0"], "--max-prompt-length must be >= 1, got 0"),
    ],
)
def test_a_refused_value_names_its_flag(runner, argv, line) -> None:
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and result.stderr.startswith(f"bleuberi: error: {line}"), result.stderr


def test_select_says_when_n_is_more_than_the_pool(runner, tmp_path) -> None:
    scored = [{"id": f"r{i}", "prompt": "p", "references": ["r"], "completions": ["c"], "score": i} for i in range(5)]
    result = runner.invoke(app, ["select", "-i", str(write_jsonl(tmp_path / "s.jsonl", scored)), "-n", "500"])
    assert result.exit_code == 0 and len(read_jsonl_text(result.stdout)) == 5
    assert "note: -n 500 asks for more records than the pool's 5: all 5 are kept" in result.stderr


def test_generate_takes_records_without_references(runner, tmp_path, tiny_model) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "Name a planet."}])
    result = runner.invoke(app, ["generate", "-i", str(data), "--model", str(tiny_model), "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.stderr
    [record] = read_jsonl_text(result.stdout)
    assert record["id"] == "a" and len(record["completions"]) == 1 and record.get("references", []) == []


@pytest.mark.parametrize(
    ("line", "where"),
    [
        (b'{"id": "b", "prompt": "p",', "unexpected end of data, at the end of the line"),
        (b'{"id": "b", "prompt": "p" "references": []}', "at column 27"),
    ],
)
def test_a_malformed_line_is_placed_by_one_line_number(runner, tmp_path, line, where) -> None:
    good = {"id": "a", "prompt": "p", "references": ["r"], "completions": ["c"]}
    data = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    result = runner.invoke(app, ["score", "-i", str(data)])
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert message.startswith(f"bleuberi: error: {data}:2: not valid JSON (") and message.endswith(f"{where})")
    assert not re.search(r"line \d+ column|\(char \d+\)", message)  # the parser's own count of lines and characters


@pytest.mark.slow
def test_run_on_a_terminal_ends_with_its_tables_not_a_json_line(tmp_path, tiny_model) -> None:
    """A person reading a terminal gets the tables and where the report is; a pipe or file gets the record."""
    primary, secondary = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "bleuberi_cli", *run_args(tmp_path / "run", tiny_model), "-q"]
    try:
        done = subprocess.run(argv, stdout=secondary, stderr=subprocess.PIPE, cwd=tmp_path, env=env, timeout=900)
    finally:
        os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal's other end is closed: all read
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b'"run_dir"' not in shown and (tmp_path / "run" / "eval" / "report.json").is_file()
    piped = subprocess.run(argv, capture_output=True, cwd=tmp_path, env=env, timeout=900)  # a rerun: all up to date
    assert piped.returncode == 0 and read_jsonl_text(piped.stdout.decode())[0]["run_dir"] == str(tmp_path / "run")
