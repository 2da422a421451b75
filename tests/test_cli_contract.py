"""The contract every command keeps, checked the same way for each (csvkit-style): generate, score,
select, train, eval, eval --agreement and run.

- empty input: exit 0, nothing on stdout, a note on stderr;
- a bad line: exit 1 and one line on stderr naming file:line (and the field), no traceback;
- `--help`: exit 0, with an example;
- `-q`: nothing on stderr when all goes well;
- stdout closed by its reader: exit 0 (or a quiet SIGPIPE), nothing on stderr;
- `--help` imports no torch (the heavy stack loads only when a command runs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from bleuberi_cli.app import app
from tests.conftest import EXAMPLES, ROOT, demo_records, write_jsonl

SAMPLE = EXAMPLES / "sample.jsonl"
PAIRS = EXAMPLES / "pairs.jsonl"


def _lines(path: Path, count: int) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()[:count]]


@dataclass(frozen=True)
class Command:
    """How to run one command on an input file (`-i FILE`, or the data files of a `run` config)."""

    words: list[str]  # the command as typed after `bleuberi`
    extra: list[str]  # options it needs to run small ({model}: the tiny model, {out}: a fresh folder)
    valid: Callable[[], list[dict]]  # a small valid input
    bad_field: tuple[bytes, str]  # a bad line 2 and the field its error must name
    empty_note: str  # what stderr says about an empty input
    records_out: Callable[[int], int] = lambda n: n  # how many stdout records a valid input of n records gives
    empty_exit: int = 0  # a filter in a pipe has nothing to do (0); a stage that needs records stops (1)

    def argv(self, data: Path, model: Path, out: Path) -> list[str]:
        extra = [a.replace("{model}", str(model)).replace("{out}", str(out)) for a in self.extra]
        if self.words == ["run"]:
            return ["run", *extra, "--set", f"data.pool={data}", "--set", f"data.heldout={data}"]
        return [*self.words, "-i", str(data), *extra]


MISSING_REFERENCES = (b'{"id": "b", "prompt": "p", "completions": ["c"], "score": 0.1}', "references")
BAD_PROMPT = (b'{"id": "b", "prompt": 7}', "prompt")  # for the stages that need no references (split, generate)
SMALL_GENERATION = ["--model", "{model}", "--max-new-tokens", "2"]
SCORED = {"id": "a", "prompt": "p", "references": ["r"], "completions": ["c"], "score": 0.5}
RUN_SETTINGS = [
    "model={model}",
    "device=cpu",
    "select.num=2",
    "generate.max_new_tokens=4",
    "train.max_steps=1",
    "train.per_device_train_batch_size=4",
    "train.max_completion_length=4",
    "eval.max_new_tokens=4",
    "eval.bootstrap_resamples=20",
]

COMMANDS: dict[str, Command] = {
    "split": Command(
        ["split"],
        ["--pool", "{out}/pool.jsonl", "--heldout", "{out}/heldout.jsonl"],
        lambda: demo_records(count=3),
        BAD_PROMPT,
        "empty.jsonl: no records to split",
        lambda n: 0,  # the two parts go to their files
        empty_exit=1,
    ),
    "generate": Command(["generate"], SMALL_GENERATION, lambda: demo_records(count=2), BAD_PROMPT, "no records"),
    "score": Command(["score"], [], lambda: _lines(SAMPLE, 2), MISSING_REFERENCES, "scored 0 records"),
    "select": Command(
        ["select"],
        ["-n", "1"],
        lambda: [SCORED, {**SCORED, "id": "b", "score": 0.2}],
        MISSING_REFERENCES,
        "no records: nothing to select from",
        lambda n: 1,
    ),
    "train": Command(
        ["train"],
        ["-o", "{out}", "--model", "{model}", "--num-generations", "2", "--per-device-train-batch-size", "2"]
        + ["--max-steps", "2", "--max-completion-length", "4", "--save-steps", "10"],
        lambda: demo_records(count=2),
        MISSING_REFERENCES,
        "empty.jsonl: no records to train on",
        lambda n: 2,  # one metrics record per step
        empty_exit=1,
    ),
    "eval": Command(
        ["eval"],
        ["--model", "{model}", "--max-new-tokens", "2", "--bootstrap-resamples", "10"],
        lambda: demo_records(count=2),
        MISSING_REFERENCES,
        "empty.jsonl: no records to evaluate",
        lambda n: n,
        empty_exit=1,
    ),
    "eval --agreement": Command(
        ["eval", "--agreement"],
        ["--bootstrap-resamples", "10"],
        lambda: _lines(PAIRS, 3),
        (
            b'{"id": "z", "prompt": "p", "response_a": "a", "response_b": "b", "winner": "c", "references": ["r"]}',
            "winner",
        ),
        "empty.jsonl: no pairs to measure agreement on",
        lambda n: n,
        empty_exit=1,
    ),
    "run": Command(
        ["run"],
        ["-o", "{out}", *(x for setting in RUN_SETTINGS for x in ("--set", setting))],
        lambda: demo_records(count=4),
        MISSING_REFERENCES,
        "empty.jsonl) is empty: a run needs records in data.pool and data.heldout",
        lambda n: 1,  # the eval summary
        empty_exit=1,
    ),
}
NAMES = list(COMMANDS)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _bleuberi(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "bleuberi_cli", *argv]


# --- help --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_help_shows_usage_and_an_example(runner, name) -> None:
    command = COMMANDS[name]
    result = runner.invoke(app, [*command.words, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: bleuberi {command.words[0]}" in result.stdout
    examples = result.stdout.partition("Examples:")[2]
    assert f"bleuberi {' '.join(command.words)}" in examples, result.stdout


@pytest.mark.parametrize("name", ["", *NAMES])
def test_help_imports_no_torch(name) -> None:
    """`--help` answers at once: the ML stack (torch, transformers, peft) is imported only to do work."""
    words = COMMANDS[name].words if name else []
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from bleuberi_cli.app import app\n"
        f"result = CliRunner().invoke(app, {[*words, '--help']!r})\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'Usage: bleuberi' in result.stdout\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'safetensors') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- empty input and bad lines -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_empty_input_is_a_note_for_a_filter_and_an_error_for_a_stage_that_needs_it(runner, name, tiny_model, tmp_path):
    command = COMMANDS[name]
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    result = runner.invoke(app, command.argv(empty, tiny_model, tmp_path / "out"))
    assert result.exit_code == command.empty_exit, result.stderr
    assert result.stdout == ""
    assert command.empty_note in result.stderr and "nan" not in result.stderr
    if command.empty_exit:  # one line, the error alone
        assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if "error" in line]
        assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["field", "json", "array"])
def test_bad_line_exits_1_with_one_line_naming_file_line_and_field(runner, name, kind, tiny_model, tmp_path) -> None:
    command = COMMANDS[name]
    bad, field = {
        "field": command.bad_field,
        "json": (b"{oops", None),
        "array": (b"[1, 2]", None),
    }[kind]
    path = write_jsonl(tmp_path / "in.jsonl", [command.valid()[0], bad])
    argv = command.argv(path, tiny_model, tmp_path / "out")
    quiet = runner.invoke(app, [*argv, "-q"])
    assert quiet.exit_code == 1
    assert quiet.stdout == ""
    [line] = quiet.stderr.splitlines()  # errors show even with -q, and in one line
    assert line.startswith(f"bleuberi: error: {path}:2: ")
    if field:
        assert line.startswith(f"bleuberi: error: {path}:2: field '{field}': ")
    else:
        assert ("not valid JSON" if kind == "json" else "expected a JSON object") in line
    # without -q the same line ends stderr, after any progress messages, and no traceback
    loud = runner.invoke(app, argv)
    assert loud.exit_code == 1
    assert loud.stderr.splitlines()[-1] == line
    assert "Traceback" not in loud.stderr


# --- a real process: -q silence and a closed stdout ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_quiet_success_writes_nothing_on_stderr(name, tiny_model, tmp_path) -> None:
    command = COMMANDS[name]
    records = command.valid()
    data = write_jsonl(tmp_path / "in.jsonl", records)
    argv = [*command.argv(data, tiny_model, tmp_path / "out"), "-q"]
    done = subprocess.run(_bleuberi(argv), capture_output=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr.decode() == ""
    out = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert len(out) == command.records_out(len(records))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_closed_stdout_is_quiet(name, tiny_model, tmp_path) -> None:
    """The reader is gone before the command writes anything (as `| head -c 0`): every write fails."""
    command = COMMANDS[name]
    data = write_jsonl(tmp_path / "in.jsonl", command.valid())
    argv = command.argv(data, tiny_model, tmp_path / "out")  # not -q: whatever else it says is allowed
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader at all: the first write gets EPIPE, deterministically
    try:
        proc = subprocess.Popen(_bleuberi(argv), stdout=write_end, stderr=subprocess.PIPE, env=_env())
    finally:
        os.close(write_end)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, -signal.SIGPIPE), err.decode()
    for noise in ("Traceback", "Exception ignored", "BrokenPipe", "bleuberi: error"):
        assert noise not in err.decode()


def test_pipe_into_head_stops_quietly_mid_stream(tmp_path) -> None:
    """`bleuberi score big.jsonl | head -c 1`: the reader leaves while megabytes are still to come."""
    rows = _lines(SAMPLE, 20)
    big = write_jsonl(tmp_path / "big.jsonl", [dict(rows[i % 20], id=str(i)) for i in range(4000)])
    score = subprocess.Popen(
        _bleuberi(["score", "-i", str(big), "-j", "1"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    head = subprocess.Popen(["head", "-c", "1"], stdin=score.stdout, stdout=subprocess.PIPE)
    score.stdout.close()  # only `head` reads the pipe now
    first, _ = head.communicate(timeout=120)
    _, err = score.communicate(timeout=120)
    assert first == b"{"
    assert score.returncode in (0, -signal.SIGPIPE)
    assert b"Traceback" not in err and b"BrokenPipe" not in err and b"Exception ignored" not in err
